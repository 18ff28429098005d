"""Ping stage: fan a redacted lead out to every eligible buyer at once.

For each ping request the stage records the round's ``AuctionOpen`` (who is pinged, when the
auction closes) in the auctions table *before* any request leaves (``mark_open``), then pings
every eligible buyer concurrently over one shared aiohttp session. Each buyer gets
``min(its timeout, time left until deadline - safety margin)`` and is told that budget as
``tmax_ms`` (Prebid Server's practice). Every outcome (bid, no-bid, timeout, error, filtered)
is a ``Bid``; when the last is in, the round goes to the bids topic as one ``PingRound``
record (key = lead_id) and, on the lead's owner, straight to its auction, which closes then.

One record per round, not one per answer: each Kafka record costs about what its request
costs, written once and read by three groups (docs/numbers.md). The price: a worker that dies
mid-round loses the answers it had. The auction then pings that lead again, once, when its
deadline passes with no round (``reping``; docs/operations.md, "A ping round lost").
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any, Protocol

import schemas
from schemas.records import Bid
from streams import rules
from streams.context import Context, Offers, ProgressPort, Round
from streams.rules.auction import acceptable
from streams.rules.experiments import flow_for
from streams.rules.pinging import MIN_WAVE_MS, ping_id_for
from streams.runtime.agents import DeadLetters, InFlight, Requeue, now_ms
from streams.runtime.fanout import Sent, bid_record, ping_buyer, plan_for
from streams.runtime.progress import tracker
from streams.settings import BuyerConfig, Settings

__all__ = ["AuctionHandoff", "PingStage", "register"]

log = logging.getLogger(__name__)

#: Handed-off leads remembered until their ping-requests record comes back (``handed``).
HANDED_KEPT = 16_384


class AuctionHandoff(Protocol):
    """The auction's ports the ping stage reads when it handles a request (``Context``): read
    then, not when the stage is built, since the auction registers after the ping stage."""

    @property
    def auctions_table(self) -> Mapping[Any, Any] | None: ...

    @property
    def apply_round(self) -> Callable[[Round], Awaitable[bool]] | None: ...

    @property
    def mark_open(self) -> Callable[[dict[str, Any]], Awaitable[bool]] | None: ...


#: ``plan_for`` with this worker's live state: ``(request, at_ms) -> (targets, filtered)``.
Plan = Callable[[dict[str, Any], int], tuple[list[BuyerConfig], list[tuple[BuyerConfig, str]]]]
#: ``ping_buyer`` over this worker's buyer client, not sending: ``(request, buyer, ping_id,
#: stop_at_ms, answers) -> Bid record``; it appends the record to ``answers``.
PingOne = Callable[[dict[str, Any], BuyerConfig, str, int, Sent], Awaitable[Bid]]


class PingStage:
    """The ping stage's handlers: open the auction, fan the request out, hand the round off.

    ``send_bid`` is the bids topic's ``send`` (it returns the Kafka ack future; the stage
    sends each round there as one ``PingRound``); ``plan`` and
    ``ping`` are :func:`plan_for` and :func:`ping_buyer` bound to the worker; ``ports`` gives
    the auction's table, open marker and round hand-off; ``handoff`` False turns the
    hand-off off."""

    def __init__(
        self,
        settings: Settings,
        *,
        send_bid: Callable[..., Awaitable[Any]],
        plan: Plan,
        ping: PingOne,
        ports: AuctionHandoff,
        dead: DeadLetters,
        inflight: InFlight,
        progress: ProgressPort,
        handoff: bool = True,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.settings = settings
        self._send = send_bid
        self._plan = plan
        self._ping = ping
        self.ports = ports
        self.dead = dead
        self.inflight = inflight
        self.progress = progress
        self.handoff = handoff
        self._clock = clock
        #: Rounds pinged again (``reping``), running aside from the agent.
        self.repings: set[asyncio.Future[None]] = set()
        #: Leads pinged from the redact stage's hand-off whose record has not come back
        #: through the ping-requests topic yet: that copy finding its auction open is
        #: expected, not logged. Oldest first, bounded (a copy that never comes back here,
        #: its partition moved, is forgotten).
        self.handed: OrderedDict[str, None] = OrderedDict()

    async def drain(self) -> None:
        await self.inflight.drain(timeout=5.0)
        if self.repings:
            await asyncio.wait(list(self.repings), timeout=5.0)

    async def round_for(self, req: dict[str, Any]) -> None:
        answers: Sent = []
        open_rec = await self.ping_round(req, answers)
        if open_rec is None:
            return
        round_rec = {
            "lead_id": req["lead_id"],
            "open": open_rec,
            "answers": [rec for _, rec, _ in answers],
        }
        ack = await self._send(
            key=req["lead_id"].encode(), value=schemas.encode("PingRound", round_rec)
        )
        apply_local = self.ports.apply_round if self.handoff else None
        if apply_local is None:
            return
        # Once Kafka has acknowledged the round, hand it to this worker's auction directly
        # (when it owns the lead) so the auction closes now, not after the record's trip
        # through the bids topic.
        try:
            await ack
        except Exception as exc:
            log.warning(
                "lead %s: Kafka did not acknowledge its ping round (%s); its auction "
                "closes from the bids topic or at its deadline",
                req["lead_id"],
                exc,
            )
            return
        await apply_local([("PingRound", round_rec)])

    async def ping_now(self, req: dict[str, Any], ack: Awaitable[Any]) -> bool:
        """The redact stage's hand-off (the ``ping_now`` port): ping ``req`` from here once
        Kafka has acknowledged it, instead of after its trip through the ping-requests topic
        (at 50 leads/s that trip was half of receipt → ping: 9 / 21 / 39 ms p50 / p90 / p99).
        The record still arrives through the topic; its auction is open by then, or opens
        under the auction's lock first, so nobody is pinged twice (``mark_open``). Returns
        whether a round was started here: not when the hand-off is off, or every in-flight
        slot is taken (the topic's event then waits its turn, as before)."""
        if not self.handoff:
            return False
        if not await self.inflight.detached(partial(self._round_now, req, ack)):
            return False
        handed = self.handed
        handed[req["lead_id"]] = None
        if len(handed) > HANDED_KEPT:
            handed.popitem(last=False)
        return True

    def _expected(self, lead_id: str) -> bool:
        """Whether ``lead_id``'s auction being open already is the hand-off's doing (the
        other copy of a handed-off request): forgets it then."""
        return self.handed.pop(lead_id, False) is None

    async def _round_now(self, req: dict[str, Any], ack: Awaitable[Any]) -> None:
        try:
            await ack
        except Exception:  # not on Kafka: nothing to ping (the lead's record is redelivered)
            return
        try:
            await self.round_for(req)
        except Requeue:
            return  # not this worker's now, or mid-rebalance: the topic delivers it
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The topic's delivery of the same request tries again (and dead-letters it),
            # unless the round had opened: then the auction's lost-round path pings again.
            log.warning(
                "lead %s: ping hand-off failed (%r); the topic retries", req["lead_id"], exc
            )

    def reping(self, open_rec: dict[str, Any], attempt: int) -> None:
        """Ping a lead again whose round ``open_rec`` was lost (the auction saw its deadline
        pass with no ``PingRound``: the worker pinging it died mid-round), as round
        ``attempt``. Runs aside (the auction calls it under its lock); its ``mark_open``
        refuses it if the auction moved on meanwhile."""
        req = {
            k: open_rec[k] for k in ("lead_id", "flow", "source", "received_at_ms", "created_at_ms")
        }
        req["ping_fields"] = open_rec["ping_fields"]
        req["skip_buyers"] = open_rec.get("skip_buyers") or []
        req["attempt"] = attempt
        fut = asyncio.ensure_future(self.round_for(req))
        self.repings.add(fut)
        fut.add_done_callback(partial(self._repinged, req["lead_id"]))

    def _repinged(self, lead_id: str, fut: asyncio.Future[None]) -> None:
        self.repings.discard(fut)
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            # Not owned here any more, or no Kafka: the auction stays open past its
            # deadline and its sweep's close marker asks again (the lead's next owner's).
            log.warning("lead %s: its ping round could not be pinged again yet: %s", lead_id, exc)

    async def ping_round(self, req: dict[str, Any], answers: Sent) -> dict[str, Any] | None:
        """Ping ``req``'s buyers, collecting every outcome in ``answers``; returns the round's
        ``AuctionOpen``, or None when the lead is auctioned already (nobody pinged)."""
        settings, progress, now_ms = self.settings, self.progress, self._clock
        ping_one = self._ping

        def send_bid(record: Mapping[str, Any]) -> None:
            answers.append(("Bid", record, None))

        attempt = int(req.get("attempt", 1))
        auctions = self.ports.auctions_table
        if attempt == 1 and auctions is not None and auctions.get(req["lead_id"]) is not None:
            # Redelivered after a crash: this lead's auction is already open (its timer or the
            # recovery sweep closes it) or closed. Pinging buyers again would only spam them.
            # (Or the other copy of a handed-off request: expected, not logged.)
            if not self._expected(req["lead_id"]):
                log.info("lead %s already auctioned; not pinging again", req["lead_id"])
            return None
        flow = settings.flows.get(req["flow"])
        if flow is None:
            raise ValueError(f"flow '{req['flow']}' is not configured on this worker")
        opened = now_ms()
        if attempt == 1:
            progress.opened(opened - req["received_at_ms"])
        targets, filtered = self._plan(req, opened)
        deadline = opened + flow.deadline_ms
        pinged = [
            {"buyer_id": b.id, "tier": b.tier, "ping_id": ping_id_for(req["lead_id"], b.id)}
            for b in targets
        ]
        open_rec = {
            "lead_id": req["lead_id"],
            "flow": req["flow"],
            "source": req["source"],
            "received_at_ms": req["received_at_ms"],
            "created_at_ms": req["created_at_ms"],
            "opened_at_ms": opened,
            "deadline_at_ms": deadline,
            "ping_fields": req["ping_fields"],
            "pinged": pinged,
            "skip_buyers": req.get("skip_buyers") or [],
            "attempt": attempt,
        }
        # The round is in the auction table (and on its way to the changelog) before a ping
        # leaves: a redelivery of this request after a crash pings nobody twice (see
        # auction.mark_open).
        mark_open = self.ports.mark_open
        if mark_open is not None and not await mark_open(open_rec):
            if not self._expected(req["lead_id"]):
                log.info("lead %s already auctioned; not pinging again", req["lead_id"])
            return None
        for buyer, reason in filtered:
            send_bid(
                bid_record(
                    req,
                    buyer,
                    ping_id_for(req["lead_id"], buyer.id),
                    opened,
                    None,
                    "filtered",
                    reason,
                    wave=rules.wave_number(buyer.tier, flow.waves),
                )
            )
        stop_at = deadline - flow.safety_margin_ms
        if flow.waves is None:
            await asyncio.gather(
                *(ping_one(req, b, p["ping_id"], stop_at, answers) for b, p in zip(targets, pinged))
            )
            return open_rec
        # Waves: ping the first wave's tiers; a later wave only if the earlier ones produced
        # no acceptable bid, and never past the deadline. Buyers of a wave not pinged get a
        # `filtered` row saying why (the auction counts it as their answer: it can close early).
        pending = list(zip(targets, pinged))
        # Whether a wave had an acceptable bid is judged as the auction will: under the
        # lead's experiment variant, if any (its floors and strategy).
        _, sells = flow_for(flow, req["lead_id"], req["received_at_ms"])
        for i, wave in enumerate(flow.waves):
            members = [(b, p) for b, p in pending if rules.wave_of(b.tier, flow.waves) == i]
            if not members:
                continue
            now = now_ms()
            if stop_at - now < MIN_WAVE_MS:
                for b, p in members:
                    send_bid(
                        bid_record(
                            req,
                            b,
                            p["ping_id"],
                            now,
                            None,
                            "filtered",
                            f"not pinged: no time left for wave {i + 1} before the deadline",
                            wave=i + 1,
                        )
                    )
                continue
            wave_stop = min(stop_at, now + wave.timeout_ms)
            outcomes = await asyncio.gather(
                *(ping_one(req, b, p["ping_id"], wave_stop, answers) for b, p in members)
            )
            at = now_ms()
            if any(
                acceptable(
                    o, req["ping_fields"], sells.strategy, req["created_at_ms"], at, flow=sells
                )[0]
                for o in outcomes
            ):
                later = [(b, p) for b, p in pending if (rules.wave_of(b.tier, flow.waves) or 0) > i]
                for b, p in later:
                    send_bid(
                        bid_record(
                            req,
                            b,
                            p["ping_id"],
                            at,
                            None,
                            "filtered",
                            f"not pinged: wave {i + 1} had an acceptable bid",
                            wave=(rules.wave_of(b.tier, flow.waves) or 0) + 1,
                        )
                    )
                return open_rec
        return open_rec

    async def agent(self, stream: Any) -> None:
        dead, inflight, progress = self.dead, self.inflight, self.progress
        manual = stream.noack()
        async for event in manual.events():
            try:
                req = schemas.decode_as("PingRequest", event.value)
            except schemas.SchemaError as exc:
                await dead.send(event, f"undecodable ping request: {exc}")
                await manual.ack(event)
                continue
            await inflight.submit(manual, event, partial(self.round_for, req))
            msg = event.message
            progress.took("ping", msg.topic, msg.partition, msg.offset, ping=True)


def register(ctx: Context) -> Offers:
    app, settings = ctx.app, ctx.settings
    bids = ctx.topic("bids")
    dead = DeadLetters(ctx.topic("deadletter"), "ping")
    inflight = InFlight("ping", settings.worker.max_inflight, dead)
    progress = tracker(ctx)  # admission control's view of this stage (streams.rules.admission)

    stage = PingStage(
        settings,
        send_bid=bids.send,
        plan=partial(plan_for, ctx),
        ping=partial(ping_buyer, ctx, send=False),
        ports=ctx,
        dead=dead,
        inflight=inflight,
        progress=progress,
        # PINGPOST_HANDOFF=0 turns the hand-offs off (the round's to the auction, the request's
        # from redact: to measure what they buy; see docs/numbers.md).
        handoff=os.environ.get("PINGPOST_HANDOFF", "1") == "1",
    )

    ctx.closers.append(stage.drain)

    @app.agent(ctx.topic("ping_requests"), name="ping", concurrency=1)
    async def ping_agent(stream: Any) -> None:
        await stage.agent(stream)

    return Offers(reping=stage.reping, ping_now=stage.ping_now)
