"""Winner selection as the auction and post stages apply it: rank by price or by score
(observed acceptance, configured payment speed), exclusive_only / shared_only, and the
acceptance counter that feeds the score."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from streams.context import ranking_inputs
from streams.rules.auction import decide
from streams.rules.buyer_stats import AcceptanceCounter
from streams.rules.posting import next_batch
from streams.settings import StrategyConfig, parse_settings

PING = {"state": "CA", "consent": True}


def bid(buyer: str, price: float, exclusive: bool = False, at: int = 1) -> dict[str, Any]:
    return {
        "buyer_id": buyer,
        "tier": "standard",
        "ping_id": f"p-{buyer}",
        "status": "bid",
        "price": price,
        "exclusive": exclusive,
        "conditions": {},
        "answered_at_ms": at,
    }


def ids(d: Any) -> list[str]:
    return [c["buyer_id"] for c in d.candidates]


# a bids 100 but rarely accepts and pays slowly; b bids 90, accepts, pays fast.
ACC = {"a": 0.2, "b": 0.95}
PAY = {"a": 0.1, "b": 1.0}


@pytest.mark.parametrize(
    ("strategy", "bids", "mode", "order"),
    [
        # price: highest first, whoever asked
        (StrategyConfig(), [bid("a", 100), bid("b", 90)], "shared", ["a", "b"]),
        # score 0.5/0.3/0.2: a = .5 + .06 + .02 = .58; b = .45 + .285 + .2 = .935
        (StrategyConfig(rank_by="score"), [bid("a", 100), bid("b", 90)], "shared", ["b", "a"]),
        # weights all on price: score ranking equals price ranking
        (
            StrategyConfig(rank_by="score", weights={"price": 1, "acceptance": 0, "payment": 0}),
            [bid("a", 100), bid("b", 90)],
            "shared",
            ["a", "b"],
        ),
        # the best bid by score asks for exclusivity: sold exclusively to it
        (
            StrategyConfig(rank_by="score"),
            [bid("a", 100), bid("b", 90, exclusive=True)],
            "exclusive",
            ["b", "a"],
        ),
        # exclusive_only: the best bid gets it alone even though it did not ask
        (
            StrategyConfig(exclusive_only=True),
            [bid("a", 100), bid("b", 90)],
            "exclusive",
            ["a", "b"],
        ),
        # shared_only: exclusive requests are never honoured (dropped), the rest share
        (
            StrategyConfig(shared_only=True),
            [bid("a", 100, exclusive=True), bid("b", 90), bid("c", 80)],
            "shared",
            ["b", "c"],
        ),
        (StrategyConfig(shared_only=True), [bid("a", 100, exclusive=True)], "none", []),
        # price ties: the earlier answer, then buyer id (never the score: b's better
        # acceptance and payment do not count)
        (StrategyConfig(), [bid("a", 90, at=1), bid("b", 90, at=2)], "shared", ["a", "b"]),
        (StrategyConfig(), [bid("b", 90, at=1), bid("a", 90, at=2)], "shared", ["b", "a"]),
        (StrategyConfig(), [bid("c", 90, at=2), bid("d", 90, at=1)], "shared", ["d", "c"]),
        (StrategyConfig(), [bid("f", 90, at=1), bid("e", 90, at=1)], "shared", ["e", "f"]),
    ],
)
def test_selection(
    strategy: StrategyConfig, bids: list[dict[str, Any]], mode: str, order: list[str]
) -> None:
    d = decide(bids, PING, strategy, 0, 1000, acceptance=ACC, payment=PAY)
    assert d.mode == mode
    assert ids(d) == order
    assert d.slots == (1 if mode == "exclusive" else 0 if mode == "none" else strategy.shared_max)


def test_new_buyers_start_at_the_prior() -> None:
    s = StrategyConfig(rank_by="score", acceptance_prior={"rate": 0.9, "weight": 10})
    # "new" has no record: prior 0.9; "old" accepted 20% → new outranks old at equal price
    d = decide(
        [bid("old", 80), bid("new", 80)], PING, s, 0, 1000, acceptance={"old": 0.2}, payment={}
    )
    assert ids(d) == ["new", "old"]


def test_price_ties_ignore_acceptance_when_another_flow_ranks_by_score() -> None:
    """The demo config plus a second flow ranked by score: every auction worker then keeps
    acceptance history, and the price-ranked flow's ties must still go to the earlier
    answer, then the buyer id, as the auction and post stages call ``decide``."""
    raw = yaml.safe_load(Path("config/demo.yaml").read_text())
    scored = yaml.safe_load(yaml.safe_dump(raw["flows"]["solar"]))
    scored["strategy"] = {"rank_by": "score"}
    raw["flows"]["roofing"] = scored
    for b in raw["buyers"]:
        b["flows"] = [*b["flows"], "roofing"]
    settings = parse_settings(raw, env={})
    price_flow = settings.flows["solar"]
    assert price_flow.strategy.rank_by == "price"
    counter = AcceptanceCounter()
    for i in range(20):  # sunrise accepts everything, greenleaf nothing
        counter.add(f"s{i}", "sunrise", "accepted", 1_000 + i)
        counter.add(f"g{i}", "greenleaf", "rejected", 1_000 + i)
    ctx = SimpleNamespace(settings=settings, acceptance=counter, payment_speeds=None)
    bids = [bid("sunrise", 90, at=20), bid("greenleaf", 90, at=10)]
    d = decide(bids, PING, price_flow.strategy, 0, 1000, **ranking_inputs(ctx, price_flow))
    assert ids(d) == ["greenleaf", "sunrise"]
    # and the score flow does use the history
    sf = settings.flows["roofing"]
    d = decide(bids, PING, sf.strategy, 0, 1000, **ranking_inputs(ctx, sf))
    assert ids(d) == ["sunrise", "greenleaf"]


def order_of(mode: str, cands: list[dict[str, Any]]) -> dict[str, Any]:
    return {"mode": mode, "candidates": cands, "ping_fields": PING, "created_at_ms": 0}


def test_exclusive_only_waterfall_posts_one_buyer_at_a_time() -> None:
    o = order_of("exclusive", [bid("a", 100), bid("b", 90), bid("c", 80)])
    mode, batch, _ = next_batch(o, set(), [], None, 3, 1000, exclusive_only=True)
    assert (mode, [c["buyer_id"] for c in batch]) == ("exclusive", ["a"])
    mode, batch, _ = next_batch(o, {"a"}, [], "exclusive", 3, 1000, exclusive_only=True)
    assert (mode, [c["buyer_id"] for c in batch]) == ("exclusive", ["b"])
    # without the flag the same bids are shared to the top 3
    mode, batch, _ = next_batch(o, set(), [], None, 3, 1000)
    assert (mode, [c["buyer_id"] for c in batch]) == ("shared", ["a", "b", "c"])


def test_acceptance_counter_counts_each_attempt_once_over_a_window() -> None:
    c = AcceptanceCounter(window_s=60)
    c.add("t1", "a", "accepted", 1_000)
    c.add("t1", "a", "accepted", 1_000)  # redelivered
    c.add("t2", "a", "rejected", 2_000)
    c.add("t3", "a", "skipped", 2_000)  # never posted
    c.add("t4", "b", "timeout", 3_000)
    assert (c.accepted, c.posted) == ({"a": 1}, {"a": 2, "b": 1})
    assert c.rates(0.5, 0) == {"a": 0.5, "b": 0.0}
    assert c.rates(0.7, 10)["a"] == pytest.approx((1 + 7) / 12)
    c.expire(61_000)  # t1 (at 1 s) left the 60 s window
    assert (c.accepted, c.posted) == ({"a": 0}, {"a": 1, "b": 1})
    c.expire(63_000)
    assert c.posted == {"a": 0, "b": 0}
