"""The timeout proposal (streams.tools.advice._propose): a significant gain that keeps the
round as fast wins; else the shortest option that loses nothing measurable; else keep."""

from __future__ import annotations

from streams.tools.advice import DEADLINE, Option, _propose, proposed_overrides


def opt(
    ms: int, diff: float, low: float, high: float, p99: float, now: int = 500, p50: float = 100
) -> Option:
    return Option("b", ms, ms == now, diff, low, high, round_p50=p50, round_p99=p99)


def test_a_significant_gain_that_keeps_the_round_as_fast_is_proposed() -> None:
    opts = [opt(200, 1.5, 0.4, 2.6, 210), opt(300, 0.9, 0.1, 1.7, 300), opt(500, 0, 0, 0, 500)]
    assert _propose("b", 500, opts, 500).proposed_ms == 200


def test_a_gain_that_slows_the_round_is_not() -> None:
    opts = [opt(500, 0, 0, 0, 500), opt(800, 2.0, 1.0, 3.0, 790)]
    assert _propose("b", 500, opts, 500).proposed_ms == 500


def test_without_a_gain_the_shortest_harmless_timeout_that_speeds_the_round_is_proposed() -> None:
    opts = [
        opt(100, -3.0, -4.0, -2.0, 100),  # loses revenue: never
        opt(250, -0.2, -0.6, 0.1, 250),  # nothing significant, and a faster round
        opt(500, 0, 0, 0, 500),
    ]
    advice = _propose("b", 500, opts, 500)
    assert (advice.proposed_ms, "no significant revenue loss" in advice.why) == (250, True)


def test_a_shorter_timeout_that_does_not_speed_the_round_is_not_proposed() -> None:
    # Another buyer's timeout bounds the round: shortening this one buys no time.
    opts = [opt(250, -0.01, -0.02, 0.0, 500), opt(500, 0, 0, 0, 500)]
    advice = _propose("b", 500, opts, 500)
    assert advice.proposed_ms == 500 and advice.why.startswith("keep")


def test_when_every_shorter_value_loses_revenue_the_timeout_stays() -> None:
    opts = [opt(200, -2.0, -3.0, -1.0, 200), opt(500, 0, 0, 0, 500)]
    advice = _propose("b", 500, opts, 500)
    assert advice.proposed_ms == 500 and advice.why.startswith("keep")


def test_the_proposals_become_a_strategy_files_keys() -> None:
    from streams.tools.advice import Advice, AdviceResult

    result = AdviceResult("solar", 10, 300.0, 500.0)
    result.advice = [
        Advice("b", 500, [], 250, ""),
        Advice("c", 500, [], 500, "keep"),
        Advice(DEADLINE, 750, [], 600, ""),
    ]
    assert proposed_overrides(result) == {"buyers": {"b": {"timeout_ms": 250}}, "deadline_ms": 600}
