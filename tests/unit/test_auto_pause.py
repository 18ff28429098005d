"""Auto-pause as the workers apply it: a buyer failing too often is paused for its
cool-down, resumes by itself, and is judged afresh after resuming."""

from __future__ import annotations

from streams.rules.buyer_stats import PauseTracker
from streams.rules.pinging import plan_pings
from streams.settings import AutoPauseConfig
from tests.unit.test_rules_wired import PING, RAW, parse_settings

CFG = AutoPauseConfig(window_s=10, min_pings=4, max_failure_rate=0.5, cool_down_s=30)


def feed(t: PauseTracker, buyer: str, statuses: str, start_ms: int, step_ms: int = 100) -> None:
    codes = {"b": "bid", "n": "no_bid", "t": "timeout", "e": "error", "f": "filtered"}
    for i, c in enumerate(statuses):
        t.add(buyer, f"{buyer}-{start_ms}-{i}", codes[c], start_ms + i * step_ms)


def states(ts: list) -> list[tuple[str, str]]:
    return [(x.buyer_id, x.state) for x in ts]


def test_pauses_above_threshold_with_enough_pings_and_resumes_after_cool_down() -> None:
    t = PauseTracker({"slow": CFG, "fine": CFG})
    feed(t, "slow", "ttb", 0)  # 3 pings: below min_pings
    feed(t, "fine", "bbbbbt", 0)
    assert t.evaluate(1_000) == []
    feed(t, "slow", "e", 500)  # 4 pings, 3 failed = 75 % > 50 %
    (p,) = t.evaluate(1_000)
    assert (p.buyer_id, p.state, p.pings, p.failure_rate, p.until_ms) == (
        "slow",
        "paused",
        4,
        0.75,
        31_000,
    )
    assert t.paused("slow") == 31_000 and t.paused("fine") is None
    assert t.evaluate(2_000) == []  # one transition, not one per tick
    assert states(t.evaluate(31_000)) == [("slow", "resumed")]
    assert t.paused("slow") is None
    # old failures no longer count: only what happens after the resume
    feed(t, "slow", "bt", 31_100)
    assert t.evaluate(32_000) == []


def test_exactly_at_the_threshold_does_not_pause_and_filtered_rows_do_not_count() -> None:
    t = PauseTracker({"x": CFG})
    feed(t, "x", "ttbbffff", 0)  # 2 of 4 pings failed = 50 %: not above
    assert t.evaluate(1_000) == []


def test_window_slides_and_redeliveries_count_once() -> None:
    t = PauseTracker({"x": CFG})
    feed(t, "x", "tttt", 0)
    feed(t, "x", "tttt", 0)  # the same ping ids again
    feed(t, "x", "bbbb", 20_000)  # the failures are more than 10 s old by then
    assert t.evaluate(21_000) == []


def test_a_paused_buyer_is_filtered_from_the_ping_plan_with_the_reason() -> None:
    s = parse_settings(RAW, env={})
    b = s.buyers[0].id
    targets, filtered = plan_pings(
        s, "solar", PING, 1_000, paused_until=lambda bid: 5_000 if bid == b else None
    )
    assert b not in [x.id for x in targets]
    assert "paused until" in dict((x.id, why) for x, why in filtered)[b]
    targets, _ = plan_pings(
        s, "solar", PING, 6_000, paused_until=lambda bid: 5_000 if bid == b else None
    )
    assert b in [x.id for x in targets]


def test_pause_view_follows_the_recorded_transitions() -> None:
    from streams.rules.buyer_stats import Transition, pause_alert
    from streams.stages.buyer_feeds import PauseView

    v = PauseView({"slow": CFG})
    paused = pause_alert(Transition("slow", "paused", 1_000, 0.75, 4, 31_000), CFG)
    resumed = pause_alert(Transition("slow", "resumed", 31_000, 0.0, 0, None), CFG)
    assert (paused["state"], resumed["state"]) == ("firing", "resolved")
    v.update(paused)
    assert v.paused("slow") == 31_000
    v.update(resumed)
    assert v.paused("slow") is None
    v.update(paused)  # an older record read late: ignored
    assert v.paused("slow") is None
    v.update({**paused, "rule": "low_bid_rate"})  # other alerts are not pauses
    v.update({**paused, "subject": "buyer:unknown"})
    assert v.paused_until == {}


def test_a_restarted_tracker_keeps_the_pause_and_ignores_replayed_failures() -> None:
    t = PauseTracker({"slow": CFG})
    t.seed("slow", "firing", 1_000)  # recorded before the restart
    feed(t, "slow", "tttt", 500)  # replayed outcomes from before the transition
    assert t.paused("slow") == 31_000
    assert t.evaluate(2_000) == []  # no second pause
    assert states(t.evaluate(31_000)) == [("slow", "resumed")]
    t2 = PauseTracker({"slow": CFG})
    t2.seed("slow", "resolved", 5_000)
    feed(t2, "slow", "tttt", 4_000)  # failures before the resume: not counted
    assert t2.evaluate(6_000) == []
