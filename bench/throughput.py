"""Throughput bench: step the offered rate up against a running stack and find the knee.

Needs a running stack (`pingpost up`, or the demo's). For each offered rate it sends
``rate x --seconds`` leads open-loop (each POST on its schedule, whatever the answers; a 429 is
counted, not retried, so the offered load stays what was asked), waits until every accepted
lead has settled in ClickHouse, and prints one row:

- offered and accepted leads/s, and 429s;
- sustained leads/s (accepted leads over first receipt → last settle);
- receipt → ping round open p50 / p99 (``opened_at - received_at``: queueing before the ping
  counts), close lag p50 / p99, receipt → settled p99 — of the leads received after the
  step's first ``--warmup`` seconds;
- leads unsold for a platform reason;
- CPU ms per settled lead of each stack process (``/proc``, each component's process group),
  and of this load generator apart;
- after the table, the Kafka records written per settled lead, per topic (end offsets before
  and after the step; the work every consumer and the broker pay for).

The knee is the last step that accepted ≥ 95 % of what was offered with receipt → ping p99
within ``--p99-ms``. A step's leads carry ids with its own prefix, so every query is one
``startsWith`` whatever the number of leads.

``--profile DIR`` also records each Python process of the stack with py-spy during every step
(``DIR/<process>-<rate>.txt``, collapsed stacks; open them in speedscope or flamegraph.pl) and
prints each process's top frames by own time. py-spy's sampling costs a little CPU itself.

    .venv/bin/pingpost up --workers 2
    .venv/bin/python bench/throughput.py [--rates 25,50,100,200,400] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import clickhouse_connect

from streams.settings import load_settings
from streams.tools import cpu
from streams.tools.demo import generate_leads, tag_leads
from streams.tools.report import platform_unsold


async def offer(url: str, token: str, leads: list[dict[str, Any]], rate: float) -> Counter[int]:
    """POST each lead at its scheduled time; the count of each HTTP status (0: no answer)."""
    headers = {"Authorization": f"Bearer {token}"}
    statuses: Counter[int] = Counter()
    conn = aiohttp.TCPConnector(limit=1024)
    async with aiohttp.ClientSession(
        connector=conn, timeout=aiohttp.ClientTimeout(total=60)
    ) as session:

        async def one(lead: dict[str, Any]) -> None:
            try:
                async with session.post(url, json=lead, headers=headers) as r:
                    await r.read()
                    statuses[r.status] += 1
            except (TimeoutError, aiohttp.ClientError):
                statuses[0] += 1

        pending: set[asyncio.Task[None]] = set()
        start = time.monotonic()
        for i, lead in enumerate(leads):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            t = asyncio.create_task(one(lead))
            pending.add(t)
            t.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
    return statuses


def topic_records(bootstrap: str) -> dict[str, int]:
    """Records written so far to each topic (the sum of its partitions' end offsets; the
    internal ``__consumer_offsets`` counts the commits)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def go() -> dict[str, int]:
        c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
        await c.start()
        try:
            # All topics' metadata (a group-less consumer's own view covers only what it
            # reads).
            md = await c._client.fetch_all_metadata()
            tps = [
                TopicPartition(t, p)
                for t in md.topics()
                if t != "__cluster_metadata"
                for p in md.partitions_for_topic(t) or ()
            ]
            ends = await c.end_offsets(tps)
        finally:
            await c.stop()
        out: dict[str, int] = {}
        for tp, end in ends.items():
            out[tp.topic] = out.get(tp.topic, 0) + end
        return out

    return asyncio.run(go())


def _self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _profile(pid_dir: Path, out_dir: Path, rate: float, seconds: float) -> list[Any]:
    """Start py-spy on every Python process of the stack (not Kafka's JVM)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    procs = []
    for f in sorted(pid_dir.glob("*.pid")):
        if f.stem == "kafka":
            continue
        pid = f.read_text().strip()
        out = out_dir / f"{f.stem}-{rate:g}.txt"
        procs.append(
            (
                f.stem,
                out,
                subprocess.Popen(
                    [
                        spy,
                        "record",
                        "--pid",
                        pid,
                        "--subprocesses",
                        "--format",
                        "raw",
                        "-d",
                        str(int(seconds) + 1),
                        "-r",
                        "50",
                        "-o",
                        str(out),
                        "--nonblocking",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                ),
            )
        )
    return procs


def top_frames(collapsed: Path, n: int = 6) -> list[tuple[str, float]]:
    """The ``n`` frames with the most own time (leaf samples) in a collapsed-stacks file."""
    own: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        own[leaf] += int(count)
        total += int(count)
    return [(f, 100.0 * k / total) for f, k in own.most_common(n)] if total else []


def step(
    args: argparse.Namespace, s: Any, ch: Any, rate: float, stamp: str, pid_dir: Path, n: int
) -> dict[str, Any]:
    # The step's number too: two steps at one rate must not send the same leads (the second
    # would be idempotent retries of the first, and measure nothing).
    prefix = f"tp-{stamp}-{n}-{rate:g}-"
    leads = generate_leads(max(1, int(rate * args.seconds)), seed=int(rate * 1000) + 11 + n)
    tag_leads(leads, prefix)
    url = f"http://{s.ingest.host}:{s.ingest.port}/v1/leads"
    token = s.ingest.producers[0].token.get_secret_value()
    profiling = _profile(pid_dir, Path(args.profile), rate, args.seconds) if args.profile else []
    records0 = topic_records(s.kafka.bootstrap)
    cpu0, self0, t0 = cpu.sample(pid_dir), _self_cpu_s(), time.monotonic()
    statuses = asyncio.run(offer(url, token, leads, rate))
    sent_for = time.monotonic() - t0
    self_cpu = _self_cpu_s() - self0
    accepted = statuses[202]
    db = s.clickhouse.database
    deadline, settled = time.monotonic() + args.settle_timeout, 0
    while time.monotonic() < deadline:
        settled = ch.query(
            f"SELECT count() FROM {db}.auctions FINAL WHERE startsWith(lead_id, %(p)s)",
            parameters={"p": prefix},
        ).result_rows[0][0]
        if settled >= accepted:
            break
        time.sleep(0.5)
    cpu_ms = cpu.per_lead_ms(cpu0, cpu.sample(pid_dir), settled)
    records1 = topic_records(s.kafka.bootstrap)
    per_topic = {
        t: (n - records0.get(t, 0)) / max(1, settled)
        for t, n in records1.items()
        if n > records0.get(t, 0)
    }
    for _, _, proc in profiling:
        proc.wait()
    ((first, last, o50, o99, c50, c99, s99),) = ch.query(
        f"""WITH (SELECT min(received_at) FROM {db}.auctions FINAL
                  WHERE startsWith(lead_id, %(p)s)) AS t0
            SELECT t0, max(settled_at),
                   quantileExactIf(0.5)(o, w), quantileExactIf(0.99)(o, w),
                   quantileExactIf(0.5)(close_lag_ms, w), quantileExactIf(0.99)(close_lag_ms, w),
                   quantileExactIf(0.99)(toUnixTimestamp64Milli(settled_at)
                                         - toUnixTimestamp64Milli(received_at), w)
            FROM (SELECT *, toUnixTimestamp64Milli(opened_at)
                            - toUnixTimestamp64Milli(received_at) AS o,
                         received_at >= t0 + toIntervalSecond(%(warm)s) AS w
                  FROM {db}.auctions FINAL WHERE startsWith(lead_id, %(p)s))""",
        parameters={"p": prefix, "warm": args.warmup},
    ).result_rows
    reasons = [
        tuple(r)
        for r in ch.query(
            f"SELECT reason, count() FROM {db}.auctions FINAL WHERE startsWith(lead_id, %(p)s) "
            "AND outcome = 'unsold' GROUP BY reason",
            parameters={"p": prefix},
        ).result_rows
    ]
    span = (last - first).total_seconds() if first and last else 0.0
    return {
        "rate": rate,
        "offered": len(leads) / sent_for,
        "accepted": accepted / sent_for,
        "accepted_share": accepted / len(leads),
        "refused": statuses[429],
        "other": {k: v for k, v in statuses.items() if k not in (202, 429)},
        "settled": settled,
        "sustained": settled / span if span else 0.0,
        "open_p50": o50,
        "open_p99": o99,
        "close_p50": c50,
        "close_p99": c99,
        "settled_p99": s99,
        "platform_unsold": platform_unsold(reasons),
        "cpu_ms": cpu_ms,
        "records": per_topic,
        "generator_ms": 1000.0 * self_cpu / max(1, accepted),
        "profiles": [(name, out) for name, out, _ in profiling],
    }


def rest_check(
    args: argparse.Namespace, s: Any, ch: Any, stamp: str, pid_dir: Path, when: str
) -> None:
    """The stack at rest: CPU over ``--rest`` seconds with no traffic, then five leads one
    second apart, each one's receipt → ping open (the first lead after the rest). ``when``:
    "after start" (the stack may still be warming up) or "after traffic" (the steps ran)."""
    print(f"… at rest for {args.rest:g} s, {when}", flush=True)
    before = cpu.sample(pid_dir)
    time.sleep(args.rest)  # the rest being measured
    after = cpu.sample(pid_dir)
    span = after.at - before.at
    used = {k: 100.0 * (v - before.seconds.get(k, 0.0)) / span for k, v in after.seconds.items()}
    print(
        f"  at rest: {sum(used.values()):.1f} % of one core ("
        + ", ".join(f"{k} {v:.1f}" for k, v in sorted(used.items(), key=lambda kv: -kv[1]))
        + ")"
    )
    prefix = f"rest-{stamp}-{when.split()[-1]}-"
    leads = generate_leads(5, seed=5)
    tag_leads(leads, prefix)
    url = f"http://{s.ingest.host}:{s.ingest.port}/v1/leads"
    token = s.ingest.producers[0].token.get_secret_value()
    statuses = asyncio.run(offer(url, token, leads, 1.0))
    db = s.clickhouse.database
    deadline = time.monotonic() + args.settle_timeout
    rows: list[Any] = []
    while time.monotonic() < deadline:
        rows = ch.query(
            f"""SELECT toUnixTimestamp64Milli(opened_at) - toUnixTimestamp64Milli(received_at)
                FROM {db}.auctions FINAL WHERE startsWith(lead_id, %(p)s)
                ORDER BY received_at""",
            parameters={"p": prefix},
        ).result_rows
        if len(rows) >= statuses[202]:
            break
        time.sleep(0.5)
    print(
        "  after the rest, receipt → ping open of 5 leads 1 s apart: "
        + ", ".join(f"{r[0]} ms" for r in rows)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=os.environ.get("PINGPOST_CONFIG", "config/demo.yaml"))
    ap.add_argument("--run-dir", default=".run", help="the stack's run dir (pids/ inside)")
    ap.add_argument(
        "--rates", default="25,50,100,200,400", help="leads/s, comma-separated ('': none)"
    )
    ap.add_argument("--seconds", type=float, default=30.0, help="each step's offering time")
    ap.add_argument("--warmup", type=float, default=5.0, help="first seconds left out of %%iles")
    ap.add_argument("--settle-timeout", type=float, default=180.0)
    ap.add_argument("--p99-ms", type=float, default=250.0, help="knee: receipt → ping p99 bound")
    ap.add_argument("--profile", metavar="DIR", help="py-spy each stack process into DIR")
    ap.add_argument(
        "--rest",
        type=float,
        default=0.0,
        help="first and after the steps: CPU at rest over this many s, then 5 leads",
    )
    args = ap.parse_args()
    s = load_settings(args.config)
    pid_dir = Path(args.run_dir) / "pids"
    if not any(pid_dir.glob("*.pid")):
        sys.exit(f"no stack running here ({pid_dir} has no pid files): start one with pingpost up")
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    ch = clickhouse_connect.get_client(
        host=s.clickhouse.url.split("://")[1].rsplit(":", 1)[0],
        port=int(s.clickhouse.url.rsplit(":", 1)[1]),
        username=s.clickhouse.username,
        password=s.clickhouse.password.get_secret_value(),
    )
    stamp = time.strftime("%H%M%S")
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    if not rates and not args.rest:
        sys.exit("nothing to measure: give --rates, or --rest N for the stack at rest")
    print(f"throughput bench: rates {rates} leads/s, {args.seconds:g} s each, stack {pid_dir}")
    if args.rest:
        rest_check(args, s, ch, stamp, pid_dir, "after start")
    rows = []
    for n, rate in enumerate(rates):
        print(f"… offering {rate:g} leads/s for {args.seconds:g} s", flush=True)
        rows.append(step(args, s, ch, rate, stamp, pid_dir, n))
        r = rows[-1]
        print(
            f"  accepted {r['accepted']:.1f}/s ({r['refused']} × 429), sustained "
            f"{r['sustained']:.1f}/s, open p99 {r['open_p99']:.0f} ms, CPU "
            f"{cpu.format_per_lead(r['cpu_ms'])}",
            flush=True,
        )
    if args.rest and rows:
        rest_check(args, s, ch, stamp, pid_dir, "after traffic")
    ch.close()
    if not rows:
        return  # --rates '' --rest N: the rest alone
    knee = None
    for r in rows:
        if r["accepted_share"] >= 0.95 and r["open_p99"] <= args.p99_ms and not r["other"]:
            knee = r["rate"]
        else:
            break
    procs = sorted({k for r in rows for k in r["cpu_ms"]})
    print()
    head = (
        "| offered/s | accepted/s | 429 | sustained/s | receipt→ping p50 / p99 ms | close lag "
        "p50 / p99 ms | receipt→settled p99 ms | platform-unsold | CPU ms/lead | "
        + " | ".join(procs)
        + " | generator |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        mark = " ← knee" if r["rate"] == knee else ""
        print(
            f"| {r['offered']:.0f}{mark} | {r['accepted']:.1f} | {r['refused']} | "
            f"{r['sustained']:.1f} | {r['open_p50']:.0f} / {r['open_p99']:.0f} | "
            f"{r['close_p50']:.0f} / {r['close_p99']:.0f} | {r['settled_p99']:.0f} | "
            f"{r['platform_unsold']} | {sum(r['cpu_ms'].values()):.1f} | "
            + " | ".join(f"{r['cpu_ms'].get(p, 0.0):.1f}" for p in procs)
            + f" | {r['generator_ms']:.1f} |"
        )
        if r["other"]:
            print(f"|   other answers: {r['other']} |")
    print(
        f"\nknee: {knee:g} leads/s offered (the last step accepting ≥ 95 % with receipt → ping "
        f"p99 ≤ {args.p99_ms:g} ms)"
        if knee is not None
        else f"\nno step met ≥ 95 % accepted with receipt → ping p99 ≤ {args.p99_ms:g} ms"
    )
    last = rows[-1]
    print(
        f"\nKafka records per settled lead at {last['rate']:g}/s: "
        f"{sum(last['records'].values()):.1f} ("
        + ", ".join(
            f"{t} {n:.2f}" for t, n in sorted(last["records"].items(), key=lambda kv: -kv[1])
        )
        + ")"
    )
    for r in rows:
        for name, out in r["profiles"]:
            if out.exists():
                top = top_frames(out)
                print(f"\n{name} at {r['rate']:g}/s, top frames by own time ({out}):")
                for frame, pct in top:
                    print(f"  {pct:5.1f}%  {frame}")


if __name__ == "__main__":
    main()
