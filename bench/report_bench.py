"""``pingpost report`` over millions of leads: wall time and memory, end to end (issue 12).

Starts an embedded warehouse of its own (a fresh data directory, a free port), writes N
synthetic leads into its ``pingpost`` database as the sink would have (each with its auction,
five pings and a post per bid: ``bench/replay_bench.py``'s demo-like market), then runs the real
CLI against it, as an operator would:

- ``pingpost report`` (the text report),
- ``pingpost report --html PATH`` (the HTML report, its charts' queries included),
- ``pingpost report --since ... --until ...`` over a tenth of the time span,

and prints for each its wall time and peak RSS, and the warehouse's peak RSS. Every report
query is an aggregate of constant size; what grows with the leads is the warehouse's work.
Run on purpose (CI does not):

    .venv/bin/python bench/report_bench.py --leads 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import clickhouse_connect

sys.path.insert(0, str(Path(__file__).resolve().parent))
from replay_bench import T0, auctions, write  # bench/ is not a package: its own dir

from streams.rules.replay import Recorded
from streams.settings import ClickHouseConfig, flow_version, load_settings

REPO = Path(__file__).resolve().parents[1]
PY = REPO / ".venv" / "bin" / "python"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _hwm_mib(pid: int) -> float:
    """Peak resident memory of a live process (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    import urllib.request

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the warehouse exited ({proc.returncode}):\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    sys.exit("the warehouse did not answer /ping within 120 s")


def _run(name: str, args: list[str], env: dict[str, str], out: Path) -> tuple[float, float]:
    """One CLI run: (wall s, its peak RSS MiB). Its output goes to ``out``.

    The peak is the child's VmHWM, read every 20 ms while it runs (the last reading before it
    exits). Not wait4's ru_maxrss: exec carries the forking process's own high-water mark into
    it, and this process holds the generated leads."""
    t = time.perf_counter()
    peak = 0.0
    with out.open("wb") as f:
        proc = subprocess.Popen(args, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
        while proc.poll() is None:
            try:
                peak = max(peak, _hwm_mib(proc.pid))
            except (OSError, ValueError):
                pass  # exiting
            time.sleep(0.02)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"{name} failed ({proc.returncode}):\n{out.read_text()[-3000:]}")
    return wall, peak


def _sold(r: Recorded) -> Recorded:
    """The recorded auction with the outcome its accepted posts make (replay_bench records
    every auction unsold: its replay decides them again)."""
    prices = {p.buyer_id: p.price or 0.0 for p in r.pings}
    winners = [b for b, answer in r.posts.items() if answer == "accepted"]
    if not winners:
        return r
    return replace(
        r,
        outcome="sold_shared" if len(winners) > 1 else "sold_exclusive",
        winners=winners,
        price_total=round(sum(prices[b] for b in winners), 2),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--leads", type=int, default=1_000_000)
    ap.add_argument("--config", default="config/demo.yaml")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--work-dir", help="data and outputs here (default: a temp dir, removed)")
    args = ap.parse_args()
    settings = load_settings(REPO / args.config)
    buyers = {b.id: b.tier for b in settings.buyers}
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="pingpost-report-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = work / "warehouse.log"
    wh = subprocess.Popen(
        [
            str(PY),
            "-m",
            "connectors.warehouse",
            "--data-dir",
            str(work / "wh"),
            "--port",
            str(port),
        ],
        cwd=REPO,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_ready(url, wh, log)
        db = settings.clickhouse.database

        async def prepare() -> None:
            from connectors.clickhouse import connect, migrate

            w = await connect(ClickHouseConfig(url=url, database=db))
            await migrate(w)
            await w.close()

        asyncio.run(prepare())
        client = clickhouse_connect.get_client(host="127.0.0.1", port=port)
        print(f"report bench: {args.leads:,} leads into {url} ({work})", flush=True)
        t = time.perf_counter()
        version = flow_version(settings, "solar")
        for i in range(0, args.leads, 200_000):
            part = [
                _sold(r) for r in auctions(min(200_000, args.leads - i), buyers, args.seed + i, i)
            ]
            write(client, db, part, version)
        rows = {
            t_: client.command(f"SELECT count() FROM {db}.{t_}")
            for t_ in ("leads", "auctions", "pings", "posts")
        }
        print(
            f"written in {time.perf_counter() - t:.0f} s: "
            + ", ".join(f"{n:,} {t_}" for t_, n in rows.items()),
            flush=True,
        )
        client.close()
        env = {**os.environ, "PINGPOST_CLICKHOUSE_URL": url, "PINGPOST_CONFIG": args.config}
        cli = [str(PY), "-m", "streams.tools.cli", "--config", args.config, "report"]
        span_ms = args.leads * 20
        since = datetime.fromtimestamp((T0 + span_ms * 0.45) / 1000, tz=UTC).isoformat()
        until = datetime.fromtimestamp((T0 + span_ms * 0.55) / 1000, tz=UTC).isoformat()
        runs = [
            ("pingpost report", "report", cli),
            ("pingpost report --html", "html", [*cli, "--html", str(work / "report.html")]),
            (
                "pingpost report --since/--until (a tenth of the leads)",
                "window",
                [*cli, "--since", since, "--until", until],
            ),
        ]
        print(f"\n| {args.leads:,} leads | wall s | peak RSS MiB |\n| --- | --- | --- |")
        for name, short, argv in runs:
            wall, rss = _run(name, argv, env, work / f"{short}.out")
            print(f"| {name} | {wall:.1f} | {rss:.0f} |", flush=True)
        print(f"\nwarehouse peak RSS (the whole run, writing included): {_hwm_mib(wh.pid):.0f} MiB")
        print(f"the text report: {work / 'report.out'}")
    finally:
        wh.terminate()
        wh.wait(60)
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
