"""The HTML report's pure half: query results in, one self-contained page out.

The browser test (tests/e2e/test_html_report_browser.py) renders real data in Chromium; these
pin the builder's contracts: escaping, empty data, the deadline marker's position, binning.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta

import pytest

from streams.tools.html_report import (
    CHART_IDS,
    Frame,
    HtmlReportData,
    bucket_seconds,
    latency_bins,
    nice_axis,
    render,
    svg_alerts,
    svg_latency,
    svg_time,
)
from streams.tools.report import Report, parse_time

T0 = datetime(2025, 6, 1, 12, 0)
EVIL = '<script>alert("x")</script>&\'b'


def buyer(bid: str, **kw: float) -> dict[str, object]:
    return {
        "buyer_id": bid,
        "tier": "premium",
        "pings": 10,
        "bid_rate": 0.5,
        "win_rate": 0.4,
        "avg_bid": 50.0,
        "p50": 70.0,
        "p99": 300.0,
        "timeouts": 1,
        "errors": 0,
        "posts": 4,
        "accepted": 2,
        "accept_rate": 0.5,
        "spend": 100.0,
        **kw,
    }


def full_data(name: str = "sunrise") -> HtmlReportData:
    r = Report(
        leads=10,
        auctions=10,
        sold=6,
        sold_exclusive=2,
        sold_shared=4,
        unsold=4,
        revenue=300.0,
        pings=40,
        filtered=5,
        first_received=T0,
        last_settled=T0 + timedelta(minutes=3),
    )
    r.buyers = [buyer(name), buyer("greenleaf")]
    r.unsold_reasons = [(f"reason {name}", 4)]
    r.tiers = [(f"tier {name}", 6, 300.0)]
    return HtmlReportData(
        title=f"report {name}",
        scope="all leads",
        generated_at=T0,
        summary=r,
        series=[(T0, 100.0, 20, 5, 3), (T0 + timedelta(minutes=2), 200.0, 20, 5, 3)],
        latency=[(80, "answered", 30), (120, "answered", 5), (700, "timeout", 3)],
        deadlines=[(name, 750.0)],
        alerts=[
            (f"rule {name}", name, "firing", 1.0, T0, f"message {name}"),
            (f"rule {name}", name, "resolved", 0.0, T0 + timedelta(minutes=1), ""),
        ],
        window=(T0, T0 + timedelta(minutes=3)),
        extra={f"extra {name}": name},
    )


def svgs(page: str) -> dict[str, ET.Element]:
    """Every inline <svg> parsed as XML (well-formed or this fails), by id."""
    out = {}
    for m in re.finditer(r"<svg\b.*?</svg>", page, re.S):
        el = ET.fromstring(m.group(0))
        out[el.get("id") or ""] = el
    return out


SVG = "{http://www.w3.org/2000/svg}"


def test_every_chart_is_present_and_well_formed() -> None:
    page = render(full_data())
    charts = svgs(page)
    assert list(charts) == list(CHART_IDS)
    for chart_id, el in charts.items():
        shapes = [
            x
            for x in el.iter()
            if x.tag in (f"{SVG}rect", f"{SVG}circle", f"{SVG}polyline", f"{SVG}line")
        ]
        assert shapes, chart_id
    assert "no alerts" not in page


def test_every_string_from_config_or_buyers_is_escaped() -> None:
    page = render(full_data(EVIL))
    assert "<script" not in page
    assert 'alert("x")' not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#x27;b" in page
    svgs(page)  # still well-formed XML with the hostile strings inside attributes and text
    # Buyer ids in the chart are also escaped when truncated.
    long_evil = "<b>" * 20
    assert "<b>" not in render(full_data(long_evil)).split("<body>")[1]


def test_self_contained_no_external_reference() -> None:
    page = render(full_data())
    assert "<script" not in page
    assert not re.search(r"\b(src|href)\s*=", page)
    assert re.findall(r"https?://[^\"' ]+", page) == ["http://www.w3.org/2000/svg"] * len(CHART_IDS)
    assert "default-src 'none'" in page  # the browser refuses any fetch


def test_empty_data_renders_every_chart_with_a_message() -> None:
    page = render(
        HtmlReportData(title="empty", scope="all leads", generated_at=T0, summary=Report())
    )
    assert list(svgs(page)) == list(CHART_IDS)
    assert "no data in this range" in page
    assert "no auctions in this range" in page
    assert "no pings in this range" in page
    assert "no alerts in this range" in page
    assert 'id="no-alerts">no alerts<' in page
    assert not re.search(r"\b(nan|inf)\b", page, re.I)


def test_deadline_marker_sits_at_the_deadline_on_the_latency_axis() -> None:
    rows = [(100, "answered", 10), (900, "timeout", 2)]
    width, top, bins = latency_bins(rows, [("solar", 750.0)])
    assert top == 1000.0  # 901 ms rounds up to a 0..1000 axis
    svg = ET.fromstring(svg_latency("lat", "latency", rows, [("solar", 750.0)]))
    (line,) = [x for x in svg.iter(f"{SVG}line") if x.get("class") == "deadline"]
    f = Frame()
    assert float(line.get("x1") or 0) == pytest.approx(f.left + 0.75 * f.plot_w, abs=0.1)
    assert line.get("data-ms") == "750.0" and line.get("data-flow") == "solar"


def test_deadline_beyond_every_ping_extends_the_axis() -> None:
    rows = [(40, "answered", 10), (60, "answered", 3)]
    svg = ET.fromstring(svg_latency("lat", "latency", rows, [("a", 750.0), ("b", 300.0)]))
    f = Frame()
    xs = sorted(
        float(x.get("x1") or 0) for x in svg.iter(f"{SVG}line") if x.get("class") == "deadline"
    )
    assert len(xs) == 2
    assert f.left < xs[0] < xs[1] <= f.left + f.plot_w
    # The 300 ms marker is at 300/axis of the plot width.
    _, top, _ = latency_bins(rows, [("a", 750.0), ("b", 300.0)])
    assert xs[0] == pytest.approx(f.left + 300 / top * f.plot_w, abs=0.1)


def test_latency_bins_keep_every_ping() -> None:
    rows = [(ms, "answered", 1) for ms in range(0, 500, 3)] + [(499, "timeout", 7)]
    width, top, bins = latency_bins(rows, [])
    assert sum(sum(c.values()) for _, c in bins) == sum(c for *_, c in rows)
    assert all(start % width == 0 for start, _ in bins)
    assert top >= 500 and width >= 1


def test_time_buckets_fill_gaps_with_zero_bars() -> None:
    svg = ET.fromstring(
        svg_time("rev", "revenue", [(T0, 10.0), (T0 + timedelta(minutes=2), 30.0)], 60)
    )
    bars = [x for x in svg.iter(f"{SVG}rect") if x.get("class") == "bar"]
    assert len(bars) == 3
    assert float(bars[1].get("height") or -1) == 0.0
    assert float(bars[2].get("height") or 0) > float(bars[0].get("height") or 0) > 0


def test_revenue_per_ping_line_skips_buckets_without_pings() -> None:
    page = render(
        HtmlReportData(
            title="t",
            scope="s",
            generated_at=T0,
            summary=Report(),
            series=[(T0, 10.0, 0, 1, 0), (T0 + timedelta(minutes=1), 10.0, 5, 1, 1)],
        )
    )
    svg = svgs(page)["chart-revenue-per-ping"]
    assert len(list(svg.iter(f"{SVG}circle"))) == 1


def test_alert_timeline_draws_closed_and_open_firing_periods() -> None:
    alerts = [
        ("r1", "s", "firing", 1.0, T0, "m"),
        ("r1", "s", "resolved", 0.0, T0 + timedelta(minutes=1), ""),
        ("r2", "", "firing", 2.0, T0 + timedelta(minutes=2), ""),
    ]
    svg = ET.fromstring(svg_alerts("al", "alerts", alerts, (T0, T0 + timedelta(minutes=4))))
    rects = [x for x in svg.iter(f"{SVG}rect")]
    classes = sorted(x.get("class") or "" for x in rects)
    assert classes == ["firing", "firing open"]
    closed = next(x for x in rects if x.get("class") == "firing")
    f = Frame(left=170)
    assert float(closed.get("width") or 0) == pytest.approx(f.plot_w / 4, abs=0.2)
    assert len(list(svg.iter(f"{SVG}circle"))) == 3


def test_alert_timeline_accepts_aware_and_naive_times() -> None:
    alerts = [("r", "s", "firing", 1.0, T0, "")]
    svg_alerts("al", "alerts", alerts, (T0.replace(tzinfo=UTC), None))


@pytest.mark.parametrize(
    "hi,top", [(0, 1.0), (0.3, 0.3), (7, 8.0), (901, 1000.0), (45678.9, 50000.0)]
)
def test_nice_axis(hi: float, top: float) -> None:
    got, ticks = nice_axis(hi)
    assert got == pytest.approx(top)
    assert ticks[0] == 0 and ticks[-1] == pytest.approx(got) and got >= hi


def test_bucket_seconds_stays_per_minute_unless_the_range_is_long() -> None:
    assert bucket_seconds(None, None) == 60
    assert bucket_seconds(T0, T0 + timedelta(seconds=5)) == 60
    assert bucket_seconds(T0, T0 + timedelta(hours=6)) == 60
    assert bucket_seconds(T0, T0 + timedelta(hours=7)) == 300
    assert bucket_seconds(T0, T0 + timedelta(days=400)) == 86400


def test_parse_time() -> None:
    now = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    assert parse_time("15m", now) == now - timedelta(minutes=15)
    assert parse_time("2h", now) == now - timedelta(hours=2)
    assert parse_time("7d", now) == now - timedelta(days=7)
    assert parse_time("2025-06-01") == datetime(2025, 6, 1, tzinfo=UTC)
    assert parse_time("2025-06-01T14:30Z") == datetime(2025, 6, 1, 14, 30, tzinfo=UTC)
    assert parse_time("2025-06-01T14:30+02:00") == datetime(2025, 6, 1, 12, 30, tzinfo=UTC)
    with pytest.raises(ValueError, match="neither an ISO 8601"):
        parse_time("yesterday")


def test_a_live_experiment_gets_its_tables_escaped() -> None:
    from streams.tools.experiment import ExperimentResult, VariantStats
    from streams.tools.replay import Comparison

    d = full_data()
    x = ExperimentResult(
        "solar",
        EVIL,
        "control",
        100,
        [
            VariantStats("control", 0.5, leads=120, revenue=6000.0, pings=400, sold=100),
            VariantStats("low-floor", 0.5, leads=130, revenue=7800.0, pings=430, sold=120),
        ],
    )
    x.comparisons["low-floor"] = [Comparison("revenue per lead", 50.0, 60.0, 4.5, 15.5)]
    d.experiments = [x]
    page = render(d)
    assert EVIL not in page and "&lt;script&gt;" in page
    assert "low-floor" in page and "[+4.500, +15.500]" in page and ">better<" in page
