"""Auction, post and ping rules: decide/acceptable/close_lag_ms, the post waterfall
(next_batch, condition_failure), bodies and ids, and ping planning."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from streams.rules.auction import acceptable, close_lag_ms, decide
from streams.rules.leads import redact, validate_lead
from streams.rules.pinging import ping_body, ping_id_for, plan_pings
from streams.rules.posting import condition_failure, next_batch, post_body, post_id_for
from streams.settings import StrategyConfig, load_settings, parse_settings

#: The time the plans are made at (the rules take the clock as an argument).
NOW_MS = int(time.time() * 1000)


REPO = Path(__file__).resolve().parents[2]
DEMO = load_settings(REPO / "config" / "demo.yaml")
STRATEGY = StrategyConfig()  # highest, shared_max 3, min_price 0
T0 = 1_717_243_200_000  # lead created
MIN = 60_000
CLOSE = T0 + 1_000
PF = {"state": "CA", "zip": "902", "homeowner": True, "consent": True}


def bid(
    buyer: str,
    price: float | None,
    *,
    exclusive: bool = False,
    at: int = 100,
    status: str = "bid",
    **conditions: Any,
) -> dict[str, Any]:
    """A Bid as the auction table keeps it (answered_at_ms relative to T0)."""
    return {
        "buyer_id": buyer,
        "tier": "standard",
        "ping_id": f"ping-{buyer}",
        "status": status,
        "price": price,
        "exclusive": exclusive,
        "conditions": {
            "max_age_minutes": None,
            "states": None,
            "require_consent": False,
            "exclusive_required": False,
            **conditions,
        },
        "answered_at_ms": T0 + at,
    }


def ranked(
    bids: list[dict[str, Any]],
    pf: dict[str, Any] = PF,
    at_ms: int = CLOSE,
    strategy: StrategyConfig = STRATEGY,
) -> list[str]:
    return [c["buyer_id"] for c in decide(bids, pf, strategy, T0, at_ms).candidates]


# --------------------------------------------------------------------------- decide


@pytest.mark.parametrize(
    ("bids", "order"),
    [
        ([bid("a", 10), bid("b", 30), bid("c", 20)], ["b", "c", "a"]),
        ([bid("a", 10.01), bid("b", 10.0)], ["a", "b"]),
        # tie on price: the earlier answer first, then buyer id
        ([bid("a", 25, at=300), bid("b", 25, at=200)], ["b", "a"]),
        ([bid("z", 25, at=200), bid("m", 25, at=200), bid("a", 25, at=250)], ["m", "z", "a"]),
        ([bid("b", 25, at=200), bid("a", 25, at=200)], ["a", "b"]),
    ],
    ids=["by price", "cents", "tie earlier answer", "tie answer then id", "tie id"],
)
def test_ranking(bids: list[dict[str, Any]], order: list[str]) -> None:
    assert ranked(bids) == order
    assert ranked(list(reversed(bids))) == order  # independent of arrival order


@pytest.mark.parametrize(
    ("bids", "mode", "slots", "first"),
    [
        ([bid("a", 50, exclusive=True), bid("b", 40), bid("c", 30)], "exclusive", 1, "a"),
        ([bid("a", 50, exclusive_required=True), bid("b", 40)], "exclusive", 1, "a"),
        ([bid("a", 50), bid("b", 40, exclusive=True), bid("c", 30)], "shared", 3, "a"),
        ([bid("a", 50)], "shared", 3, "a"),
        ([bid("a", 10, exclusive=True), bid("b", 60)], "shared", 3, "b"),
    ],
    ids=[
        "best exclusive",
        "exclusive_required",
        "best shared",
        "single shared",
        "exclusive loses on price",
    ],
)
def test_decide_mode(bids: list[dict[str, Any]], mode: str, slots: int, first: str) -> None:
    d = decide(bids, PF, STRATEGY, T0, CLOSE)
    assert (d.mode, d.slots) == (mode, slots)
    assert d.candidates[0]["buyer_id"] == first


def test_shared_slots_follow_strategy() -> None:
    d = decide([bid("a", 5), bid("b", 4)], PF, StrategyConfig(shared_max=5), T0, CLOSE)
    assert (d.mode, d.slots) == ("shared", 5)


@pytest.mark.parametrize(
    "bids",
    [
        [],
        [
            bid("a", None, status="no_bid"),
            bid("b", None, status="timeout"),
            bid("c", None, status="error"),
            bid("d", None, status="filtered"),
        ],
        [bid("a", 99, status="timeout")],  # a price on a failed ping is not a bid
        [bid("a", None)],  # a "bid" without a price
    ],
    ids=["no bids", "only non-bids", "late priced answer", "bid without price"],
)
def test_decide_none(bids: list[dict[str, Any]]) -> None:
    d = decide(bids, PF, STRATEGY, T0, CLOSE)
    assert (d.mode, d.slots, d.candidates) == ("none", 0, [])


def test_candidates_are_post_order_records() -> None:
    b = bid("a", 42, exclusive=True, at=77, states=["CA"])
    d = decide([b, bid("x", None, status="no_bid")], PF, STRATEGY, T0, CLOSE)
    assert d.candidates == [
        {
            "buyer_id": "a",
            "tier": "standard",
            "ping_id": "ping-a",
            "price": 42.0,
            "exclusive": True,
            "conditions": b["conditions"],
            "answered_at_ms": T0 + 77,
        }
    ]
    assert isinstance(d.candidates[0]["price"], float)


# --------------------------------------------------------------------------- acceptable


@pytest.mark.parametrize(
    ("b", "pf", "at_ms", "ok"),
    [
        (bid("a", 10), PF, CLOSE, True),
        (bid("a", 10, states=["CA", "TX"]), PF, CLOSE, True),
        (bid("a", 10, states=["TX", "AZ"]), PF, CLOSE, False),
        (bid("a", 10, states=[]), PF, CLOSE, False),
        (bid("a", 10, states=["CA"]), {**PF, "state": None}, CLOSE, False),
        (bid("a", 10, require_consent=True), PF, CLOSE, True),
        (bid("a", 10, require_consent=True), {**PF, "consent": False}, CLOSE, False),
        (
            bid("a", 10, require_consent=True),
            {k: v for k, v in PF.items() if k != "consent"},
            CLOSE,
            False,
        ),
        (bid("a", 10, require_consent=True), {**PF, "consent": "true"}, CLOSE, False),
        (bid("a", 10, require_consent=False), {**PF, "consent": False}, CLOSE, True),
        (bid("a", 10, max_age_minutes=5), PF, T0 + 5 * MIN, True),
        (bid("a", 10, max_age_minutes=5), PF, T0 + 5 * MIN + 1, False),
        (bid("a", 10, max_age_minutes=0.5), PF, T0 + 29_000, True),
        (bid("a", 10, max_age_minutes=0.5), PF, T0 + 31_000, False),
        (bid("a", 0.0), PF, CLOSE, True),
        (bid("a", None, status="no_bid"), PF, CLOSE, False),
    ],
    ids=[
        "plain",
        "state in list",
        "state outside",
        "empty states",
        "no state",
        "consent given",
        "consent false",
        "consent missing",
        "consent not bool",
        "consent not required",
        "age at limit",
        "age over",
        "half minute ok",
        "half minute over",
        "zero price",
        "no bid",
    ],
)
def test_acceptable(b: dict[str, Any], pf: dict[str, Any], at_ms: int, ok: bool) -> None:
    got, reason = acceptable(b, pf, STRATEGY, T0, at_ms)
    assert got is ok
    assert (reason == "") is ok


def test_price_floor() -> None:
    floor = StrategyConfig(min_price=20)
    assert acceptable(bid("a", 19.99), PF, floor, T0, CLOSE)[0] is False
    assert acceptable(bid("a", 20), PF, floor, T0, CLOSE)[0] is True
    assert ranked([bid("a", 19), bid("b", 25)], strategy=floor) == ["b"]


def test_unacceptable_best_bid_does_not_win() -> None:
    d = decide(
        [bid("a", 90, exclusive=True, states=["TX"]), bid("b", 40), bid("c", 30)],
        PF,
        STRATEGY,
        T0,
        CLOSE,
    )
    assert d.mode == "shared"
    assert [c["buyer_id"] for c in d.candidates] == ["b", "c"]


# --------------------------------------------------------------------------- close_lag_ms


@pytest.mark.parametrize(
    ("reason", "closed", "deadline", "last", "lag"),
    [
        ("deadline", 1_000.0 + 12.5, 1_000, 900, 12.5),
        ("deadline", 990.0, 1_000, 900, 0.0),
        ("recovery", 5_000.0, 1_000, None, 4_000.0),
        ("all_answered", 620.0, 1_000, 600, 20.0),
        ("all_answered", 600.0, 1_000, 600, 0.0),
        ("all_answered", 620.0, 1_000, None, 0.0),
    ],
    ids=["after deadline", "early timer", "recovery", "all answered", "same ms", "no answers"],
)
def test_close_lag(reason: str, closed: float, deadline: int, last: int | None, lag: float) -> None:
    assert close_lag_ms(reason, closed, deadline, last) == pytest.approx(lag)


# --------------------------------------------------------------------------- conditions at post


def order_of(
    bids: list[dict[str, Any]], pf: dict[str, Any] = PF, at_ms: int = CLOSE
) -> dict[str, Any]:
    d = decide(bids, pf, STRATEGY, T0, at_ms)
    return {
        "lead_id": "lead-1",
        "flow": "solar",
        "ping_fields": pf,
        "created_at_ms": T0,
        "mode": d.mode,
        "slots": d.slots,
        "candidates": d.candidates,
    }


@pytest.mark.parametrize(
    ("conds", "pf", "at_ms", "fails"),
    [
        ({}, PF, CLOSE, None),
        ({"max_age_minutes": 5}, PF, T0 + 5 * MIN, None),
        ({"max_age_minutes": 5}, PF, T0 + 6 * MIN, "max_age"),
        ({"states": ["TX"]}, PF, CLOSE, "state"),
        ({"require_consent": True}, {**PF, "consent": False}, CLOSE, "consent"),
    ],
    ids=["none", "age ok", "age over", "state", "consent"],
)
def test_condition_failure(
    conds: dict[str, Any], pf: dict[str, Any], at_ms: int, fails: str | None
) -> None:
    cand = {"buyer_id": "a", "conditions": conds}
    order = {"ping_fields": pf, "created_at_ms": T0}
    why = condition_failure(cand, order, at_ms)
    if fails is None:
        assert why is None
    else:
        assert why is not None and fails in why


def test_max_age_holds_at_close_and_fails_after_slow_first_post() -> None:
    bids = [bid("a", 60, exclusive=True), bid("b", 40, exclusive=True, max_age_minutes=5)]
    order = order_of(bids, at_ms=T0 + 4 * MIN)  # closes 4 min after creation
    assert [c["buyer_id"] for c in order["candidates"]] == ["a", "b"]
    mode, batch, skipped = next_batch(order, set(), [], None, 3, T0 + 4 * MIN)
    assert (mode, [c["buyer_id"] for c in batch], skipped) == ("exclusive", ["a"], [])
    # a's post took 2 minutes and was rejected: b's bid no longer holds
    mode, batch, skipped = next_batch(order, {"a"}, [], None, 3, T0 + 6 * MIN)
    assert batch == []
    assert [(c["buyer_id"], "max_age" in why) for c, why in skipped] == [("b", True)]


# --------------------------------------------------------------------------- next_batch

#   A excl 50 > B 40 > X excl 35 > C 30 > D 20 > E 10 > F 5
WATERFALL = order_of(
    [
        bid("a", 50, exclusive=True),
        bid("b", 40),
        bid("x", 35, exclusive=True),
        bid("c", 30),
        bid("d", 20),
        bid("e", 10),
        bid("f", 5),
    ]
)


@pytest.mark.parametrize(
    ("tried", "sold", "sold_mode", "mode", "batch"),
    [
        # exclusive winner first, alone
        (set(), [], None, "exclusive", ["a"]),
        # exclusive winner rejected -> next candidate B is non-exclusive -> shared top 3
        ({"a"}, [], None, "shared", ["b", "c", "d"]),
        # shared batch: B sold, C and D failed -> both freed slots refilled
        ({"a", "b", "c", "d"}, ["b"], "shared", "shared", ["e", "f"]),
        # B and D sold, C failed: one slot left
        ({"a", "b", "c", "d"}, ["b", "d"], "shared", "shared", ["e"]),
        # all three sold: nothing more
        ({"a", "b", "c", "d"}, ["b", "c", "d"], "shared", "shared", []),
        # after a shared sale the exclusive bid X is never used, even with free slots
        ({"a", "b", "c", "d", "e", "f"}, ["b"], "shared", "shared", []),
        # after an exclusive sale nothing more
        ({"a"}, ["a"], "exclusive", "exclusive", []),
        # everyone tried, nothing sold
        ({"a", "b", "x", "c", "d", "e", "f"}, [], None, "none", []),
    ],
    ids=[
        "exclusive first",
        "fallback to shared",
        "refill two slots",
        "refill last slot",
        "slots full",
        "no exclusive after shared sale",
        "done after exclusive sale",
        "exhausted",
    ],
)
def test_waterfall(
    tried: set[str], sold: list[str], sold_mode: str | None, mode: str, batch: list[str]
) -> None:
    got_mode, got_batch, skipped = next_batch(WATERFALL, tried, sold, sold_mode, 3, CLOSE)
    assert got_mode == mode
    assert [c["buyer_id"] for c in got_batch] == batch
    assert skipped == []
    assert not {c["buyer_id"] for c in got_batch} & tried


def test_exclusive_fallback_to_next_exclusive() -> None:
    order = order_of(
        [bid("a", 50, exclusive=True), bid("b", 45, exclusive_required=True), bid("c", 40)]
    )
    assert [c["buyer_id"] for c in next_batch(order, {"a"}, [], None, 3, CLOSE)[1]] == ["b"]
    mode, batch, _ = next_batch(order, {"a", "b"}, [], None, 3, CLOSE)
    assert (mode, [c["buyer_id"] for c in batch]) == ("shared", ["c"])


def test_shared_batch_respects_shared_max() -> None:
    order = order_of([bid(f"b{i}", 50 - i) for i in range(6)])
    _, batch, _ = next_batch(order, set(), [], None, 2, CLOSE)
    assert [c["buyer_id"] for c in batch] == ["b0", "b1"]
    _, batch, _ = next_batch(order, {"b0", "b1"}, ["b0"], "shared", 2, CLOSE)
    assert [c["buyer_id"] for c in batch] == ["b2"]


def test_shared_batch_skips_candidates_whose_conditions_fail() -> None:
    order = order_of([bid("a", 50), bid("b", 40, max_age_minutes=1), bid("c", 30), bid("d", 20)])
    mode, batch, skipped = next_batch(order, set(), [], None, 3, T0 + 2 * MIN)
    assert mode == "shared"
    assert [c["buyer_id"] for c in batch] == ["a", "c", "d"]
    assert [c["buyer_id"] for c, _ in skipped] == ["b"]


def test_no_candidates() -> None:
    order = order_of([])
    assert next_batch(order, set(), [], None, 3, CLOSE) == ("none", [], [])


# --------------------------------------------------------------------------- post body and ids

LEAD = {
    "flow": "solar",
    "state": "CA",
    "zip": "90210",
    "homeowner": True,
    "electric_bill": "$200-300",
    "credit_range": "700+",
    "property_type": "single_family",
    "consent": True,
    "first_name": "Ada",
    "last_name": "Lovelace",
    "email": "ada@example.com",
    "phone": "+13105550100",
    "address": "1 Main St, Beverly Hills",
}
PII = {
    "first_name": "Ada",
    "last_name": "Lovelace",
    "email": "ada@example.com",
    "phone": "+13105550100",
    "address": "1 Main St, Beverly Hills",
}


def demo_view() -> Any:
    v = validate_lead(DEMO, LEAD, received_at_ms=T0, source="test", lead_id="lead-9")
    return redact(DEMO, v)


def test_post_body() -> None:
    view = demo_view()
    order = {"lead_id": "lead-9", "flow": "solar", "ping_fields": view.ping_fields}
    cand = {"buyer_id": "sunrise", "ping_id": "ping-xyz", "price": 45.5}
    body = post_body(order, view.pii, cand, "post-abc", True)
    for name, value in PII.items():
        assert body[name] == value
    assert body["zip"] == "902"  # the value the buyer bid on
    assert body["state"] == "CA"
    assert body["homeowner"] is True
    assert body["ping_id"] == "ping-xyz"
    assert body["post_id"] == "post-abc"
    assert body["price"] == 45.5
    assert body["exclusive"] is True
    assert body["lead_id"] == "lead-9"
    assert post_body(order, view.pii, cand, "post-abc", False)["exclusive"] is False
    json.dumps(body)  # serialisable as is


def test_post_body_ping_data_wins() -> None:
    order = {"lead_id": "l", "flow": "solar", "ping_fields": {"state": "CA", "zip": "902"}}
    pii = {"email": "ada@example.com", "state": "TX", "zip": "73301"}
    body = post_body(order, pii, {"buyer_id": "b", "ping_id": "p", "price": 1.0}, "q", False)
    assert body["state"] == "CA" and body["zip"] == "902"
    assert body["email"] == "ada@example.com"


def test_post_body_ids_cannot_be_overridden_by_lead_data() -> None:
    order = {"lead_id": "l", "flow": "solar", "ping_fields": {"price": 0, "post_id": "evil"}}
    body = post_body(
        order, {"ping_id": "evil"}, {"buyer_id": "b", "ping_id": "p", "price": 7.0}, "q", False
    )
    assert (body["price"], body["post_id"], body["ping_id"]) == (7.0, "q", "p")


def test_post_id_deterministic_and_distinct() -> None:
    assert post_id_for("lead-1", "sunrise") == post_id_for("lead-1", "sunrise")
    ids = {
        post_id_for(lead, buyer)
        for lead in ("lead-1", "lead-2")
        for buyer in ("sunrise", "greenleaf", "brightpath")
    }
    assert len(ids) == 6
    # no ambiguity from concatenation
    assert post_id_for("ab", "c") != post_id_for("a", "bc")
    assert post_id_for("lead-1", "sunrise") != ping_id_for("lead-1", "sunrise")


def test_ping_id_deterministic_and_distinct() -> None:
    assert ping_id_for("lead-1", "sunrise") == ping_id_for("lead-1", "sunrise")
    ids = {ping_id_for(lead, b.id) for lead in ("lead-1", "lead-2") for b in DEMO.buyers}
    assert len(ids) == 2 * len(DEMO.buyers)
    assert ping_id_for("ab", "c") != ping_id_for("a", "bc")
    assert "lead-1" not in ping_id_for("lead-1", "sunrise")  # opaque to buyers


# --------------------------------------------------------------------------- ping body


def test_ping_body_has_only_ping_fields() -> None:
    view = demo_view()
    body = ping_body(view.ping_fields, "solar", "ping-1", 412)
    assert set(body) == {
        "state",
        "zip",
        "homeowner",
        "electric_bill",
        "credit_range",
        "property_type",
        "consent",
        "ping_id",
        "flow",
        "tmax_ms",
    }
    assert body["zip"] == "902"
    assert (body["ping_id"], body["flow"], body["tmax_ms"]) == ("ping-1", "solar", 412)
    text = json.dumps(body).lower()
    for name, value in PII.items():
        assert name not in body
        assert value.lower() not in text
    assert "90210" not in text


def test_ping_body_does_not_alias_ping_fields() -> None:
    pf = {"state": "CA"}
    body = ping_body(pf, "solar", "p", 100)
    body["x"] = 1
    assert pf == {"state": "CA"}


# --------------------------------------------------------------------------- plan_pings


@pytest.mark.parametrize(
    ("state", "pinged", "filtered"),
    [
        ("CA", ["sunrise", "brightpath", "greenleaf", "voltmarket", "backupsolar"], []),
        ("TX", ["sunrise", "brightpath", "greenleaf", "voltmarket", "backupsolar"], []),
        ("NY", ["sunrise", "brightpath", "voltmarket", "backupsolar"], ["greenleaf"]),
        (None, ["sunrise", "brightpath", "voltmarket", "backupsolar"], ["greenleaf"]),
    ],
)
def test_plan_pings_demo_state_filter(
    state: str | None, pinged: list[str], filtered: list[str]
) -> None:
    pf = {"zip": "100"} if state is None else {"state": state, "zip": "100"}
    targets, out = plan_pings(DEMO, "solar", pf, NOW_MS)
    assert [b.id for b in targets] == pinged
    assert [b.id for b, _ in out] == filtered
    for _, reason in out:
        assert reason and "state" in reason


def test_plan_pings_only_buyers_of_the_flow() -> None:
    raw: dict[str, Any] = {
        "flows": {
            f: {
                "fields": {"state": {}, "email": {}},
                "ping_fields": {"state": {}},
                "pii_fields": ["email"],
            }
            for f in ("solar", "roof")
        },
        "buyers": [
            {"id": "s", "flows": ["solar"], "ping_url": "http://s/p", "post_url": "http://s/q"},
            {"id": "r", "flows": ["roof"], "ping_url": "http://r/p", "post_url": "http://r/q"},
            {
                "id": "both",
                "flows": ["roof", "solar"],
                "ping_url": "http://b/p",
                "post_url": "http://b/q",
                "filters": {"states": ["TX"]},
            },
        ],
    }
    s = parse_settings(raw, env={})
    targets, filtered = plan_pings(s, "roof", {"state": "TX"}, NOW_MS)
    assert [b.id for b in targets] == ["r", "both"] and filtered == []
    targets, filtered = plan_pings(s, "solar", {"state": "CA"}, NOW_MS)
    assert [b.id for b in targets] == ["s"]
    assert [(b.id, "CA" in why) for b, why in filtered] == [("both", True)]
    assert plan_pings(s, "unknown", {"state": "CA"}, NOW_MS) == ([], [])
