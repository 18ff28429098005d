"""The post waterfall's decisions: which buyers to post to next, the post body of
CONTRACT §3, post ids, and why a waterfall ended unsold."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from streams.rules import selling as rules
from streams.rules.auction import conditions_reason

__all__ = ["condition_failure", "next_batch", "post_body", "post_id_for", "unsold_reason"]


_POST_NS = uuid.UUID("0d7c3a8e-2b7e-4c53-bb0e-3f4c1f7c2b55")


def post_id_for(lead_id: str, buyer_id: str) -> str:
    return str(uuid.uuid5(_POST_NS, f"{lead_id}\x00{buyer_id}"))


def condition_failure(c: dict[str, Any], order: dict[str, Any], at_ms: int) -> str | None:
    """Why a candidate's bid conditions fail at post time (None: they hold)."""
    return conditions_reason(
        c.get("conditions") or {}, order["ping_fields"], order["created_at_ms"], at_ms
    )


def next_batch(
    order: dict[str, Any],
    tried: set[str],
    sold: list[str],
    sold_mode: str | None,
    shared_max: int,
    at_ms: int,
    *,
    exclusive_only: bool = False,
) -> tuple[str, list[dict[str, Any]], list[tuple[dict[str, Any], str]]]:
    """The next buyers to post to: ``(mode, batch, skipped-with-reason)``; empty batch = done.

    Candidates come best first. Exclusive: one buyer at a time until one accepts; shared: the
    top ``shared_max`` non-exclusive bids at once, a failed slot offered to the next one. The
    best remaining bid decides the mode (a rejected exclusive winner falls back to the next
    bidder, shared if that one did not ask for exclusivity); ``exclusive_only`` flows sell
    every lead exclusively."""
    remaining, skipped = [], []
    for c in order["candidates"]:
        if c["buyer_id"] in tried:
            continue
        why = condition_failure(c, order, at_ms)
        if why is None:
            remaining.append(c)
        else:
            skipped.append((c, why))
    shared = [c for c in remaining if not rules.wants_exclusive(c)]
    if sold:
        if sold_mode == "exclusive":
            return "exclusive", [], skipped
        return "shared", shared[: max(0, shared_max - len(sold))], skipped
    if not remaining:
        return "none", [], skipped
    if exclusive_only or rules.wants_exclusive(remaining[0]):
        return "exclusive", [remaining[0]], skipped
    return "shared", shared[:shared_max], skipped


def post_body(
    order: dict[str, Any], pii: dict[str, Any], cand: dict[str, Any], post_id: str, exclusive: bool
) -> dict[str, Any]:
    """CONTRACT §3: PII fields, the ping values bid on (ping data wins), and the ids."""
    body: dict[str, Any] = dict(pii)
    body.update(order["ping_fields"])
    body.update(
        lead_id=order["lead_id"],
        flow=order["flow"],
        ping_id=cand["ping_id"],
        post_id=post_id,
        price=cand["price"],
        exclusive=exclusive,
    )
    return body


def unsold_reason(
    *,
    posts_sent: int,
    cap_skips: Sequence[str],
    window_cut: bool,
    timed_out: Sequence[str],
    post_timeout_ms: int,
) -> str:
    """Why a lead's post waterfall ended without a sale, for its auction row.

    ``window_cut``: the waterfall stopped with a buyer still to try (a candidate, or backup
    waves not yet pinged) because its post window had no useful budget left — a platform
    reason. A waterfall that ran out of buyers is not cut, however long it took: its last
    buyer's rejection is the reason (a lead whose only bidder rejected it after a broker
    outage is not "window exhausted"). A timed-out post is named last: it may yet be a sale.
    """
    reason = "all posts rejected or failed" if posts_sent else "no acceptable bid at post time"
    if cap_skips:
        reason += "; caps reached: " + ", ".join(cap_skips)
    if window_cut:
        reason = f"post window of {post_timeout_ms} ms exhausted"
    if timed_out:
        reason = f"no answer in time from {', '.join(timed_out)} (asked again after settling)"
    return reason
