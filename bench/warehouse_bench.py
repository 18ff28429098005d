"""Micro-benchmark of the embedded warehouse through clickhouse-connect.

    python bench/warehouse_bench.py                 # starts a warehouse on a temp dir
    python bench/warehouse_bench.py --url http://127.0.0.1:8123   # uses a running one

Prints SELECT 1 latency (p50/p99) and insert throughput for 1k- and 10k-row batches.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import clickhouse_connect
from clickhouse_connect.driver.client import Client

REPO_ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def warehouse(data_dir: str, timeout: float = 60.0) -> Iterator[str]:
    """A warehouse subprocess on a free port; yields its URL, SIGTERMs it afterwards."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "connectors.warehouse",
            "--data-dir",
            data_dir,
            "--port",
            "0",
            "--log-level",
            "WARNING",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "warehouse listening on http://host:port (data: DIR)"
        if not line.startswith("warehouse listening on "):
            raise SystemExit(f"warehouse failed to start (exit {proc.wait()})")
        url = line.split()[3]
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                    if response.read() == b"Ok.\n":
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        if proc.stdout is not None:
            proc.stdout.close()


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_select_1(client: Client, n: int) -> None:
    for _ in range(20):
        client.command("SELECT 1")
    for name, call in (
        ("command", lambda: client.command("SELECT 1")),
        ("query", lambda: client.query("SELECT 1")),
    ):
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            call()
            samples.append(time.perf_counter() - start)
        print(
            f"SELECT 1 via {name:<7}  p50 {percentile(samples, 0.5) * 1e3:6.2f} ms"
            f"   p99 {percentile(samples, 0.99) * 1e3:6.2f} ms   (n={n})"
        )


def bench_inserts(client: Client, table: str, batch: int, total: int) -> None:
    rows = [(i, f"lead-{i}", "buyer-" + str(i % 50), i * 0.01) for i in range(batch)]
    names = ["id", "lead", "buyer", "price"]
    client.insert(table, rows, column_names=names)  # warm up (describe, first part)
    samples = []
    start_all = time.perf_counter()
    for _ in range(total // batch):
        start = time.perf_counter()
        client.insert(table, rows, column_names=names)
        samples.append(time.perf_counter() - start)
    elapsed = time.perf_counter() - start_all
    print(
        f"insert {batch:>6}-row batches  {total / elapsed:>9,.0f} rows/s   "
        f"per batch p50 {statistics.median(samples) * 1e3:6.1f} ms"
        f"   (compress={client.write_compression or False})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="benchmark a running warehouse instead of starting one")
    parser.add_argument("--n", type=int, default=500, help="SELECT 1 samples")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(
            warehouse(stack.enter_context(tempfile.TemporaryDirectory()))
        )
        parts = urllib.parse.urlsplit(url)
        for compress in ("lz4", False):
            client = clickhouse_connect.get_client(
                host=parts.hostname, port=parts.port, compress=compress
            )
            stack.callback(client.close)
            db = f"bench_{uuid.uuid4().hex[:8]}"
            client.command(f"CREATE DATABASE {db}")
            stack.callback(client.command, f"DROP DATABASE {db}")
            table = f"{db}.pings"
            client.command(
                f"CREATE TABLE {table} (id UInt64, lead String, buyer LowCardinality(String), price Float64)"
                " ENGINE = MergeTree ORDER BY id"
            )
            if compress:
                bench_select_1(client, args.n)
            bench_inserts(client, table, 1_000, 100_000)
            bench_inserts(client, table, 10_000, 200_000)


if __name__ == "__main__":
    main()
