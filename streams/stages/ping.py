"""Ping stage: fan a redacted lead out to every eligible buyer at once.

For each ping request the stage writes an ``AuctionOpen`` marker (who is pinged, when the
auction closes) to the bids topic *before* any request leaves, then pings every eligible buyer
concurrently over one shared aiohttp session. Each buyer gets
``min(its timeout, time left until deadline - safety margin)`` and is told that budget as
``tmax_ms`` (Prebid Server's practice). Every outcome (bid, no-bid, timeout, error, filtered)
becomes one ``Bid`` event keyed by lead_id, sent the moment it is known, so the auction can
close early once everyone has answered.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from typing import Any, Callable, Mapping

import schemas
from connectors.buyers import PingOutcome
from streams import rules
from streams.context import Context
from streams.stages.auction import acceptable, conditions_reason
from streams.rules.leads import pii_hash
from streams.runtime.progress import tracker
from streams.runtime.agents import DeadLetters, InFlight, now_ms
from streams.rules.scrub import safe_ref, scrub
from streams.settings import BuyerConfig, Settings

__all__ = ["register", "plan_pings", "plan_for", "ping_body", "ping_buyer", "ping_id_for",
           "pii_check", "MIN_WAVE_MS"]

log = logging.getLogger(__name__)

_TRACE = os.environ.get("PINGPOST_TRACE_PINGS") == "1"

#: A wave that would have less than this before the deadline is not pinged at all.
MIN_WAVE_MS = 20

#: Records a ping round sent to the bids topic: (schema name, record, Kafka ack future).
Sent = list[tuple[str, dict[str, Any], "asyncio.Future[Any]"]]

_PING_NS = uuid.UUID("5b0e1f0e-6a52-4f5e-9d51-7d1d0c7c0a11")


def ping_id_for(lead_id: str, buyer_id: str) -> str:
    """Deterministic per (lead, buyer): a replayed ping round reuses the ids, so its outcomes
    replace the first ones instead of adding rows. Opaque to buyers."""
    return str(uuid.uuid5(_PING_NS, f"{lead_id}\x00{buyer_id}"))


def plan_pings(
    settings: Settings, flow: str, ping_fields: dict[str, Any], at_ms: int | None = None, *,
    paused_until: Callable[[str], int | None] | None = None,
    cap_counters: Callable[[BuyerConfig, int], rules.BuyerCounters | None] | None = None,
    skip_buyers: list[str] | None = None,
) -> tuple[list[BuyerConfig], list[tuple[BuyerConfig, str]]]:
    """Which buyers of the flow get a ping, and why each other one does not (filters on the
    ping fields, the buyer's schedule, an auto-pause, a tier in no wave)."""
    at = now_ms() if at_ms is None else at_ms
    targets: list[BuyerConfig] = []
    filtered: list[tuple[BuyerConfig, str]] = []
    waves = settings.flows[flow].waves if flow in settings.flows else None
    for buyer in settings.buyers_for(flow):
        why = rules.eligibility(
            buyer, ping_fields, at,
            paused_until_ms=paused_until(buyer.id) if paused_until is not None else None,
            counters=cap_counters(buyer, at) if cap_counters is not None and buyer.caps
            else None)
        if why is None and skip_buyers and buyer.id in skip_buyers:
            why = "already bought this lead (a duplicate within the flow's window)"
        if why is None and rules.wave_of(buyer.tier, waves) is None:
            why = f"tier '{buyer.tier}' is in no wave of flow '{flow}'"
        if why is None:
            targets.append(buyer)
        else:
            filtered.append((buyer, why))
    return targets, filtered


def ping_body(
    ping_fields: dict[str, Any], flow: str, ping_id: str, tmax_ms: int
) -> dict[str, Any]:
    """CONTRACT §2: only the configured ping fields, plus ping_id, flow and tmax_ms."""
    body = dict(ping_fields)
    body.update(ping_id=ping_id, flow=flow, tmax_ms=tmax_ms)
    return body


def _bid_record(req: dict[str, Any], buyer: BuyerConfig, ping_id: str, sent_at: int,
                out: PingOutcome | None, status: str | None = None, reason: str = "") -> dict[str, Any]:
    if out is None:
        return {
            "lead_id": req["lead_id"], "flow": req["flow"], "ping_id": ping_id,
            "buyer_id": buyer.id, "tier": buyer.tier, "status": status, "sent_at_ms": sent_at,
            "answered_at_ms": sent_at, "latency_ms": 0.0, "price": None, "exclusive": False,
            "buyer_ref": None, "conditions": {}, "reason": reason, "http_status": None,
        }
    c = out.conditions
    return {
        "lead_id": req["lead_id"], "flow": req["flow"], "ping_id": ping_id,
        "buyer_id": buyer.id, "tier": buyer.tier, "status": out.status,
        # sent_at is a truncated wall-clock ms and latency a monotonic measure: capped at
        # now, the answer never looks later than what happens after it (the next wave).
        "sent_at_ms": sent_at, "answered_at_ms": min(sent_at + int(round(out.latency_ms)),
                                                     now_ms()),
        "latency_ms": float(out.latency_ms), "price": out.price, "exclusive": out.exclusive,
        "buyer_ref": out.buyer_ref,
        "conditions": {
            "max_age_minutes": c.max_age_minutes,
            "states": list(c.states) if c.states is not None else None,
            "require_consent": c.require_consent,
            "exclusive_required": c.exclusive_required,
        },
        "reason": out.reason, "http_status": out.http_status,
    }


def plan_for(ctx: Context, req: dict[str, Any], at_ms: int
             ) -> tuple[list[BuyerConfig], list[tuple[BuyerConfig, str]]]:
    """:func:`plan_pings` with this worker's live state: auto-pauses, cap counters, and the
    buyers a duplicate must skip."""
    pauses, view = ctx.resources.get("pauses"), ctx.resources.get("caps_view")
    return plan_pings(
        ctx.settings, req["flow"], req["ping_fields"], at_ms,
        paused_until=pauses.paused if pauses else None,
        cap_counters=(lambda b, at: view.counters(b.id, b.caps, at)) if view else None,
        skip_buyers=req.get("skip_buyers"))


def pii_check(settings: Settings, req: dict[str, Any],
              pii: Mapping[str, Any] | None = None) -> Callable[[str], bool]:
    """Whether a token a buyer sent is one of the lead's PII values: by value when the caller
    knows them (the post stage), else by keyed hash against the request's ``pii_hashes``
    (pings never see PII, but a buyer may echo what it knows)."""
    if pii:
        return lambda token: scrub(token, pii) != token
    hashes = req.get("pii_hashes") or {}
    key = settings.privacy.hash_key.get_secret_value().encode()
    return lambda token: any(pii_hash(key, f, token) == h for f, h in hashes.items())


async def ping_buyer(ctx: Context, req: dict[str, Any], buyer: BuyerConfig, ping_id: str,
                     stop_at_ms: int, records: Sent | None = None, *,
                     pii: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Ping one buyer for ``req`` (lead_id, flow, ping_fields) with the time left until
    ``stop_at_ms``; send and return its outcome (a ``Bid`` record, floor reason included).
    ``records`` collects the record with the future of its Kafka acknowledgement. The
    buyer's own ``buyer_id`` is recorded only if it cannot be PII (``pii``: the lead's PII
    values, when the caller has them)."""
    settings = ctx.settings
    flow = settings.flows[req["flow"]]
    bids = ctx.topic("bids")
    sent = now_ms()
    budget = min(buyer.timeout_ms, stop_at_ms - sent)
    if budget <= 0:
        record = _bid_record(req, buyer, ping_id, sent, None, "timeout",
                             "no time left before the auction deadline")
    else:
        body = ping_body(req["ping_fields"], req["flow"], ping_id, budget)
        if _TRACE:
            log.info("TRACE ping %s %s %s", req["lead_id"], buyer.id, os.getpid())
        out = await ctx.buyer_client().ping(buyer, body, budget / 1000.0,
                                            max_price=flow.strategy.max_price,
                                            min_price=flow.strategy.min_price)
        record = _bid_record(req, buyer, ping_id, sent, out)
        if out.buyer_ref is not None:
            record["buyer_ref"] = safe_ref(out.buyer_ref, pii_check(settings, req, pii))
        if out.status == "bid" and out.price is not None:
            # The ping row says why a bid cannot win (below its floor, or its own conditions
            # fail: states, consent, max age at its answer); the auction applies the same
            # rules at close, when the lead is only older.
            record["reason"] = rules.below_floor_reason(
                flow, out.price, req["ping_fields"], sent,
                exclusive=out.exclusive or out.conditions.exclusive_required) or (
                conditions_reason(record["conditions"], req["ping_fields"],
                                  req["created_at_ms"], record["answered_at_ms"]) or "")
    ack = await bids.send(key=record["lead_id"].encode(), value=schemas.encode("Bid", record))
    if records is not None:
        records.append(("Bid", record, ack))
    return record


def register(ctx: Context) -> None:
    app, settings = ctx.app, ctx.settings
    bids = ctx.topic("bids")
    dead = DeadLetters(ctx.topic("deadletter"), "ping")
    inflight = InFlight("ping", settings.worker.max_inflight, dead)
    progress = tracker(ctx)  # admission control's view of this stage (streams/rules/admission.py)
    async def drain() -> None:
        await inflight.drain(timeout=5.0)

    ctx.closers.append(drain)

    # PINGPOST_HANDOFF=0 turns the hand-off off (to measure what it buys; see README Numbers).
    handoff = os.environ.get("PINGPOST_HANDOFF", "1") == "1"

    async def round_for(req: dict[str, Any]) -> None:
        sent: Sent = []
        await ping_round(req, sent)
        apply_local = ctx.resources.get("auction_apply_local") if handoff else None
        if apply_local is None or not sent:
            return
        # Every answer is in: once Kafka has acknowledged the round's records, hand them to
        # this worker's auction directly (when it owns the lead) so the auction closes now,
        # not after the last bid's trip through the bids topic.
        try:
            await asyncio.gather(*(ack for _, _, ack in sent))
        except Exception as exc:  # noqa: BLE001 - not acknowledged: only the topic may close
            log.warning("lead %s: Kafka did not acknowledge its ping round (%s); its auction "
                        "closes from the bids topic or at its deadline", req["lead_id"], exc)
            return
        await apply_local([(name, rec) for name, rec, _ in sent])

    async def ping_round(req: dict[str, Any], sent: Sent) -> None:
        async def send_bid(record: dict[str, Any], name: str = "Bid") -> None:
            ack = await bids.send(key=record["lead_id"].encode(),
                                  value=schemas.encode(name, record))
            sent.append((name, record, ack))

        async def ping_one(req: dict[str, Any], buyer: BuyerConfig, ping_id: str,
                           stop_at_ms: int) -> dict[str, Any]:
            return await ping_buyer(ctx, req, buyer, ping_id, stop_at_ms, sent)

        auctions = ctx.resources.get("auctions_table")
        if auctions is not None and auctions.get(req["lead_id"]) is not None:
            # Redelivered after a crash: this lead's auction is already open (its timer or the
            # recovery sweep closes it) or closed. Pinging buyers again would only spam them.
            log.info("lead %s already auctioned; not pinging again", req["lead_id"])
            return
        flow = settings.flows.get(req["flow"])
        if flow is None:
            raise ValueError(f"flow '{req['flow']}' is not configured on this worker")
        opened = now_ms()
        progress.opened(opened - req["received_at_ms"])
        targets, filtered = plan_for(ctx, req, opened)
        deadline = opened + flow.deadline_ms
        pinged = [{"buyer_id": b.id, "tier": b.tier, "ping_id": ping_id_for(req["lead_id"], b.id)}
                  for b in targets]
        open_rec = {
            "lead_id": req["lead_id"], "flow": req["flow"], "source": req["source"],
            "received_at_ms": req["received_at_ms"], "created_at_ms": req["created_at_ms"],
            "opened_at_ms": opened, "deadline_at_ms": deadline,
            "ping_fields": req["ping_fields"], "pinged": pinged,
            "skip_buyers": req.get("skip_buyers") or [],
        }
        # The round is in the auction table (and on its way to the changelog) before a ping
        # leaves: a redelivery of this request after a crash pings nobody twice (see
        # auction.mark_open).
        mark_open = ctx.resources.get("auction_mark_open")
        if mark_open is not None and not await mark_open(open_rec):
            log.info("lead %s already auctioned; not pinging again", req["lead_id"])
            return
        await send_bid(open_rec, "AuctionOpen")
        for buyer, reason in filtered:
            await send_bid(_bid_record(req, buyer, ping_id_for(req["lead_id"], buyer.id),
                                       opened, None, "filtered", reason))
        stop_at = deadline - flow.safety_margin_ms
        if flow.waves is None:
            await asyncio.gather(*(ping_one(req, b, p["ping_id"], stop_at)
                                   for b, p in zip(targets, pinged)))
            return
        # Waves: ping the first wave's tiers; a later wave only if the earlier ones produced
        # no acceptable bid, and never past the deadline. Buyers of a wave not pinged get a
        # `filtered` row saying why (the auction counts it as their answer: it can close early).
        pending = list(zip(targets, pinged))
        for i, wave in enumerate(flow.waves):
            members = [(b, p) for b, p in pending if rules.wave_of(b.tier, flow.waves) == i]
            if not members:
                continue
            now = now_ms()
            if stop_at - now < MIN_WAVE_MS:
                for b, p in members:
                    await send_bid(_bid_record(req, b, p["ping_id"], now, None, "filtered",
                                               f"not pinged: no time left for wave {i + 1} "
                                               "before the deadline"))
                continue
            wave_stop = min(stop_at, now + wave.timeout_ms)
            outcomes = await asyncio.gather(*(ping_one(req, b, p["ping_id"], wave_stop)
                                              for b, p in members))
            at = now_ms()
            if any(acceptable(o, req["ping_fields"], flow.strategy, req["created_at_ms"], at,
                              flow=flow)[0] for o in outcomes):
                later = [(b, p) for b, p in pending
                         if (rules.wave_of(b.tier, flow.waves) or 0) > i]
                for b, p in later:
                    await send_bid(_bid_record(req, b, p["ping_id"], at, None, "filtered",
                                               f"not pinged: wave {i + 1} had an acceptable "
                                               "bid"))
                return

    @app.agent(ctx.topic("ping_requests"), name="ping", concurrency=1)
    async def ping_agent(stream: Any) -> None:
        manual = stream.noack()
        async for event in manual.events():
            try:
                req = schemas.decode_as("PingRequest", event.value)
            except schemas.SchemaError as exc:
                await dead.send(event, f"undecodable ping request: {exc}")
                await manual.ack(event)
                continue
            await inflight.submit(manual, event, lambda req=req: round_for(req))
            msg = event.message
            progress.took("ping", msg.topic, msg.partition, msg.offset, ping=True)
