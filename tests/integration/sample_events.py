"""A few events of every kind in a fresh, migrated database: the fixture data of the tests
that check analyst queries (the Grafana dashboard, the HTML report) against the real warehouse.

Two leads (l1 sold exclusively to sunrise at $60, l2 unsold), four pings (one filtered), one
accepted post, three alert state changes; one ping and one auction are inserted twice, as a
redelivery would, so a query without FINAL counts them twice.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from connectors.clickhouse import ClickHouseClient, connect, migrate
from streams.settings import ClickHouseConfig

T0 = datetime(2025, 6, 1, 12, 0, 0)


async def seeded(url: str) -> ClickHouseClient:
    """A fresh database with the migrated schema and a few events (one of them twice)."""
    wh = await connect(ClickHouseConfig(url=url, database=f"grafana_{uuid.uuid4().hex[:8]}"))
    await migrate(wh)
    t = T0
    await wh.insert(
        "leads",
        [
            ["l1", "solar", "http", t, t, {"state": "CA"}, {}],
            ["l2", "solar", "http", t + timedelta(minutes=2), t, {"state": "TX"}, {}],
        ],
    )
    pings = [
        ["p1", "l1", "solar", "sunrise", "premium", t, t, 80.0, "bid", 60.0, True, "", 200],
        [
            "p2",
            "l1",
            "solar",
            "greenleaf",
            "standard",
            t,
            t,
            700.0,
            "timeout",
            None,
            False,
            "deadline",
            None,
        ],
        ["p3", "l2", "solar", "sunrise", "premium", t, t, 90.0, "no_bid", None, False, "", 204],
        [
            "p4",
            "l2",
            "solar",
            "greenleaf",
            "standard",
            t,
            t,
            0.0,
            "filtered",
            None,
            False,
            "state",
            None,
        ],
    ]
    # conditions, wave, timeout_ms (migration 3): the time a sent ping was given
    for row in pings:
        row += ["", 0, None if row[8] == "filtered" else 500.0]
    await wh.insert("pings", pings + pings[:1])
    auctions = [
        [
            "l1",
            "solar",
            "http",
            "sold_exclusive",
            ["sunrise"],
            [60.0],
            60.0,
            "",
            t,
            t,
            t + timedelta(milliseconds=750),
            t,
            t,
            700.0,
            "deadline",
            10.0,
            2,
            1,
            1,
        ],
        [
            "l2",
            "solar",
            "http",
            "unsold",
            [],
            [],
            0.0,
            "no bids",
            t + timedelta(minutes=2),
            t,
            t,
            t,
            t,
            100.0,
            "all answered",
            5.0,
            1,
            0,
            0,
        ],
    ]
    for row in auctions:
        row += ["c4b194fe509cc17e", ""]  # config_hash, variant (migration 3)
    await wh.insert("auctions", auctions + auctions[:1])
    await wh.insert(
        "posts",
        [
            [
                "a1",
                "post1",
                "l1",
                "solar",
                "sunrise",
                "premium",
                "p1",
                60.0,
                True,
                "accepted",
                30.0,
                "",
                200,
                t,
                1,
            ]
        ],
    )
    await wh.insert(
        "alerts",
        [
            ["sold_rate_low", "solar", "firing", 0.3, t, "sold 30%"],
            ["sold_rate_low", "solar", "resolved", 0.6, t + timedelta(minutes=1), ""],
            ["buyer_timeouts", "greenleaf", "firing", 0.5, t + timedelta(minutes=2), ""],
        ],
    )
    return wh
