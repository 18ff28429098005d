"""The HTML report from real data, opened in a real headless Chromium.

Runs a small `pingpost demo` (its own Kafka, warehouse, buyers, workers and ingest on free
ports, as tests/e2e/test_demo.py does), which ends by writing ``<run dir>/report.html``; then
records three alert state changes (the demo config has no alert rules yet, so nothing else
writes that table) and writes a second report with ``pingpost report --html --since``. Both
pages are opened in Debian's Chromium (``/usr/bin/chromium``, ``make install`` installs it)
through Playwright, without any browser download. The test checks that every chart renders
with content, that the numbers agree with the tables (read with FINAL), that the page makes
no request and logs no console error, and saves screenshots to ``tests/artifacts/``
(``PINGPOST_TEST_ARTIFACTS`` overrides; gitignored).
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import clickhouse_connect
import pytest

from connectors.clickhouse import TABLE_COLUMNS
from streams.tools.html_report import CHART_IDS
from tests.e2e.demo_config import demo_config

pytestmark = pytest.mark.e2e

LEADS = 100
REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("PINGPOST_TEST_ARTIFACTS", REPO_ROOT / "tests" / "artifacts"))
CHROMIUM = os.environ.get("PINGPOST_CHROMIUM", "/usr/bin/chromium")


def open_report(browser: Any, path: Path, screenshot: Path) -> tuple[Any, list[str], list[str]]:
    """Load ``path``; returns (page, console errors/warnings and page errors, requested URLs)."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    requests: list[str] = []
    page.on(
        "console",
        lambda m: (
            problems.append(f"console {m.type}: {m.text}")
            if m.type in ("error", "warning")
            else None
        ),
    )
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.as_uri(), wait_until="load")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(screenshot), full_page=True)
    return page, problems, requests


def check_charts(page: Any) -> None:
    """Every chart is there, laid out at a real size, with drawn shapes."""
    for chart_id in CHART_IDS:
        svg = page.locator(f"svg#{chart_id}")
        assert svg.count() == 1, chart_id
        box = svg.bounding_box()
        assert box and box["width"] > 300 and box["height"] > 40, (chart_id, box)
        assert svg.locator("rect, circle, polyline, line, text").count() > 0, chart_id
    # Real data: each data chart has drawn marks, not its "no data" message.
    heights = page.locator("#chart-revenue rect.bar").evaluate_all(
        "els => els.map(e => e.getBBox().height)"
    )
    assert heights and max(heights) > 10, heights
    assert page.locator("#chart-revenue-per-ping circle.point").count() >= 1
    assert page.locator("#chart-split rect.seg").count() == 6  # 3 segments + 3 legend keys
    assert page.locator("#chart-latency rect[class*='lat-']").count() > 3
    deadline = page.locator("#chart-latency line.deadline")
    assert deadline.count() == 1
    assert deadline.get_attribute("data-ms") == "750.0"  # config/demo.yaml's solar deadline
    svg_box = page.locator("#chart-latency").bounding_box()
    line_box = deadline.bounding_box()
    assert svg_box and line_box
    assert svg_box["x"] < line_box["x"] < svg_box["x"] + svg_box["width"]


def test_html_report_renders_in_chromium(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), (
        f"{CHROMIUM} is missing: `make install` installs Debian's chromium package"
    )
    config, warehouse = demo_config(tmp_path)
    env = {**os.environ, "PINGPOST_RUN_DIR": str(tmp_path / "run"), "COLUMNS": "250"}
    cmd = [sys.executable, "-m", "streams.tools.cli", "--config", str(config)]
    started = datetime.now(UTC) - timedelta(seconds=1)
    try:
        out = subprocess.run(
            [*cmd, "demo", "--leads", str(LEADS), "--rate", "50"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=REPO_ROOT,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "✓ HTML report written" in out.stdout
        demo_html = tmp_path / "run" / "report.html"
        assert "HTML report:" in out.stdout and demo_html.is_file()

        ch = clickhouse_connect.get_client(host="127.0.0.1", port=warehouse)
        try:
            at = datetime.now(UTC).replace(tzinfo=None)
            changes = [
                (
                    "sold_rate_low",
                    "solar",
                    "firing",
                    0.31,
                    at - timedelta(seconds=3),
                    "sold 31% < 40%",
                ),
                ("sold_rate_low", "solar", "resolved", 0.55, at - timedelta(seconds=2), ""),
                (
                    "buyer_timeouts",
                    "<sunrise>",
                    "firing",
                    0.2,
                    at - timedelta(seconds=1),
                    "timeouts > 10% & rising",
                ),
            ]
            # The first change twice: a redelivery must not show twice (FINAL).
            ch.insert(
                "pingpost.alerts", changes + changes[:1], column_names=TABLE_COLUMNS["alerts"]
            )
            ((n, revenue),) = ch.query(
                "SELECT count(), sum(price_total) FROM pingpost.auctions FINAL"
            ).result_rows
            ((buyers,),) = ch.query(
                "SELECT uniqExact(buyer_id) FROM pingpost.pings FINAL WHERE status != 'filtered'"
            ).result_rows
        finally:
            ch.close()
        assert n == LEADS

        cli_html = tmp_path / "out" / "report.html"
        rep = subprocess.run(
            [*cmd, "report", "--html", str(cli_html), "--since", started.isoformat()],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO_ROOT,
        )
        assert rep.returncode == 0, rep.stdout + rep.stderr
        assert f"HTML report: {cli_html}" in rep.stdout

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for src, name in ((demo_html, "report-demo.html"), (cli_html, "report.html")):
            (ARTIFACTS / name).write_bytes(src.read_bytes())
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM)
            try:
                page, problems, requests = open_report(
                    browser, demo_html, ARTIFACTS / "report-demo.png"
                )
                assert problems == []
                assert requests == [demo_html.as_uri()]
                check_charts(page)
                assert page.title() == f"pingpost demo — {LEADS} solar leads"
                summary = page.locator("#summary").inner_text()
                assert f"${revenue:,.2f}" in summary
                assert "0 leaks" in summary
                assert page.locator("#chart-buyers text.buyer").count() == buyers
                assert (
                    page.locator("#chart-alerts").text_content() or ""
                ).strip() == "no alerts in this range"
                assert page.locator("#no-alerts").inner_text() == "no alerts"

                page, problems, requests = open_report(browser, cli_html, ARTIFACTS / "report.png")
                assert problems == []
                assert requests == [cli_html.as_uri()]
                check_charts(page)
                assert f"${revenue:,.2f}" in page.locator("#summary").inner_text()
                alerts = page.locator("#chart-alerts")
                assert alerts.locator("rect.firing").count() == 2  # one closed, one open
                assert alerts.locator("rect.firing.open").count() == 1
                assert alerts.locator("circle.change").count() == 3
                rows = page.locator("table.alerts tbody tr")
                assert rows.count() == 3
                assert "<sunrise>" in page.locator("table.alerts").inner_text()
                assert "timeouts > 10% & rising" in page.locator("table.alerts").inner_text()
            finally:
                browser.close()
    finally:
        down = subprocess.run(
            [*cmd, "down"], env=env, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
        )
    assert down.returncode == 0, down.stderr
