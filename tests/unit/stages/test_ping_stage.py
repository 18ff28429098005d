"""The ping stage in memory: its auction hand-off and its fan-out over the fake buyer
transport (connectors.buyers' ``Transport`` seam). No broker, no Faust worker."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from functools import partial
from types import SimpleNamespace
from typing import Any, cast

import orjson
import pytest

import schemas
from connectors.buyers import BuyerClient
from streams.context import Context
from streams.runtime.agents import DeadLetters, InFlight, Requeue, now_ms
from streams.runtime.fanout import ping_buyer, plan_for
from streams.stages.ping import PingStage
from streams.topics import TopicNames
from tests.unit.stages.fakes import FakeProgress, RecordingTopic, Stream, demo_settings, event
from tests.unit.test_buyers import FakeTransport

PING_FIELDS = {
    "state": "NY",
    "zip": "100",
    "homeowner": True,
    "electric_bill": "$200-300",
    "credit_range": "700+",
    "property_type": "single_family",
    "consent": True,
}


class LoggingTransport(FakeTransport):
    """The fake buyer transport, also writing each ping into the shared ``log``."""

    log: list[Any]

    async def post(
        self, url: str, headers: Mapping[str, str], body: bytes, timeout_s: float
    ) -> tuple[int, bytes]:
        self.log.append(("ping", url))
        return await super().post(url, headers, body, timeout_s)


class Paused:
    def __init__(self, *buyers: str) -> None:
        self.buyers = buyers

    def paused(self, buyer_id: str) -> int | None:
        return now_ms() + 60_000 if buyer_id in self.buyers else None


class Harness:
    """A PingStage over recording fakes, wired as ``register`` wires it (the real
    ``plan_for`` and ``ping_buyer`` over a context whose buyer client is the fake)."""

    def __init__(self, *, already: bool = False, open_ok: bool = True) -> None:
        self.settings = demo_settings()
        self.log: list[Any] = []
        names = TopicNames.from_settings(self.settings)
        self.bids = RecordingTopic("bids", self.log)
        self.dead = RecordingTopic("deadletter", self.log)
        self.transport = LoggingTransport([(200, orjson.dumps({"bid": True, "price": 50.0}))])
        self.transport.log = self.log
        ctx = Context(
            settings=self.settings,
            app=cast(Any, None),
            names=names,
            topics={names.bids: self.bids, names.deadletter: self.dead},
        )
        ctx.buyers = BuyerClient(self.transport)
        ctx.pauses = Paused("voltmarket")
        self.rounds: list[list[tuple[str, dict[str, Any]]]] = []
        self.opened: list[dict[str, Any]] = []
        self.open_ok = open_ok

        async def mark_open(rec: dict[str, Any]) -> bool:
            self.log.append(("mark_open", rec["lead_id"]))
            self.opened.append(rec)
            return self.open_ok

        async def apply_round(records: list[tuple[str, dict[str, Any]]]) -> bool:
            self.log.append(("apply_round", len(records)))
            self.rounds.append(records)
            return True

        self.auctions: dict[str, Any] = {"lead-1": {"open": True}} if already else {}
        self.ports = SimpleNamespace(
            auctions_table=self.auctions, apply_round=apply_round, mark_open=mark_open
        )
        self.clock_ms = now_ms()  # frozen: the buyers' budgets stay those of the deadline
        dead = DeadLetters(self.dead, "ping", self.settings)
        self.progress = FakeProgress()
        self.stage = PingStage(
            self.settings,
            send_bid=self.bids.send,
            plan=partial(plan_for, ctx),
            ping=partial(ping_buyer, ctx, send=False),
            ports=self.ports,
            dead=dead,
            inflight=InFlight("ping", 4, dead),
            progress=self.progress,
            clock=lambda: self.clock_ms,
        )

    def request(self, lead_id: str = "lead-1", **over: Any) -> dict[str, Any]:
        return {
            "lead_id": lead_id,
            "flow": "solar",
            "source": "http:demo",
            "received_at_ms": self.clock_ms - 20,
            "created_at_ms": self.clock_ms - 2000,
            "ping_fields": PING_FIELDS,
            "pii_hashes": {},
            "identity": None,
            "skip_buyers": ["backupsolar"],
            **over,
        }

    def pinged_urls(self) -> list[str]:
        return [x[1] for x in self.log if x[0] == "ping"]


def decoded(name: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` as it reads back from the topic (the defaults filled in)."""
    return schemas.decode_as(name, schemas.encode(name, record))


def url_of(settings: Any, buyer_id: str) -> str:
    return next(b.ping_url for b in settings.buyers if b.id == buyer_id)


def test_a_round_opens_the_auction_before_any_ping_and_sends_one_record_after_the_last() -> None:
    h = Harness()
    asyncio.run(h.stage.round_for(h.request()))

    # The open marker before the first ping leaves; one PingRound on the bids topic after
    # the last answer is in (not a record per answer).
    pings = [i for i, x in enumerate(h.log) if x[0] == "ping"]
    sends = [i for i, x in enumerate(h.log) if x[0] == "send"]
    assert h.log[0] == ("mark_open", "lead-1")
    assert pings and pings[0] > 0
    assert [h.log[i] for i in sends] == [("send", "bids", "PingRound")]
    assert sends[0] > pings[-1]
    [(name, round_rec)] = h.bids.records()
    assert name == "PingRound" and round_rec["lead_id"] == "lead-1"
    open_rec = round_rec["open"]
    assert h.opened == [open_rec] and open_rec["attempt"] == 1

    # Pinged: the eligible buyers, and only them (greenleaf takes no NY lead, voltmarket is
    # paused, backupsolar already bought this person's lead).
    pinged = {p["buyer_id"] for p in open_rec["pinged"]}
    assert pinged == {"sunrise", "brightpath"}
    assert sorted(h.pinged_urls()) == sorted(url_of(h.settings, b) for b in pinged)
    assert open_rec["deadline_at_ms"] == h.clock_ms + h.settings.flows["solar"].deadline_ms

    # Every buyer not pinged has a `filtered` row with its reason; each pinged one its bid.
    bids = {r["buyer_id"]: r for r in round_rec["answers"]}
    assert len(bids) == len(round_rec["answers"])
    assert set(bids) == {"sunrise", "brightpath", "greenleaf", "voltmarket", "backupsolar"}
    filtered = {b: r["reason"] for b, r in bids.items() if r["status"] == "filtered"}
    assert set(filtered) == {"greenleaf", "voltmarket", "backupsolar"}
    assert all(filtered.values()), filtered
    assert "already bought" in filtered["backupsolar"]
    assert "pause" in filtered["voltmarket"]
    assert {bids[b]["status"] for b in pinged} == {"bid"}

    # The hand-off: once Kafka acknowledged it, the round as one record.
    assert h.log[-1] == ("apply_round", 1)
    assert [[(n, decoded(n, r)) for n, r in rs] for rs in h.rounds] == [[("PingRound", round_rec)]]
    assert h.progress.delays == [20]


def test_a_lost_round_is_pinged_again_as_the_next_attempt() -> None:
    """``reping`` (the auction's call when a round's deadline passed with no PingRound):
    the lead is in the auction table already, and is pinged all the same, as attempt 2."""
    h = Harness(already=True)

    async def go() -> None:
        h.stage.reping({**h.request(), "opened_at_ms": h.clock_ms, "pinged": []}, 2)
        await h.stage.drain()

    asyncio.run(go())
    [(name, round_rec)] = h.bids.records()
    assert name == "PingRound" and round_rec["open"]["attempt"] == 2
    assert h.opened == [round_rec["open"]]
    assert sorted(h.pinged_urls()) == sorted(
        url_of(h.settings, b) for b in ("sunrise", "brightpath")
    )
    assert [[(n, decoded(n, r)) for n, r in rs] for rs in h.rounds] == [[("PingRound", round_rec)]]
    assert h.progress.delays == []  # the receipt -> ping delay counts the first round only


@pytest.mark.parametrize("already, open_ok", [(True, True), (False, False)])
def test_a_redelivered_request_whose_auction_is_open_pings_nobody(
    already: bool, open_ok: bool
) -> None:
    """Already in the auction table, or the open marker says it was opened before: no ping,
    no record, no hand-off."""
    h = Harness(already=already, open_ok=open_ok)
    asyncio.run(h.stage.round_for(h.request()))
    assert h.pinged_urls() == []
    assert h.bids.sent == []
    assert h.rounds == []
    assert h.transport.requests == []


def test_the_agent_acks_a_request_after_its_round_and_hand_off() -> None:
    h = Harness()
    stream = Stream(
        [event(schemas.encode("PingRequest", h.request()), "ping-requests", 0, 7)], h.log
    )

    async def go() -> None:
        await h.stage.agent(stream)
        await h.stage.drain()

    asyncio.run(go())
    assert len(stream.acked) == 1
    kinds = [x[0] for x in h.log]
    assert kinds.index("apply_round") < kinds.index("ack") == len(kinds) - 1
    assert h.progress.taken == [("ping", "ping-requests", 0, 7)]


def _opening_auctions(h: Harness) -> None:
    """``mark_open`` as the auction's: the first round of a lead opens it, a second is
    refused (under the auction's lock, whichever comes first)."""

    async def mark_open(rec: dict[str, Any]) -> bool:
        h.log.append(("mark_open", rec["lead_id"]))
        if rec["lead_id"] in h.auctions:
            return False
        h.auctions[rec["lead_id"]] = {"open": rec}
        return True

    h.ports.mark_open = mark_open


def test_a_handed_off_request_is_pinged_once_kafka_has_it_and_its_topic_copy_pings_nobody(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="streams.stages.ping")
    h = Harness()
    _opening_auctions(h)

    async def go() -> None:
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        assert await h.stage.ping_now(h.request(), ack)
        for _ in range(10):
            await asyncio.sleep(0)
        assert h.log == []  # nothing opened, nobody pinged before Kafka acknowledged it
        ack.set_result(None)
        await h.stage.drain()
        assert len(h.pinged_urls()) == 2 and len(h.rounds) == 1  # sunrise, brightpath
        # The same request through the ping-requests topic: its auction is open.
        await h.stage.round_for(h.request())

    asyncio.run(go())
    assert len(h.pinged_urls()) == 2 and len(h.rounds) == 1  # sunrise, brightpath
    assert [x for x in h.log if x[0] == "mark_open"] == [("mark_open", "lead-1")]
    # The topic's copy was expected: not logged. A redelivery after that one is logged.
    assert "already auctioned" not in caplog.text and not h.stage.handed
    asyncio.run(h.stage.round_for(h.request()))
    assert "lead lead-1 already auctioned; not pinging again" in caplog.text
    assert len(h.pinged_urls()) == 2


def test_no_hand_off_when_it_is_off_or_every_slot_is_taken_or_kafka_refused_the_request() -> None:
    async def go() -> list[Any]:
        off = Harness()
        off.stage.handoff = False
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        assert not await off.stage.ping_now(off.request(), done)

        full = Harness()
        gate = asyncio.Event()

        async def hold() -> None:
            await gate.wait()

        for _ in range(4):  # the harness's InFlight limit
            assert await full.stage.inflight.detached(hold)
        assert not await full.stage.ping_now(full.request(), done)
        gate.set()
        await full.stage.drain()
        assert await full.stage.ping_now(full.request(), done)  # a slot is free again
        await full.stage.drain()

        refused = Harness()
        failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        failed.set_exception(RuntimeError("KafkaTimeoutError"))
        assert await refused.stage.ping_now(refused.request(), failed)
        await refused.stage.drain()
        assert off.log == [] and refused.log == [] and len(full.pinged_urls()) == 2
        return refused.dead.sent

    assert asyncio.run(go()) == []


def test_a_hand_off_to_a_worker_that_does_not_own_the_lead_leaves_it_to_the_topic() -> None:
    h = Harness()

    async def not_mine(rec: dict[str, Any]) -> bool:
        raise Requeue("this worker does not own its auction")

    h.ports.mark_open = not_mine

    async def go() -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        assert await h.stage.ping_now(h.request(), done)
        await h.stage.drain()

    asyncio.run(go())
    assert h.pinged_urls() == [] and h.rounds == [] and h.dead.sent == []


def test_an_undecodable_request_is_dead_lettered_and_acked() -> None:
    h = Harness()
    stream = Stream([event(b"not avro", "ping-requests", 0, 3)], h.log)
    asyncio.run(h.stage.agent(stream))
    assert [n for n, _ in h.dead.records()] == ["DeadLetter"]
    assert len(stream.acked) == 1
    assert h.pinged_urls() == []
