"""The HTML report's queries (``streams.tools.html_report.collect``) against the real warehouse:
every event counted once (FINAL), the time window selects leads with all their events, alerts
are cut by their own time, and the result renders."""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import clickhouse_connect
import pytest

from connectors.clickhouse import ClickHouseClient
from streams.tools.html_report import CHART_IDS, collect, render, write_html_report
from tests.integration.sample_events import T0, seeded

pytestmark = pytest.mark.integration


@pytest.fixture
async def wh(warehouse_url: str) -> AsyncIterator[ClickHouseClient]:
    w = await seeded(warehouse_url)
    try:
        yield w
    finally:
        await w.command(f"DROP DATABASE IF EXISTS {w.database}")
        await w.close()


@pytest.fixture
def client(warehouse_url: str) -> Iterator[Any]:
    u = urllib.parse.urlsplit(warehouse_url)
    c = clickhouse_connect.get_client(host=u.hostname, port=u.port)
    yield c
    c.close()


async def test_everything_each_event_once(wh: ClickHouseClient, client: Any) -> None:
    d = collect(client, wh.database)
    r = d.summary
    assert (r.leads, r.auctions, r.sold_exclusive, r.unsold) == (2, 2, 1, 1)
    assert r.revenue == 60.0 and r.pings == 3 and r.filtered == 1
    assert d.bucket_s == 60
    assert [(t, rev, pings, n) for t, rev, pings, n, _ in d.series] == [
        (T0, 60.0, 2, 1),
        (T0 + timedelta(minutes=2), 0.0, 1, 1),
    ]
    assert sorted(d.latency) == [(80, "answered", 1), (90, "answered", 1), (700, "timeout", 1)]
    assert d.deadlines == [("solar", 750.0)]
    assert [(a[0], a[2]) for a in d.alerts] == [
        ("sold_rate_low", "firing"),
        ("sold_rate_low", "resolved"),
        ("buyer_timeouts", "firing"),
    ]
    page = render(d)
    for chart_id in CHART_IDS:
        assert f'<svg id="{chart_id}"' in page
    assert "no alerts" not in page


async def test_time_window_selects_leads_and_alerts(wh: ClickHouseClient, client: Any) -> None:
    cut = (T0 + timedelta(minutes=1)).replace(tzinfo=UTC)
    early = collect(client, wh.database, until=cut)
    assert (early.summary.leads, early.summary.revenue, early.summary.pings) == (1, 60.0, 2)
    assert [a[2] for a in early.alerts] == ["firing"]
    late = collect(client, wh.database, since=cut)
    assert (late.summary.leads, late.summary.unsold, late.summary.pings) == (1, 1, 1)
    assert [a[2] for a in late.alerts] == ["resolved", "firing"]
    assert "received from 2025-06-01 12:01:00 UTC until now" in late.scope
    nothing = collect(client, wh.database, since=cut + timedelta(days=1))
    page = render(nothing)
    assert nothing.summary.leads == 0 and "no data in this range" in page
    assert "no alerts in this range" in page


async def test_lead_ids_scope_and_write(wh: ClickHouseClient, client: Any, tmp_path: Path) -> None:
    out = write_html_report(
        client, wh.database, tmp_path / "sub" / "r.html", lead_ids=["l1"], title="one lead"
    )
    page = out.read_text()
    assert out.is_absolute() and "<title>one lead</title>" in page
    assert "one run: 1 lead " in page
    assert not list(out.parent.glob(".*.tmp"))


async def test_lead_prefix_scopes_like_the_list_of_its_ids(
    wh: ClickHouseClient, client: Any
) -> None:
    """A run's leads by id prefix (the demo's, at any size: one startsWith) select exactly
    what the list of their ids selects, in the summary and in every chart."""
    from streams.tools.report import build_report

    for prefix, ids in (("l1", ["l1"]), ("l", ["l1", "l2"]), ("zz", [])):
        by_prefix = collect(client, wh.database, lead_prefix=prefix)
        by_ids = collect(client, wh.database, lead_ids=ids or ["none"])
        # repr: an empty scope's percentiles are NaN, which is never == itself.
        assert repr(by_prefix.summary) == repr(by_ids.summary)
        assert (by_prefix.series, by_prefix.latency) == (by_ids.series, by_ids.latency)
        assert repr(build_report(client, wh.database, lead_prefix=prefix)) == repr(by_ids.summary)
    assert collect(client, wh.database, lead_prefix="l1").summary.sold_exclusive == 1
    assert "one run: 1 lead (l1*)" in collect(client, wh.database, lead_prefix="l1").scope
