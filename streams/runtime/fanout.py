"""Ping one buyer within a budget and record its outcome: the ping stage's fan-out, and the
post waterfall's backup waves (pinged when every bidder rejected), share it.

Each buyer gets ``min(its timeout, time left until the stop)`` and is told that budget as
``tmax_ms``; its outcome (bid, no-bid, timeout, error, filtered) becomes one ``Bid`` event
keyed by lead_id, sent the moment it is known.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import Any

import schemas
from connectors.buyers import PingOutcome
from schemas.records import Bid
from streams import rules
from streams.context import Context
from streams.rules.auction import below_min_price_reason, conditions_reason
from streams.rules.experiments import flow_for
from streams.rules.pinging import pii_check, ping_body, plan_pings
from streams.rules.scrub import safe_ref
from streams.runtime.agents import now_ms
from streams.settings import BuyerConfig

__all__ = ["Sent", "bid_record", "ping_buyer", "plan_for"]

log = logging.getLogger(__name__)


_TRACE = os.environ.get("PINGPOST_TRACE_PINGS") == "1"


#: Outcomes of pings: (schema name, record, Kafka ack future; None when not sent alone).
Sent = list[tuple[str, Mapping[str, Any], "asyncio.Future[Any] | None"]]


def bid_record(
    req: dict[str, Any],
    buyer: BuyerConfig,
    ping_id: str,
    sent_at: int,
    out: PingOutcome | None,
    status: str = "timeout",
    reason: str = "",
    *,
    wave: int = 0,
    timeout_ms: float | None = None,
) -> Bid:
    """The ``Bid`` event of one ping: ``out`` its outcome, or None for a ping not sent
    (``status``: filtered, or a timeout with no time left) with its ``reason``; ``wave``
    (:func:`~streams.rules.selling.wave_number`) and the ``timeout_ms`` it was given are
    recorded for a replay (docs/strategy-lab.md)."""
    if out is None:
        return {
            "lead_id": req["lead_id"],
            "flow": req["flow"],
            "ping_id": ping_id,
            "buyer_id": buyer.id,
            "tier": buyer.tier,
            "status": status,
            "sent_at_ms": sent_at,
            "answered_at_ms": sent_at,
            "latency_ms": 0.0,
            "price": None,
            "exclusive": False,
            "buyer_ref": None,
            "conditions": {},
            "reason": reason,
            "http_status": None,
            "wave": wave,
            "timeout_ms": None,
        }
    c = out.conditions
    return {
        "lead_id": req["lead_id"],
        "flow": req["flow"],
        "ping_id": ping_id,
        "buyer_id": buyer.id,
        "tier": buyer.tier,
        "status": out.status,
        # sent_at is a truncated wall-clock ms and latency a monotonic measure: capped at
        # now, the answer never looks later than what happens after it (the next wave).
        "sent_at_ms": sent_at,
        "answered_at_ms": min(sent_at + int(round(out.latency_ms)), now_ms()),
        "latency_ms": float(out.latency_ms),
        "price": out.price,
        "exclusive": out.exclusive,
        "buyer_ref": out.buyer_ref,
        "conditions": {
            "max_age_minutes": c.max_age_minutes,
            "states": list(c.states) if c.states is not None else None,
            "require_consent": c.require_consent,
            "exclusive_required": c.exclusive_required,
        },
        "reason": out.reason,
        "http_status": out.http_status,
        "wave": wave,
        "timeout_ms": timeout_ms,
    }


def plan_for(
    ctx: Context, req: dict[str, Any], at_ms: int
) -> tuple[list[BuyerConfig], list[tuple[BuyerConfig, str]]]:
    """:func:`plan_pings` with this worker's live state: auto-pauses, cap counters, and the
    buyers a duplicate must skip."""
    pauses, view = ctx.pauses, ctx.cap_counters

    def counters(b: BuyerConfig, at: int) -> rules.BuyerCounters | None:
        # (plan_pings asks only for capped buyers.)
        return view.counters(b.id, b.caps, at) if view is not None and b.caps else None

    return plan_pings(
        ctx.settings,
        req["flow"],
        req["ping_fields"],
        at_ms,
        paused_until=pauses.paused if pauses else None,
        cap_counters=counters if view is not None else None,
        skip_buyers=req.get("skip_buyers"),
    )


async def ping_buyer(
    ctx: Context,
    req: dict[str, Any],
    buyer: BuyerConfig,
    ping_id: str,
    stop_at_ms: int,
    records: Sent | None = None,
    *,
    pii: Mapping[str, Any] | None = None,
    send: bool = True,
) -> Bid:
    """Ping one buyer for ``req`` (lead_id, flow, ping_fields) with the time left until
    ``stop_at_ms``; send and return its outcome (a ``Bid`` record, floor reason included).
    ``records`` collects the record with the future of its Kafka acknowledgement. ``send``
    False: the record is only returned (and collected, with no future): the ping stage sends
    a round's outcomes together, as one ``PingRound``. The
    buyer's own ``buyer_id`` is recorded only if it cannot be PII (``pii``: the lead's PII
    values, when the caller has them)."""
    settings = ctx.settings
    # (an experiment's variant may change the floors and the strategy's price bounds)
    _, flow = flow_for(settings.flows[req["flow"]], req["lead_id"], req.get("received_at_ms", 0))
    bids = ctx.topic("bids")
    sent = now_ms()
    budget = min(buyer.timeout_ms, stop_at_ms - sent)
    wave = rules.wave_number(buyer.tier, flow.waves)
    if budget <= 0:
        record = bid_record(
            req,
            buyer,
            ping_id,
            sent,
            None,
            "timeout",
            "no time left before the auction deadline",
            wave=wave,
        )
    else:
        body = ping_body(req["ping_fields"], req["flow"], ping_id, budget)
        if _TRACE:
            log.info("TRACE ping %s %s %s", req["lead_id"], buyer.id, os.getpid())
        out = await ctx.buyer_client().ping(
            buyer,
            body,
            budget / 1000.0,
            max_price=flow.strategy.max_price,
        )
        record = bid_record(req, buyer, ping_id, sent, out, wave=wave, timeout_ms=float(budget))
        if out.buyer_ref is not None:
            record["buyer_ref"] = safe_ref(out.buyer_ref, pii_check(settings, req, pii))
        if out.status == "bid" and out.price is not None:
            # The ping row says why a bid cannot win (below the flow's min_price or its
            # floor, or its own conditions fail: states, consent, max age at its answer); the
            # auction applies the same rules at close, when the lead is only older.
            record["reason"] = (
                below_min_price_reason(out.price, flow.strategy)
                or rules.below_floor_reason(
                    flow,
                    out.price,
                    req["ping_fields"],
                    sent,
                    exclusive=out.exclusive or out.conditions.exclusive_required,
                )
                or (
                    conditions_reason(
                        record["conditions"],
                        req["ping_fields"],
                        req["created_at_ms"],
                        record["answered_at_ms"],
                    )
                    or ""
                )
            )
    ack = (
        await bids.send(key=record["lead_id"].encode(), value=schemas.encode("Bid", record))
        if send
        else None
    )
    if records is not None:
        records.append(("Bid", record, ack))
    return record
