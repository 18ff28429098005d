"""The README's first command, end to end: `pingpost demo` brings up its own stack (Kafka,
embedded warehouse, simulated buyers, workers, ingest), pushes leads over HTTP, waits for every
auction to settle and prints the report; `pingpost down` stops it all.

Runs on free ports with its own run directory, so it never touches a developer's stack.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import clickhouse_connect
import pytest
import yaml

from tests.integration.kafka_fixture import free_ports

pytestmark = pytest.mark.e2e

LEADS = 200


def test_demo_runs_the_whole_stack_and_reports(tmp_path: Path) -> None:
    cfg = yaml.safe_load(Path("config/demo.yaml").read_text())
    kafka, warehouse, ingest, *buyer_ports = free_ports(3 + len(cfg["simulator"]["buyers"]))
    cfg["kafka"]["bootstrap"] = f"127.0.0.1:{kafka}"
    cfg["clickhouse"]["url"] = f"http://127.0.0.1:{warehouse}"
    cfg["warehouse"]["port"] = warehouse
    cfg["ingest"]["listen"] = f"127.0.0.1:{ingest}"
    for buyer, port in zip(cfg["buyers"], buyer_ports):
        buyer["ping_url"] = f"http://127.0.0.1:{port}/ping"
        buyer["post_url"] = f"http://127.0.0.1:{port}/post"
        cfg["simulator"]["buyers"][buyer["id"]]["port"] = port
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PINGPOST_RUN_DIR": str(tmp_path / "run"), "COLUMNS": "120"}
    cmd = [sys.executable, "-m", "streams.cli", "--config", str(config)]
    try:
        out = subprocess.run([*cmd, "demo", "--leads", str(LEADS), "--rate", "50"], env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "checks passed" in out.stdout
        assert f"{LEADS} solar leads" in out.stdout
        assert "0 leaks" in out.stdout
        # The report agrees with the tables.
        ch = clickhouse_connect.get_client(host="127.0.0.1", port=warehouse)
        try:
            (n, sold, revenue), = ch.query(
                "SELECT count(), countIf(outcome != 'unsold'), sum(price_total) "
                "FROM pingpost.auctions FINAL").result_rows
        finally:
            ch.close()
        assert n == LEADS
        assert f"{sold:,} ({100 * sold / n:.1f}%)" in out.stdout
        assert f"${revenue:,.2f}" in out.stdout
    finally:
        down = subprocess.run([*cmd, "down"], env=env, capture_output=True, text=True,
                              timeout=120)
    assert down.returncode == 0, down.stderr
    assert "kafka" in down.stdout
