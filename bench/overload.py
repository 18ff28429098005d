"""Overload bench: offer leads past capacity, see what admission control does with them.

Needs a running stack (`pingpost up`, or the demo's). Offers ``--rate`` leads/s for
``--seconds`` open-loop (every request on schedule, whatever the answers; a 429 is counted, not
retried, so the offered load stays what was asked), waits until every accepted lead has
settled in ClickHouse, and prints: offered / accepted / refused rates, Retry-After values,
receipt → ping round open p50/p99/max of the accepted leads (``opened_at - received_at`` in
the ``auctions`` table), close lag, and the leads unsold for a platform reason. Capacity on
the 2-core development machine is ~60 leads/s, so ``--rate 120`` is ~2x. To see the same load
without admission control, set ``ingest.max_queue_delay_ms: 0`` and restart ingest.

    .venv/bin/python bench/overload.py [--config config/demo.yaml] [--rate 120] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from typing import Any

import aiohttp
import clickhouse_connect

from streams.settings import load_settings
from streams.tools.demo import generate_leads
from streams.tools.report import MARKET_REASONS, platform_unsold


async def offer(
    url: str, token: str, leads: list[dict[str, Any]], rate: float
) -> tuple[list[tuple[float, int, str | None, Any]], float]:
    """POST each lead at its scheduled time; ``(sent at, status, Retry-After, body)`` each."""
    headers = {"Authorization": f"Bearer {token}"}
    conn = aiohttp.TCPConnector(limit=512)
    async with aiohttp.ClientSession(
        connector=conn, timeout=aiohttp.ClientTimeout(total=60)
    ) as session:

        async def one(lead: dict[str, Any]) -> tuple[float, int, str | None, Any]:
            sent = time.monotonic()
            try:
                async with session.post(url, json=lead, headers=headers) as r:
                    return sent, r.status, r.headers.get("Retry-After"), await r.json()
            except (TimeoutError, aiohttp.ClientError) as exc:
                return sent, 0, None, {"error": repr(exc)}

        start, tasks = time.monotonic(), []
        for i, lead in enumerate(leads):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one(lead)))
        sent_for = time.monotonic() - start
        return list(await asyncio.gather(*tasks)), sent_for


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="config/demo.yaml")
    ap.add_argument("--rate", type=float, default=120.0, help="leads offered per second")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--settle-timeout", type=float, default=120.0)
    args = ap.parse_args()
    s = load_settings(args.config)
    url = f"http://{s.ingest.host}:{s.ingest.port}/v1/leads"
    token = s.ingest.producers[0].token.get_secret_value()
    leads = generate_leads(int(args.rate * args.seconds), seed=int(time.time()))
    print(
        f"offering {len(leads)} leads at {args.rate:g}/s for {args.seconds:g}s to {url} "
        f"(ingest.max_queue_delay_ms {s.ingest.max_queue_delay_ms})"
    )
    start_wall = time.time()
    answers, sent_for = asyncio.run(offer(url, token, leads, args.rate))
    ids = [body["lead_id"] for _, status, _, body in answers if status == 202]
    statuses = Counter(status for _, status, _, _ in answers)
    retry_after = Counter(ra for _, status, ra, _ in answers if status == 429)

    ch = clickhouse_connect.get_client(
        host=s.clickhouse.url.split("://")[1].rsplit(":", 1)[0],
        port=int(s.clickhouse.url.rsplit(":", 1)[1]),
        username=s.clickhouse.username,
        password=s.clickhouse.password.get_secret_value(),
    )
    db = s.clickhouse.database
    deadline, settled = time.monotonic() + args.settle_timeout, 0
    while ids and time.monotonic() < deadline:
        settled = ch.query(
            f"SELECT count() FROM {db}.auctions FINAL WHERE lead_id IN %(ids)s",
            parameters={"ids": ids},
        ).result_rows[0][0]
        if settled >= len(ids):
            break
        time.sleep(1)
    ((n, o50, o99, omax, c50, c99),) = ch.query(
        f"""SELECT count(), quantileExact(0.5)(d), quantileExact(0.99)(d), max(d),
                   quantileExact(0.5)(close_lag_ms), quantileExact(0.99)(close_lag_ms)
            FROM (SELECT toUnixTimestamp64Milli(opened_at) - toUnixTimestamp64Milli(received_at)
                         AS d, close_lag_ms FROM {db}.auctions FINAL WHERE lead_id IN %(ids)s)""",
        parameters={"ids": ids or [""]},
    ).result_rows
    reasons = [
        tuple(r)
        for r in ch.query(
            f"SELECT reason, count() FROM {db}.auctions FINAL WHERE lead_id IN %(ids)s "
            "AND outcome = 'unsold' GROUP BY reason ORDER BY count() DESC",
            parameters={"ids": ids or [""]},
        ).result_rows
    ]
    timeline = ch.query(
        f"""SELECT intDiv(toUnixTimestamp64Milli(received_at) - %(t0)s, 5000) AS b, count(),
                   quantileExact(0.5)(d), quantileExact(0.99)(d), max(d)
            FROM (SELECT received_at, toUnixTimestamp64Milli(opened_at)
                         - toUnixTimestamp64Milli(received_at) AS d
                  FROM {db}.auctions FINAL WHERE lead_id IN %(ids)s)
            GROUP BY b ORDER BY b""",
        parameters={"ids": ids or [""], "t0": int(start_wall * 1000)},
    ).result_rows
    sold = ch.query(
        f"SELECT countIf(outcome != 'unsold') FROM {db}.auctions FINAL WHERE lead_id IN %(ids)s",
        parameters={"ids": ids or [""]},
    ).result_rows[0][0]
    ch.close()

    def rate(k: int) -> str:
        return f"{k:6,}  {k / sent_for:6.1f}/s"

    other = {k: v for k, v in statuses.items() if k not in (202, 429)}
    print(f"offered   {rate(len(answers))}  (over {sent_for:.1f}s)")
    print(f"accepted  {rate(statuses[202])}")
    print(
        f"refused   {rate(statuses[429])}  (429; Retry-After {dict(sorted(retry_after.items()))})"
    )
    if other:
        print(f"other     {other}")
    print(f"settled   {settled:,} of {len(ids):,} accepted; sold {sold:,}")
    if n:
        print(f"receipt → ping open  p50 {o50:.0f} ms  p99 {o99:.0f} ms  max {omax:.0f} ms")
        print(f"close lag            p50 {c50:.0f} ms  p99 {c99:.0f} ms")
        print("  received   accepted   open p50 / p99 / max ms")
        for b, k, b50, b99, bmax in timeline:
            print(
                f"  {5 * b:3d}-{5 * b + 5:<3d}s  {k / 5:6.1f}/s   {b50:5.0f} / {b99:5.0f} / "
                f"{bmax:5.0f}"
            )
    platform = platform_unsold(reasons)
    print(
        f"unsold for a platform reason: {platform}"
        + (
            ""
            if not platform
            else "  "
            + "; ".join(
                f"{r} ({k})"
                for r, k in reasons
                if r.split("; caps reached:")[0] not in MARKET_REASONS
            )
        )
    )


if __name__ == "__main__":
    main()
