"""Ping fan-out throughput: BuyerClient + AiohttpTransport against N local buyer servers.

    .venv/bin/python bench/buyer_fanout_bench.py [--buyers 4] [--seconds 5] [--concurrency 10 100]

The buyers run in a child process (so client and servers don't share a core); the client
keeps C pings in flight, round-robin over the buyers, and reports req/s and p50/p99 latency
as BuyerClient measures it (loop clock around the request).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import subprocess
import sys
import time

try:
    import uvloop
except ImportError:  # pragma: no cover - optional
    uvloop = None  # type: ignore[assignment]

from aiohttp import web

ANSWER = b'{"bid": true, "price": 45.0, "exclusive": false, "buyer_id": "bench"}'


async def serve(n: int) -> None:
    async def ping(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=ANSWER, content_type="application/json")

    app = web.Application()
    app.router.add_post("/ping", ping)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ports = []
    for _ in range(n):
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        ports.append(runner.addresses[-1][1])
    print(" ".join(map(str, ports)), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until parent exits
    await runner.cleanup()


async def fan_out(ports: list[int], concurrency: int, seconds: float) -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from connectors.buyers import AiohttpTransport, BuyerClient
    from streams.settings import BuyerConfig

    buyers = [
        BuyerConfig.model_validate(
            {
                "id": f"b{i}",
                "flows": ["solar"],
                "ping_url": f"http://127.0.0.1:{p}/ping",
                "post_url": f"http://127.0.0.1:{p}/post",
                "headers": {"X-Api-Key": "bench-key"},
            }
        )
        for i, p in enumerate(ports)
    ]
    body = {
        "ping_id": "p",
        "flow": "solar",
        "tmax_ms": 700,
        "state": "CA",
        "zip": "902",
        "homeowner": True,
        "electric_bill": "$200-300",
        "credit_range": "700+",
    }
    latencies: list[float] = []
    statuses: collections.Counter[str] = collections.Counter()

    async with BuyerClient(AiohttpTransport()) as client:
        # warm the keep-alive pool so connection set-up is not in the numbers
        await asyncio.gather(
            *(
                client.ping(buyers[i % len(buyers)], body, 2.0, max_price=1e4)
                for i in range(concurrency)
            )
        )
        stop = time.monotonic() + seconds

        async def worker(k: int) -> None:
            i = k
            while time.monotonic() < stop:
                out = await client.ping(buyers[i % len(buyers)], body, 0.75, max_price=1e4)
                latencies.append(out.latency_ms)
                statuses[out.status] += 1
                i += 1

        t0 = time.monotonic()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        wall = time.monotonic() - t0

    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    print(
        f"buyers={len(ports)} in_flight={concurrency:<4} {len(latencies) / wall:8.0f} req/s  "
        f"p50={pct(0.50):6.2f} ms  p99={pct(0.99):6.2f} ms  statuses={dict(statuses)}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--buyers", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    run = uvloop.run if uvloop is not None else asyncio.run

    if args.serve:
        run(serve(args.serve))
        return

    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(args.buyers)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        ports = [int(p) for p in server.stdout.readline().split()]
        print(f"loop={'uvloop' if uvloop else 'asyncio'} cpus={os.cpu_count()}")
        for c in args.concurrency:
            run(fan_out(ports, c, args.seconds))
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
