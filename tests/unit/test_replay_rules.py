"""streams.rules.replay: a recorded auction decided again, under its own configuration and
under overrides (counterfactual timeouts, waves, floors, the post model)."""

from __future__ import annotations

from typing import Any

import pytest

from streams.rules.replay import (
    PingRec,
    Recorded,
    Strategy,
    apply_overrides,
    draw,
    replay,
)

T0 = 1_717_243_200_000  # opened (a Saturday: no business-hours premium)
PF = {"state": "CA", "zip": "902", "credit_range": "650-699", "consent": True}

FLOW: dict[str, Any] = {
    "fields": {
        "state": {"type": "string"},
        "zip": {"type": "string"},
        "credit_range": {"type": "string"},
        "consent": {"type": "boolean"},
        "email": {"type": "string"},
    },
    "ping_fields": {"state": {}, "zip": {}, "credit_range": {}, "consent": {}},
    "pii_fields": ["email"],
    "deadline_ms": 750,
    "safety_margin_ms": 50,
    "strategy": {"shared_max": 2},
    "floors": {"base": 10.0, "exclusive_min": 60.0},
}
BUYERS = {
    "a": {"tier": "premium", "timeout_ms": 500},
    "b": {"tier": "premium", "timeout_ms": 500},
    "c": {"tier": "standard", "timeout_ms": 500},
    "d": {"tier": "backup", "timeout_ms": 500},
}


def doc(**flow: Any) -> dict[str, Any]:
    return {"flow": {**FLOW, **flow}, "buyers": {k: dict(v) for k, v in BUYERS.items()}}


def strat(**flow: Any) -> Strategy:
    return Strategy.from_doc(doc(**flow))


def ping(
    buyer: str,
    status: str = "bid",
    price: float | None = None,
    *,
    exclusive: bool = False,
    latency: float = 100.0,
    timeout: float | None = 500.0,
    sent: int = 2,
    reason: str = "",
    **conditions: Any,
) -> PingRec:
    return PingRec(
        buyer_id=buyer,
        tier=BUYERS[buyer]["tier"],
        status=status,
        price=price,
        exclusive=exclusive,
        conditions=conditions,
        sent_at_ms=T0 + sent,
        answered_at_ms=T0 + sent + int(latency),
        latency_ms=latency,
        timeout_ms=timeout if status != "filtered" else None,
        reason=reason,
    )


def recorded(
    pings: list[PingRec], posts: dict[str, str], winners: list[str], total: float
) -> Recorded:
    return Recorded(
        lead_id="lead-1",
        flow="solar",
        ping_fields=PF,
        created_at_ms=T0 - 1000,
        opened_at_ms=T0,
        deadline_at_ms=T0 + 750,
        closed_at_ms=T0 + 400,
        pings=pings,
        posts=posts,
        outcome=("sold_shared" if winners else "unsold"),
        winners=winners,
        price_total=total,
    )


ACC = {"a": 0.5, "b": 0.5, "c": 0.5, "d": 0.5}


def test_the_configuration_it_ran_with_reproduces_a_shared_sale_from_recorded_answers() -> None:
    rec = recorded(
        [ping("a", price=50.0), ping("b", price=40.0), ping("c", "no_bid")],
        {"a": "accepted", "b": "accepted"},
        ["a", "b"],
        90.0,
    )
    out = replay(rec, strat(), ACC)
    assert (out.outcome, sorted(out.winners), out.revenue) == ("sold_shared", ["a", "b"], 90.0)
    assert out.exact and (out.pings, out.posts) == (3, 2)


def test_a_rejection_falls_back_to_the_next_bidder_as_recorded() -> None:
    rec = recorded(
        [ping("a", price=80.0, exclusive=True), ping("b", price=40.0)],
        {"a": "rejected", "b": "accepted"},
        ["b"],
        40.0,
    )
    out = replay(rec, strat(), ACC)
    assert (out.winners, out.posts, out.exact) == (["b"], 2, True)


def test_a_shorter_timeout_turns_a_slow_answer_into_a_timeout() -> None:
    rec = recorded(
        [ping("a", price=50.0, latency=350.0), ping("b", price=40.0, latency=80.0)],
        {"a": "accepted", "b": "accepted"},
        ["a", "b"],
        90.0,
    )
    faster = Strategy.from_doc(apply_overrides(doc(), {"buyers": {"a": {"timeout_ms": 300}}}))
    out = replay(rec, faster, ACC)
    assert out.winners == ["b"] and out.exact
    # ...and the deadline cuts it too: 400 ms - 50 ms margin - 2 ms offset < 350 ms
    out = replay(rec, strat(deadline_ms=400), ACC)
    assert out.winners == ["b"]


def test_a_real_timeout_stays_one_and_a_longer_wait_for_it_is_counted_as_censored() -> None:
    rec = recorded(
        [ping("a", "timeout", latency=300.0, timeout=300.0), ping("b", price=40.0)],
        {"b": "accepted"},
        ["b"],
        40.0,
    )
    same = replay(
        rec,
        Strategy.from_doc(
            {**doc(), "buyers": {**BUYERS, "a": {"tier": "premium", "timeout_ms": 300}}}
        ),
        ACC,
    )
    assert same.censored == 0 and same.exact
    longer = replay(rec, strat(), ACC)  # a's timeout 500 > the 300 it had
    assert (longer.censored, longer.winners, longer.exact) == (1, ["b"], False)


def test_a_higher_exclusive_minimum_turns_an_exclusive_sale_shared_through_the_model() -> None:
    rec = recorded(
        [ping("a", price=70.0, exclusive=True), ping("b", price=40.0), ping("c", price=30.0)],
        {"a": "accepted"},
        ["a"],
        70.0,
    )
    live = replay(rec, strat(), ACC)
    assert (live.outcome, live.winners, live.exact) == ("sold_exclusive", ["a"], True)
    sure = {"a": 1.0, "b": 1.0, "c": 1.0}
    higher = replay(rec, strat(floors={"base": 10.0, "exclusive_min": 75.0}), sure)
    # a's exclusive bid no longer qualifies: shared to b and c, never posted for real
    assert (higher.outcome, sorted(higher.winners)) == ("sold_shared", ["b", "c"])
    assert (higher.model_posts, higher.model_revenue, higher.exact) == (2, 70.0, False)


def test_a_timed_out_post_keeps_its_exclusive_slot_no_fallback() -> None:
    rec = recorded(
        [ping("a", price=80.0, exclusive=True), ping("b", price=40.0)],
        {"a": "timeout"},
        [],
        0.0,
    )
    out = replay(rec, strat(), ACC)
    assert (out.outcome, out.posts, out.exact) == ("unsold", 1, True)


def test_waves_ping_a_later_wave_only_without_an_acceptable_bid() -> None:
    waves = [{"tiers": ["premium"], "timeout_ms": 300}, {"tiers": ["standard"], "timeout_ms": 300}]
    skipped = "not pinged: wave 1 had an acceptable bid"
    rec = recorded(
        [ping("a", price=50.0), ping("c", "filtered", reason=skipped)],
        {"a": "accepted"},
        ["a"],
        50.0,
    )
    out = replay(rec, strat(waves=waves), ACC)
    assert (out.winners, out.pings, out.unobserved, out.exact) == (["a"], 1, 0, True)
    # Without waves c would have been pinged: its answer was never seen (no bid, counted).
    flat = replay(rec, strat(), ACC)
    assert (flat.pings, flat.unobserved, flat.exact) == (2, 1, False)


def test_backup_waves_after_every_bidder_rejected_use_the_real_backup_answers() -> None:
    waves = [{"tiers": ["premium"], "timeout_ms": 300}, {"tiers": ["backup"], "timeout_ms": 300}]
    rec = recorded(
        [ping("a", price=50.0), ping("d", price=20.0, sent=900)],  # d pinged by the post stage
        {"a": "rejected", "d": "accepted"},
        ["d"],
        20.0,
    )
    out = replay(rec, strat(waves=waves), ACC)
    assert (out.winners, out.posts, out.exact) == (["d"], 2, True)


def test_modelled_answers_are_deterministic_and_follow_the_rate() -> None:
    assert draw(3, "lead-1", "a") == draw(3, "lead-1", "a")
    assert draw(3, "lead-1", "a") != draw(4, "lead-1", "a")
    xs = [draw(0, f"lead-{i}", "a") for i in range(20_000)]
    assert all(0.0 <= x < 1.0 for x in xs)
    assert abs(sum(x < 0.3 for x in xs) / len(xs) - 0.3) < 0.015


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"post_timeout_ms": 1}, "cannot override post_timeout_ms"),
        ({"strategy": 3}, "strategy: expected a mapping"),
        ({"buyers": {"zz": {"timeout_ms": 100}}}, "buyers.zz: not a buyer of this flow"),
        ({"buyers": {"a": {"tier": "x"}}}, "buyers.a: only timeout_ms"),
    ],
)
def test_overrides_refuse_what_they_cannot_change_naming_the_key(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        apply_overrides(doc(), overrides)


def test_overrides_merge_strategy_and_floors_key_by_key() -> None:
    out = apply_overrides(doc(), {"strategy": {"exclusive_only": True}, "floors": {"base": 5}})
    assert out["flow"]["strategy"] == {"shared_max": 2, "exclusive_only": True}
    assert out["flow"]["floors"] == {"base": 5, "exclusive_min": 60.0}
    assert doc()["flow"]["floors"] == {"base": 10.0, "exclusive_min": 60.0}  # not mutated


def test_the_round_lasts_until_its_last_answer_or_the_time_it_gave() -> None:
    rec = recorded(
        [ping("a", price=50.0, latency=120.0), ping("b", price=40.0, latency=260.0)],
        {"a": "accepted", "b": "accepted"},
        ["a", "b"],
        90.0,
    )
    out = replay(rec, strat(), ACC)
    assert (out.round_ms, out.bids) == (2 + 260.0, 2)
    shorter = Strategy.from_doc(apply_overrides(doc(), {"buyers": {"b": {"timeout_ms": 200}}}))
    cut = replay(rec, shorter, ACC)
    assert (cut.round_ms, cut.bids, cut.winners) == (2 + 200.0, 1, ["a"])
