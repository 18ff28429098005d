"""``pingpost replay --html PATH``: the replay as a self-contained page, styled like the report
(no scripts, no external resources): the side-by-side table, the differences with their
intervals drawn on a common zero line, and each buyer's spend in both arms."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from streams.tools.html_report import _table, e, page
from streams.tools.replay import Comparison, ReplayResult, buyer_rows, cand_model_line, format_rows

__all__ = ["render_replay", "write_replay_html"]

_EXTRA_CSS = """
rect.base{fill:var(--c5)}rect.cand{fill:var(--c1)}
line.zero{stroke:var(--fg);stroke-width:1}
line.ci{stroke:var(--c1);stroke-width:3}circle.est{fill:var(--c1)}
line.ci.sig{stroke:var(--c2)}circle.est.sig{fill:var(--c2)}
"""


def _interval_chart(comparisons: list[Comparison]) -> str:
    """One row per metric: the interval as a bar and the estimate as a dot, each metric on
    its own scale around zero (units differ)."""
    w, row, left, labels = 640, 34, 130, 190  # labels: the right-hand figures' width
    h = row * len(comparisons) + 20
    parts = []
    for i, c in enumerate(comparisons):
        y = 16 + i * row
        span = max(abs(c.low), abs(c.high), abs(c.diff), 1e-9) * 1.15
        half = (w - left - labels) / 2

        def x(v: float, span: float = span, half: float = half) -> float:
            return left + half + v / span * half

        sig = " sig" if c.significant else ""
        parts.append(f'<text x="4" y="{y + 4}" class="legend">{e(c.name)}</text>')
        parts.append(
            f'<line class="zero" x1="{x(0):.1f}" x2="{x(0):.1f}" y1="{y - 10}" y2="{y + 10}"/>'
        )
        parts.append(
            f'<line class="ci{sig}" x1="{x(c.low):.1f}" x2="{x(c.high):.1f}" y1="{y}" y2="{y}"/>'
        )
        parts.append(f'<circle class="est{sig}" cx="{x(c.diff):.1f}" cy="{y}" r="5"/>')
        parts.append(
            f'<text x="{w - 4}" y="{y + 4}" text-anchor="end">{c.diff:+.3g} '
            f"[{c.low:+.3g}, {c.high:+.3g}]</text>"
        )
    return (
        f'<svg class="chart" id="chart-differences" viewBox="0 0 {w} {h}" role="img" '
        f'aria-label="candidate minus baseline with intervals">{"".join(parts)}</svg>'
    )


def _spend_chart(result: ReplayResult) -> str:
    rows = [
        (b, result.baseline.spend.get(b, 0.0), result.candidate.spend.get(b, 0.0))
        for b in sorted(set(result.baseline.spend) | set(result.candidate.spend))
    ]
    if not rows:
        return '<p class="empty">no sales in either arm</p>'
    w, bar, gap, left = 640, 11, 10, 110
    top = max(max(b, c) for _, b, c in rows) or 1.0
    h = len(rows) * (2 * bar + gap) + 10
    parts = []
    for i, (buyer, b, c) in enumerate(rows):
        y = 5 + i * (2 * bar + gap)
        parts.append(f'<text x="4" y="{y + bar + 3}" class="buyer">{e(buyer)}</text>')
        for j, (cls, v) in enumerate((("base", b), ("cand", c))):
            width = (w - left - 90) * v / top
            yy = y + j * bar
            parts.append(
                f'<rect class="{cls}" x="{left}" y="{yy}" width="{width:.1f}" height="{bar - 2}"/>'
            )
            parts.append(f'<text x="{left + width + 4:.1f}" y="{yy + bar - 3}">{v:,.0f}</text>')
    return (
        f'<svg class="chart" id="chart-spend" viewBox="0 0 {w} {h}" role="img" '
        f'aria-label="spend per buyer, baseline (grey) and candidate (blue)">{"".join(parts)}</svg>'
    )


def render_replay(result: ReplayResult, title: str, scope: str) -> str:
    pct = int(result.confidence * 100)
    diffs = _table(
        ["", "baseline", "candidate", "difference", f"{pct} % interval", "significant"],
        [
            (
                c.name,
                f"{c.baseline:,.3f}",
                f"{c.candidate:,.3f}",
                f"{c.diff:+,.3f}",
                f"[{c.low:+,.3f}, {c.high:+,.3f}]",
                "yes" if c.significant else "no",
            )
            for c in result.comparisons
        ],
        "num",
    )
    b = result.baseline
    notes = [
        f"Baseline decided {result.exact:,} of {b.auctions:,} auctions from recorded answers "
        f"alone; {result.reproduced:,} of them reproduce the recorded outcome.",
        f"Model use (candidate): {cand_model_line(result)}.",
        f"{result.duplicates:,} duplicate leads left out"
        + (
            f"; {result.fallback:,} auctions had no recorded configuration version"
            if result.fallback
            else ""
        )
        + ".",
    ]
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return page(
        title,
        f"{scope} · generated {now} · {result.resamples} bootstrap resamples, paired by auction",
        f"""<section id="side-by-side"><h2>Recorded, baseline, candidate</h2>
{_table(["", "recorded", "baseline", "candidate"], format_rows(result), "num")}</section>
<section id="differences"><h2>Candidate − baseline</h2>
<figure class="card">{_interval_chart(result.comparisons)}<p class="note">dot: the difference over
the window; bar: its {pct} % interval; green: significant (the interval excludes 0)</p></figure>
{diffs}</section>
<section id="buyers"><h2>Per buyer</h2>
<figure class="card"><figcaption>spend: baseline (grey), candidate (blue)</figcaption>{_spend_chart(result)}</figure>
{_table(["buyer", "wins rec.", "wins base", "wins cand.", "spend rec.", "spend base", "spend cand."], buyer_rows(result), "num")}</section>
<section id="notes"><h2>How much rests on models</h2>{"".join(f"<p>{e(x)}</p>" for x in notes)}</section>""",
        "pingpost replay · docs/strategy-lab.md",
        _EXTRA_CSS,
    )


def write_replay_html(result: ReplayResult, path: str, title: str, scope: str) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_replay(result, title, scope), encoding="utf-8")
    return out.resolve()
