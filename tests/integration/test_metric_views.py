"""The metric tables flow_minute and buyer_minute on the real embedded warehouse.

A realistic set of raw events (several minutes, flows and buyers; pings of every status,
posts accepted/rejected/failed, auctions sold and unsold) goes in through the project's own
``ClickHouseClient.insert``; each metric of each table is checked against a computation in plain
Python from the rows inserted. Then part of the events is inserted again in other batches
(what the at-least-once sink does after a crash) and every metric must be unchanged.

The refreshes are triggered and awaited explicitly (``SYSTEM REFRESH VIEW`` then
``SYSTEM WAIT VIEW``): no sleeps.
"""

from __future__ import annotations

import math
import random
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import SecretStr

from connectors.clickhouse import MIGRATIONS, TABLE_COLUMNS, ClickHouseClient, connect, migrate
from streams.settings import ClickHouseConfig

pytestmark = pytest.mark.integration

REFRESHABLE_VIEWS = [
    "flow_minute_mv_recent",
    "flow_minute_mv_daily",
    "buyer_minute_mv_recent",
    "buyer_minute_mv_daily",
]
FLOWS = ["solar", "roofing"]
BUYERS = {
    "sunrise": "premium",
    "greenleaf": "standard",
    "voltco": "standard",
    "brightpath": "budget",
}
STATES = ["CA", "TX", "AZ", "NY"]
CREDIT = ["<600", "600-649", "650-699", "700+"]
PING_STATUSES = ["bid", "bid", "bid", "no_bid", "no_bid", "timeout", "error", "filtered"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
async def wh(warehouse_url: str) -> AsyncIterator[ClickHouseClient]:
    """A migrated database of its own on the session warehouse."""
    name = f"m_{uuid.uuid4().hex[:10]}"
    cfg = ClickHouseConfig(url=warehouse_url, database=name, password=SecretStr(""))
    warehouse = await connect(cfg)
    try:
        assert await migrate(warehouse) == [v for v, _, _ in MIGRATIONS]
        await wait_views(warehouse)  # the refresh each view starts when created
        yield warehouse
    finally:
        await warehouse.command(f"DROP DATABASE IF EXISTS {name}")
        await warehouse.close()


async def wait_views(wh: ClickHouseClient) -> None:
    for view in REFRESHABLE_VIEWS:
        await wh.command(f"SYSTEM WAIT VIEW {wh.database}.{view}")


async def refresh(wh: ClickHouseClient, views: Iterable[str] = REFRESHABLE_VIEWS) -> None:
    for view in views:
        await wh.command(f"SYSTEM REFRESH VIEW {wh.database}.{view}")
        await wh.command(f"SYSTEM WAIT VIEW {wh.database}.{view}")


# --------------------------------------------------------------------------- raw events


@dataclass
class Events:
    """Raw rows by table, as dicts keyed by column (the sink's column order is applied at
    insert)."""

    leads: list[dict[str, Any]] = field(default_factory=list)
    pings: list[dict[str, Any]] = field(default_factory=list)
    posts: list[dict[str, Any]] = field(default_factory=list)
    auctions: list[dict[str, Any]] = field(default_factory=list)

    def tables(self) -> dict[str, list[dict[str, Any]]]:
        return {
            "leads": self.leads,
            "pings": self.pings,
            "posts": self.posts,
            "auctions": self.auctions,
        }


def make_events(start: datetime, minutes: int, leads_per_minute: int, seed: int) -> Events:
    """Leads spread over ``minutes`` minutes from ``start``; every buyer pinged; the best
    bids posted in order until one accepts (exclusive) or up to two accept (shared)."""
    rng = random.Random(seed)
    ev = Events()
    n = 0
    for m in range(minutes):
        for _ in range(leads_per_minute):
            n += 1
            lead_id = f"lead-{seed}-{n}"
            flow = rng.choice(FLOWS)
            # Some leads arrive in a minute's last second: their pings, auction close and
            # posts then fall in different minutes.
            offset_ms = rng.choice([rng.randrange(0, 58_000), rng.randrange(59_000, 60_000)])
            received = start + timedelta(minutes=m, milliseconds=offset_ms)
            ev.leads.append(
                {
                    "lead_id": lead_id,
                    "flow": flow,
                    "source": rng.choice(["website", "kafka"]),
                    "received_at": received,
                    "created_at": received - timedelta(seconds=2),
                    "ping_fields": {
                        "state": rng.choice(STATES),
                        "zip": f"{rng.randrange(900, 999)}",
                        "credit_range": rng.choice(CREDIT),
                    },
                    "pii_hashes": {"email": uuid.uuid4().hex},
                }
            )
            sent = received + timedelta(milliseconds=30)
            bids = []
            for buyer, tier in BUYERS.items():
                status = rng.choice(PING_STATUSES)
                latency = {"filtered": 0.0, "timeout": 500.0}.get(
                    status, round(rng.uniform(15, 480), 3)
                )
                price = round(rng.uniform(20, 120), 2) if status == "bid" else None
                ping = {
                    "ping_id": f"{lead_id}:{buyer}",
                    "lead_id": lead_id,
                    "flow": flow,
                    "buyer_id": buyer,
                    "tier": tier,
                    "sent_at": sent,
                    "answered_at": sent + timedelta(milliseconds=latency),
                    "latency_ms": latency,
                    "status": status,
                    "price": price,
                    "exclusive": status == "bid" and rng.random() < 0.3,
                    "reason": {
                        "filtered": "state not in filter",
                        "timeout": "no answer in 500 ms",
                        "error": "HTTP 500",
                    }.get(status, ""),
                    "http_status": {"bid": 200, "no_bid": 204, "error": 500}.get(status),
                    "conditions": "",
                    "wave": 0,
                    "timeout_ms": None if status == "filtered" else 500.0,
                }
                ev.pings.append(ping)
                if status == "bid":
                    bids.append(ping)
            closed = sent + timedelta(milliseconds=750)
            bids.sort(key=lambda p: -p["price"])
            exclusive = bool(bids) and bids[0]["exclusive"]
            wanted = 1 if exclusive else 2
            winners: list[dict[str, Any]] = []
            attempt = 0
            for bid in bids:
                if len(winners) == wanted:
                    break
                attempt += 1
                status = rng.choice(["accepted", "accepted", "rejected", "error", "timeout"])
                post = {
                    "attempt_id": f"{bid['ping_id']}:post:1",
                    "post_id": f"{bid['ping_id']}:post",
                    "lead_id": lead_id,
                    "flow": flow,
                    "buyer_id": bid["buyer_id"],
                    "tier": bid["tier"],
                    "ping_id": bid["ping_id"],
                    "price": bid["price"],
                    "exclusive": exclusive,
                    "status": status,
                    "latency_ms": round(rng.uniform(20, 900), 3),
                    "reason": {"rejected": "duplicate lead"}.get(status, ""),
                    "http_status": {"accepted": 200, "rejected": 200, "error": 502}.get(status),
                    "sent_at": closed + timedelta(milliseconds=5 + 300 * attempt),
                    "attempt": attempt,
                }
                ev.posts.append(post)
                if status == "accepted":
                    winners.append(post)
            if winners:
                outcome = "sold_exclusive" if exclusive else "sold_shared"
                reason = ""
            else:
                outcome = "unsold"
                reason = "every post failed or was rejected" if bids else "no bids"
            settled = closed + timedelta(milliseconds=10 + 300 * attempt)
            ev.auctions.append(
                {
                    "lead_id": lead_id,
                    "flow": flow,
                    "source": ev.leads[-1]["source"],
                    "outcome": outcome,
                    "winners": [w["buyer_id"] for w in winners],
                    "prices": [w["price"] for w in winners],
                    "price_total": round(sum(w["price"] for w in winners), 2),
                    "reason": reason,
                    "received_at": received,
                    "opened_at": sent,
                    "deadline_at": sent + timedelta(milliseconds=750),
                    "closed_at": closed,
                    "settled_at": settled,
                    "duration_ms": 750.0,
                    "close_reason": "deadline",
                    "close_lag_ms": 3.0,
                    "pinged": len(BUYERS),
                    "bids": len(bids),
                    "post_attempts": attempt,
                    "config_hash": "c4b194fe509cc17e",
                    "variant": "",
                }
            )
    return ev


async def insert(wh: ClickHouseClient, table: str, rows: list[dict[str, Any]]) -> None:
    await wh.insert(table, [[r[c] for c in TABLE_COLUMNS[table]] for r in rows])


# --------------------------------------------------------------------------- expected metrics


def minute(ts: datetime) -> datetime:
    return ts.replace(second=0, microsecond=0)


def ratio(num: float, den: float) -> float | None:
    return None if den == 0 else num / den


def nearest_rank(values: list[float], q: float) -> float | None:
    """The value at 0-based rank floor(q·n) of the sorted values (ClickHouse's
    quantileExact: the higher middle for an even count)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def expected_flow_minute(ev: Events) -> dict[tuple[str, datetime], dict[str, Any]]:
    posted_pings = {p["ping_id"] for p in ev.posts}
    acc: dict[tuple[str, datetime], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for p in ev.pings:
        a = acc[(p["flow"], minute(p["sent_at"]))]
        s = p["status"]
        if s == "filtered":
            a["pings_filtered"] += 1
            continue
        a["pings_sent"] += 1
        a["responses"] += s in ("bid", "no_bid")
        a["bids"] += s == "bid"
        a["no_bids"] += s == "no_bid"
        a["timeouts"] += s == "timeout"
        a["errors"] += s == "error"
        a["bid_sum"] += p["price"] if s == "bid" else 0.0
        a["pings_posted"] += p["ping_id"] in posted_pings
    for p in ev.posts:
        a = acc[(p["flow"], minute(p["sent_at"]))]
        a["posts"] += 1
        a["posts_accepted"] += p["status"] == "accepted"
    for x in ev.auctions:
        a = acc[(x["flow"], minute(x["closed_at"]))]
        a["leads"] += 1
        a["leads_sold"] += x["outcome"] != "unsold"
        a["revenue"] += x["price_total"]
    out = {}
    for key, a in acc.items():
        row: dict[str, Any] = {
            c: a.get(c, 0.0)
            for c in (
                "pings_sent",
                "pings_filtered",
                "responses",
                "bids",
                "no_bids",
                "timeouts",
                "errors",
                "bid_sum",
                "pings_posted",
                "posts",
                "posts_accepted",
                "leads",
                "leads_sold",
                "revenue",
            )
        }
        row.update(
            response_rate=ratio(row["responses"], row["pings_sent"]),
            bid_rate=ratio(row["bids"], row["pings_sent"]),
            avg_bid=ratio(row["bid_sum"], row["bids"]),
            win_rate=ratio(row["pings_posted"], row["pings_sent"]),
            accept_rate=ratio(row["posts_accepted"], row["posts"]),
            revenue_per_ping=ratio(row["revenue"], row["pings_sent"]),
            revenue_per_lead=ratio(row["revenue"], row["leads"]),
        )
        out[key] = row
    return out


def expected_buyer_minute(ev: Events) -> dict[tuple[str, datetime], dict[str, Any]]:
    acc: dict[tuple[str, datetime], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    latencies: dict[tuple[str, datetime], list[float]] = defaultdict(list)
    for p in ev.pings:
        key = (p["buyer_id"], minute(p["sent_at"]))
        a = acc[key]
        s = p["status"]
        if s == "filtered":
            a["pings_filtered"] += 1
            continue
        latencies[key].append(p["latency_ms"])
        a["pings_sent"] += 1
        a["bids"] += s == "bid"
        a["no_bids"] += s == "no_bid"
        a["timeouts"] += s == "timeout"
        a["errors"] += s == "error"
        a["bid_sum"] += p["price"] if s == "bid" else 0.0
    for p in ev.posts:
        a = acc[(p["buyer_id"], minute(p["sent_at"]))]
        a["posts"] += 1
        a["posts_accepted"] += p["status"] == "accepted"
        a["posts_rejected"] += p["status"] == "rejected"
        a["posts_failed"] += p["status"] in ("error", "timeout")
        a["spend"] += p["price"] if p["status"] == "accepted" else 0.0
    out = {}
    for key, a in acc.items():
        row: dict[str, Any] = {
            c: a.get(c, 0.0)
            for c in (
                "pings_sent",
                "pings_filtered",
                "bids",
                "no_bids",
                "timeouts",
                "errors",
                "bid_sum",
                "posts",
                "posts_accepted",
                "posts_rejected",
                "posts_failed",
                "spend",
            )
        }
        row.update(
            latency_p50=nearest_rank(latencies[key], 0.5),
            latency_p95=nearest_rank(latencies[key], 0.95),
            latency_p99=nearest_rank(latencies[key], 0.99),
            bid_rate=ratio(row["bids"], row["pings_sent"]),
            avg_bid=ratio(row["bid_sum"], row["bids"]),
            timeout_rate=ratio(row["timeouts"], row["pings_sent"]),
            error_rate=ratio(row["errors"], row["pings_sent"]),
            accept_rate=ratio(row["posts_accepted"], row["posts"]),
        )
        out[key] = row
    return out


async def stored(
    wh: ClickHouseClient, table: str, key: str, columns: Iterable[str]
) -> dict[tuple[str, datetime], dict[str, Any]]:
    cols = list(columns)
    rows = await wh.query_rows(
        f"SELECT {key}, minute, {', '.join(cols)} FROM {wh.database}.{table} FINAL"
    )
    out: dict[tuple[str, datetime], dict[str, Any]] = {}
    for r in rows:
        k = (r[0], r[1].replace(tzinfo=UTC) if r[1].tzinfo is None else r[1])
        assert k not in out, f"{table}: two rows for {k} even with FINAL"
        out[k] = dict(zip(cols, r[2:], strict=True))
    return out


def assert_metrics_equal(
    table: str, got: dict[Any, dict[str, Any]], want: dict[Any, dict[str, Any]]
) -> None:
    assert sorted(got) == sorted(want), (
        f"{table}: rows only stored {sorted(set(got) - set(want))},"
        f" only expected {sorted(set(want) - set(got))}"
    )
    problems = []
    for key, expected in want.items():
        for column, value in expected.items():
            actual = got[key][column]
            if value is None or actual is None:
                same = value is None and actual is None
            else:
                same = math.isclose(actual, value, rel_tol=1e-9, abs_tol=1e-9)
            if not same:
                problems.append(f"{key[0]} {key[1]:%H:%M} {column}: got {actual}, want {value}")
    assert not problems, f"{table}:\n" + "\n".join(problems[:40])


FLOW_COLUMNS = [
    "pings_sent",
    "pings_filtered",
    "responses",
    "bids",
    "no_bids",
    "timeouts",
    "errors",
    "bid_sum",
    "pings_posted",
    "posts",
    "posts_accepted",
    "leads",
    "leads_sold",
    "revenue",
    "response_rate",
    "bid_rate",
    "avg_bid",
    "win_rate",
    "accept_rate",
    "revenue_per_ping",
    "revenue_per_lead",
]
BUYER_COLUMNS = [
    "pings_sent",
    "pings_filtered",
    "bids",
    "no_bids",
    "timeouts",
    "errors",
    "bid_sum",
    "latency_p50",
    "latency_p95",
    "latency_p99",
    "posts",
    "posts_accepted",
    "posts_rejected",
    "posts_failed",
    "spend",
    "bid_rate",
    "avg_bid",
    "timeout_rate",
    "error_rate",
    "accept_rate",
]


async def check_views(wh: ClickHouseClient, ev: Events) -> None:
    assert_metrics_equal(
        "flow_minute",
        await stored(wh, "flow_minute", "flow", FLOW_COLUMNS),
        expected_flow_minute(ev),
    )
    assert_metrics_equal(
        "buyer_minute",
        await stored(wh, "buyer_minute", "buyer_id", BUYER_COLUMNS),
        expected_buyer_minute(ev),
    )


def regroup(
    rows: list[dict[str, Any]], rng: random.Random, pick: Callable[[int], bool], size: int
) -> list[list[dict[str, Any]]]:
    """Some rows again, shuffled into batches of another size than the first delivery."""
    again = [r for i, r in enumerate(rows) if pick(i)]
    rng.shuffle(again)
    return [again[i : i + size] for i in range(0, len(again), size)]


# --------------------------------------------------------------------------- tests


async def test_metric_views_match_raw_events_and_ignore_redelivery(wh: ClickHouseClient) -> None:
    now = datetime.now(UTC)
    recent = make_events(minute(now) - timedelta(minutes=6), minutes=5, leads_per_minute=14, seed=1)
    # Events of a minute 5 h ago reached ClickHouse late (a warehouse outage): outside the
    # every-minute refresh's 3 h window, counted by the daily refresh over 35 days.
    late = make_events(minute(now) - timedelta(hours=5), minutes=1, leads_per_minute=6, seed=2)
    ev = Events(
        *(a + b for a, b in zip(recent.tables().values(), late.tables().values(), strict=True))
    )
    statuses = {p["status"] for p in ev.pings}
    assert statuses == {"bid", "no_bid", "timeout", "error", "filtered"}
    assert {p["status"] for p in ev.posts} >= {"accepted", "rejected", "error", "timeout"}
    assert {a["outcome"] for a in ev.auctions} == {"sold_exclusive", "sold_shared", "unsold"}

    db = wh.database
    for table in ev.tables():  # duplicates stay in the parts: only FINAL can remove them
        await wh.command(f"SYSTEM STOP MERGES {db}.{table}")
    for table, rows in ev.tables().items():  # the sink's batches: ~25 rows, in order
        for i in range(0, len(rows), 25):
            await insert(wh, table, rows[i : i + 25])
    await refresh(wh)
    await check_views(wh, ev)

    # Redelivery: two thirds of every table again, shuffled into batches of 9, plus the
    # whole late minute once more.
    rng = random.Random(3)
    for table, rows in ev.tables().items():
        for batch in regroup(rows, rng, lambda i: i % 3 != 0, 9):
            await insert(wh, table, batch)
        await insert(wh, table, late.tables()[table])
    for table, rows in ev.tables().items():
        ((raw,),) = await wh.query_rows(f"SELECT count() FROM {db}.{table}")
        ((final,),) = await wh.query_rows(f"SELECT count() FROM {db}.{table} FINAL")
        assert raw > final == len(rows), table  # the duplicates are really there
    await refresh(wh)
    await check_views(wh, ev)
    ((n_flow,),) = await wh.query_rows(f"SELECT count() FROM {db}.flow_minute FINAL")
    assert n_flow == len(expected_flow_minute(ev))


async def test_recent_refresh_leaves_minutes_older_than_its_window(wh: ClickHouseClient) -> None:
    now = datetime.now(UTC)
    ev = make_events(minute(now) - timedelta(hours=5), minutes=1, leads_per_minute=4, seed=4)
    ev.pings += make_events(
        minute(now) - timedelta(minutes=3), minutes=1, leads_per_minute=4, seed=5
    ).pings
    await insert(wh, "pings", ev.pings)
    await refresh(wh, ["flow_minute_mv_recent"])
    old = minute(now) - timedelta(hours=5)
    minutes = {m for _, m in await stored(wh, "flow_minute", "flow", ["pings_sent"])}
    assert minute(now) - timedelta(minutes=3) in minutes and old not in minutes
    await refresh(wh, ["flow_minute_mv_daily"])
    minutes = {m for _, m in await stored(wh, "flow_minute", "flow", ["pings_sent"])}
    assert minute(now) - timedelta(minutes=3) in minutes and old in minutes


async def test_resent_ping_with_other_outcome_counts_once_in_its_last_version(
    wh: ClickHouseClient,
) -> None:
    """A crash between a ping and its ack re-sends the ping: same ping_id, maybe another
    status and minute. FINAL keeps the version inserted last; the metrics follow it."""
    now = datetime.now(UTC)
    ev = make_events(minute(now) - timedelta(minutes=4), minutes=2, leads_per_minute=5, seed=6)
    for table, rows in ev.tables().items():
        await insert(wh, table, rows)
    first = next(p for p in ev.pings if p["status"] == "timeout")
    again = {
        **first,
        "status": "bid",
        "price": 77.5,
        "latency_ms": 40.0,
        "sent_at": first["sent_at"] + timedelta(minutes=1),
        "reason": "",
        "answered_at": first["sent_at"] + timedelta(minutes=1, milliseconds=40),
        "http_status": 200,
    }
    await insert(wh, "pings", [again])
    ev.pings = [again if p is first else p for p in ev.pings]
    await refresh(wh)
    assert_metrics_equal(
        "buyer_minute",
        await stored(wh, "buyer_minute", "buyer_id", BUYER_COLUMNS),
        expected_buyer_minute(ev),
    )
    assert_metrics_equal(
        "flow_minute",
        await stored(wh, "flow_minute", "flow", FLOW_COLUMNS),
        expected_flow_minute(ev),
    )


async def test_migrate_is_rerunnable(wh: ClickHouseClient) -> None:
    assert await migrate(wh) == []
    # Even with its bookkeeping lost, every statement is idempotent (IF NOT EXISTS).
    await wh.command(f"TRUNCATE TABLE {wh.database}.schema_migrations")
    assert await migrate(wh) == [v for v, _, _ in MIGRATIONS]
    views = await wh.query_rows(
        "SELECT view FROM system.view_refreshes WHERE database = {db:String}", db=wh.database
    )
    assert set(REFRESHABLE_VIEWS) <= {v for (v,) in views}
