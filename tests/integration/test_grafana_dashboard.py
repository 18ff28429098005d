"""The Grafana provisioning of docker-compose.yml: files parse, the dashboard points at the
provisioned data source, and every panel's SQL runs against the real (embedded) warehouse with
the migrated schema, after substituting the ClickHouse plugin's macros the way the plugin does
(grafana/clickhouse-datasource ``pkg/macros``) with a fixed time range.

Grafana itself cannot run here (no Docker), so what is checked is what can break silently:
the SQL and the wiring between the files.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.sample_events import T0, seeded

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
GRAFANA = REPO_ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "pingpost.json"

FROM, TO = T0 - timedelta(hours=1), T0 + timedelta(hours=1)
INTERVAL_S = 60


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panel_sql(d: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p["title"], t["rawSql"]) for p in d["panels"] for t in p.get("targets", [])]


def substitute(sql: str, database: str) -> str:
    """Grafana's template variable and the plugin's macros, as the plugin expands them."""
    frm, to = (int(t.replace(tzinfo=UTC).timestamp()) for t in (FROM, TO))

    def macro(m: re.Match[str]) -> str:
        name, arg = m.group(1), m.group(2).strip()
        if name == "timeFilter":
            return f"{arg} >= toDateTime({frm}) AND {arg} <= toDateTime({to})"
        if name == "timeInterval":
            return f"toStartOfInterval(toDateTime({arg}), INTERVAL {INTERVAL_S} second)"
        raise AssertionError(f"macro $__{name}() is not substituted by this test")

    sql = re.sub(r"\$__(\w+)\(([^)]*)\)", macro, sql)
    sql = (
        sql.replace("$__interval_s", str(INTERVAL_S))
        .replace("$__fromTime", f"toDateTime({frm})")
        .replace("$__toTime", f"toDateTime({to})")
        .replace("${database}", database)
        .replace("$database", database)
    )
    assert "$" not in sql, sql
    return sql


def test_provisioning_files_parse_and_agree() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "clickhouse.yaml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "grafana-clickhouse-datasource"
    assert source["jsonData"]["protocol"] == "http" and source["jsonData"]["port"] == 8123
    providers = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "pingpost.yaml").read_text()
    )["providers"]
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    assert mounts[providers[0]["options"]["path"]] == "./deploy/grafana/dashboards"
    assert (
        mounts["/etc/grafana/provisioning/datasources"]
        == "./deploy/grafana/provisioning/datasources"
    )
    assert "grafana-clickhouse-datasource" in grafana["environment"]["GF_INSTALL_PLUGINS"]

    d = dashboard()
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        assert p["datasource"]["uid"] == source["uid"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == source["uid"]
            assert t["editorType"] == "sql" and t["format"] in (0, 1)
    titles = " / ".join(p["title"] for p in d["panels"])
    for wanted in (
        "Revenue per minute",
        "Revenue per ping",
        "Sold",
        "bid, win and accept",
        "latency p50",
        "latency p99",
        "Alert",
    ):
        assert wanted in titles


def test_every_query_reads_raw_tables_with_final() -> None:
    for title, sql in panel_sql(dashboard()):
        tables = re.findall(r"\$\{database\}\.(\w+)(\s+FINAL)?", sql)
        assert tables, title
        for table, final in tables:
            assert table in ("leads", "pings", "auctions", "posts", "alerts"), (title, table)
            assert final, f"{title}: {table} without FINAL"


async def test_every_panel_query_runs_on_the_migrated_schema(warehouse_url: str) -> None:
    wh = await seeded(warehouse_url)
    try:
        results = {}
        for title, sql in panel_sql(dashboard()):
            rows = await wh.query_rows(substitute(sql, wh.database))
            assert rows, f"{title}: no rows from seeded data"
            results[title] = rows
        # Spot checks that the queries mean what the titles say (and that FINAL dedupes).
        assert results["Leads"] == [(2,)]
        assert results["Revenue"] == [(60.0,)]
        assert results["Sold"] == [(0.5,)]
        assert results["Revenue per ping"] == [(pytest.approx(60.0 / 3),)]  # 3 buyers pinged
        assert len(results) == len(panel_sql(dashboard()))  # titles are unique
        assert results["Alerts firing"] == [(1,)]
        buyers = {r[0]: r for r in results["Buyers: bid, win and accept rate"]}
        assert buyers["sunrise"][2:6] == (2, 0.5, 1.0, 1.0)  # pings, bid, win, accept rate
        assert buyers["greenleaf"][2] == 1  # the filtered buyer was not pinged
        assert len(results["Alert state changes"]) == 3
    finally:
        await wh.command(f"DROP DATABASE IF EXISTS {wh.database}")
        await wh.close()
