"""The HTML report: one self-contained file (inline CSS, inline SVG drawn here, no script, no
network), queried from ClickHouse like the terminal report.

Two halves:

- ``collect(client, database, ...)`` runs the queries (a *synchronous* clickhouse-connect
  client, every table read with ``FINAL`` so a redelivered event counts once) and returns an
  ``HtmlReportData``;
- ``render(data)`` and the ``svg_*`` functions are pure: query results in, an HTML string out.
  Every string that reaches the page (buyer ids, rules, reasons, messages come from config and
  buyers) goes through ``html.escape``; every number written into SVG is finite.

The page carries a Content-Security-Policy that forbids every fetch, so a chart that
accidentally referenced anything outside the file would fail loudly in the browser.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from streams.tools.report import Report, build_report, ch_time, headline_rows, scope_where

__all__ = [
    "CHART_IDS",
    "HtmlReportData",
    "collect",
    "page",
    "render",
    "write_html_report",
    "bucket_seconds",
    "latency_bins",
    "nice_axis",
    "svg_alerts",
    "svg_buyer_rates",
    "svg_latency",
    "svg_split",
    "svg_time",
    "Frame",
]

#: The id of every chart's ``<svg>``, in page order (the browser test checks each one).
CHART_IDS = (
    "chart-revenue",
    "chart-revenue-per-ping",
    "chart-split",
    "chart-buyers",
    "chart-latency",
    "chart-alerts",
)

#: Bucket sizes for the time series: one minute unless the range would need more than
#: ``MAX_BUCKETS`` of them (a chart of thousands of one-pixel bars shows nothing).
BUCKETS_S = (60, 300, 900, 3600, 4 * 3600, 86400)
MAX_BUCKETS = 360
MAX_ALERT_LANES = 12
MAX_ALERT_ROWS = 200

# Ping outcomes as the latency histogram stacks them.
LATENCY_CATEGORIES = ("answered", "timeout", "error")


@dataclass
class HtmlReportData:
    """Everything the page shows; built by ``collect`` or by hand in tests."""

    title: str
    scope: str
    generated_at: datetime
    summary: Report
    bucket_s: int = 60
    #: (bucket start, revenue, pings sent, auctions, sold), ordered, gaps allowed.
    series: list[tuple[datetime, float, int, int, int]] = field(default_factory=list)
    #: (latency in whole ms, category in LATENCY_CATEGORIES, pings).
    latency: list[tuple[int, str, int]] = field(default_factory=list)
    #: (flow, deadline ms) of the flows in the report.
    deadlines: list[tuple[str, float]] = field(default_factory=list)
    #: (rule, subject, state, value, at, message), ordered by ``at``.
    alerts: list[tuple[str, str, str, float, datetime, str]] = field(default_factory=list)
    #: Time range the alert timeline spans when there are alerts (defaults to the data's).
    window: tuple[datetime | None, datetime | None] = (None, None)
    extra: dict[str, str] = field(default_factory=dict)
    #: Live experiments with data (streams.tools.experiment.ExperimentResult).
    experiments: list[Any] = field(default_factory=list)


# --------------------------------------------------------------------------- queries


def bucket_seconds(first: datetime | None, last: datetime | None) -> int:
    """The smallest bucket of ``BUCKETS_S`` giving at most ``MAX_BUCKETS`` buckets."""
    if first is None or last is None:
        return BUCKETS_S[0]
    span = max((last - first).total_seconds(), 0.0)
    for b in BUCKETS_S:
        if span / b <= MAX_BUCKETS:
            return b
    return BUCKETS_S[-1]


def collect(
    client: Any,
    database: str,
    *,
    lead_ids: Sequence[str] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    lead_prefix: str | None = None,
    summary: Report | None = None,
    title: str = "pingpost report",
    extra: dict[str, str] | None = None,
    now: datetime | None = None,
) -> HtmlReportData:
    """Query everything the HTML report shows, for the leads of ``lead_ids`` and/or received
    in ``[since, until)``; alerts are those raised in ``[since, until)``. ``summary`` saves
    re-querying the headline numbers when the caller already has them for the same scope."""
    db = database
    where, params = scope_where(db, lead_ids, since, until, lead_prefix)
    and_ = f"{where} AND" if where else "WHERE"
    r = (
        summary
        if summary is not None
        else build_report(client, db, lead_ids, since=since, until=until, lead_prefix=lead_prefix)
    )
    first = r.first_received
    (last,) = (
        client.query(
            f"SELECT max(received_at) FROM {db}.auctions FINAL {where}", parameters=params
        ).result_rows[0]
        if r.auctions
        else (None,)
    )
    b = bucket_seconds(first, last)
    series = [
        (t, float(rev or 0.0), int(pings), int(n), int(sold))
        for t, rev, pings, n, sold in client.query(
            f"SELECT toStartOfInterval(received_at, INTERVAL {b} SECOND) AS t, "
            f"sum(price_total), sum(pinged), count(), countIf(outcome != 'unsold') "
            f"FROM {db}.auctions FINAL {where} GROUP BY t ORDER BY t",
            parameters=params,
        ).result_rows
    ]
    latency = [
        (int(ms), str(cat), int(n))
        for ms, cat, n in client.query(
            f"SELECT least(toUInt32(greatest(latency_ms, 0)), 600000) AS ms, "
            f"multiIf(status IN ('bid', 'no_bid'), 'answered', status = 'timeout', 'timeout', "
            f"'error') AS cat, count() FROM {db}.pings FINAL {and_} status != 'filtered' "
            f"GROUP BY ms, cat ORDER BY ms",
            parameters=params,
        ).result_rows
    ]
    deadlines = [
        (str(flow), float(ms))
        for flow, ms in client.query(
            f"SELECT flow, quantileExact(0.5)(toUnixTimestamp64Milli(deadline_at) "
            f"- toUnixTimestamp64Milli(opened_at)) AS ms FROM {db}.auctions FINAL "
            f"{and_} deadline_at > opened_at GROUP BY flow ORDER BY flow",
            parameters=params,
        ).result_rows
    ]
    conds, aparams = [], {}
    if since is not None:
        conds.append("at >= toDateTime64(%(since)s, 3, 'UTC')")
        aparams["since"] = ch_time(since)
    if until is not None:
        conds.append("at < toDateTime64(%(until)s, 3, 'UTC')")
        aparams["until"] = ch_time(until)
    alerts = [
        (str(rule), str(subject), str(state), float(value), at, str(message))
        for rule, subject, state, value, at, message in client.query(
            f"SELECT rule, subject, state, value, at, message FROM {db}.alerts FINAL "
            f"{'WHERE ' + ' AND '.join(conds) if conds else ''} "
            f"ORDER BY at, rule, subject LIMIT 5000",
            parameters=aparams,
        ).result_rows
    ]
    if lead_ids is not None:
        scope = f"one run: {len(lead_ids):,} lead{'' if len(lead_ids) == 1 else 's'}"
    elif lead_prefix is not None:
        scope = f"one run: {r.leads:,} lead{'' if r.leads == 1 else 's'} ({lead_prefix}*)"
    else:
        scope = "all leads"
    if since is not None or until is not None:
        scope += (
            f" received from {_fmt_time(since) if since else 'the beginning'}"
            f" until {_fmt_time(until) if until else 'now'}"
        )
    return HtmlReportData(
        title=title,
        scope=scope,
        generated_at=now or datetime.now(UTC),
        summary=r,
        bucket_s=b,
        series=series,
        latency=latency,
        deadlines=deadlines,
        alerts=alerts,
        window=(since or first, until or r.last_settled),
        extra=dict(extra or {}),
    )


def write_html_report(
    client: Any,
    database: str,
    path: str | os.PathLike[str],
    *,
    experiments: Sequence[Any] = (),
    **kwargs: Any,
) -> Path:
    """``collect`` + ``render`` into ``path`` (written whole, then renamed into place: a
    browser never sees half a file); ``experiments``: results of ``run_experiment`` to show.
    Returns the absolute path."""
    out = Path(path).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    data = collect(client, database, **kwargs)
    data.experiments = [x for x in experiments if any(v.leads for v in x.variants)]
    page = render(data)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


# --------------------------------------------------------------------------- helpers


def e(value: Any) -> str:
    """Escape for HTML text and attribute values (quotes included)."""
    return html.escape(str(value), quote=True)


def n(x: float) -> str:
    """A coordinate for SVG: finite, one decimal."""
    if not math.isfinite(x):
        x = 0.0
    return f"{x:.1f}"


def _utc(t: datetime) -> datetime:
    """Query results are naive UTC; make every datetime comparable."""
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _fmt_time(t: datetime) -> str:
    return _utc(t).strftime("%Y-%m-%d %H:%M:%S UTC")


def _money(x: float) -> str:
    return f"${x:,.2f}"


def nice_step(raw: float) -> float:
    """1, 2 or 5 × a power of ten, at least ``raw``."""
    if not math.isfinite(raw) or raw <= 0:
        return 1.0
    exp = math.floor(math.log10(raw))
    f = raw / 10**exp
    m = 1 if f <= 1 else 2 if f <= 2 else 5 if f <= 5 else 10
    return float(m * 10**exp)


def nice_axis(hi: float, ticks: int = 5) -> tuple[float, list[float]]:
    """An axis from 0 covering ``hi``: (top, tick values)."""
    step = nice_step(hi / ticks if hi > 0 else 0.0)
    top = max(math.ceil(hi / step - 1e-9), 1) * step if hi > 0 else step
    return top, [i * step for i in range(int(round(top / step)) + 1)]


def _tick_label(v: float, unit: str = "") -> str:
    if unit == "$":
        return f"${v:,.0f}" if v >= 10 or v == 0 else f"${v:,.2f}".rstrip("0").rstrip(".")
    text = f"{v:,.0f}" if v >= 10 or v == int(v) else f"{v:g}"
    return text + unit


@dataclass(frozen=True)
class Frame:
    """The geometry every chart shares: an SVG of ``width`` × ``height`` with the plot area
    inside the margins."""

    width: float = 640
    height: float = 260
    left: float = 64
    right: float = 20
    top: float = 18
    bottom: float = 46

    @property
    def plot_w(self) -> float:
        return self.width - self.left - self.right

    @property
    def plot_h(self) -> float:
        return self.height - self.top - self.bottom

    @property
    def base(self) -> float:
        return self.top + self.plot_h

    def x(self, v: float, hi: float, lo: float = 0.0) -> float:
        return self.left + (v - lo) / (hi - lo) * self.plot_w if hi > lo else self.left

    def y(self, v: float, top: float) -> float:
        return self.base - (v / top) * self.plot_h if top > 0 else self.base


def _svg(chart_id: str, frame: Frame, label: str, body: list[str]) -> str:
    return (
        f'<svg id="{e(chart_id)}" class="chart" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {n(frame.width)} {n(frame.height)}" role="img" '
        f'aria-label="{e(label)}">' + "".join(body) + "</svg>"
    )


def _empty(chart_id: str, label: str, text: str, height: float = 80) -> str:
    f = Frame(height=height)
    return _svg(
        chart_id,
        f,
        label,
        [
            f'<text class="empty" x="{n(f.width / 2)}" y="{n(height / 2)}" '
            f'text-anchor="middle">{e(text)}</text>'
        ],
    )


def _y_grid(f: Frame, ticks: list[float], top: float, unit: str) -> list[str]:
    out = []
    for v in ticks:
        y = f.y(v, top)
        out.append(
            f'<line class="grid" x1="{n(f.left)}" x2="{n(f.left + f.plot_w)}" '
            f'y1="{n(y)}" y2="{n(y)}"/>'
        )
        out.append(
            f'<text class="tick" x="{n(f.left - 6)}" y="{n(y + 4)}" '
            f'text-anchor="end">{e(_tick_label(v, unit))}</text>'
        )
    return out


# --------------------------------------------------------------------------- charts


def _slots(series: Sequence[tuple[datetime, Any]], bucket_s: int) -> list[tuple[datetime, Any]]:
    """Fill the gaps between buckets (a minute without leads is a zero, not a missing bar)."""
    if not series:
        return []
    by_t = {_utc(t): v for t, v in series}
    t, end = min(by_t), max(by_t)
    out: list[tuple[datetime, Any]] = []
    while t <= end and len(out) <= MAX_BUCKETS * 4:
        out.append((t, by_t.get(t)))
        t += timedelta(seconds=bucket_s)
    return out


def _bucket_name(bucket_s: int) -> str:
    return {
        60: "minute",
        300: "5 minutes",
        900: "15 minutes",
        3600: "hour",
        4 * 3600: "4 hours",
        86400: "day",
    }.get(bucket_s, f"{bucket_s} s")


def svg_time(
    chart_id: str,
    label: str,
    series: Sequence[tuple[datetime, float | None]],
    bucket_s: int,
    *,
    kind: str = "bar",
    unit: str = "$",
    frame: Frame = Frame(),
    value_fmt: Any = _money,
) -> str:
    """Bars (``kind="bar"``) or a line with points (``"line"``) over time buckets, one slot
    per bucket from the first to the last; ``None`` values (nothing to divide by) are left
    out of a line and drawn as 0 in bars."""
    slots = _slots(series, bucket_s)
    if not slots:
        return _empty(chart_id, label, "no data in this range")
    f = frame
    values = [v for _, v in slots if v is not None and math.isfinite(v)]
    top, ticks = nice_axis(max(values, default=0.0))
    body = _y_grid(f, ticks, top, unit)
    slot_w = f.plot_w / len(slots)
    span_days = (slots[-1][0] - slots[0][0]).total_seconds() >= 86400 or bucket_s >= 86400
    fmt = "%m-%d %H:%M" if span_days else "%H:%M"
    every = max(1, math.ceil(len(slots) / 8))
    points = []
    for i, (t, v) in enumerate(slots):
        cx = f.left + slot_w * (i + 0.5)
        tip = f"{t.strftime('%Y-%m-%d %H:%M')} UTC: " + ("no data" if v is None else value_fmt(v))
        if kind == "bar":
            val = v if v is not None and math.isfinite(v) else 0.0
            bw = max(min(48.0, slot_w * 0.8), 1.0)
            y = f.y(val, top)
            body.append(
                f'<rect class="bar" x="{n(cx - bw / 2)}" y="{n(y)}" width="{n(bw)}" '
                f'height="{n(f.base - y)}"><title>{e(tip)}</title></rect>'
            )
        elif v is not None and math.isfinite(v):
            points.append((cx, f.y(v, top), tip))
        if i % every == 0:
            body.append(
                f'<text class="tick" x="{n(cx)}" y="{n(f.base + 16)}" '
                f'text-anchor="middle">{e(t.strftime(fmt))}</text>'
            )
    if kind != "bar" and points:
        body.append(
            '<polyline class="line" points="'
            + " ".join(f"{n(x)},{n(y)}" for x, y, _ in points)
            + '"/>'
        )
        body += [
            f'<circle class="point" cx="{n(x)}" cy="{n(y)}" r="3.5">'
            f"<title>{e(tip)}</title></circle>"
            for x, y, tip in points
        ]
    body.append(
        f'<line class="axis" x1="{n(f.left)}" x2="{n(f.left + f.plot_w)}" '
        f'y1="{n(f.base)}" y2="{n(f.base)}"/>'
    )
    body.append(
        f'<text class="axis-label" x="{n(f.left + f.plot_w / 2)}" '
        f'y="{n(f.height - 6)}" text-anchor="middle">'
        f"{e('time (UTC), per ' + _bucket_name(bucket_s))}</text>"
    )
    return _svg(chart_id, f, label, body)


def svg_split(
    chart_id: str,
    label: str,
    segments: Sequence[tuple[str, int, str]],
    *,
    frame: Frame = Frame(height=120),
) -> str:
    """One 100% stacked bar: (label, count, css class) segments, with a legend."""
    total = sum(max(c, 0) for _, c, _ in segments)
    if total <= 0:
        return _empty(chart_id, label, "no auctions in this range")
    f = frame
    body, x, bar_y, bar_h = [], f.left, f.top, 36.0
    for name, count, cls in segments:
        w = f.plot_w * max(count, 0) / total
        pct = 100 * max(count, 0) / total
        body.append(
            f'<rect class="seg {e(cls)}" x="{n(x)}" y="{n(bar_y)}" width="{n(w)}" '
            f'height="{n(bar_h)}"><title>{e(f"{name}: {count:,} ({pct:.1f}%)")}</title>'
            f"</rect>"
        )
        if w > 44:
            body.append(
                f'<text class="seg-label" x="{n(x + w / 2)}" y="{n(bar_y + 23)}" '
                f'text-anchor="middle">{pct:.0f}%</text>'
            )
        x += w
    lx = f.left
    for name, count, cls in segments:
        pct = 100 * max(count, 0) / total
        body.append(
            f'<rect class="seg {e(cls)}" x="{n(lx)}" y="{n(bar_y + bar_h + 20)}" '
            f'width="12" height="12"/>'
        )
        text = f"{name} {count:,} ({pct:.1f}%)"
        body.append(
            f'<text class="legend" x="{n(lx + 17)}" y="{n(bar_y + bar_h + 30)}">{e(text)}</text>'
        )
        lx += 26 + 7.2 * len(text)
    return _svg(chart_id, f, label, body)


BUYER_RATES = (
    ("bid_rate", "bid rate", "rate-bid"),
    ("win_rate", "win rate", "rate-win"),
    ("accept_rate", "accept rate", "rate-accept"),
)


def svg_buyer_rates(chart_id: str, label: str, buyers: Sequence[dict[str, Any]]) -> str:
    """Per buyer, three horizontal bars on a 0–100% axis: bid, win and accept rate."""
    if not buyers:
        return _empty(chart_id, label, "no pings in this range")
    bar_h, gap = 11.0, 12.0
    group = len(BUYER_RATES) * bar_h + gap
    f = Frame(height=18 + len(buyers) * group + 58, left=130)
    top, ticks = 1.0, [0.0, 0.25, 0.5, 0.75, 1.0]
    body = []
    for v in ticks:
        x = f.x(v, top)
        body.append(
            f'<line class="grid" x1="{n(x)}" x2="{n(x)}" y1="{n(f.top)}" y2="{n(f.base)}"/>'
        )
        body.append(
            f'<text class="tick" x="{n(x)}" y="{n(f.base + 16)}" '
            f'text-anchor="middle">{v * 100:.0f}%</text>'
        )
    for i, b in enumerate(buyers):
        y0 = f.top + i * group + gap / 2
        name = str(b.get("buyer_id", ""))
        short = name if len(name) <= 18 else name[:17] + "…"
        body.append(
            f'<text class="buyer" x="{n(f.left - 8)}" y="{n(y0 + 1.5 * bar_h + 4)}" '
            f'text-anchor="end">{e(short)}<title>{e(name)}</title></text>'
        )
        for j, (key, what, cls) in enumerate(BUYER_RATES):
            v = float(b.get(key) or 0.0)
            v = min(max(v if math.isfinite(v) else 0.0, 0.0), 1.0)
            body.append(
                f'<rect class="bar {cls}" x="{n(f.left)}" y="{n(y0 + j * bar_h)}" '
                f'width="{n(f.x(v, top) - f.left)}" height="{n(bar_h - 1)}">'
                f"<title>{e(f'{name} {what}: {100 * v:.1f}%')}</title></rect>"
            )
    lx = f.left
    for _, what, cls in BUYER_RATES:
        body.append(
            f'<rect class="bar {cls}" x="{n(lx)}" y="{n(f.height - 20)}" width="12" '
            f'height="12"/><text class="legend" x="{n(lx + 17)}" '
            f'y="{n(f.height - 10)}">{e(what)}</text>'
        )
        lx += 110
    return _svg(chart_id, f, label, body)


def latency_bins(
    rows: Sequence[tuple[int, str, int]], deadlines: Sequence[tuple[str, float]]
) -> tuple[float, float, list[tuple[float, dict[str, int]]]]:
    """Histogram of (ms, category, count) rows: ``(bin width, axis max, [(bin start,
    {category: count})])``. The axis always reaches past the largest deadline so its marker
    is inside the plot."""
    hi: float = max((ms for ms, _, c in rows if c > 0), default=0) + 1
    hi = max(hi, max((d for _, d in deadlines), default=0.0) * 1.05)
    top, _ = nice_axis(hi)
    width = max(nice_step(top / 50), 1.0)
    bins: dict[int, dict[str, int]] = {}
    for ms, cat, count in rows:
        k = int(ms // width)
        slot = bins.setdefault(k, {})
        slot[cat] = slot.get(cat, 0) + count
    return width, top, [(k * width, bins[k]) for k in sorted(bins)]


def svg_latency(
    chart_id: str,
    label: str,
    rows: Sequence[tuple[int, str, int]],
    deadlines: Sequence[tuple[str, float]],
    *,
    frame: Frame = Frame(),
) -> str:
    """Ping latency histogram, stacked by outcome, with each flow's deadline as a dashed line
    (``<line class="deadline" data-ms=...>``)."""
    if not any(c > 0 for _, _, c in rows):
        return _empty(chart_id, label, "no pings in this range")
    f = frame
    width, xmax, bins = latency_bins(rows, deadlines)
    ymax, yticks = nice_axis(max(sum(b.values()) for _, b in bins))
    body = _y_grid(f, yticks, ymax, "")
    bw = f.x(width, xmax) - f.left
    for start, counts in bins:
        y = f.base
        for cat in (*LATENCY_CATEGORIES, *sorted(set(counts) - set(LATENCY_CATEGORIES))):
            c = counts.get(cat, 0)
            if c <= 0:
                continue
            h = f.base - f.y(c, ymax)
            y -= h
            tip = f"{start:g}–{start + width:g} ms, {cat}: {c:,}"
            body.append(
                f'<rect class="bar lat-{e(cat)}" x="{n(f.x(start, xmax) + 0.5)}" '
                f'y="{n(y)}" width="{n(max(bw - 1, 0.5))}" height="{n(h)}">'
                f"<title>{e(tip)}</title></rect>"
            )
    _, xticks = nice_axis(xmax)
    for v in xticks:
        body.append(
            f'<text class="tick" x="{n(f.x(v, xmax))}" y="{n(f.base + 16)}" '
            f'text-anchor="middle">{e(_tick_label(v))}</text>'
        )
    body.append(
        f'<line class="axis" x1="{n(f.left)}" x2="{n(f.left + f.plot_w)}" '
        f'y1="{n(f.base)}" y2="{n(f.base)}"/>'
    )
    for i, (flow, ms) in enumerate(sorted(deadlines, key=lambda d: d[1])):
        x = f.x(ms, xmax)
        body.append(
            f'<line class="deadline" data-flow="{e(flow)}" data-ms="{n(ms)}" '
            f'x1="{n(x)}" x2="{n(x)}" y1="{n(f.top)}" y2="{n(f.base)}">'
            f"<title>{e(f'deadline of {flow}: {ms:g} ms')}</title></line>"
        )
        body.append(
            f'<text class="deadline-label" x="{n(x - 4)}" y="{n(f.top + 12 + 13 * i)}" '
            f'text-anchor="end">{e(f"deadline {flow} {ms:g} ms")}</text>'
        )
    lx = f.left
    for cat in LATENCY_CATEGORIES:
        body.append(
            f'<rect class="bar lat-{cat}" x="{n(lx)}" y="{n(f.height - 18)}" '
            f'width="12" height="12"/><text class="legend" x="{n(lx + 17)}" '
            f'y="{n(f.height - 8)}">{cat}</text>'
        )
        lx += 100
    body.append(
        f'<text class="axis-label" x="{n(f.left + f.plot_w)}" y="{n(f.height - 8)}" '
        f'text-anchor="end">ping latency (ms)</text>'
    )
    return _svg(chart_id, f, label, body)


def svg_alerts(
    chart_id: str,
    label: str,
    alerts: Sequence[tuple[str, str, str, float, datetime, str]],
    window: tuple[datetime | None, datetime | None] = (None, None),
) -> str:
    """One lane per (rule, subject): firing periods as bars (open-ended when never resolved
    in the range) and every state change as a dot. No alerts: says so."""
    if not alerts:
        return _empty(chart_id, label, "no alerts in this range")
    lanes: dict[tuple[str, str], list[tuple[datetime, str, float, str]]] = {}
    for rule, subject, state, value, at, message in alerts:
        lanes.setdefault((rule, subject), []).append((_utc(at), state, value, message))
    shown = list(lanes)[:MAX_ALERT_LANES]
    times = [t for evs in lanes.values() for t, *_ in evs]
    lo = min([*times, *(_utc(w) for w in window if w is not None)])
    hi = max([*times, *(_utc(w) for w in window if w is not None)])
    if hi <= lo:
        hi = lo + timedelta(seconds=60)
    lane_h = 26.0
    f = Frame(
        height=18 + lane_h * len(shown) + 40 + (16 if len(lanes) > len(shown) else 0), left=170
    )
    span = (hi - lo).total_seconds()

    def x(t: datetime) -> float:
        return f.x((t - lo).total_seconds(), span)

    body = []
    for i in range(6):
        t = lo + timedelta(seconds=span * i / 5)
        fmt = "%m-%d %H:%M" if span >= 86400 else "%H:%M:%S"
        anchor = "start" if i == 0 else "end" if i == 5 else "middle"
        body.append(
            f'<line class="grid" x1="{n(x(t))}" x2="{n(x(t))}" y1="{n(f.top)}" '
            f'y2="{n(f.base)}"/><text class="tick" x="{n(x(t))}" '
            f'y="{n(f.base + 16)}" text-anchor="{anchor}">{e(t.strftime(fmt))}</text>'
        )
    for i, key in enumerate(shown):
        y0 = f.top + i * lane_h
        name = f"{key[0]} · {key[1]}" if key[1] else key[0]
        short = name if len(name) <= 26 else name[:25] + "…"
        body.append(
            f'<text class="lane" x="{n(f.left - 8)}" y="{n(y0 + 17)}" '
            f'text-anchor="end">{e(short)}<title>{e(name)}</title></text>'
        )
        opened: datetime | None = None
        for t, state, _value, _message in lanes[key]:
            if state == "firing" and opened is None:
                opened = t
            elif state != "firing" and opened is not None:
                body.append(
                    f'<rect class="firing" x="{n(x(opened))}" y="{n(y0 + 6)}" '
                    f'width="{n(max(x(t) - x(opened), 2))}" height="14">'
                    f"<title>{e(f'{name}: firing {_fmt_time(opened)} → {_fmt_time(t)}')}"
                    f"</title></rect>"
                )
                opened = None
        if opened is not None:
            body.append(
                f'<rect class="firing open" x="{n(x(opened))}" y="{n(y0 + 6)}" '
                f'width="{n(max(x(hi) - x(opened), 2))}" height="14">'
                f"<title>{e(f'{name}: firing since {_fmt_time(opened)}')}</title></rect>"
            )
        for t, state, value, message in lanes[key]:
            tip = f"{_fmt_time(t)} {name}: {state} (value {value:g}) {message}".strip()
            body.append(
                f'<circle class="change {"firing" if state == "firing" else "resolved"}"'
                f' cx="{n(x(t))}" cy="{n(y0 + 13)}" r="4"><title>{e(tip)}</title>'
                f"</circle>"
            )
    if len(lanes) > len(shown):
        body.append(
            f'<text class="note" x="{n(f.left)}" y="{n(f.height - 6)}">'
            f"{e(f'+{len(lanes) - len(shown)} more rule/subject pairs in the table')}"
            f"</text>"
        )
    return _svg(chart_id, f, label, body)


# --------------------------------------------------------------------------- page


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{e(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _experiment_tables(x: Any) -> str:
    """A live experiment: its variants, and each one's difference from the control."""
    pct = int(x.confidence * 100)
    variants = _table(
        ["variant", "share", "leads", "revenue", "per lead", "per ping", "sold %"],
        [
            (
                v.name,
                "—" if v.share is None else f"{v.share:.0%}",
                f"{v.leads:,}",
                _money(v.revenue),
                f"{v.per_lead:,.2f}",
                f"{v.per_ping:,.3f}",
                f"{v.sold_pct:.1f}",
            )
            for v in x.variants
        ],
        "num",
    )
    diffs = _table(
        ["variant", "metric", "difference", f"{pct} % interval", "verdict"],
        [
            (
                name if j == 0 else "",
                c.name,
                f"{c.diff:+,.3f}",
                f"[{c.low:+,.3f}, {c.high:+,.3f}]",
                x.verdict(name) if j == 0 else "",
            )
            for name, comps in x.comparisons.items()
            for j, c in enumerate(comps)
        ],
        "num",
    )
    return (
        f'<h2 id="experiment-{e(x.experiment)}">Experiment {e(x.experiment)} (flow '
        f"{e(x.flow)}, control {e(x.control)})</h2>{variants}"
        f'<p class="note">difference from the control, {pct} % bootstrap interval; a verdict '
        f"once both arms have {x.min_leads:,} leads</p>{diffs}"
    )


def _card(title: str, svg: str, note: str = "") -> str:
    return (
        f'<figure class="card"><figcaption>{e(title)}</figcaption>{svg}'
        + (f'<p class="note">{e(note)}</p>' if note else "")
        + "</figure>"
    )


def render(d: HtmlReportData) -> str:
    """The whole page as one string."""
    r = d.summary
    per = _bucket_name(d.bucket_s)
    revenue = svg_time(
        "chart-revenue", f"revenue per {per}", [(t, rev) for t, rev, *_ in d.series], d.bucket_s
    )
    rpp = svg_time(
        "chart-revenue-per-ping",
        f"revenue per ping, per {per}",
        [(t, rev / pings if pings else None) for t, rev, pings, *_ in d.series],
        d.bucket_s,
        kind="line",
    )
    split = svg_split(
        "chart-split",
        "sold and unsold auctions",
        [
            ("sold exclusive", r.sold_exclusive, "sold-exclusive"),
            ("sold shared", r.sold_shared, "sold-shared"),
            ("unsold", r.unsold, "unsold"),
        ],
    )
    buyers = svg_buyer_rates("chart-buyers", "bid, win and accept rate per buyer", r.buyers)
    latency = svg_latency("chart-latency", "ping latency distribution", d.latency, d.deadlines)
    alerts = svg_alerts("chart-alerts", "alert timeline", d.alerts, d.window)

    headline = "".join(
        f'<tr class="{"sub" if k.startswith(" ") else ""}"><th>{e(k.strip())}</th>'
        f"<td>{e(v)}</td></tr>"
        for k, v in [*headline_rows(r), *d.extra.items()]
    )
    buyer_rows = [
        (
            b["buyer_id"],
            b["tier"],
            f"{b['pings']:,}",
            f"{100 * b['bid_rate']:.1f}%",
            _money(b["avg_bid"]),
            f"{b['p50']:.0f} ms",
            f"{b['p99']:.0f} ms",
            f"{b['timeouts']:,}",
            f"{b['errors']:,}",
            f"{b['accepted']:,}",
            f"{100 * b['win_rate']:.1f}%",
            f"{b['posts']:,}",
            f"{100 * b['accept_rate']:.1f}%",
            _money(b["spend"]),
        )
        for b in r.buyers
    ]
    parts = [
        _card(f"Revenue per {per}", revenue),
        _card(
            f"Revenue per ping, per {per}",
            rpp,
            "revenue of the leads received in the bucket ÷ buyers pinged for them",
        ),
        _card("Sold / unsold", split),
        _card(
            "Buyers: bid, win and accept rate",
            buyers,
            "bid rate = bids ÷ pings; win rate = leads won ÷ bids; "
            "accept rate = accepted posts ÷ posts sent",
        ),
        _card("Ping latency", latency, "pings that were sent (filtered buyers are not pinged)"),
        _card("Alerts", alerts),
    ]
    tables = [
        f"<h2>Buyers</h2>{_table(['buyer', 'tier', 'pings', 'bid rate', 'avg bid', 'p50', 'p99', 'timeouts', 'errors', 'leads won', 'win rate', 'posts', 'accept rate', 'spend'], buyer_rows, 'num')}"
    ]
    if r.tiers:
        tables.append(
            "<h2>Sales by tier</h2>"
            + _table(
                ["tier", "sales", "revenue"],
                [(t, f"{c:,}", _money(s)) for t, c, s in r.tiers],
                "num",
            )
        )
    if r.waterfall:
        tables.append(
            "<h2>Post attempts per lead</h2>"
            + _table(["post attempts", "leads"], [(a, f"{c:,}") for a, c in r.waterfall], "num")
        )
    if r.unsold_reasons:
        tables.append(
            "<h2>Why unsold</h2>"
            + _table(
                ["reason", "leads"], [(x or "(none)", f"{c:,}") for x, c in r.unsold_reasons], "num"
            )
        )
    for x in d.experiments:
        tables.append(_experiment_tables(x))
    if d.alerts:
        tables.append(
            "<h2>Alert changes</h2>"
            + _table(
                ["at", "rule", "subject", "state", "value", "message"],
                [
                    (_fmt_time(at), rule, subj, st, f"{v:g}", msg)
                    for rule, subj, st, v, at, msg in d.alerts[:MAX_ALERT_ROWS]
                ],
                "alerts",
            )
            + (
                f'<p class="note">{len(d.alerts) - MAX_ALERT_ROWS:,} more not shown</p>'
                if len(d.alerts) > MAX_ALERT_ROWS
                else ""
            )
        )
    else:
        tables.append('<h2>Alert changes</h2><p class="empty" id="no-alerts">no alerts</p>')
    return page(
        d.title,
        f"{d.scope} · generated {_fmt_time(d.generated_at)} · every table read with FINAL",
        f"""<section id="summary"><h2>Summary</h2><table class="kv">{headline}</table></section>
<section id="charts" class="grid">{"".join(parts)}</section>
<section id="tables">{"".join(tables)}</section>""",
        "pingpost · queried from ClickHouse",
    )


def page(title: str, scope: str, main: str, footer: str, css: str = "") -> str:
    """A self-contained page in the report's style: ``main`` is HTML, the rest text. The
    Content-Security-Policy forbids every script and outside resource."""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)}</title>
<style>{_CSS}{css}</style>
</head>
<body>
<header><h1>{e(title)}</h1>
<p class="scope">{e(scope)}</p></header>
<main>
{main}
</main>
<footer>{e(footer)} · self-contained: no scripts, no external resources</footer>
</body>
</html>
"""


_CSS = """
:root{--fg:#1d2433;--muted:#667085;--line:#e4e7ec;--bg:#f7f8fa;--card:#fff;
--c1:#2e6be6;--c2:#12a594;--c3:#f2a33a;--c4:#d9485f;--c5:#98a2b3}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:var(--fg);background:var(--bg)}
header{padding:20px 28px 8px}h1{margin:0;font-size:22px}
h2{font-size:16px;margin:22px 0 8px}
.scope,.note,footer{color:var(--muted)}.scope{margin:4px 0 0}
main{padding:0 28px 20px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:16px}
.card{margin:0;background:var(--card);border:1px solid var(--line);border-radius:8px;
padding:12px 14px}
figcaption{font-weight:600;margin-bottom:6px}.note{font-size:12px;margin:6px 0 0}
svg.chart{width:100%;height:auto;display:block}
table{border-collapse:collapse;background:var(--card);border:1px solid var(--line)}
th,td{padding:5px 10px;border-bottom:1px solid var(--line);text-align:left}
table.num td:not(:first-child){text-align:right;font-variant-numeric:tabular-nums}
table.kv td{text-align:right;font-variant-numeric:tabular-nums}
table.kv tr.sub th{padding-left:26px;font-weight:normal}
thead th{background:#f0f2f5;font-weight:600}
line.grid{stroke:var(--line);stroke-width:1}
line.axis{stroke:var(--muted)}
text{font-size:11px;fill:var(--muted)}
text.legend,text.buyer,text.lane,text.seg-label{fill:var(--fg)}
text.seg-label{fill:#fff;font-weight:600;font-size:12px}
text.empty{font-size:14px}
text.axis-label{font-size:11px}
rect.bar{fill:var(--c1)}
polyline.line{fill:none;stroke:var(--c2);stroke-width:2}
circle.point{fill:var(--c2)}
rect.sold-exclusive{fill:var(--c1)}rect.sold-shared{fill:var(--c2)}rect.unsold{fill:var(--c5)}
rect.rate-bid{fill:var(--c1)}rect.rate-win{fill:var(--c2)}rect.rate-accept{fill:var(--c3)}
rect.lat-answered{fill:var(--c1)}rect.lat-timeout{fill:var(--c3)}rect.lat-error{fill:var(--c4)}
line.deadline{stroke:var(--c4);stroke-width:2;stroke-dasharray:6 4}
text.deadline-label{fill:var(--c4);font-weight:600}
rect.firing{fill:var(--c4);opacity:.35}rect.firing.open{opacity:.2}
circle.change.firing{fill:var(--c4)}circle.change.resolved{fill:var(--c2)}
p.empty{color:var(--muted)}
footer{padding:10px 28px 24px;font-size:12px}
"""
