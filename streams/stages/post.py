"""Post stage: deliver the full lead to the winner(s), walking the bids as a waterfall.

For each winner event (``PostOrder``) the stage posts the ping values the buyer bid on, the
lead's PII (from the ``pii`` table, fed by the lead-pii topic — the only place PII is read)
and ``ping_id``/``post_id``/``price``/``exclusive``, with ``Idempotency-Key: <post_id>``.
``post_id`` is deterministic per (lead, buyer), so a retry or a replay after a crash carries
the same key and a buyer can never receive the same lead under two post_ids.

Exclusive: one buyer at a time, in rank order, until one accepts. Shared: the top N
non-exclusive bids at once; each slot that fails is offered to the next shared bidder. A
candidate whose conditions no longer hold (e.g. ``max_age_minutes`` after a slow first post)
is skipped. Progress is kept in the ``postings`` table so a redelivered order resumes instead
of re-selling; a settled lead re-emits its recorded result.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import schemas
from schemas.records import Bid
from streams import rules
from streams.context import CapReservations, Context, Offers, ranking_inputs
from streams.rules.auction import decide
from streams.rules.experiments import variant_flow
from streams.rules.pinging import MIN_WAVE_MS, ping_id_for
from streams.rules.posting import next_batch, post_body, post_id_for, unsold_reason
from streams.rules.scrub import scrub
from streams.runtime.agents import (
    DeadLetters,
    InFlight,
    KeyedLocks,
    Requeue,
    durable_pop,
    durable_set,
    hold_unconfirmed,
    is_transient,
    key_partition,
    member_confirmed,
    now_ms,
    timer,
)
from streams.runtime.fanout import ping_buyer, plan_for
from streams.settings import BuyerConfig, FlowConfig, Settings

if TYPE_CHECKING:
    from connectors.buyers import BuyerClient

__all__ = ["PostStage", "register"]

log = logging.getLogger(__name__)

#: Why a lead whose ping rounds were both lost is unsold (a platform reason).
ROUND_LOST_REASON = (
    "ping round lost (its worker failed mid-round; pinging it again failed or was lost too)"
)


#: A post order whose PII has not arrived is handed back (requeued) for this long after its
#: auction closed, then settled unsold ("PII unavailable"). From the close, not the receipt:
#: after a broker outage leads reached their close 75-90 s after receipt, and 35 of 3,000
#: were settled unsold at once, their lead-pii records written before their pings.
PII_REQUEUE_MS = 60_000

#: When a post that timed out is asked again (after the lead settled), seconds apart.
RECONCILE_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 15.0)
#: The reconcile timer reads an index of the leads with a reconcile entry, not the whole
#: postings table (it holds every lead of the last ``closed_retention_s``: a scan each second
#: cost the auction worker ~1.6 ms of CPU per lead in a long run). The index is rebuilt from
#: the table after each recovery and, as a safety net, this often (seconds).
RECONCILE_RESCAN_S = 30.0
#: How long a post waits for this worker's group membership to be confirmed before the
#: order is handed back (``confirmed_or_requeue``).
FENCE_WAIT_S = 5.0


def settled_form(state: dict[str, Any], encoded: bytes | None = None) -> dict[str, Any]:
    """What the postings table keeps of a lead settled for good (no reconciliation pending):
    its result, Avro-encoded, as one string, to re-send if its order comes again. The
    waterfall's progress is not needed any more; kept whole, it was ~6 containers per lead
    for ``closed_retention_s``, which every full collection of the cyclic GC walked (its
    pause grew to ~65 ms at 60 leads/s within 5 minutes). A dict of strings is never
    tracked by that collector. A lead with a reconciliation pending keeps its whole state
    (the reconciliation reads and corrects it). ``encoded``: the result's Avro, if at hand."""
    if state.get("reconcile") or not isinstance(state.get("result"), dict):
        return state
    encoded = encoded or schemas.encode("AuctionResult", state["result"])
    return {"result": base64.b64encode(encoded).decode()}


def settled_result(state: dict[str, Any]) -> bytes | None:
    """The encoded ``AuctionResult`` of a settled lead's postings state (None: not settled),
    whichever form it is kept in (:func:`settled_form`, or whole)."""
    result = state.get("result")
    if result is None:
        return None
    if isinstance(result, str):
        return base64.b64decode(result)
    return schemas.encode("AuctionResult", result)


class Send(Protocol):
    """A topic's ``send``: the record's key and value; returns the Kafka acknowledgement."""

    def __call__(self, *, key: bytes, value: bytes) -> Awaitable[Any]: ...


#: ``plan_for`` of this worker: the buyers to ping for a request at a time, and the filtered.
Plan = Callable[[dict[str, Any], int], tuple[list[BuyerConfig], list[tuple[BuyerConfig, str]]]]


class PostStage:
    """The post stage's state and handlers: the waterfall of each ``PostOrder``
    (``run_order``), the PII it posts (``pii_agent``, ``wait_pii``), the reconciliation of
    timed-out posts (``reconcile_due``, ``reconcile_lead``) and the cap reservations.

    Every dependency is given: the ``pii`` and ``postings`` tables (Faust tables in a worker,
    dicts in unit tests), the send functions of the deliveries and results topics, the buyer
    client, the cap owners (``caps``: read when an order is handled, the caps stage fills
    its port after this one registers), the ping plan and fan-out for the backup waves, the
    membership fence (``confirmed``, ``hold``), ``rebalancing``,
    ``durable_set``/``durable_pop`` (a table write and the ack of its changelog record),
    ``rows`` (the postings entries of this worker, for the reconcile timer) and the clock.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        pii: MutableMapping[str, Any],
        postings: MutableMapping[str, Any],
        send_delivery: Send,
        send_result: Send,
        buyers: Callable[[], BuyerClient],
        caps: Callable[[], CapReservations | None],
        dead: DeadLetters,
        inflight: InFlight,
        plan: Plan,
        ping: Callable[..., Awaitable[Bid]],
        ranking: Callable[[FlowConfig], dict[str, Any]],
        confirmed: Callable[[], bool],
        hold: Callable[[str], None],
        rebalancing: Callable[[], bool],
        durable_set: Callable[[Any, str, Any, int], Any] = durable_set,
        durable_pop: Callable[[Any, str, int], Any] = durable_pop,
        rows: Callable[[], Iterable[tuple[str, Any]]] | None = None,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self._settings = settings
        self._parts = settings.kafka.partitions
        self._pii = pii
        self._postings = postings
        self._send_delivery = send_delivery
        self._send_result = send_result
        self._buyers = buyers
        self._caps = caps
        self._dead = dead
        self._inflight = inflight
        self._plan = plan
        self._ping = ping
        self._ranking = ranking
        self._confirmed = confirmed
        self._hold = hold
        self._rebalancing = rebalancing
        self._durable_set = durable_set
        self._durable_pop = durable_pop
        self._rows = rows if rows is not None else postings.items
        self._now = clock
        self._waiters: dict[str, asyncio.Event] = {}
        self._lead_locks = KeyedLocks()
        #: Leads whose timed-out posts this worker is asking again right now.
        self._reconciling: dict[str, asyncio.Task[None]] = {}
        #: Lead -> when its reconcile entry is due (a cache of the table's; see
        #: RECONCILE_RESCAN_S); ``_rescan_at``: when it is rebuilt from the table next.
        self._due: dict[str, int] = {}
        self._rescan_at: int | None = None

    async def drain(self) -> None:
        await self._inflight.drain(timeout=10.0)

    async def pii_agent(self, stream: Any) -> None:
        async for event in stream.events():
            try:
                rec = schemas.decode_as("LeadPii", event.value)
            except schemas.SchemaError as exc:
                await self._dead.send(event, f"undecodable PII record: {exc}")
                continue
            done = self._postings.get(rec["lead_id"])
            if done is not None and done.get("result") is not None:
                continue  # replayed after the lead settled: do not resurrect its PII

            async def store(rec: dict[str, Any] = rec) -> None:
                self._pii[rec["lead_id"]] = {
                    "fields": rec["fields"],
                    "expires_at_ms": rec["expires_at_ms"],
                }

            if not await self._dead.guarded(event, store, "pii"):
                continue
            w = self._waiters.pop(rec["lead_id"], None)
            if w is not None:
                w.set()

    async def wait_pii(self, lead_id: str, timeout_s: float) -> dict[str, Any] | None:
        got: dict[str, Any] | None = self._pii.get(lead_id)
        if got is not None:
            return got
        ev = self._waiters.setdefault(lead_id, asyncio.Event())
        try:
            await asyncio.wait_for(ev.wait(), timeout_s)
        except TimeoutError:
            self._waiters.pop(lead_id, None)
        late: dict[str, Any] | None = self._pii.get(lead_id)
        return late

    async def emit_delivery(
        self,
        order: dict[str, Any],
        cand: dict[str, Any],
        attempt: int,
        status: str,
        latency: float,
        reason: str,
        http_status: int | None,
        sent_at: int,
        exclusive: bool,
        *,
        durable: bool = True,
    ) -> None:
        """Publish a post attempt's ``Delivery`` and, unless ``durable=False``, wait until
        Kafka has it. The answer of a post that went out is recorded before the lead's state
        says it was answered (callers change the state after this returns): a worker killed
        between the two then leaves the attempt ``pending``, and whoever resumes the lead asks
        the buyer again with the same post_id and records the answer. (Published without
        waiting, a record still in the producer's buffer when its worker was killed could be
        lost while the state saying "answered" reached Kafka: 2 and 7 acceptances of ~800
        were never recorded in two short chaos runs, a broker outage ending just before a
        kill -9.) ``durable=False`` is for skipped candidates: no buyer was asked."""
        post_id = post_id_for(order["lead_id"], cand["buyer_id"])
        ack = await self._send_delivery(
            key=order["lead_id"].encode(),
            value=schemas.encode(
                "Delivery",
                {
                    "attempt_id": f"{post_id}:{attempt}",
                    "post_id": post_id,
                    "lead_id": order["lead_id"],
                    "flow": order["flow"],
                    "buyer_id": cand["buyer_id"],
                    "tier": cand["tier"],
                    "ping_id": cand["ping_id"],
                    "price": cand["price"],
                    "exclusive": exclusive,
                    "status": status,
                    "latency_ms": latency,
                    "reason": reason,
                    "http_status": http_status,
                    "sent_at_ms": sent_at,
                    "attempt": attempt,
                },
            ),
        )
        if durable:
            await ack

    async def settle(
        self,
        order: dict[str, Any],
        state: dict[str, Any],
        reason: str,
        *,
        keep_settled_at: bool = False,
    ) -> None:
        sold = list({s["buyer_id"]: s for s in state["sold"]}.values())
        if not sold:
            outcome = "unsold"
        else:
            outcome = "sold_exclusive" if state["mode"] == "exclusive" else "sold_shared"
        settled = self._now()
        if keep_settled_at and state.get("result") is not None:
            settled = state["result"]["settled_at_ms"]  # a correction of the same outcome
        result = {
            "lead_id": order["lead_id"],
            "flow": order["flow"],
            "source": order["source"],
            "outcome": outcome,
            "winners": [s["buyer_id"] for s in sold],
            "prices": [s["price"] for s in sold],
            "price_total": round(sum(s["price"] for s in sold), 2),
            "reason": "" if sold else reason,
            "received_at_ms": order["received_at_ms"],
            "opened_at_ms": order["opened_at_ms"],
            "deadline_at_ms": order["deadline_at_ms"],
            "closed_at_ms": order["closed_at_ms"],
            "settled_at_ms": settled,
            "close_reason": order["close_reason"],
            "close_lag_ms": order["close_lag_ms"],
            "pinged": order["pinged"],
            "bids": order["bids"],
            "post_attempts": state["n"],
            "config_hash": order.get("config_hash", ""),
            "variant": order.get("variant", ""),
        }
        state["result"] = result
        value = schemas.encode("AuctionResult", result)
        part = key_partition(order["lead_id"], self._parts)
        self._durable_set(self._postings, order["lead_id"], settled_form(state, value), part)
        self._note_due(order["lead_id"], state)
        await self._send_result(key=order["lead_id"].encode(), value=value)
        if not state.get("reconcile"):
            # PII is not kept past the sale (nor past a reconciliation: see reconcile_lead).
            self._durable_pop(self._pii, order["lead_id"], part)

    async def ping_later_waves(
        self, order: dict[str, Any], flow: Any, give_up_at: int
    ) -> list[dict[str, Any]]:
        """Ping, wave by wave, the waves after the last one the auction pinged; return the
        first wave's acceptable bids, ranked (empty: none). Their outcomes replace the
        ``filtered`` ping rows the auction wrote for them."""

        waves = flow.waves
        asked = {c["buyer_id"] for c in order["candidates"]}
        last = max((rules.wave_of(c["tier"], waves) or 0) for c in order["candidates"])
        targets, _ = self._plan(order, self._now())
        for i, wave in enumerate(waves):
            if i <= last:
                continue
            members = [
                b for b in targets if rules.wave_of(b.tier, waves) == i and b.id not in asked
            ]
            now = self._now()
            if not members:
                continue
            if give_up_at - now < MIN_WAVE_MS:
                break
            stop = min(give_up_at, now + wave.timeout_ms)
            known = (self._pii.get(order["lead_id"]) or {}).get("fields")
            outcomes = await asyncio.gather(
                *(
                    self._ping(order, b, ping_id_for(order["lead_id"], b.id), stop, pii=known)
                    for b in members
                )
            )
            d = decide(
                list(outcomes),
                order["ping_fields"],
                flow.strategy,
                order["created_at_ms"],
                self._now(),
                flow=flow,
                **self._ranking(flow),
            )
            if d.candidates:
                log.info(
                    "lead %s: wave %d after a failed waterfall: %d acceptable bid(s)",
                    order["lead_id"],
                    i + 1,
                    len(d.candidates),
                )
                return d.candidates
        return []

    async def reserve_slots(
        self,
        order: dict[str, Any],
        batch: list[dict[str, Any]],
        exclusive: bool,
        state: dict[str, Any],
        flow: Any,
        give_up_at: int,
    ) -> list[dict[str, Any]]:
        """Reserve a slot with each capped buyer's cap owner before the lead leaves; the
        buyers refused (cap reached, no answer in time) are skipped with the reason. During
        a rebalance the owners cannot answer: the order is requeued at the end of its
        partition (``Requeue``) before anything of this batch is recorded, instead of
        holding the rebalance up until the decision times out."""
        client = self._caps()
        if client is None:
            return batch
        capped = [c for c in batch if self._settings.buyer(c["buyer_id"]).caps is not None]
        if not capped:
            return batch
        # Its own short bound, never the whole window: a slot not granted in time is denied
        # (a slow or dead cap owner costs this buyer the lead, not the lead its window).
        bound_ms = min(
            flow.cap_decision_timeout_ms, give_up_at - self._now() - flow.min_post_budget_ms
        )
        answers = await asyncio.gather(
            *(
                client.reserve(
                    c["buyer_id"],
                    order["lead_id"],
                    c["price"],
                    rebalancing=self._rebalancing,
                    timeout_s=max(0.0, bound_ms / 1000.0),
                )
                for c in capped
            ),
            return_exceptions=True,
        )
        decisions: list[tuple[bool, str]] = []
        for a in answers:
            if isinstance(a, BaseException):
                raise a
            decisions.append(a)
        keep = list(batch)
        for cand, (granted, why) in zip(capped, decisions):
            if granted:
                continue
            keep.remove(cand)
            state["attempts"][cand["buyer_id"]] = {"status": "skipped", "attempt": 0}
            state.setdefault("cap_skips", []).append(f"{cand['buyer_id']}: {why}")
            await self.emit_delivery(
                order,
                cand,
                0,
                "skipped",
                0.0,
                f"cap: {why}",
                None,
                self._now(),
                exclusive,
                durable=False,
            )
        return keep

    async def release_slots(self, lead_id: str, batch: list[dict[str, Any]]) -> None:
        client = self._caps()
        for c in batch:
            if client is not None and self._settings.buyer(c["buyer_id"]).caps is not None:
                await client.release(c["buyer_id"], lead_id)

    def _reconciled(self, lead_id: str, _task: asyncio.Task[None]) -> None:
        self._reconciling.pop(lead_id, None)

    async def reconcile_due(self) -> None:
        """Ask again, when due, the buyers whose posts timed out on settled leads (the
        ``reconcile`` entry of their ``postings`` state: it survives a crash, the PII is kept
        until it is done, and the lead's next owner carries on)."""
        now = self._now()
        if self._rescan_at is None or now >= self._rescan_at:
            self._due = {
                lead_id: rec["due_ms"]
                for lead_id, state in list(self._rows())
                if (rec := (state or {}).get("reconcile"))
            }
            self._rescan_at = now + int(RECONCILE_RESCAN_S * 1000)
        for lead_id, due_ms in list(self._due.items()):
            if due_ms > now or lead_id in self._reconciling:
                continue
            state = self._postings.get(lead_id)
            rec = (state or {}).get("reconcile")
            if not rec:
                del self._due[lead_id]  # done, or purged with its auction
                continue
            if rec["due_ms"] > now:
                self._due[lead_id] = rec["due_ms"]
                continue
            task = asyncio.ensure_future(self.reconcile_lead(lead_id))
            self._reconciling[lead_id] = task
            task.add_done_callback(partial(self._reconciled, lead_id))

    def _note_due(self, lead_id: str, state: dict[str, Any]) -> None:
        """Keep the reconcile index in step with a postings write of this worker."""
        rec = state.get("reconcile")
        if rec:
            self._due[lead_id] = rec["due_ms"]
        else:
            self._due.pop(lead_id, None)

    def recovered(self) -> None:
        """The postings table's ``on_recover``: entries came from the changelog (a restart,
        a partition moved here); the next tick rebuilds the reconcile index from the table."""
        self._rescan_at = None

    async def reconcile_lead(self, lead_id: str) -> None:
        """Ask each buyer whose post timed out again, with the same Idempotency-Key (it
        answers as before, CONTRACT §3): an acceptance that came after we gave up is a
        sale, recorded once — its ``posts`` row (same attempt id) becomes ``accepted`` and
        the lead's result is re-emitted with the buyer among the winners; a rejection is
        recorded as such. Buyers still not answering are asked again later
        (``RECONCILE_DELAYS_S``), then given up on."""
        async with self._lead_locks.hold(lead_id):
            state: dict[str, Any] | None = self._postings.get(lead_id)
            rec = (state or {}).get("reconcile")
            if state is None or not rec or state.get("result") is None:
                return
            # Worked on a copy, stored when done: a failure half-way (Kafka) leaves the
            # table's state as it was, and the next try asks every item again (a late sale
            # recorded in memory only would not be "late" any more, and its corrected result
            # never sent).
            state = copy.deepcopy(state)
            rec = state["reconcile"]
            order = rec["order"]
            pii = self._pii.get(lead_id)
            pending = []
            sold_late = False
            for item in rec["items"]:
                cand, n, exclusive = item["cand"], item["n"], item["exclusive"]
                buyer = self._settings.buyer(cand["buyer_id"])
                post_id = post_id_for(lead_id, buyer.id)
                if pii is None:
                    log.warning(
                        "lead %s: its PII is gone; %s's timed-out post cannot be asked again",
                        lead_id,
                        buyer.id,
                    )
                    continue
                body = post_body(order, pii["fields"], cand, post_id, exclusive)
                try:
                    out = await self._buyers().post(
                        buyer, body, post_id, buyer.post_timeout_ms / 1000.0
                    )
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.warning(
                        "reconciling lead %s with %s failed", lead_id, buyer.id, exc_info=True
                    )
                    pending.append(item)
                    continue
                if out.status == "timeout":
                    pending.append(item)
                    continue
                late_sale = out.status == "accepted" and all(
                    s["buyer_id"] != buyer.id for s in state["sold"]
                )
                # (a rejection's cap slot stays counted: a budget errs on the buyer's side)
                reason = (
                    "accepted after the post timed out (reconciled)"
                    if late_sale
                    else scrub(out.reason, pii["fields"])
                )
                # On Kafka before the state that says so (emit_delivery): a failure here
                # leaves the item to ask again.
                await self.emit_delivery(
                    order,
                    cand,
                    n,
                    out.status,
                    float(out.latency_ms),
                    reason,
                    out.http_status,
                    self._now(),
                    exclusive,
                )
                state["attempts"][buyer.id] = {"status": out.status, "attempt": n}
                if late_sale:
                    log.warning(
                        "lead %s: %s accepted a post after it timed out; recorded as a sale",
                        lead_id,
                        buyer.id,
                    )
                    if not state["sold"]:
                        state["mode"] = "exclusive" if exclusive else "shared"
                    state["sold"].append({"buyer_id": buyer.id, "price": cand["price"]})
                    sold_late = True
            tries = rec["tries"] + 1
            if pending and tries < len(RECONCILE_DELAYS_S):
                state["reconcile"] = {
                    **rec,
                    "items": pending,
                    "tries": tries,
                    "due_ms": self._now() + int(RECONCILE_DELAYS_S[tries] * 1000),
                }
            else:
                for item in pending:
                    log.warning(
                        "lead %s: %s never answered its timed-out post (%d asks); "
                        "the post stays a timeout",
                        lead_id,
                        item["cand"]["buyer_id"],
                        tries,
                    )
                state.pop("reconcile", None)
            if sold_late:  # the outcome changed: a corrected result
                await self.settle(order, state, state["result"]["reason"], keep_settled_at=True)
                return
            # Nothing sold: the recorded result stands (re-emitting it on every try only
            # repeated it); the progress is kept, and the PII goes once reconciling ends.
            part = key_partition(lead_id, self._parts)
            self._durable_set(self._postings, lead_id, settled_form(state), part)
            self._note_due(lead_id, state)
            if not state.get("reconcile"):
                self._durable_pop(self._pii, lead_id, part)

    async def drain_reconciling(self) -> None:
        if self._reconciling:
            await asyncio.wait(list(self._reconciling.values()), timeout=5.0)

    async def confirmed_or_requeue(self, lead_id: str, keep: Any) -> None:
        """Post only while this worker's group membership is confirmed: a worker cut off
        from the group may have lost the lead's partition, whose new owner runs the same
        waterfall. Waits up to ``FENCE_WAIT_S`` for the proof (a late heartbeat), then hands
        the order back (its progress is in the table) for whoever owns the partition."""
        deadline = time.monotonic() + FENCE_WAIT_S
        while not self._confirmed():
            if time.monotonic() >= deadline:
                self._hold(f"the posts of lead {lead_id}")
                keep()
                raise Requeue(f"lead {lead_id}: this worker's group membership is not confirmed")
            await asyncio.sleep(0.1)

    async def run_order(self, order: dict[str, Any]) -> None:
        # One waterfall per lead at a time: a PostOrder can arrive twice (an auction close
        # retried after a transient error, a redelivery) and two concurrent runs would each
        # walk the bids — an exclusive lead could be accepted by two buyers.
        async with self._lead_locks.hold(order["lead_id"]):
            await self.run_order_locked(order)

    async def run_order_locked(self, order: dict[str, Any]) -> None:
        lead_id = order["lead_id"]
        state = self._postings.get(lead_id)
        done = None if state is None else settled_result(state)
        if done is not None:
            await self._send_result(key=lead_id.encode(), value=done)
            return
        if state is None:
            state = {"attempts": {}, "sold": [], "mode": None, "n": 0, "result": None}
        if state.get("backup"):  # bids of later waves pinged before a restart
            order = {**order, "candidates": order["candidates"] + state["backup"]}
        flow = self._settings.flows.get(order["flow"])
        if flow is not None:  # the lead's experiment variant, if any: its shared_max, floors...
            flow = variant_flow(flow, order.get("variant", ""))
        if not order["candidates"] or flow is None:
            await self.settle(
                order,
                state,
                ROUND_LOST_REASON
                if order["close_reason"] == "round_lost"
                else "no bids"
                if order["bids"] == 0
                else "no acceptable bid"
                if flow is not None
                else "flow not configured",
            )
            return
        pii = await self.wait_pii(lead_id, timeout_s=flow.pii_wait_ms / 1000.0)
        if pii is None and self._now() - order["closed_at_ms"] < PII_REQUEUE_MS:
            # Its lead-pii record is on Kafka (written before the ping request) but this
            # worker has not read it yet: after a crash or rebalance the pii agent catches up
            # on its partitions while the post agent already runs. Hand the order back to
            # the end of its partition rather than settle a sellable lead unsold (4 of 3,000
            # in the chaos bench, a worker killed every 12 s).
            raise Requeue(f"lead {lead_id}: its PII is not here yet")
        if pii is None:
            await self.settle(
                order,
                state,
                f"PII unavailable (no lead-pii record {PII_REQUEUE_MS // 1000} s after the close)",
            )
            return
        # The window is the time spent posting: it starts at the first attempt, not at the
        # close (an order that waited for its PII still gets its full window), and an order
        # resumed after a crash or a move gets what was left of it when its progress was last
        # recorded — the failover does not use it up. (Counted from the first attempt, the
        # seconds a restart takes came out of the window of every lead it interrupted: a
        # lead whose first buyer rejected just before a kill -9 had nothing left for its
        # next bidder.)
        resumed_at = self._now()
        spent_before = int(state.get("spent_ms", 0))
        give_up_at = resumed_at + flow.post_timeout_ms - spent_before

        part = key_partition(lead_id, self._parts)

        def keep() -> Any:
            """Record the lead's progress (and the window it has used) in the table; returns
            the acknowledgement of its changelog record (awaitable)."""
            state["spent_ms"] = spent_before + self._now() - resumed_at
            return self._durable_set(self._postings, lead_id, state, part)

        min_budget = flow.min_post_budget_ms
        #: Attempts that timed out (ambiguous): asked again after the lead settles.
        unresolved: list[tuple[dict[str, Any], int, bool]] = []
        window_cut = False  # the window, not the buyers, ended the waterfall
        pii_values = list(pii["fields"].values())  # buyer text is scrubbed of every form of each
        while True:
            await self.confirmed_or_requeue(lead_id, keep)
            now = self._now()
            # An attempt recorded as pending was sent before a crash and its answer was lost:
            # the buyer may have accepted. Resolve it first, with the same post_id (the
            # Idempotency-Key makes the buyer answer as before), whatever the post window.
            pending = [
                c
                for c in order["candidates"]
                if state["attempts"].get(c["buyer_id"], {}).get("status") == "pending"
            ]
            if pending:
                batch, exclusive = pending, state["mode"] == "exclusive"
            else:
                tried = set(state["attempts"])
                # A post that timed out is ambiguous: the buyer may have taken the lead. Its
                # slot counts as taken — an exclusive lead does not fall back to the next
                # bidder, a shared slot is not offered again — until reconcile_lead knows.
                ambiguous = [
                    b for b, a in state["attempts"].items() if a.get("status") == "timeout"
                ]
                mode, batch, skipped = next_batch(
                    order,
                    tried,
                    [s["buyer_id"] for s in state["sold"]] + ambiguous,
                    state["mode"],
                    flow.strategy.shared_max,
                    now,
                    exclusive_only=flow.strategy.exclusive_only,
                )
                for cand, why in skipped:
                    state["attempts"][cand["buyer_id"]] = {"status": "skipped", "attempt": 0}
                    await self.emit_delivery(
                        order,
                        cand,
                        0,
                        "skipped",
                        0.0,
                        why,
                        None,
                        now,
                        mode == "exclusive",
                        durable=False,
                    )
                if (
                    not batch
                    and not state["sold"]
                    and not ambiguous
                    and now < give_up_at
                    and flow.waves
                    and not state.get("backup_done")
                ):
                    # Every bidder said no: the waves the auction did not need (an earlier
                    # wave had an acceptable bid) are the brief's backup buyers. Ping them now.
                    # (Wave after wave: if these reject too, the next one is tried.)
                    backup = await self.ping_later_waves(order, flow, give_up_at)
                    state["backup_done"] = not backup
                    state["backup"] = state.get("backup", []) + backup
                    keep()
                    order = {**order, "candidates": order["candidates"] + backup}
                    continue
                if not batch or now + min_budget > give_up_at:
                    # Never send a post without a useful budget left. Cut short (a platform
                    # reason) only if a buyer was left to try: a batch, or backup waves the
                    # window no longer allowed (the branch above pings them otherwise).
                    window_cut = bool(batch) or (
                        not state["sold"]
                        and not ambiguous
                        and bool(flow.waves)
                        and not state.get("backup_done")
                    )
                    break
                # Capped buyers' slots first: an attempt recorded as pending below always has
                # its reservation, so resolving it after a crash never needs one.
                batch = await self.reserve_slots(
                    order, batch, mode == "exclusive", state, flow, give_up_at
                )
                if not batch:
                    continue
                if self._now() + min_budget > give_up_at:  # the reservations took the time
                    await self.release_slots(lead_id, batch)
                    window_cut = True
                    break
                if not state["sold"]:
                    state["mode"] = mode
                exclusive = mode == "exclusive"
                for cand in batch:
                    state["n"] += 1
                    state["attempts"][cand["buyer_id"]] = {
                        "status": "pending",
                        "attempt": state["n"],
                    }
                # Record intent before any request leaves, and make it durable: a crash
                # after the request left must find it. Only this record is waited for: a
                # flush of the whole producer (as before) waited for every record in flight
                # and cost ~6 % of the worker's CPU at 100 leads/s (py-spy), in Faust's
                # buffer polling. What else a post needs on Kafka first was waited for where
                # it was sent: the earlier answers' deliveries, the cap reservations.
                await keep()

            async def attempt(
                cand: dict[str, Any],
                exclusive: bool = exclusive,
                resolving: bool = bool(pending),
                order: dict[str, Any] = order,
            ) -> None:
                buyer = self._settings.buyer(cand["buyer_id"])
                post_id = post_id_for(lead_id, buyer.id)
                # (Its cap slot, if any, was reserved before the attempt was recorded; an
                # attempt resolved after a crash is counted whatever the cap says now: if the
                # buyer took the lead, it is sold.)
                caps_client = self._caps() if buyer.caps else None
                sent = self._now()
                body = post_body(order, pii["fields"], cand, post_id, exclusive)
                # A timeout is ambiguous (the buyer may have taken the lead): ask again with
                # the same Idempotency-Key while the window leaves a useful budget; still no
                # answer, and the slot stays the buyer's until reconcile_lead knows.
                for ask in range(6):
                    left = give_up_at - self._now()
                    if resolving:
                        budget_ms = buyer.post_timeout_ms
                    elif ask == 0:  # checked just before: at least the minimum budget
                        budget_ms = min(buyer.post_timeout_ms, max(min_budget, left))
                    elif left >= min_budget:
                        budget_ms = min(buyer.post_timeout_ms, left)
                    else:
                        break  # no useful budget for a second ask: reconciled later
                    out = await self._buyers().post(buyer, body, post_id, budget_ms / 1000.0)
                    if out.status != "timeout":
                        break
                n = state["attempts"][buyer.id]["attempt"]
                # On Kafka before the state that says so (emit_delivery).
                await self.emit_delivery(
                    order,
                    cand,
                    n,
                    out.status,
                    float(out.latency_ms),
                    scrub(out.reason, pii_values),
                    out.http_status,
                    sent,
                    exclusive,
                )
                state["attempts"][buyer.id] = {"status": out.status, "attempt": n}
                if caps_client is not None:
                    # Count it on accept — and on a timeout, which the buyer may have taken;
                    # free the slot otherwise.
                    if out.status in ("accepted", "timeout"):
                        await caps_client.commit(buyer.id, lead_id, cand["price"])
                    else:
                        await caps_client.release(buyer.id, lead_id)
                if out.status == "accepted" and all(
                    s["buyer_id"] != buyer.id for s in state["sold"]
                ):
                    state["sold"].append({"buyer_id": buyer.id, "price": cand["price"]})
                if out.status == "timeout":
                    # The buyer may have taken the lead after we stopped waiting: ask it
                    # again later with the same Idempotency-Key (reconcile_lead).
                    unresolved.append((cand, n, exclusive))

            try:
                # TaskGroup: if one attempt fails, its siblings are cancelled rather than left
                # running while the order is retried.
                async with asyncio.TaskGroup() as tg:
                    for c in batch:
                        tg.create_task(attempt(c))
            except BaseExceptionGroup as eg:
                keep()
                if not all(is_transient(e) for e in eg.exceptions):
                    # Never leave a lead unsettled: record what was sold so far.
                    await self.settle(order, state, f"internal error: {eg.exceptions[0]!r}"[:300])
                raise eg.exceptions[0] from eg
            keep()
        timed_out = [b for b, a in state["attempts"].items() if a.get("status") == "timeout"]
        reason = (
            ""
            if state["sold"]
            else unsold_reason(
                posts_sent=state["n"],
                cap_skips=state.get("cap_skips", []),
                window_cut=window_cut,
                timed_out=timed_out,
                post_timeout_ms=flow.post_timeout_ms,
            )
        )
        items = [
            {"cand": cand, "n": n, "exclusive": exclusive}
            for cand, n, exclusive in unresolved
            if state["attempts"].get(cand["buyer_id"], {}).get("status") == "timeout"
        ]
        if items:
            # Asked again after the lead settles (reconcile_lead), from the table: a crash
            # meanwhile hands them to the lead's next owner. The PII stays until then.
            state["reconcile"] = {
                "order": order,
                "items": items,
                "tries": 0,
                "due_ms": self._now() + int(RECONCILE_DELAYS_S[0] * 1000),
            }
        await self.settle(order, state, reason)

    async def post_agent(self, stream: Any) -> None:
        manual = stream.noack()
        async for event in manual.events():
            try:
                order = schemas.decode_as("PostOrder", event.value)
            except schemas.SchemaError as exc:
                await self._dead.send(event, f"undecodable post order: {exc}")
                await manual.ack(event)
                continue
            await self._inflight.submit(manual, event, partial(self.run_order, order))


def register(ctx: Context) -> Offers:
    app, settings = ctx.app, ctx.settings
    parts = settings.kafka.partitions
    deliveries, results = ctx.topic("deliveries"), ctx.topic("results")
    dead = DeadLetters(ctx.topic("deadletter"), "post", settings)
    inflight = InFlight("post", settings.worker.max_inflight, dead)
    pii_table = app.Table("pii", default=None, partitions=parts, key_type=str, value_type=None)
    postings = app.Table("postings", default=None, partitions=parts, key_type=str, value_type=None)
    stage = PostStage(
        settings,
        pii=pii_table,
        postings=postings,
        send_delivery=deliveries.send,
        send_result=results.send,
        buyers=ctx.buyer_client,  # created on first use, inside the running loop
        caps=lambda: ctx.caps,  # the caps stage's offer, wired by streams.app after this one
        dead=dead,
        inflight=inflight,
        plan=partial(plan_for, ctx),
        ping=partial(ping_buyer, ctx),
        ranking=partial(ranking_inputs, ctx),
        confirmed=lambda: member_confirmed(app),
        hold=lambda what: hold_unconfirmed(app, what),
        rebalancing=lambda: bool(app.rebalancing),
        rows=lambda: postings.data.items(),
    )

    ctx.closers.append(stage.drain)

    @postings.on_recover
    async def _postings_recovered() -> None:
        stage.recovered()

    @app.agent(ctx.topic("lead_pii"), name="pii", concurrency=1)
    async def pii_agent(stream: Any) -> None:
        await stage.pii_agent(stream)

    @timer(app, 1.0, name="post-reconcile")
    async def reconcile_due() -> None:
        await stage.reconcile_due()

    ctx.closers.append(stage.drain_reconciling)

    @app.agent(ctx.topic("posts"), name="post", concurrency=1)
    async def post_agent(stream: Any) -> None:
        await stage.post_agent(stream)

    return Offers(postings_table=postings, purge_with_auction=[pii_table, postings])
