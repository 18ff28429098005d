"""The alert state machine and the windowed metrics, without Kafka.

Table-driven: each case is a series of evaluations (value, samples) and the transitions it
must produce — threshold, for-duration, hysteresis, minimum samples, one transition each.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from streams.rules.alerts import AlertEngine, AlertState, step, steps_for
from streams.rules.windows import BUCKETS_MS, Agg, WindowedMetrics, metric_value, quantile
from streams.settings import ConfigError, parse_settings
from streams.settings.metrics import AlertRule
from streams.stages.sink import to_row

W = 10  # base window (s)


def rule(**kw: Any) -> AlertRule:
    base = {
        "name": "r",
        "metric": "bid_rate",
        "scope": "buyer",
        "comparison": "<",
        "threshold": 0.2,
        "min_samples": 10,
    }
    return AlertRule.model_validate({**base, **kw})


def run(r: AlertRule, series: list[tuple[float | None, int]]) -> list[str]:
    """Feed one evaluation per window; list the transitions as 'i:state'."""
    st = AlertState()
    out = []
    for i, (value, samples) in enumerate(series):
        new = step(r, st, value, samples, (i + 1) * W * 1000, W)
        if new:
            out.append(f"{i}:{new}")
    return out


LOW, HIGH, MID = (0.1, 50), (0.5, 50), (0.22, 50)  # bid rates with enough samples

CASES = [
    ("fires at the first breach without 'for'", {}, [HIGH, LOW, LOW], ["1:firing"]),
    ("threshold is strict for '<'", {}, [(0.2, 50)], []),
    ("'<=' includes the threshold", {"comparison": "<="}, [(0.2, 50)], ["0:firing"]),
    (
        "'>' rule",
        {"metric": "avg_response_ms", "comparison": ">", "threshold": 600},
        [(590.0, 50), (601.0, 50)],
        ["1:firing"],
    ),
    (
        "for: 20s needs three breaching windows in a row",
        {"for": "20s"},
        [LOW, LOW, HIGH, LOW, LOW, LOW],
        ["5:firing"],
    ),
    (
        "one good window resets the pending streak",
        {"for": "10s"},
        [LOW, HIGH, LOW, HIGH, LOW, LOW],
        ["5:firing"],
    ),
    ("too few samples never fire (idle buyer)", {}, [(0.0, 9), (0.0, 3), (None, 0)], []),
    ("min_samples reached fires", {}, [(0.0, 9), (0.0, 10)], ["1:firing"]),
    (
        "resolves at once when healthy again (resolve_for defaults to for=0)",
        {},
        [LOW, HIGH],
        ["0:firing", "1:resolved"],
    ),
    (
        "hysteresis: inside the band stays firing",
        {"resolve_threshold": 0.25},
        [LOW, MID, MID, MID, (0.26, 50)],
        ["0:firing", "4:resolved"],
    ),
    (
        "hysteresis: hovering at the threshold does not flap",
        {"resolve_threshold": 0.25},
        [(0.19, 50), (0.21, 50), (0.19, 50), (0.21, 50), (0.19, 50)],
        ["0:firing"],
    ),
    (
        "resolve_for needs consecutive recovered windows",
        {"resolve_for": "10s"},
        [LOW, HIGH, LOW, HIGH, HIGH, HIGH],
        ["0:firing", "4:resolved"],
    ),
    (
        "no data while firing counts toward resolving",
        {"resolve_for": "10s"},
        [LOW, (None, 0), (0.0, 2)],
        ["0:firing", "2:resolved"],
    ),
    (
        "each transition exactly once across a long run",
        {"for": "10s"},
        [LOW] * 10 + [HIGH] * 10 + [LOW] * 10,
        ["1:firing", "11:resolved", "21:firing"],
    ),
]


@pytest.mark.parametrize(
    ("overrides", "series", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_state_machine(
    overrides: dict[str, Any], series: list[tuple[float | None, int]], expected: list[str]
) -> None:
    assert run(rule(**overrides), series) == expected


def test_steps_for() -> None:
    assert [steps_for(d, 10) for d in (0, 10, 20, 60)] == [1, 2, 3, 7]


# --------------------------------------------------------------------------- windows


def bid(
    buyer: str, t: int, status: str = "bid", latency: float = 100.0, price: float | None = 40.0
) -> dict[str, Any]:
    return {
        "buyer_id": buyer,
        "flow": "solar",
        "status": status,
        "answered_at_ms": t,
        "latency_ms": latency,
        "price": price if status == "bid" else None,
    }


def test_windows_count_per_buyer_and_flow_and_merge() -> None:
    m = WindowedMetrics(W)
    t0 = 1_700_000_000_000  # a window boundary (multiple of 10 s)
    for i, status in enumerate(["bid", "bid", "no_bid", "timeout", "error", "filtered"]):
        assert m.add("Bid", bid("a", t0 + i, status, latency=100.0 * (i + 1))) == t0 + i
    m.add("Bid", bid("b", t0 + W * 1000 + 5, "bid", price=60.0))  # next window
    m.add(
        "Delivery",
        {
            "buyer_id": "a",
            "flow": "solar",
            "status": "accepted",
            "price": 40.0,
            "sent_at_ms": t0,
            "latency_ms": 20.0,
        },
    )
    m.add(
        "Delivery",
        {
            "buyer_id": "a",
            "flow": "solar",
            "status": "rejected",
            "price": 40.0,
            "sent_at_ms": t0,
            "latency_ms": 20.0,
        },
    )
    assert (
        m.add(
            "Delivery",
            {
                "buyer_id": "a",
                "flow": "solar",
                "status": "skipped",
                "price": 40.0,
                "sent_at_ms": t0,
                "latency_ms": 0.0,
            },
        )
        is None
    )
    m.add(
        "AuctionResult",
        {
            "flow": "solar",
            "outcome": "sold_exclusive",
            "price_total": 40.0,
            "settled_at_ms": t0 + 50,
        },
    )
    m.add(
        "AuctionResult",
        {"flow": "solar", "outcome": "unsold", "price_total": 0.0, "settled_at_ms": t0 + 60},
    )
    assert m.add("AuctionOpen", {}) is None

    a = m.aggregate(("buyer", "a"), t0 + W * 1000, W * 1000)
    assert (a.pings, a.bids, a.no_bids, a.timeouts, a.errors, a.filtered) == (5, 2, 1, 1, 1, 1)
    assert metric_value(a, "bid_rate") == pytest.approx(0.4)
    assert metric_value(a, "response_rate") == pytest.approx(0.6)
    assert metric_value(a, "timeout_rate") == pytest.approx(0.2)
    assert metric_value(a, "error_rate") == pytest.approx(0.2)
    assert metric_value(a, "avg_bid") == pytest.approx(40.0)
    assert metric_value(a, "avg_response_ms") == pytest.approx(300.0)  # filtered not counted
    assert metric_value(a, "accept_rate") == pytest.approx(0.5)
    assert metric_value(a, "revenue") == pytest.approx(40.0)
    assert metric_value(a, "revenue_per_ping") == pytest.approx(8.0)
    flow = m.aggregate(("flow", "solar"), t0 + W * 1000, W * 1000)
    assert flow.pings == 5 and flow.revenue == pytest.approx(40.0)  # from results, not posts
    assert metric_value(flow, "sell_rate") == pytest.approx(0.5)
    # b only in the second window; a 20 s span merges both windows of the flow.
    assert m.subjects(t0 + W * 1000, W * 1000, "buyer") == {("buyer", "a")}
    both = m.aggregate(("flow", "solar"), t0 + 2 * W * 1000, 2 * W * 1000)
    assert both.pings == 6 and both.bids == 3
    m.expire(t0 + W * 1000)
    assert len(m) == 1


@pytest.mark.parametrize(
    ("latencies", "q", "low", "high"),
    [
        ([100.0] * 10, 0.5, 75, 100),
        ([50.0] * 50 + [900.0] * 50, 0.5, 30, 75),
        ([50.0] * 40 + [900.0] * 60, 0.5, 750, 1000),
        ([10.0] * 99 + [2500.0], 0.99, 5, 10),
        ([10.0] * 98 + [2500.0] * 2, 0.99, 2000, 3000),
        ([20000.0] * 3, 0.5, 10000, 10000),  # the open bucket reports its lower bound
    ],
)
def test_histogram_quantile_is_within_the_bucket(
    latencies: list[float], q: float, low: float, high: float
) -> None:
    agg = Agg()
    for ms in latencies:
        agg.observe_latency(ms)
    got = quantile(agg.hist, q)
    assert got is not None and low <= got <= high, got
    assert quantile([0] * len(BUCKETS_MS), 0.5) is None


def test_engine_evaluates_every_buyer_and_never_goes_back_before_a_seeded_transition() -> None:
    r = rule(metric="avg_response_ms", comparison=">", threshold=600, window="20s", min_samples=2)
    engine = AlertEngine([r], W)
    m = WindowedMetrics(W)
    t0 = 1_700_000_000_000
    for i in range(6):  # six windows: "slow" slow in 2..3 only, "fast" always fast
        for k in range(3):
            t = t0 + i * W * 1000 + k
            m.add("Bid", bid("slow", t, latency=900.0 if i in (2, 3) else 50.0))
            m.add("Bid", bid("fast", t, latency=50.0))
    got = []
    for i in range(1, 7):
        got += [
            (t.subject[1], t.state, (t.at_ms - t0) // 1000)
            for t in engine.evaluate(m, t0 + i * W * 1000)
        ]
    # 20 s window: the mean is over 600 only when both of its windows are slow (at 40 s).
    assert got == [("slow", "firing", 40), ("slow", "resolved", 50)]
    # A restarted engine seeded with the firing transition does not emit it again.
    fresh = AlertEngine([r], W)
    fresh.seed("r", ("buyer", "slow"), "firing", t0 + 40_000)
    again = []
    for i in range(1, 7):
        again += [(t.state, (t.at_ms - t0) // 1000) for t in fresh.evaluate(m, t0 + i * W * 1000)]
    assert again == [("resolved", 50)]
    assert fresh.firing() == []


def test_transition_record_and_sink_row() -> None:
    r = rule(message="check buyer endpoint")
    engine = AlertEngine([r], W)
    m = WindowedMetrics(W)
    t0 = 1_700_000_000_000
    for k in range(20):
        m.add("Bid", bid("a", t0 + k, "no_bid"))
    (t,) = engine.evaluate(m, t0 + W * 1000)
    rec = t.record(W)
    assert rec["alert_id"] == f"r|buyer:a|{t0 + W * 1000}|firing"
    assert rec["state"] == "firing" and rec["value"] == 0.0 and rec["samples"] == 20
    assert rec["message"].startswith("check buyer endpoint")
    table, row = to_row("Alert", rec)  # type: ignore[misc]
    assert table == "alerts"
    assert row[:4] == ["r", "buyer:a", "firing", 0.0] and row[5] == rec["message"]
    _, row = to_row("Alert", {**rec, "value": None})  # type: ignore[misc]
    assert math.isnan(row[3])


# --------------------------------------------------------------------------- configuration


def settings_with(alerts: list[dict[str, Any]], metrics: dict[str, Any] | None = None) -> Any:
    raw = {
        "flows": {
            "solar": {"fields": {"state": {}}, "ping_fields": {"state": {}}, "pii_fields": []}
        },
        "buyers": [
            {
                "id": "sunrise",
                "flows": ["solar"],
                "ping_url": "http://x/ping",
                "post_url": "http://x/post",
            }
        ],
        "alerts": alerts,
    }
    if metrics is not None:
        raw["metrics"] = metrics
    return parse_settings(raw, env={})


GOOD = {
    "name": "slow",
    "metric": "avg_response_ms",
    "scope": "buyer",
    "comparison": ">",
    "threshold": 600,
    "window": "30s",
    "for": "20s",
}


def test_a_valid_rule_with_defaults() -> None:
    (r,) = settings_with([{**GOOD, "webhook": "https://hooks.example/T0K3N"}]).alerts
    assert r.window == 30 and r.for_ == 20 and r.resolve_after == 20 and r.resolve_at == 600
    assert r.webhook is not None and "T0K3N" not in repr(r)  # a secret: never printed


@pytest.mark.parametrize(
    ("change", "metrics", "error"),
    [
        ({"metric": "latency"}, None, "alerts[0].metric: unknown metric 'latency'"),
        ({"scope": "lead"}, None, "alerts[0].scope"),
        ({"comparison": "=="}, None, "alerts[0].comparison"),
        ({"window": "45s"}, None, "alerts[0].window: 45s is not a multiple of metrics.window_s"),
        ({"for": "abc"}, None, "alerts[0].for: 'abc' is not a duration"),
        ({"resolve_threshold": 700}, None, "resolve_threshold 700.0 is above threshold"),
        ({"id": "nobody"}, None, "alerts[0].id: no buyer 'nobody'"),
        ({"min_samples": 0}, None, "alerts[0].min_samples"),
        ({"webhook": "ftp://x"}, None, "alerts[0].webhook.url: must be an http"),
        ({"metric": "sell_rate"}, None, "exists for flows only"),
        ({"colour": "red"}, None, "alerts[0].colour"),
        ({}, {"window_s": 0}, "metrics.window_s"),
        ({}, {"listen": "9464"}, "metrics.listen"),
    ],
)
def test_bad_rules_name_the_key(
    change: dict[str, Any], metrics: dict[str, Any] | None, error: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        settings_with([{**GOOD, **change}], metrics)
    assert error in str(exc.value), str(exc.value)


def test_duplicate_rule_names_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"alerts\[1\].name: duplicate rule name 'slow'"):
        settings_with([GOOD, GOOD])


def test_demo_config_has_the_three_default_rules() -> None:
    from streams.settings import load_settings

    s = load_settings("config/demo.yaml")
    by_metric = {r.metric: r for r in s.alerts}
    assert by_metric["bid_rate"].comparison == "<" and by_metric["bid_rate"].threshold == 0.2
    assert by_metric["avg_response_ms"].threshold == 600
    assert "revenue_per_ping" in by_metric
    assert all(r.min_samples >= 10 for r in s.alerts)


def test_an_experiment_variant_gets_its_own_leads_sold_and_revenue() -> None:
    from streams.stages.metrics import MetricsCollector

    m = WindowedMetrics(W)
    t0 = 1_700_000_000_000
    for variant, outcome, price in (
        ("control", "sold_shared", 90.0),
        ("control", "unsold", 0.0),
        ("low-floor", "sold_shared", 120.0),
        ("", "sold_exclusive", 80.0),  # a lead in no experiment
    ):
        m.add(
            "AuctionResult",
            {
                "flow": "solar",
                "variant": variant,
                "outcome": outcome,
                "price_total": price,
                "settled_at_ms": t0 + 10,
            },
        )
    end, span = t0 + W * 1000, W * 1000
    flow = m.aggregate(("flow", "solar"), end, span)
    assert (flow.leads, flow.sold, flow.revenue) == (4, 3, 290.0)
    ctl = m.aggregate(("variant", "solar/control"), end, span)
    assert (ctl.leads, ctl.sold, ctl.revenue) == (2, 1, 90.0)
    assert m.subjects(end, span, "variant") == {
        ("variant", "solar/control"),
        ("variant", "solar/low-floor"),
    }
    # /metrics: leads, sell_rate and revenue per variant, nothing it cannot know
    engine = AlertEngine([], W)
    collector = MetricsCollector(m, engine, span, 0, {}, now_ms=lambda: end)
    exported = {
        (f.name, tuple(s.labels.values())): s.value
        for f in collector.collect()
        for s in f.samples
        if s.labels.get("scope") == "variant"
    }
    assert exported == {
        ("pingpost_leads", ("variant", "solar/control")): 2.0,
        ("pingpost_sell_rate", ("variant", "solar/control")): 0.5,
        ("pingpost_revenue", ("variant", "solar/control")): 90.0,
        ("pingpost_leads", ("variant", "solar/low-floor")): 1.0,
        ("pingpost_sell_rate", ("variant", "solar/low-floor")): 1.0,
        ("pingpost_revenue", ("variant", "solar/low-floor")): 120.0,
    }


def test_a_ping_round_counts_as_its_answers() -> None:
    """A ``PingRound`` (one record per round on the bids topic) counts exactly as its
    answers one by one would, and its event time is its latest answer's."""
    t0 = 1_700_000_000_000
    answers = [
        bid("a", t0 + 1, "bid", price=40.0),
        bid("b", t0 + 7, "timeout"),
        bid("c", t0 + 3, "filtered"),
    ]
    one_by_one, as_round = WindowedMetrics(W), WindowedMetrics(W)
    for a in answers:
        one_by_one.add("Bid", a)
    assert as_round.add("PingRound", {"lead_id": "l", "open": {}, "answers": answers}) == t0 + 7
    assert as_round.windows == one_by_one.windows
    assert as_round.add("PingRound", {"lead_id": "l", "open": {}, "answers": []}) is None
