"""The README's first command, end to end: `pingpost demo` brings up its own stack (Kafka,
embedded warehouse, simulated buyers, workers, ingest), pushes leads over HTTP, waits for every
auction to settle and prints the report; `pingpost down` stops it all.

The demo runs once per module (``demo`` fixture); the tests then read what it left in the
warehouse: the report's figures, the analyst queries of docs/analytics.md and the metric
tables. Runs on free ports with its own run directory, so it never touches a developer's
stack.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import clickhouse_connect
import pytest
from clickhouse_connect.driver.client import Client

from tests.e2e.demo_config import demo_config

pytestmark = pytest.mark.e2e

LEADS = 200
REPO_ROOT = Path(__file__).resolve().parents[2]
METRIC_VIEWS = [
    "flow_minute_mv_recent",
    "flow_minute_mv_daily",
    "buyer_minute_mv_recent",
    "buyer_minute_mv_daily",
]


@dataclass
class DemoRun:
    stdout: str
    warehouse_port: int


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    """`pingpost demo` once, on its own ports and run directory; `pingpost down` afterwards."""
    tmp_path = tmp_path_factory.mktemp("demo")
    config, warehouse = demo_config(tmp_path)
    env = {**os.environ, "PINGPOST_RUN_DIR": str(tmp_path / "run"), "COLUMNS": "120"}
    cmd = [sys.executable, "-m", "streams.tools.cli", "--config", str(config)]
    try:
        out = subprocess.run(
            [*cmd, "demo", "--leads", str(LEADS), "--rate", "50"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        yield DemoRun(out.stdout, warehouse)
    finally:
        down = subprocess.run([*cmd, "down"], env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert "kafka" in down.stdout


@pytest.fixture(scope="module")
def ch(demo: DemoRun) -> Iterator[Client]:
    client = clickhouse_connect.get_client(host="127.0.0.1", port=demo.warehouse_port)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def refreshed(ch: Client) -> Client:
    """The metric tables recomputed now, so they cover the whole demo (their own schedule is
    every minute)."""
    for view in METRIC_VIEWS:
        ch.command(f"SYSTEM REFRESH VIEW pingpost.{view}")
        ch.command(f"SYSTEM WAIT VIEW pingpost.{view}")
    return ch


def test_demo_runs_the_whole_stack_and_reports(demo: DemoRun, ch: Client) -> None:
    assert "checks passed" in demo.stdout
    assert f"{LEADS} solar leads" in demo.stdout
    assert "0 leaks" in demo.stdout
    assert "receipt → ping open p50 / p99" in demo.stdout  # the queue before the ping
    # The report agrees with the tables.
    ((n, sold, revenue),) = ch.query(
        "SELECT count(), countIf(outcome != 'unsold'), sum(price_total) "
        "FROM pingpost.auctions FINAL"
    ).result_rows
    assert n == LEADS
    assert f"{sold:,} ({100 * sold / n:.1f}%)" in demo.stdout
    assert f"${revenue:,.2f}" in demo.stdout


def documented_queries() -> list[str]:
    """The ```sql blocks of docs/analytics.md's "Example queries" section."""
    text = (REPO_ROOT / "docs/analytics.md").read_text()
    section = text.split("\n## Example queries\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```sql\n(.*?)^```$", section, re.S | re.M)


def test_docs_have_ten_example_queries() -> None:
    assert len(documented_queries()) == 10


@pytest.mark.parametrize("number", range(1, 11))
def test_documented_query_answers_on_demo_data(refreshed: Client, number: int) -> None:
    sql = documented_queries()[number - 1]
    rows = refreshed.query(sql).result_rows
    assert rows, f"query {number} of docs/analytics.md returned no row:\n{sql}"


def test_metric_tables_agree_with_the_event_tables(refreshed: Client) -> None:
    ch = refreshed

    def one(sql: str) -> tuple[object, ...]:
        return tuple(ch.query(sql).result_rows[0])

    flows = one(
        "SELECT sum(pings_sent), sum(pings_filtered), sum(bids), sum(bid_sum),"
        " sum(pings_posted), sum(posts), sum(posts_accepted), sum(leads),"
        " sum(leads_sold), round(sum(revenue), 6) FROM pingpost.flow_minute FINAL"
    )
    raw = one(
        "SELECT"
        " (SELECT countIf(status != 'filtered') FROM pingpost.pings FINAL),"
        " (SELECT countIf(status = 'filtered') FROM pingpost.pings FINAL),"
        " (SELECT countIf(status = 'bid') FROM pingpost.pings FINAL),"
        " (SELECT sumIf(price, status = 'bid') FROM pingpost.pings FINAL),"
        " (SELECT uniqExact(ping_id) FROM pingpost.posts FINAL),"
        " (SELECT count() FROM pingpost.posts FINAL),"
        " (SELECT countIf(status = 'accepted') FROM pingpost.posts FINAL),"
        " (SELECT count() FROM pingpost.auctions FINAL),"
        " (SELECT countIf(outcome != 'unsold') FROM pingpost.auctions FINAL),"
        " (SELECT round(sum(price_total), 6) FROM pingpost.auctions FINAL)"
    )
    assert flows[:3] == raw[:3] and flows[4:9] == raw[4:9]
    assert flows[3] == pytest.approx(raw[3]) and flows[9] == pytest.approx(raw[9])
    assert raw[7] == LEADS and raw[8] > 0 and raw[7] > raw[8]  # sold and unsold leads

    by_buyer = dict(
        (
            (b, (p, bids, acc, round(spend, 6)))
            for b, p, bids, acc, spend in ch.query(
                "SELECT buyer_id, sum(pings_sent), sum(bids), sum(posts_accepted), sum(spend)"
                " FROM pingpost.buyer_minute FINAL GROUP BY buyer_id"
            ).result_rows
        )
    )
    raw_by_buyer = dict(
        (
            (b, (p, bids, acc, round(spend, 6)))
            for b, p, bids, acc, spend in ch.query(
                "SELECT p.buyer_id, p.sent, p.bids, q.accepted, q.spend FROM"
                " (SELECT buyer_id, countIf(status != 'filtered') AS sent, countIf(status = 'bid') AS bids"
                "  FROM pingpost.pings FINAL GROUP BY buyer_id) AS p LEFT JOIN"
                " (SELECT buyer_id, countIf(status = 'accepted') AS accepted,"
                "  sumIf(price, status = 'accepted') AS spend FROM pingpost.posts FINAL GROUP BY buyer_id)"
                " AS q ON q.buyer_id = p.buyer_id"
            ).result_rows
        )
    )
    assert len(by_buyer) >= 3
    assert by_buyer.keys() == raw_by_buyer.keys()
    for buyer, (sent, bids, accepted, spend) in raw_by_buyer.items():
        got = by_buyer[buyer]
        assert got[:3] == (sent, bids, accepted), buyer
        assert got[3] == pytest.approx(spend), buyer

    # The percentiles of the busiest buyer-minute, against its pings' latencies.
    busiest = (
        "SELECT buyer_id, minute FROM pingpost.buyer_minute FINAL"
        " ORDER BY pings_sent DESC, buyer_id, minute LIMIT 1"
    )
    ((p50, p95, p99),) = ch.query(
        "SELECT latency_p50, latency_p95, latency_p99 FROM pingpost.buyer_minute FINAL"
        f" WHERE (buyer_id, minute) IN ({busiest})"
    ).result_rows
    ((latencies,),) = ch.query(
        "SELECT arraySort(groupArray(latency_ms)) FROM pingpost.pings FINAL"
        f" WHERE (buyer_id, toStartOfMinute(sent_at)) IN ({busiest})"
        " AND status != 'filtered'"
    ).result_rows
    n = len(latencies)
    assert n > 0
    assert (p50, p95, p99) == tuple(latencies[min(int(q * n), n - 1)] for q in (0.5, 0.95, 0.99))
