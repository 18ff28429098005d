"""The auction stage's class in memory (streams/stages/auction.py ``AuctionStage``): a dict for
the ``auctions`` table, recording senders for the bids and posts topics, a clock the test
moves, and a membership fence that always holds. No broker, no Faust worker.

What is checked is what the exactly-once close rests on: a round closes once, with its
decision, and sends one post order; whatever arrives after the close (redelivered or late
answers, a second close marker) changes nothing; a recovered closed auction re-sends the
same order bytes instead of deciding again; the open marker makes a redelivered ping request
ping nobody; closed entries are purged with the post stage's tables after the retention.
"""

from __future__ import annotations

import asyncio
import copy
import gc
from pathlib import Path
from typing import Any

import pytest
import yaml

import schemas
from streams.runtime.agents import Requeue
from streams.settings import parse_settings
from streams.stages.auction import AuctionStage

RAW = yaml.safe_load(Path("config/demo.yaml").read_text())
T0 = 1_767_808_800_000  # Wednesday 2026-01-07 18:00 UTC: inside the solar flow's hours
LEAD = "lead-0001"
PING_FIELDS = {
    "state": "CA",
    "zip": "902",
    "homeowner": True,
    "electric_bill": "$200-300",
    "credit_range": "700+",
    "property_type": "single_family",
    "consent": True,
}
NO_CONDITIONS = {
    "max_age_minutes": None,
    "states": None,
    "require_consent": False,
    "exclusive_required": False,
}
EVENT = object()  # an event that came back from the bids topic (None: the local hand-off)


class Table(dict[str, Any]):
    """The ``auctions`` table: a dict whose local store (``data``) is itself."""

    @property
    def data(self) -> Table:
        return self


class Clock:
    def __init__(self, at_ms: int) -> None:
        self.at_ms = at_ms

    def now_ms(self) -> int:
        return self.at_ms

    def time(self) -> float:
        return self.at_ms / 1000.0


class Sender:
    """A topic: records what is sent, acknowledges at once."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, bytes]] = []

    async def send(self, *, key: bytes, value: bytes) -> asyncio.Future[None]:
        self.sent.append((key, value))
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ack.set_result(None)
        return ack

    def decoded(self) -> list[tuple[str, dict[str, Any]]]:
        return [schemas.decode(value) for _, value in self.sent]


class Dead:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, event: Any, reason: str, field: str | None = None) -> None:
        self.sent.append(reason)


class Harness:
    """An ``AuctionStage`` with fakes at every seam, and what it wrote."""

    def __init__(self, table: Table | None = None, **overrides: Any) -> None:
        self.settings = parse_settings(yaml.safe_load(yaml.safe_dump(RAW)), env={})
        self.table = Table() if table is None else table
        self.clock = Clock(T0)
        self.bids, self.posts, self.dead = Sender(), Sender(), Dead()
        self.changelog: list[tuple[str, Any]] = []  # durable_set writes, in order
        self.postings: dict[str, Any] = {}
        self.pii: dict[str, Any] = {}
        deps: dict[str, Any] = {
            "bids": self.bids,
            "posts": self.posts,
            "dead": self.dead,
            "postings_table": lambda: self.postings,
            "purge_with_auction": lambda: [self.pii, self.postings],
            "ranking": lambda flow: {"acceptance": None, "payment": {}},
            "member_confirmed": lambda: True,
            "hold_unconfirmed": lambda what: None,
            "rebalancing": lambda: False,
            "in_recovery": lambda: False,
            "assigned_here": lambda partition: True,
            "active_partitions": lambda: set(range(self.settings.kafka.partitions)),
            "durable_set": self.durable_set,
            "now_ms": self.clock.now_ms,
            "clock": self.clock.time,
        }
        deps.update(overrides)
        self.stage = AuctionStage(self.settings, self.table, **deps)

    def durable_set(self, table: Table, key: str, value: Any, partition: int) -> Any:
        table[key] = value
        self.changelog.append((key, copy.deepcopy(value)))
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ack.set_result(None)
        return ack

    async def settle(self) -> None:
        """Let the closes in flight (changelog ack, then the order) finish."""
        while self.stage.closing:
            await asyncio.gather(*self.stage.closing.values())
        await asyncio.sleep(0)  # the markers' sends (ensure_future)

    def orders(self) -> list[dict[str, Any]]:
        decoded = self.posts.decoded()
        assert all(name == "PostOrder" for name, _ in decoded)
        return [rec for _, rec in decoded]


def open_rec(deadline_in_ms: int = 750) -> dict[str, Any]:
    return {
        "lead_id": LEAD,
        "flow": "solar",
        "source": "http:demo",
        "received_at_ms": T0 - 5,
        "created_at_ms": T0 - 2000,
        "opened_at_ms": T0,
        "deadline_at_ms": T0 + deadline_in_ms,
        "ping_fields": PING_FIELDS,
        "pinged": [
            {"buyer_id": "sunrise", "tier": "premium", "ping_id": "p-1"},
            {"buyer_id": "greenleaf", "tier": "standard", "ping_id": "p-2"},
        ],
        "skip_buyers": [],
    }


def bid(ping_id: str, buyer: str, price: float, exclusive: bool = False) -> dict[str, Any]:
    return {
        "lead_id": LEAD,
        "flow": "solar",
        "ping_id": ping_id,
        "buyer_id": buyer,
        "tier": "standard",
        "status": "bid",
        "sent_at_ms": T0 + 1,
        "answered_at_ms": T0 + 60,
        "latency_ms": 59.0,
        "price": price,
        "exclusive": exclusive,
        "buyer_ref": None,
        "conditions": NO_CONDITIONS,
        "reason": "",
        "http_status": 200,
    }


BID_1 = bid("p-1", "sunrise", 95.0, exclusive=True)
BID_2 = bid("p-2", "greenleaf", 50.0)


def marker(reason: str) -> dict[str, Any]:
    return {"lead_id": LEAD, "reason": reason, "at_ms": T0 + 800}


async def closed_by_handoff(h: Harness) -> None:
    """A whole round handed off by the ping stage: opened, both buyers answered."""
    assert await h.stage.mark_open(open_rec())
    applied = await h.stage.apply_local(
        [("AuctionOpen", open_rec()), ("Bid", BID_1), ("Bid", BID_2)]
    )
    assert applied
    await h.settle()


async def test_a_round_every_buyer_answered_closes_early_once_with_its_decision() -> None:
    h = Harness()
    await closed_by_handoff(h)

    [order] = h.orders()
    assert order["lead_id"] == LEAD
    assert order["close_reason"] == "all_answered"
    assert order["mode"] == "exclusive"
    assert order["candidates"][0]["buyer_id"] == "sunrise"
    assert order["candidates"][0]["price"] == 95.0
    assert (order["pinged"], order["bids"]) == (2, 2)
    assert order["closed_at_ms"] == T0
    assert h.stage.closes == {"handoff": 1, "topic": 0}
    # The closed state with its order reached the changelog before the order left; once
    # Kafka had the order, the order was dropped from the closed state.
    closed_writes = [v for k, v in h.changelog if k == LEAD and v["closed_at_ms"] is not None]
    assert [("order" in v) for v in closed_writes] == [True, False]
    assert h.table[LEAD]["closed_at_ms"] == T0
    assert "order" not in h.table[LEAD]
    # Kept for closed_retention_s: nothing in it for the cyclic GC to track and walk.
    assert not gc.is_tracked(h.table[LEAD])
    assert LEAD not in h.stage.timers and LEAD not in h.stage.open_index
    assert list(h.stage.purge_queue) == [(T0, LEAD)]


class CountingTable(Table):
    """The ``auctions`` table counting its writes: each is one changelog record in Faust."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def __setitem__(self, key: str, value: Any) -> None:
        self.writes += 1
        super().__setitem__(key, value)


async def test_a_handed_off_round_writes_the_changelog_once_per_state_not_per_answer() -> None:
    # The round's answers are on the bids topic already: the table's changelog gets the
    # open state, the closed state with its order, and the closed state once the order is
    # on Kafka. Three records whatever the number of answers (one more per answer before).
    h = Harness(CountingTable())
    await closed_by_handoff(h)
    assert isinstance(h.table, CountingTable)
    assert h.table.writes == 3
    assert len(h.orders()) == 1

    # A round handed off that does not close (an answer is missing) is written once, with
    # every answer it brought.
    three = open_rec()
    three["pinged"].append({"buyer_id": "voltmarket", "tier": "standard", "ping_id": "p-3"})
    h = Harness(CountingTable())
    assert await h.stage.mark_open(three)
    assert await h.stage.apply_local([("AuctionOpen", three), ("Bid", BID_1), ("Bid", BID_2)])
    assert isinstance(h.table, CountingTable)
    assert h.table.writes == 2
    assert set(h.table[LEAD]["answers"]) == {"p-1", "p-2"}
    assert h.orders() == [] and LEAD in h.stage.open_index


async def test_answers_redelivered_or_late_after_the_close_change_nothing() -> None:
    h = Harness()
    assert await h.stage.mark_open(open_rec())
    await h.stage.handle("Bid", BID_1, EVENT)
    await h.stage.handle("Bid", BID_2, EVENT)  # the last answer: closes
    assert LEAD in h.stage.closing
    # While its order is on the way to Kafka, and after.
    await h.stage.handle("Bid", bid("p-2", "greenleaf", 500.0), EVENT)
    await h.settle()
    closed = copy.deepcopy(h.table[LEAD])
    writes = len(h.changelog)
    for name, rec in [
        ("AuctionOpen", open_rec()),
        ("Bid", BID_1),
        ("Bid", bid("p-2", "greenleaf", 500.0)),
        ("Bid", bid("p-3", "latecomer", 900.0, exclusive=True)),
    ]:
        await h.stage.handle(name, rec, EVENT)
    assert await h.stage.apply_local([("AuctionOpen", open_rec()), ("Bid", BID_1)])
    await h.settle()

    [order] = h.orders()
    assert order["candidates"][0]["buyer_id"] == "sunrise"
    assert order["close_reason"] == "all_answered"
    assert h.stage.closes == {"handoff": 0, "topic": 1}
    assert h.table[LEAD] == closed
    assert len(h.changelog) == writes
    assert LEAD not in h.stage.timers and LEAD not in h.stage.open_index
    assert h.dead.sent == []


async def test_the_deadline_marker_closes_an_open_auction_once() -> None:
    h = Harness()
    assert await h.stage.mark_open(open_rec())
    await h.stage.handle("Bid", BID_2, EVENT)  # sunrise never answers
    assert h.table[LEAD]["closed_at_ms"] is None
    assert LEAD in h.stage.timers  # the deadline timer is armed
    assert h.stage.open_index == {LEAD: T0 + 750}
    assert h.orders() == []

    h.clock.at_ms = T0 + 760
    await h.stage.handle("AuctionClose", marker("deadline"), EVENT)
    await h.settle()
    h.clock.at_ms = T0 + 900
    await h.stage.handle("AuctionClose", marker("deadline"), EVENT)  # a second marker
    await h.stage.handle("AuctionClose", marker("recovery"), EVENT)
    await h.settle()

    [order] = h.orders()
    assert order["close_reason"] == "deadline"
    assert order["closed_at_ms"] == T0 + 760
    assert order["mode"] == "shared"
    assert [c["buyer_id"] for c in order["candidates"]] == ["greenleaf"]
    assert (order["pinged"], order["bids"]) == (2, 1)
    assert h.stage.closes == {"handoff": 0, "topic": 1}
    assert h.table[LEAD]["closed_at_ms"] == T0 + 760
    assert LEAD not in h.stage.timers and LEAD not in h.stage.open_index


async def test_a_redelivered_ping_request_finds_its_auction_open() -> None:
    h = Harness()
    rec = open_rec()
    assert await h.stage.mark_open(rec) is True
    # Written through to the changelog (durable_set), not only to the local store.
    assert h.changelog == [(LEAD, {**h.table[LEAD], "open": rec})]
    assert h.table[LEAD]["open"] == rec
    assert LEAD in h.stage.timers

    assert await h.stage.mark_open(open_rec()) is False  # the redelivered request: no ping
    assert len(h.changelog) == 1

    # Its round comes back through the bids topic: the first deadline is kept.
    await h.stage.handle("AuctionOpen", open_rec(deadline_in_ms=5000), EVENT)
    assert h.table[LEAD]["open"]["deadline_at_ms"] == T0 + 750
    assert h.orders() == []

    # A worker that does not own the lead hands the request back, recording nothing.
    other = Harness(assigned_here=lambda partition: False)
    with pytest.raises(Requeue):
        await other.stage.mark_open(open_rec())
    assert other.table == {} and other.changelog == []


async def test_a_closed_auction_keeps_its_outcome_and_candidates_when_closed_again() -> None:
    first = Harness()
    await closed_by_handoff(first)
    [sent] = first.posts.sent
    with_order = next(v for k, v in first.changelog if "order" in v)

    # A crash after the closed state reached the changelog, before the order left: the next
    # owner recovers that state and sends the very same order, deciding nothing again.
    h = Harness(table=Table({LEAD: copy.deepcopy(with_order)}))
    h.clock.at_ms = T0 + 5000
    await h.stage.handle("AuctionClose", marker("recovery"), EVENT)
    await h.stage.handle("Bid", bid("p-3", "latecomer", 900.0, exclusive=True), EVENT)
    await h.stage.sweep()  # rebuilds its indexes from the recovered table; re-sends
    await h.settle()
    await h.stage.handle("AuctionClose", marker("deadline"), EVENT)
    await h.stage.sweep()
    await h.settle()

    assert h.posts.sent == [sent]
    assert h.stage.closes == {"handoff": 0, "topic": 0}
    assert h.table[LEAD]["closed_at_ms"] == with_order["closed_at_ms"]
    assert "order" not in h.table[LEAD]
    assert [name for name, _ in h.bids.decoded()] == []  # no close marker for a closed lead


async def test_the_purge_removes_a_settled_closed_auction_after_the_retention() -> None:
    h = Harness()
    await closed_by_handoff(h)
    h.pii[LEAD] = {"email": "ada@example.com"}
    h.postings[LEAD] = {"result": None}  # its post waterfall has not settled yet
    retention_ms = h.stage.retention_ms

    h.clock.at_ms = T0 + retention_ms  # not past the retention yet
    await h.stage.sweep()
    await h.settle()
    assert h.bids.decoded() == []

    h.clock.at_ms = T0 + retention_ms + 1
    await h.stage.sweep()
    await h.settle()
    [(name, purge)] = h.bids.decoded()
    assert (name, purge["reason"]) == ("AuctionClose", "purge")
    await h.stage.handle(name, purge, EVENT)
    # Not settled: kept (PII and progress), queued again.
    assert LEAD in h.table and LEAD in h.pii and LEAD in h.postings
    assert list(h.stage.purge_queue) == [(T0 + retention_ms + 1, LEAD)]

    h.postings[LEAD] = {"result": "sold"}
    h.clock.at_ms = T0 + 2 * retention_ms + 2
    await h.stage.sweep()
    await h.settle()
    [_, (name, purge)] = h.bids.decoded()
    await h.stage.handle(name, purge, EVENT)
    assert LEAD not in h.table and LEAD not in h.pii and LEAD not in h.postings
    assert h.stage.purges_sent == set()


def ping_round(op: dict[str, Any], *answers: dict[str, Any]) -> dict[str, Any]:
    """A ``PingRound`` as the ping stage sends it: the open marker and every answer."""
    return {"lead_id": LEAD, "open": op, "answers": list(answers)}


async def test_a_ping_round_record_closes_its_auction_once_by_hand_off_or_topic() -> None:
    # Handed off: the same close and the same three changelog records as the round's
    # records one by one (open state, closed state with its order, closed state).
    h = Harness(CountingTable())
    assert await h.stage.mark_open(open_rec())
    assert await h.stage.apply_local([("PingRound", ping_round(open_rec(), BID_1, BID_2))])
    await h.settle()
    [order] = h.orders()
    assert (order["close_reason"], order["mode"], order["bids"]) == ("all_answered", "exclusive", 2)
    assert order["candidates"][0]["buyer_id"] == "sunrise"
    assert h.stage.closes == {"handoff": 1, "topic": 0}
    assert isinstance(h.table, CountingTable) and h.table.writes == 3
    # The same record back from the bids topic changes nothing.
    await h.stage.handle("PingRound", ping_round(open_rec(), BID_1, BID_2), EVENT)
    await h.settle()
    assert len(h.orders()) == 1 and h.table.writes == 3

    # From the topic, on a worker whose table never saw the open marker (a new owner).
    h = Harness(CountingTable())
    await h.stage.handle("PingRound", ping_round(open_rec(), BID_1, BID_2), EVENT)
    await h.settle()
    [order] = h.orders()
    assert order["close_reason"] == "all_answered"
    assert h.stage.closes == {"handoff": 0, "topic": 1}

    # A round that leaves its auction open (an answer missing) is written once, marked as
    # in: at its deadline it closes with what it has.
    h = Harness(CountingTable())
    assert await h.stage.mark_open(open_rec())
    await h.stage.handle("PingRound", ping_round(open_rec(), BID_2), EVENT)
    assert isinstance(h.table, CountingTable) and h.table.writes == 2
    assert h.table[LEAD]["round"] is True and set(h.table[LEAD]["answers"]) == {"p-2"}
    h.clock.at_ms = T0 + 760
    await h.stage.handle("AuctionClose", marker("deadline"), EVENT)
    await h.settle()
    [order] = h.orders()
    assert (order["close_reason"], order["bids"]) == ("deadline", 1)


class Repings:
    """The ping stage's ``reping`` port: records what it is asked to ping again."""

    def __init__(self) -> None:
        self.asked: list[tuple[dict[str, Any], int]] = []

    def __call__(self, op: dict[str, Any], attempt: int) -> None:
        self.asked.append((op, attempt))


async def test_a_round_lost_mid_flight_is_pinged_again_once_then_closed_unsold() -> None:
    """The worker pinging a lead died mid-round: its open marker is in the table, its
    PingRound never came. At the deadline the lead is pinged again (attempt 2), not closed
    with no answers; a stale marker of round 1 does not close round 2; a round-1 record that
    turns up late is not round 2's; round 2 lost too closes unsold, ``round_lost``."""
    repings = Repings()
    h = Harness(reping=lambda: repings)
    assert await h.stage.mark_open(open_rec())
    h.clock.at_ms = T0 + 760
    await h.stage.handle("AuctionClose", marker("deadline"), EVENT)
    await h.settle()
    assert h.orders() == []
    assert repings.asked == [(open_rec(), 2)]
    assert h.stage.rounds_lost == 1
    assert h.table[LEAD]["closed_at_ms"] is None

    # The ping stage's new round opens (a later attempt replaces the lost one's marker).
    second = {**open_rec(), "opened_at_ms": T0 + 770, "deadline_at_ms": T0 + 1520, "attempt": 2}
    assert await h.stage.mark_open(second) is True
    assert h.table[LEAD]["open"] == second and h.table[LEAD]["answers"] == {}
    assert await h.stage.mark_open(second) is False  # the same attempt twice: no
    assert h.stage.open_index == {LEAD: T0 + 1520}
    # A marker of round 1 (the sweep's resend), handled before round 2's deadline: ignored.
    h.clock.at_ms = T0 + 800
    await h.stage.handle("AuctionClose", marker("recovery"), EVENT)
    # Round 1's record, late: not round 2's answers.
    await h.stage.handle("PingRound", ping_round(open_rec(), BID_1, BID_2), EVENT)
    await h.settle()
    assert h.orders() == [] and h.table[LEAD]["answers"] == {}
    assert LEAD in h.stage.timers

    # Round 2 lost too: closed unsold, with the reason that names it.
    h.clock.at_ms = T0 + 1530
    await h.stage.handle("AuctionClose", marker("deadline"), EVENT)
    await h.settle()
    [order] = h.orders()
    assert (order["close_reason"], order["mode"], order["candidates"]) == ("round_lost", "none", [])
    assert len(repings.asked) == 1


async def test_a_re_pinged_round_closes_with_its_answers() -> None:
    repings = Repings()
    h = Harness(reping=lambda: repings)
    assert await h.stage.mark_open(open_rec())
    h.clock.at_ms = T0 + 760
    await h.stage.handle("AuctionClose", marker("deadline"), EVENT)
    second = {**open_rec(), "opened_at_ms": T0 + 770, "deadline_at_ms": T0 + 1520, "attempt": 2}
    assert await h.stage.mark_open(second)
    assert await h.stage.apply_local([("PingRound", ping_round(second, BID_1, BID_2))])
    await h.settle()
    [order] = h.orders()
    assert (order["close_reason"], order["bids"]) == ("all_answered", 2)
    assert order["opened_at_ms"] == T0 + 770


async def test_without_a_ping_stage_a_lost_round_closes_unsold_at_once() -> None:
    h = Harness()  # no reping port (a role without the ping stage)
    assert await h.stage.mark_open(open_rec())
    h.clock.at_ms = T0 + 760
    await h.stage.handle("AuctionClose", marker("deadline"), EVENT)
    await h.settle()
    [order] = h.orders()
    assert order["close_reason"] == "round_lost"


async def test_a_lost_round_the_ping_stage_cannot_ping_again_closes_after_three_asks() -> None:
    """The ping stage is asked to ping the lead again, but no new round opens (its flow was
    removed, say): the sweep's markers ask again, and after three asks the auction closes
    unsold instead of asking forever."""
    repings = Repings()
    h = Harness(reping=lambda: repings)
    assert await h.stage.mark_open(open_rec())
    h.clock.at_ms = T0 + 760
    for _ in range(3):
        await h.stage.handle("AuctionClose", marker("recovery"), EVENT)
    assert h.orders() == [] and len(repings.asked) == 3
    assert h.stage.rounds_lost == 1
    await h.stage.handle("AuctionClose", marker("recovery"), EVENT)
    await h.settle()
    [order] = h.orders()
    assert order["close_reason"] == "round_lost" and len(repings.asked) == 3
    assert h.stage.reping_asks == {}
