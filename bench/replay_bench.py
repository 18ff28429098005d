"""How fast ``pingpost replay`` decides: auctions per second on one core, no warehouse.

Builds N recorded auctions like the demo market's (config/demo.yaml's solar flow and five
buyers: random bids, exclusivity, answer times and post answers, seeded), then replays each
under its own configuration and under a candidate (``--override`` YAML, default a higher
exclusive minimum), as ``run_replay`` does, and prints the decision rate. Run on purpose:

    .venv/bin/python bench/replay_bench.py --auctions 200000

The figure to compare with the issue's goal (>= 10,000 auctions/s on one core) is
"auctions/s (both arms)": each auction decided twice, as a replay does.

With ``--warehouse URL`` the same auctions are written into a scratch database there (leads,
pings, posts, auctions, their flow version), then ``run_replay`` reads and replays them as
``pingpost replay`` does, end to end; the database is dropped afterwards:

    .venv/bin/python bench/replay_bench.py --auctions 500000 --warehouse http://127.0.0.1:8123
"""

from __future__ import annotations

import argparse
import random
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import yaml

from streams.rules.replay import PingRec, Recorded, Strategy, apply_overrides, replay
from streams.settings import flow_version, load_settings

REPO = Path(__file__).resolve().parents[1]
T0 = 1_780_000_000_000


def auctions(n: int, buyers: dict[str, str], seed: int, start: int = 0) -> list[Recorded]:
    """``n`` recorded auctions, the first numbered ``start`` (ids and times go on from it)."""
    rnd = random.Random(seed)
    out = []
    for i in range(start, start + n):
        opened = T0 + i * 20
        pings, posts = [], {}
        for b, tier in buyers.items():
            lat = rnd.lognormvariate(4.2, 0.6)
            if lat > 480:
                status, price = "timeout", None
            elif rnd.random() < 0.3:
                status, price = "no_bid", None
            else:
                status, price = "bid", round(rnd.lognormvariate(3.8, 0.35), 2)
            excl = status == "bid" and rnd.random() < 0.15
            pings.append(
                PingRec(
                    b, tier, status, price, excl, {}, opened + 2, opened + 2 + int(lat), lat, 498.0
                )
            )
            if status == "bid":
                posts[b] = "accepted" if rnd.random() < 0.85 else "rejected"
        fields = {
            "state": rnd.choice(["CA", "TX", "AZ"]),
            "zip": "902",
            "homeowner": True,
            "credit_range": rnd.choice(["700+", "650-699", "<600"]),
            "consent": True,
        }
        out.append(
            Recorded(
                f"lead-{i}",
                "solar",
                fields,
                opened - 500,
                opened,
                opened + 750,
                opened + 500,
                pings,
                posts,
                "unsold",
                [],
                0.0,
            )
        )
    return out


def _ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def write(client: Any, db: str, recs: list[Recorded], version: Any) -> None:
    """The auctions as the sink would have written them (every bidder posted: no model)."""
    from connectors.clickhouse import TABLE_COLUMNS

    def put(table: str, rows: list[list[Any]]) -> None:
        client.insert(table, rows, column_names=TABLE_COLUMNS[table], database=db)

    put("flow_versions", [[version.hash, "solar", version.config_json, _ts(T0)]])
    for i in range(0, len(recs), 50_000):
        part = recs[i : i + 50_000]
        leads, pings, posts, auctions = [], [], [], []
        for r in part:
            fields = {k: ("true" if v is True else str(v)) for k, v in r.ping_fields.items()}
            leads.append(
                [r.lead_id, "solar", "bench", _ts(r.opened_at_ms), _ts(r.created_at_ms), fields, {}]
            )
            for p in r.pings:
                pid = f"{r.lead_id}:{p.buyer_id}"
                pings.append(
                    [
                        pid,
                        r.lead_id,
                        "solar",
                        p.buyer_id,
                        p.tier,
                        _ts(p.sent_at_ms),
                        _ts(p.answered_at_ms),
                        p.latency_ms,
                        p.status,
                        p.price,
                        p.exclusive,
                        "",
                        None,
                        "",
                        0,
                        p.timeout_ms,
                    ]
                )
                if p.buyer_id in r.posts:
                    posts.append(
                        [
                            f"{pid}:1",
                            pid,
                            r.lead_id,
                            "solar",
                            p.buyer_id,
                            p.tier,
                            pid,
                            p.price,
                            p.exclusive,
                            r.posts[p.buyer_id],
                            50.0,
                            "",
                            200,
                            _ts(r.closed_at_ms),
                            1,
                        ]
                    )
            auctions.append(
                [
                    r.lead_id,
                    "solar",
                    "bench",
                    r.outcome,
                    list(r.winners),
                    [],
                    r.price_total,
                    "",
                    _ts(r.opened_at_ms),
                    _ts(r.opened_at_ms),
                    _ts(r.deadline_at_ms),
                    _ts(r.closed_at_ms),
                    _ts(r.closed_at_ms),
                    500.0,
                    "deadline",
                    0.0,
                    len(r.pings),
                    0,
                    0,
                    version.hash,
                    "",
                ]
            )
        put("leads", leads)
        put("pings", pings)
        put("posts", posts)
        put("auctions", auctions)
        print(f"  written {i + len(part):,} of {len(recs):,} auctions", flush=True)


def end_to_end(url: str, recs: list[Recorded], settings: Any, overrides: Any) -> None:
    import asyncio

    import clickhouse_connect

    from connectors.clickhouse import connect, migrate
    from streams.settings import ClickHouseConfig
    from streams.tools.replay import run_replay

    db = f"replay_bench_{uuid.uuid4().hex[:8]}"

    async def prepare() -> None:
        wh = await connect(ClickHouseConfig(url=url, database=db))
        await migrate(wh)
        await wh.close()

    asyncio.run(prepare())
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    client = clickhouse_connect.get_client(host=host, port=int(port))
    try:
        t = time.perf_counter()
        write(client, db, recs, flow_version(settings, "solar"))
        print(f"written in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        last = [0.0]

        def progress(done: int, total: int) -> None:
            if time.perf_counter() - last[0] > 10:
                last[0] = time.perf_counter()
                print(f"  replayed {done:,} of {total:,}", flush=True)

        result = run_replay(client, db, settings, overrides, progress=progress, resamples=400)
        wall = time.perf_counter() - t
        n = result.baseline.auctions
        print(
            f"end to end: {n:,} auctions read and replayed twice in {wall:.1f} s "
            f"({n / wall:,.0f} auctions/s; deciding {result.decide_seconds:.1f} s); "
            f"reproduced {result.reproduced:,} of {result.exact:,} decided from records alone"
        )
        print(
            f"a day at the demo's 50 leads/s (4.32 M auctions): ~{4.32e6 / (n / wall) / 60:.0f} min"
        )
    finally:
        client.command(f"DROP DATABASE IF EXISTS {db}")
        client.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--auctions", type=int, default=100_000)
    ap.add_argument("--override", help="YAML of flow keys (default: floors.exclusive_min 90)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--warehouse", metavar="URL", help="also run end to end against it")
    args = ap.parse_args()
    settings = load_settings(REPO / "config" / "demo.yaml")
    doc = orjson.loads(flow_version(settings, "solar").config_json)
    overrides = (
        yaml.safe_load(Path(args.override).read_text())
        if args.override
        else {"floors": {"exclusive_min": 90.0}}
    )
    base, cand = Strategy.from_doc(doc), Strategy.from_doc(apply_overrides(doc, overrides))
    buyers = {b.id: b.tier for b in settings.buyers if "solar" in b.flows}
    recs = auctions(args.auctions, buyers, args.seed)
    rates = dict.fromkeys(buyers, 0.8)
    t = time.process_time()
    for r in recs:
        replay(r, base, rates)
        replay(r, cand, rates)
    cpu = time.process_time() - t
    print(f"auctions: {len(recs):,}, pings each: {len(buyers)}")
    print(
        f"CPU: {cpu:.2f} s -> {len(recs) / cpu:,.0f} auctions/s (both arms), "
        f"{2 * len(recs) / cpu:,.0f} decisions/s"
    )
    print(
        f"a day at the demo's 50 leads/s (4.32 M auctions): {4.32e6 / (len(recs) / cpu) / 60:.1f} min of deciding"
    )
    if args.warehouse:
        # The recorded outcome of each auction: its decision under its own configuration.
        recs = [
            replace(r, outcome=o.outcome, winners=sorted(o.winners), price_total=o.revenue)
            for r in recs
            for o in [replay(r, base, rates)]
        ]
        end_to_end(args.warehouse, recs, settings, overrides)


if __name__ == "__main__":
    main()
