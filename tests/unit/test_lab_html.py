"""The replay's HTML page: self-contained (no script, no external resource), every table and
figure the terminal shows, escaped."""

from __future__ import annotations

from streams.tools.lab_html import render_replay
from streams.tools.replay import Arm, Comparison, ReplayResult


def result() -> ReplayResult:
    base = Arm(auctions=10, revenue=500.0, pings=40, sold=8, shared=8)
    cand = Arm(auctions=10, revenue=560.0, pings=40, sold=9, shared=9)
    base.wins, base.spend = {"<b>ad</b>": 8}, {"<b>ad</b>": 500.0}
    cand.wins, cand.spend = {"<b>ad</b>": 9}, {"<b>ad</b>": 560.0}
    return ReplayResult(
        base,
        cand,
        Arm(auctions=10, revenue=500.0),
        [Comparison("revenue per lead", 50.0, 56.0, 4.0, 8.0)],
        exact=10,
        reproduced=10,
    )


def test_the_page_is_self_contained_and_escapes_what_it_shows() -> None:
    page = render_replay(result(), "Replay: x.yaml", "since 1h")
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "&lt;b&gt;ad&lt;/b&gt;" in page and "<b>ad</b>" not in page
    for anchor in ('id="side-by-side"', 'id="chart-differences"', 'id="chart-spend"'):
        assert anchor in page
    assert "+6.000" in page and "[+4.000, +8.000]" in page  # the difference and its interval
    assert "10 of them reproduce" in page or "10 of 10" in page
