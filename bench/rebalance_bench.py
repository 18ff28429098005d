"""Auction latency while the consumer group rebalances (FIELD-NOTES: measure it, not only
steady state).

Needs the local stack: `pingpost up --workers 2`. Pushes leads at a steady rate for 30 s; at
10 s a third auction worker joins (rebalance), at 20 s it is stopped with SIGTERM (rebalance
again). Prints close lag and queueing (receipt → ping round) per second from the warehouse.

    .venv/bin/python bench/rebalance_bench.py [--rate 40] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import clickhouse_connect

from streams.settings import load_settings
from streams.tools.demo import generate_leads, push_leads
from streams.tools.stack import Stack


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="config/demo.yaml")
    ap.add_argument("--rate", type=float, default=40.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    args = ap.parse_args()
    s = load_settings(args.config)
    stack = Stack(
        s,
        Path(args.config).resolve(),
        Path(".run").resolve(),
        say=lambda m: None,
        kafka_port=int(s.kafka.bootstrap.rsplit(":", 1)[1]),
    )
    if not stack.running("worker"):
        raise SystemExit("start the stack first: pingpost up --workers 2")
    n = int(args.rate * args.seconds)
    leads = generate_leads(n, seed=int(time.time()))
    token = s.ingest.producers[0].token.get_secret_value()
    url = f"http://{s.ingest.host}:{s.ingest.port}/v1/leads"

    async def run() -> list[str]:
        async def churn() -> None:
            await asyncio.sleep(args.seconds / 3)
            print(f"t={args.seconds / 3:.0f}s: a third worker joins")
            stack.spawn("worker-bench", ["worker", "--role", "auction"])
            await asyncio.sleep(args.seconds / 3)
            print(f"t={2 * args.seconds / 3:.0f}s: it leaves (SIGTERM)")
            await asyncio.to_thread(stack.stop, "worker-bench")

        t = asyncio.create_task(churn())
        pushed = await push_leads(url, token, leads, rate=args.rate, ramp_s=0.0)
        await t
        return pushed.lead_ids

    ids = asyncio.run(run())
    ch = clickhouse_connect.get_client(
        host="127.0.0.1", port=int(s.clickhouse.url.rsplit(":", 1)[1])
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = ch.query(
            f"SELECT count() FROM {s.clickhouse.database}.auctions FINAL WHERE lead_id IN %(ids)s",
            parameters={"ids": ids},
        ).result_rows[0][0]
        if done == len(ids):
            break
        time.sleep(1)
    rows = ch.query(
        f"SELECT toUnixTimestamp64Milli(received_at), close_lag_ms, "
        f"toUnixTimestamp64Milli(opened_at) - toUnixTimestamp64Milli(received_at) "
        f"FROM {s.clickhouse.database}.auctions FINAL WHERE lead_id IN %(ids)s",
        parameters={"ids": ids},
    ).result_rows
    t0 = min(r[0] for r in rows)
    print(f"{len(rows)} of {len(ids)} leads settled")
    print(" s  leads  close-lag p50/max ms  queue p50/max ms")
    for sec in range(int(args.seconds) + 1):
        xs = [r for r in rows if sec * 1000 <= r[0] - t0 < (sec + 1) * 1000]
        if xs:
            print(
                f"{sec:2d}  {len(xs):5d}  {statistics.median(r[1] for r in xs):8.0f} "
                f"{max(r[1] for r in xs):6.0f}  {statistics.median(r[2] for r in xs):9.0f} "
                f"{max(r[2] for r in xs):6.0f}"
            )
    lags = sorted(r[1] for r in rows)
    queue = sorted(r[2] for r in rows)
    print(
        f"overall close lag p50 {lags[len(lags) // 2]:.0f} ms, p99 "
        f"{lags[int(len(lags) * 0.99)]:.0f} ms; queue p99 {queue[int(len(queue) * 0.99)]:.0f} ms"
    )


if __name__ == "__main__":
    main()
