"""Which bids may win a lead and how it is sold: the auction's decision at close, and the
checks the ping and post stages repeat (a bid's floor and its own conditions)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from streams.rules import selling as rules
from streams.settings import FlowConfig, StrategyConfig

__all__ = ["Decision", "acceptable", "close_lag_ms", "conditions_reason", "decide"]


@dataclass(frozen=True)
class Decision:
    mode: str  # exclusive | shared | none
    slots: int
    candidates: list[dict[str, Any]]  # ranked acceptable bids (Candidate records)


def acceptable(
    bid: Mapping[str, Any],
    ping_fields: Mapping[str, Any],
    strategy: StrategyConfig,
    lead_created_ms: int,
    at_ms: int,
    *,
    flow: FlowConfig | None = None,
) -> tuple[bool, str]:
    """Whether a bid may win, judged against the flow's floors (when ``flow`` is given) and
    its own conditions at ``at_ms``."""
    if bid.get("status") != "bid" or bid.get("price") is None:
        return False, "not a bid"
    price = bid["price"]
    why = below_min_price_reason(price, strategy)
    if why is not None:
        return False, why
    if flow is not None:
        why = rules.below_floor_reason(
            flow, price, ping_fields, at_ms, exclusive=rules.wants_exclusive(bid)
        )
        if why is not None:
            return False, why
    why = conditions_reason(bid.get("conditions") or {}, ping_fields, lead_created_ms, at_ms)
    return (False, why) if why is not None else (True, "")


def below_min_price_reason(price: float, strategy: StrategyConfig) -> str | None:
    """Why ``price`` is under the flow's ``min_price`` (None: it is not). Such a bid is still
    a bid (its row keeps the price, a replay with a lower ``min_price`` can sell it, and the
    buyer's error rate does not count it); it cannot win."""
    if price < strategy.min_price:
        return f"price {price:.2f} below min_price {strategy.min_price:.2f}"
    return None


def conditions_reason(
    conditions: Mapping[str, Any],
    ping_fields: Mapping[str, Any],
    lead_created_ms: int,
    at_ms: int,
) -> str | None:
    """Why a bid's own conditions (CONTRACT §2) fail for this lead at ``at_ms``; None if they
    hold. Checked at close and again before each post (a slow first post can age the lead)."""
    c = conditions
    if c.get("states") is not None and ping_fields.get("state") not in c["states"]:
        return "lead state outside the bid's states"
    if c.get("require_consent") and ping_fields.get("consent") is not True:
        return "bid requires consent"
    max_age = c.get("max_age_minutes")
    if max_age is not None and at_ms - lead_created_ms > max_age * 60_000:
        return f"lead older than the bid's max_age_minutes ({max_age})"
    return None


def decide(
    bids: Sequence[Mapping[str, Any]],
    ping_fields: Mapping[str, Any],
    strategy: StrategyConfig,
    lead_created_ms: int,
    at_ms: int,
    *,
    flow: FlowConfig | None = None,
    acceptance: Mapping[str, float] | None = None,
    payment: Mapping[str, float] | None = None,
) -> Decision:
    """The acceptable bids, best first, and how the lead is sold.

    Best is by price (``strategy.rank_by: price``; ties: earlier answer, then buyer id) or
    by score (``w_price·price/max + w_accept·acceptance + w_pay·payment_speed``, with
    ``acceptance`` the buyers' observed post acceptance rates and ``payment`` their
    configured payment speeds). The best bid wins exclusively if it asks for exclusivity,
    else the lead is shared to the top ``shared_max`` non-exclusive bids, each at its own
    price; ``exclusive_only`` sells exclusively to the best bid whatever it asked,
    ``shared_only`` never honours a request for exclusivity (those bids are dropped). With
    ``flow`` the flow's floors apply (a bid below its floor, or an exclusive bid below the
    exclusive minimum, is not acceptable)."""
    cands = []
    for b in bids:
        ok, _ = acceptable(b, ping_fields, strategy, lead_created_ms, at_ms, flow=flow)
        if ok:
            cands.append(
                {
                    "buyer_id": b["buyer_id"],
                    "tier": b["tier"],
                    "ping_id": b["ping_id"],
                    "price": float(b["price"]),
                    "exclusive": bool(b["exclusive"]),
                    "conditions": b.get("conditions") or {},
                    "answered_at_ms": b["answered_at_ms"],
                }
            )
    if strategy.shared_only:
        cands = [c for c in cands if not rules.wants_exclusive(c)]
    ranked = rules.rank(
        cands,
        rank_by=strategy.rank_by,
        weights=strategy.weights,
        acceptance=acceptance or {},
        payment=payment or {},
        default_acceptance=strategy.acceptance_prior.rate,
    )
    mode = rules.choose_mode(
        ranked, exclusive_only=strategy.exclusive_only, shared_only=strategy.shared_only
    )
    if mode == "none":
        return Decision("none", 0, [])
    return Decision(mode, 1 if mode == "exclusive" else strategy.shared_max, ranked)


def close_lag_ms(
    reason: str, closed_at_ms: float, deadline_at_ms: int, last_answer_ms: int | None
) -> float:
    """Close time minus the deadline, or minus the last answer when all answered early."""
    if reason == "all_answered" and last_answer_ms is not None:
        return max(0.0, closed_at_ms - last_answer_ms)
    return max(0.0, closed_at_ms - deadline_at_ms)
