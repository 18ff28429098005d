"""Auction stage: aggregate each lead's ping outcomes in a table and close it exactly once.

The ``auctions`` table (changelogged, keyed by lead_id) holds the open marker and the answers
of each lead's ping round. A lead's auction closes

- early, in the agent, as soon as every pinged buyer has answered; or
- at its deadline: an asyncio timer sends an ``AuctionClose`` marker keyed by lead_id into the
  lead's own partition of the bids topic, and the agent closes when the marker comes back.

Faust's ``on_window_close`` is not used (see FIELD-NOTES: whole-second windows, a 30 s scan,
callbacks dropped for all but one partition, no rebuild after recovery). Closing is
idempotent: a closed auction ignores further markers and late bids. After a restart or a
rebalance the table is recovered from its changelog and a sweep re-arms the timers of open
auctions (closing at once those already past their deadline). Closed entries are kept for
``worker.closed_retention_s`` to reject redelivered bids, then purged by a marker.

The stage's state and handlers are one class, :class:`AuctionStage`, whose dependencies are
explicit (the table, the topics it sends to, the clock, the membership fence, the ports it
reads); ``register`` builds it from the ``Context`` and binds Faust's agent, timers and
recovery callback to its methods. Unit tests build it with fakes (tests/unit/stages).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from typing import Any, Protocol

import schemas
from streams.context import Context, Offers, Round, ranking_inputs
from streams.rules.auction import Decision, close_lag_ms, decide
from streams.rules.experiments import flow_for
from streams.runtime import agents
from streams.runtime.agents import (
    DeadLetters,
    Requeue,
    durable_set,
    key_partition,
    now_ms,
    retry_transient,
    task,
    timer,
)
from streams.settings import FlowConfig, FlowVersion, Settings, flow_versions

__all__ = ["MAX_ROUNDS", "AuctionStage", "Sends", "register"]

log = logging.getLogger(__name__)

#: Ping rounds per lead at most: its own, and one more if that one's answers were lost.
MAX_ROUNDS = 2
#: How often a lost round is asked to be pinged again before its auction closes unsold.
REPING_ASKS = 3
#: A close marker handled this long before its round's deadline is an earlier round's.
STALE_MARKER_SLACK_MS = 50


class Sends(Protocol):
    """Where the stage sends records: a topic (``send`` returns what Faust's does, an
    awaitable of the delivery's future)."""

    def send(self, *, key: bytes, value: bytes) -> Awaitable[Any]: ...


class AuctionStage:
    """The auction stage's state (the timers, the closes in flight, the indexes over the
    table) and its handlers.

    ``table`` is the ``auctions`` table (a Faust table; a dict-like object in tests: ``get``,
    ``pop``, ``items``, item assignment, and ``data`` for the local deletes after a
    rebalance). ``durable_set(table, key, value, partition)`` writes it and returns the
    acknowledgement of its changelog record. The membership fence and the assignment are
    functions of this worker's app: ``member_confirmed()``, ``hold_unconfirmed(what)``,
    ``rebalancing()``, ``in_recovery()``, ``assigned_here(partition)`` (of the bids topic),
    ``active_partitions()`` (of the bids topic). The ports another stage fills after this
    one registers are read when used: ``postings_table()``, ``purge_with_auction()``,
    ``ranking(flow)`` (``decide``'s acceptance and payment, ``context.ranking_inputs``).
    ``now_ms`` and ``clock`` (epoch seconds) are the clock."""

    def __init__(
        self,
        settings: Settings,
        table: Any,
        *,
        bids: Sends,
        posts: Sends,
        dead: DeadLetters,
        postings_table: Callable[[], Any],
        purge_with_auction: Callable[[], Iterable[Any]],
        ranking: Callable[[FlowConfig], dict[str, Any]],
        reping: Callable[[], Callable[[dict[str, Any], int], None] | None] = lambda: None,
        member_confirmed: Callable[[], bool],
        hold_unconfirmed: Callable[[str], None],
        rebalancing: Callable[[], bool],
        in_recovery: Callable[[], bool],
        assigned_here: Callable[[int], bool],
        active_partitions: Callable[[], set[int]],
        durable_set: Callable[[Any, str, Any, int], Any] = durable_set,
        now_ms: Callable[[], int] = now_ms,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        #: Each flow's configuration version: every order records the one that decided it.
        self.versions = flow_versions(settings)
        self.table = table
        self.bids_topic = bids
        self.posts_topic = posts
        self.dead = dead
        self.postings_table = postings_table
        self.purge_with_auction = purge_with_auction
        self.ranking = ranking
        self.reping = reping
        self.member_confirmed = member_confirmed
        self.hold_unconfirmed = hold_unconfirmed
        self.rebalancing = rebalancing
        self.in_recovery = in_recovery
        self.assigned_here = assigned_here
        self.active_partitions = active_partitions
        self.durable_set = durable_set
        self.now_ms = now_ms
        self.clock = clock

        self.retention_ms = int(settings.worker.closed_retention_s * 1000)
        self.timers: dict[str, asyncio.TimerHandle] = {}
        #: Auctions closed whose order Kafka has not acknowledged yet (not in the table yet).
        self.closing: dict[str, asyncio.Future[None]] = {}
        self.purges_sent: set[str] = set()
        #: Closed auctions whose order is still to be sent (after recovery, or a failed send).
        self.unsent: dict[str, int] = {}
        self.markers_sent: dict[str, int] = {}  # lead -> when its last close marker was sent
        #: Auctions this worker closed, by path: on the ping round's local hand-off, or when the
        #: deciding event came back from the bids topic (deadline, recovery, another worker's...).
        self.closes = {"handoff": 0, "topic": 0}
        #: Ping rounds lost (no PingRound by their deadline) and pinged again.
        self.rounds_lost = 0
        #: Lead -> times its lost round was asked to be pinged again (until a round opens).
        self.reping_asks: dict[str, int] = {}
        self.logged = 0
        # In-memory indexes over the table, so the sweep never scans it in steady state:
        # open auctions -> deadline, and closed/orphan entries in the order they became purgeable.
        # Rebuilt from the table after every recovery (the table is the truth, these are caches).
        self.open_index: dict[str, int] = {}
        self.purge_queue: deque[tuple[int, str]] = deque()
        self.rescan = True
        # The agent and the ping stage's local hand-off (below) change auctions one at a time.
        self.lock = asyncio.Lock()

    def partition(self, lead_id: str) -> int:
        return lead_partition(lead_id, self.settings.kafka.partitions)

    async def recovered(self) -> None:
        """The table's ``on_recover`` callback."""
        self.drop_foreign_keys()
        self.rescan = True

    def drop_foreign_keys(self) -> None:
        """After a rebalance, forget this worker's local copies of leads whose partitions
        moved away. Faust's memory store drops only keys it restored from the changelog;
        keys written live would stay: stale open auctions re-armed forever, stale PII kept
        in memory. Local deletes only (no changelog write): the new owner has the truth."""
        active = self.active_partitions()
        parts = self.settings.kafka.partitions
        tables = [self.table, *self.purge_with_auction()]
        for t in tables:
            for key in [k for k in t.data.keys() if lead_partition(k, parts) not in active]:
                t.data.pop(key, None)
        for lead_id in [k for k in self.timers if lead_partition(k, parts) not in active]:
            self.timers.pop(lead_id).cancel()

    def send_marker(self, lead_id: str, reason: str) -> None:
        self.timers.pop(lead_id, None)
        if reason != "purge":
            self.markers_sent[lead_id] = self.now_ms()
        rec = {"lead_id": lead_id, "reason": reason, "at_ms": self.now_ms()}
        fut = asyncio.ensure_future(
            self.bids_topic.send(key=lead_id.encode(), value=schemas.encode("AuctionClose", rec))
        )
        fut.add_done_callback(_log_send_failure)

    def arm(self, lead_id: str, deadline_ms: int, reason: str = "deadline") -> None:
        if lead_id in self.timers:
            return
        delay = max(0.0, deadline_ms / 1000.0 - self.clock())
        self.timers[lead_id] = asyncio.get_running_loop().call_later(
            delay, self.send_marker, lead_id, reason
        )

    async def close(
        self, lead_id: str, state: dict[str, Any], reason: str, handoff: bool = False
    ) -> None:
        op = state["open"]
        flow = self.settings.flows.get(op["flow"])
        closed = self.clock() * 1000
        answers = list(state["answers"].values())
        variant = ""
        if flow is None:
            decision = Decision("none", 0, [])
        else:
            # A lead in an experiment is decided under its variant's strategy and floors.
            variant, flow = flow_for(flow, lead_id, op["received_at_ms"])
            decision = decide(
                answers,
                op["ping_fields"],
                flow.strategy,
                op["created_at_ms"],
                int(closed),
                flow=flow,
                **self.ranking(flow),
            )
        last = max((a["answered_at_ms"] for a in answers), default=None)
        lag = close_lag_ms(reason, closed, op["deadline_at_ms"], last)
        order = {
            "lead_id": lead_id,
            "flow": op["flow"],
            "source": op["source"],
            "mode": decision.mode,
            "slots": decision.slots,
            "candidates": decision.candidates,
            "ping_fields": op["ping_fields"],
            "received_at_ms": op["received_at_ms"],
            "created_at_ms": op["created_at_ms"],
            "opened_at_ms": op["opened_at_ms"],
            "deadline_at_ms": op["deadline_at_ms"],
            "closed_at_ms": int(closed),
            "close_reason": reason,
            "close_lag_ms": round(lag, 3),
            "pinged": len(op["pinged"]),
            "bids": sum(1 for a in answers if a["status"] == "bid"),
            "skip_buyers": op.get("skip_buyers") or [],
            "config_hash": self.versions[op["flow"]].hash if op["flow"] in self.versions else "",
            "variant": variant,
        }
        value = schemas.encode("PostOrder", order)
        # Close once (an outbox): the closed state, with the order in it, is on the changelog
        # before the order leaves (record_closed, aside from the lock). A crash before that
        # sent nothing: the next owner closes from scratch. A crash after finds the order in
        # the table and re-sends those same bytes (same candidates), never a second decision.
        # (Sending both at once and letting them race left 21 of 3,000 leads with two
        # different orders in the chaos bench, a worker killed every 12 s. Waiting for the
        # changelog delays the order by its acknowledgement, 20-500 ms under load, not the
        # close: the demo's throughput and close lag were unchanged, measured.)
        # No "answers" (nor anything else but strings and numbers): a closed state is kept
        # for closed_retention_s, and a dict holding a container is one more object every
        # full collection of the cyclic GC walks (settled_form in the post stage).
        closed_state = {
            "open": None,
            "closed_at_ms": int(closed),
            "seen_ms": state.get("seen_ms", int(closed)),
            "order": base64.b64encode(value).decode(),
        }
        changelog_ack = self.durable_set(self.table, lead_id, closed_state, self.partition(lead_id))
        handle = self.timers.pop(lead_id, None)
        if handle is not None:
            handle.cancel()
        self.open_index.pop(lead_id, None)
        self.markers_sent.pop(lead_id, None)
        self.reping_asks.pop(lead_id, None)
        self.closes["handoff" if handoff else "topic"] += 1
        # Waiting for the acknowledgements here, under the lock every close takes, would
        # delay the next auctions' closes (demo close-lag p99 ~21-25 ms -> ~38-41 ms): it is
        # done aside; the lead's events meanwhile are ignored (its auction is closed).
        self.send_order(lead_id, closed_state, changelog_ack)

    def send_order(self, lead_id: str, closed_state: dict[str, Any], changelog_ack: Any) -> None:
        self.closing[lead_id] = asyncio.ensure_future(
            self.record_closed(lead_id, closed_state, changelog_ack)
        )

    async def record_closed(
        self, lead_id: str, closed_state: dict[str, Any], changelog_ack: Any
    ) -> None:
        """Once the closed state (with its order) is on the changelog (``changelog_ack``; None:
        it is, a re-send after recovery), send the order; once Kafka has it, drop it from the
        closed state."""
        table = self.table
        part = self.partition(lead_id)
        value = base64.b64decode(closed_state["order"])
        try:
            if changelog_ack is not None:
                try:
                    await changelog_ack
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning(
                        "closed state of lead %s not acknowledged by Kafka (%r); writing it again",
                        lead_id,
                        exc,
                    )

                    async def rewrite() -> None:
                        await self.durable_set(table, lead_id, closed_state, part)

                    await retry_transient(rewrite, f"closed state of lead {lead_id}")

            if not self.member_confirmed():
                # Cut off from the group: the partition may be another worker's now, which
                # closes the auction itself. The order stays in the table (the sweep tries
                # again once membership is confirmed).
                self.unsent[lead_id] = self.now_ms()
                return

            async def send() -> None:
                await (await self.posts_topic.send(key=lead_id.encode(), value=value))

            await retry_transient(send, f"post order of lead {lead_id}")
            async with self.lock:
                done = {k: v for k, v in closed_state.items() if k != "order"}
                if (table.get(lead_id) or {}).get("order") == closed_state["order"]:
                    self.durable_set(table, lead_id, done, part)
                self.open_index.pop(lead_id, None)  # re-added if indexes were rebuilt meanwhile
                self.purge_queue.append((closed_state["closed_at_ms"], lead_id))
        except asyncio.CancelledError:
            raise
        except Exception:  # the order stays in the table: the sweep sends it again
            log.exception(
                "post order of lead %s could not be sent yet; the sweep sends it again", lead_id
            )
            self.unsent[lead_id] = self.now_ms()
        finally:
            self.closing.pop(lead_id, None)

    async def drain_closing(self) -> None:
        """On shutdown, let recorded closes finish (else the next owner closes them again:
        a duplicate order, harmless but avoidable)."""
        if self.closing:
            await asyncio.wait(list(self.closing.values()), timeout=5.0)

    @staticmethod
    def all_answered(state: dict[str, Any]) -> bool:
        op = state["open"]
        return op is not None and all(p["ping_id"] in state["answers"] for p in op["pinged"])

    async def handle(
        self,
        name: str,
        rec: dict[str, Any],
        event: Any,
        deferred: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """Apply one bids-topic record to its lead's auction, closing it when it decides.

        With ``deferred`` (the round's hand-off), a state that stays open is kept there
        instead of being written to the table: the caller writes it once for the whole
        round (one changelog record instead of one per answer)."""
        lead_id = rec["lead_id"]
        if lead_id in self.closing:
            return  # closed; its order is on the way to Kafka (record_closed)
        table = self.table
        state = deferred[lead_id] if deferred and lead_id in deferred else table.get(lead_id)
        if name == "PingRound":
            await self.apply_round(rec, event, deferred)
            return
        if name == "AuctionClose":
            if state is None:
                return
            if rec["reason"] == "purge":
                self.purges_sent.discard(lead_id)
                if state.get("closed_at_ms") is None and state.get("open") is not None:
                    return  # re-opened meanwhile: not purgeable
                postings = self.postings_table()
                posting = postings.get(lead_id) if postings is not None else None
                if state.get("closed_at_ms") is not None and (
                    posting is None or posting.get("result") is None
                ):
                    # Closed but its post waterfall has not settled (post stage lagging or
                    # recovering): purging now would lose its PII and its progress.
                    self.purge_queue.append((self.now_ms(), lead_id))
                    return
                table.pop(lead_id, None)
                # The post stage's per-lead tables are co-partitioned with this topic, so
                # the same marker bounds them too.
                for other in self.purge_with_auction():
                    other.pop(lead_id, None)
                return
            if state.get("closed_at_ms") is None and state.get("open") is not None:
                deadline = state["open"]["deadline_at_ms"]
                if self.now_ms() < deadline - STALE_MARKER_SLACK_MS:
                    # A marker of an earlier round (the lead was pinged again since): this
                    # round's own timer closes it.
                    self.arm(lead_id, deadline)
                    return
                if not self.confirmed(lead_id):
                    return  # the sweep sends the marker again (2 s)
                if not state.get("round") and not state["answers"]:
                    await self.round_lost(lead_id, state)
                    return
                await self.close(lead_id, state, rec["reason"])
            return
        if state is not None and state.get("closed_at_ms") is not None:
            return  # late or redelivered: the auction is already closed
        if state is None:
            state = {"open": None, "answers": {}, "closed_at_ms": None, "seen_ms": self.now_ms()}
            self.purge_queue.append((state["seen_ms"], lead_id))  # orphan until opened
        if name == "AuctionOpen":
            if state["open"] is not None:
                return  # replayed ping round: keep the first deadline
            state["open"] = rec
        elif name == "Bid":
            if rec["status"] == "filtered" and not (
                state["open"] is not None
                and any(p["ping_id"] == rec["ping_id"] for p in state["open"]["pinged"])
            ):
                return  # never planned (filters, schedule): nothing to wait for
            # (a planned buyer of a wave that was not needed answers `filtered`)
            state["answers"][rec["ping_id"]] = {
                k: rec[k]
                for k in (
                    "buyer_id",
                    "tier",
                    "ping_id",
                    "status",
                    "price",
                    "exclusive",
                    "conditions",
                    "answered_at_ms",
                )
            }
        else:
            await self.dead.send(event, f"unexpected {name} record on the bids topic")
            return
        if self.all_answered(state) and self.confirmed(lead_id):
            if deferred is not None:
                deferred.pop(lead_id, None)  # the closed state is the record to write
            await self.close(lead_id, state, "all_answered", handoff=event is None)
            return
        if deferred is not None:
            deferred[lead_id] = state
        else:
            table[lead_id] = state
        if state["open"] is not None:
            self.open_index[lead_id] = state["open"]["deadline_at_ms"]
            self.arm(lead_id, state["open"]["deadline_at_ms"])

    async def apply_round(
        self,
        rec: dict[str, Any],
        event: Any,
        deferred: dict[str, dict[str, Any]] | None,
    ) -> None:
        """Apply a ``PingRound``: its open marker, then each answer (the last one closes the
        auction), with one table write for the state it leaves (``deferred``: the caller's)."""
        lead_id = rec["lead_id"]
        op = rec["open"]
        pending = {} if deferred is None else deferred
        state = pending.get(lead_id) or self.table.get(lead_id)
        current = (state or {}).get("open")
        if current is not None and current.get("attempt", 1) != op.get("attempt", 1):
            return  # another round's (a lost round that turned up after all): not this one
        await self.handle("AuctionOpen", op, event, pending)
        for answer in rec["answers"]:
            await self.handle("Bid", answer, event, pending)
        left = pending.get(lead_id)
        if left is None:
            left = self.table.get(lead_id)
            if left is None or left.get("closed_at_ms") is not None or lead_id in self.closing:
                return
            pending[lead_id] = left
        left["round"] = True  # its answers are in: at its deadline it closes, not re-pings
        if deferred is None:
            self.durable_set(self.table, lead_id, pending.pop(lead_id), self.partition(lead_id))

    async def round_lost(self, lead_id: str, state: dict[str, Any]) -> None:
        """The deadline of ``state``'s round passed and its ``PingRound`` never came: the
        worker pinging it died mid-round (its answers died with it), or Kafka refused the
        record. Ping the lead again, once; a second round lost closes the auction unsold
        (``round_lost``, a platform reason)."""
        op = state["open"]
        attempt = int(op.get("attempt", 1))
        reping = self.reping()
        asks = self.reping_asks[lead_id] = self.reping_asks.get(lead_id, 0) + 1
        if attempt >= MAX_ROUNDS or reping is None or asks > REPING_ASKS:
            # (asked to ping again REPING_ASKS times, and no new round opened: the ping stage
            # cannot, e.g. the lead's flow is no longer configured)
            self.reping_asks.pop(lead_id, None)
            log.warning("lead %s: ping round %d lost; closing it unsold", lead_id, attempt)
            await self.close(lead_id, state, "round_lost")
            return
        log.warning(
            "lead %s: ping round %d lost (no answers by its deadline); pinging it again",
            lead_id,
            attempt,
        )
        if asks == 1:
            self.rounds_lost += 1
        # Its open marker stays until the new round's mark_open replaces it: a crash before
        # that finds the lost round again (and pings again); the sweep's marker retries it.
        self.markers_sent[lead_id] = self.now_ms()
        reping(op, attempt + 1)

    def confirmed(self, lead_id: str) -> bool:
        """Whether this worker may close now: its group membership is confirmed (a worker
        cut off from the group may have lost the lead's partition without knowing it). Not
        closed now, the auction stays open; the sweep's close marker tries again."""
        if self.member_confirmed():
            return True
        self.hold_unconfirmed(f"the close of lead {lead_id}'s auction")
        return False

    def owns(self, lead_id: str) -> bool:
        """Whether this worker is, right now and not mid-rebalance, the owner of the lead's
        auction (its partition of the bids topic, hence of the ``auctions`` table)."""
        if self.rebalancing() or self.in_recovery() or not self.member_confirmed():
            return False
        return self.assigned_here(self.partition(lead_id))

    async def apply_local(self, records: Round) -> bool:
        """Apply a finished ping round's records (``AuctionOpen`` first, then every answer),
        already acknowledged by Kafka, to the auction now instead of when they come back from
        the bids topic: the round's last answer then closes the auction without a Kafka
        round trip. Only on the lead's owner and outside a rebalance; the same records still
        arrive through the topic and are ignored there like any redelivery (a closed
        auction ignores its events; answers are keyed by ping_id). Returns whether applied."""
        lead_id = records[0][1]["lead_id"]
        if not self.owns(lead_id):
            return False
        async with self.lock:
            if not self.owns(lead_id):
                return False
            # The round's records are on the bids topic already (acknowledged): the table's
            # changelog needs only the state they leave, not one record per answer. The
            # round's last answer usually closes the auction, whose closed state is then
            # the only record; an auction left open is written once.
            deferred: dict[str, dict[str, Any]] = {}
            try:
                for name, rec in records:
                    await self.handle(name, dict(rec), None, deferred)
                state = deferred.get(lead_id)
                if state is not None and lead_id not in self.closing:
                    self.durable_set(self.table, lead_id, state, self.partition(lead_id))
            except asyncio.CancelledError:
                raise
            except Exception:  # the bids topic delivers the same records: the agent retries
                log.warning(
                    "local hand-off of lead %s failed; the bids topic will close it",
                    lead_id,
                    exc_info=True,
                )
                return False
        return True

    async def mark_open(self, rec: dict[str, Any]) -> bool:
        """Record a ping round's ``AuctionOpen`` in the table (and its changelog) before any
        ping leaves. A ping request redelivered after a crash then finds its auction in the
        recovered table and pings nobody again: the round's answers come from the bids
        topic, its timer closes it. (Before, the open marker reached the table only through
        the bids topic, and a redelivered request processed before the new owner had read it
        pinged every buyer again.) During a rebalance, or on a worker that is not the lead's
        owner (a request delivered around a rebalance), the request is handed back
        (``Requeue``, nothing sent yet) for the partition's owner. Faust's ``in_recovery``
        is not asked: it stays true while standby tables recover, and a stream runs only
        once its partition's active tables are recovered. Returns False when the auction
        exists already (do not ping)."""
        lead_id = rec["lead_id"]
        async with self.lock:
            if self.rebalancing():
                raise Requeue(f"lead {lead_id}: ping round during a rebalance")
            if not self.member_confirmed():
                raise Requeue(f"lead {lead_id}: this worker's group membership is not confirmed")
            if not self.assigned_here(self.partition(lead_id)):
                raise Requeue(f"lead {lead_id}: this worker does not own its auction")
            state = self.table.get(lead_id)
            current = (state or {}).get("open")
            if (
                lead_id in self.closing
                or state is not None
                and state.get("closed_at_ms") is not None
                or current is not None
                and current.get("attempt", 1) >= rec.get("attempt", 1)
            ):
                return False
            if state is None:
                state = {
                    "open": None,
                    "answers": {},
                    "closed_at_ms": None,
                    "seen_ms": self.now_ms(),
                }
            elif current is not None:  # pinged again: the lost round left no answers
                state = {**state, "answers": {}}
                state.pop("round", None)
            state["open"] = rec
            self.reping_asks.pop(lead_id, None)
            handle = self.timers.pop(lead_id, None)
            if handle is not None:
                handle.cancel()
            # Not waited for: in the demo the changelog's acknowledgement took 20-100 ms at
            # the median under load (500 ms at p99), and waiting for it before pinging
            # halved throughput. The record is ordered before every later change of the
            # key (one producer buffer) and on Kafka within ms: only a crash inside those ms
            # can still ping a round's buyers twice.
            self.durable_set(self.table, lead_id, state, self.partition(lead_id))
            self.open_index[lead_id] = rec["deadline_at_ms"]
            self.arm(lead_id, rec["deadline_at_ms"])
        return True

    async def consume(self, stream: Any) -> None:
        """The body of the ``auction`` agent on the bids topic."""
        async for event in stream.events():
            try:
                name, rec = schemas.decode(event.value)
            except schemas.SchemaError as exc:
                await self.dead.send(event, f"undecodable bids-topic record: {exc}")
                continue
            async with self.lock:
                await self.dead.guarded(event, partial(self.handle, name, rec, event), "auction")

    def rebuild_indexes(self) -> None:
        self.open_index.clear()
        self.purge_queue.clear()
        pending = []
        for lead_id, state in list(self.table.items()):
            if state is None:
                continue
            if state.get("order") is not None and lead_id not in self.closing:
                self.unsent[lead_id] = 0  # closed before a crash or move; its order may be unsent
            if state.get("closed_at_ms") is None and state.get("open") is not None:
                self.open_index[lead_id] = state["open"]["deadline_at_ms"]
            else:
                pending.append((state.get("closed_at_ms") or state.get("seen_ms", 0), lead_id))
        self.purge_queue.extend(sorted(pending))

    def log_closes(self) -> None:
        closes = self.closes
        total = closes["handoff"] + closes["topic"]
        if total != self.logged:
            self.logged = total
            log.info(
                "auctions closed since start: %d (%d on the ping round's hand-off, %d from "
                "the bids topic); %d open; %d ping rounds lost and pinged again",
                total,
                closes["handoff"],
                closes["topic"],
                len(self.open_index),
                self.rounds_lost,
            )

    async def stats(self) -> None:
        self.log_closes()

    async def final_stats(self) -> None:
        self.log_closes()

    async def sweep(self) -> None:
        """Re-arm timers after recovery/rebalance and purge old closed auctions."""
        if self.rescan:
            self.rescan = False
            self.rebuild_indexes()
        now = self.now_ms()
        for lead_id, failed_at in list(self.unsent.items()):
            if now - failed_at < 1000 or lead_id in self.closing:
                continue
            del self.unsent[lead_id]
            state = self.table.get(lead_id)
            if state is not None and state.get("order") is not None:
                self.send_order(lead_id, state, None)
        for lead_id, deadline in list(self.open_index.items()):
            if lead_id in self.timers or now - self.markers_sent.get(lead_id, 0) < 2000:
                continue  # armed, or a marker is on its way (under lag: don't pile them up)
            self.arm(lead_id, deadline, "deadline" if deadline > now else "recovery")
        while self.purge_queue and now - self.purge_queue[0][0] > self.retention_ms:
            _, lead_id = self.purge_queue.popleft()
            state = self.table.get(lead_id)
            if state is None or lead_id in self.open_index or lead_id in self.purges_sent:
                continue
            self.purges_sent.add(lead_id)
            self.send_marker(lead_id, "purge")


def register(ctx: Context) -> Offers:
    """Build the stage from ``ctx``, bind Faust's agent, timers and recovery callback to its
    methods, and fill the ports it offers (the table, the round hand-off, the open marker)."""
    app, settings = ctx.app, ctx.settings
    bids_topic, posts_topic = ctx.topic("bids"), ctx.topic("posts")
    dead = DeadLetters(ctx.topic("deadletter"), "auction")
    table = app.Table(
        "auctions",
        default=None,
        partitions=settings.kafka.partitions,
        key_type=str,
        value_type=None,
    )
    bids_topic_name = bids_topic.get_topic_name()

    def active_partitions() -> set[int]:
        return {
            tp.partition
            for tp in app.assignor.assigned_actives()
            if tp.topic == bids_topic.get_topic_name()
        }

    stage = AuctionStage(
        settings,
        table,
        bids=bids_topic,
        posts=posts_topic,
        dead=dead,
        postings_table=lambda: ctx.postings_table,
        purge_with_auction=lambda: ctx.purge_with_auction,
        ranking=partial(ranking_inputs, ctx),
        reping=lambda: ctx.reping,
        member_confirmed=partial(agents.member_confirmed, app),
        hold_unconfirmed=partial(agents.hold_unconfirmed, app),
        rebalancing=lambda: bool(app.rebalancing),
        in_recovery=lambda: bool(getattr(app, "in_recovery", False)),
        assigned_here=partial(agents.assigned_here, app, bids_topic_name),
        active_partitions=active_partitions,
    )

    @table.on_recover
    async def _recovered() -> None:
        await stage.recovered()

    ctx.closers.append(stage.drain_closing)

    @app.agent(bids_topic, name="auction", concurrency=1)
    async def auction_agent(stream: Any) -> None:
        await stage.consume(stream)

    @timer(app, 10.0, name="auction-stats")
    async def stats() -> None:
        await stage.stats()

    ctx.closers.append(stage.final_stats)

    versions_topic = ctx.topic("flow_versions")

    @task(app)
    async def publish_versions() -> None:
        """Each flow's configuration version onto the compacted flow-versions topic, once
        per start (a replay reads the version an auction records; docs/strategy-lab.md)."""
        for version in stage.versions.values():
            await publish_version(versions_topic, version, now_ms())

    @timer(app, 0.5, name="auction-sweep")
    async def sweep() -> None:
        """Re-arm timers after recovery/rebalance and purge old closed auctions."""
        await stage.sweep()

    return Offers(auctions_table=table, apply_round=stage.apply_local, mark_open=stage.mark_open)


async def publish_version(
    topic: Sends, version: FlowVersion, at_ms: int, attempts: int = 5, delay_s: float = 1.0
) -> None:
    """Send one ``FlowVersion`` (key = its hash), retried: auctions keep running without it,
    but a replay of them then falls back to the configuration it is given (and says so)."""
    rec = {
        "hash": version.hash,
        "flow": version.flow,
        "config_json": version.config_json,
        "at_ms": at_ms,
    }
    for attempt in range(1, attempts + 1):
        try:
            fut = await topic.send(
                key=version.hash.encode(), value=schemas.encode("FlowVersion", rec)
            )
            await fut
            log.info("flow %s: configuration version %s published", version.flow, version.hash)
            return
        except Exception as exc:
            if attempt == attempts:
                log.error(
                    "flow %s: configuration version %s not published (%s); a replay of its "
                    "auctions will need --config",
                    version.flow,
                    version.hash,
                    exc,
                )
                return
            await asyncio.sleep(delay_s * attempt)


def lead_partition(lead_id: str, partitions: int) -> int:
    """The partition of a lead-keyed topic holding ``lead_id``, hence of its auction, PII
    and post table entries."""
    return key_partition(lead_id, partitions)


def _log_send_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("could not send auction marker: %s", fut.exception())
