"""The cap owner in memory: grants within the cap, refuses beyond, releases an expired hold
and republishes the buyer's counters. A dict is the ledger table, recording topics the
caps, cap-decisions and cap-state topics, the clock is fixed. No broker, no Faust worker."""

from __future__ import annotations

import asyncio
from typing import Any

import schemas
from streams.runtime.agents import DeadLetters
from streams.settings import BuyerCaps
from streams.stages.caps import CapClient, CapsStage, CapView
from tests.unit.stages.fakes import RecordingTopic, Stream, event

T = 1_780_000_000_000
TTL = 10_000


class Harness:
    def __init__(self, *, owner: bool = True) -> None:
        self.table: dict[str, Any] = {}
        self.requests, self.decisions, self.states, self.dead = (
            RecordingTopic("caps"),
            RecordingTopic("cap-decisions"),
            RecordingTopic("cap-state"),
            RecordingTopic("deadletter"),
        )
        self.now = T
        self.owner = owner
        self.durable: list[str] = []
        self.client = CapClient(self.requests, timeout_s=0.05)
        self.view = CapView()

        def durable(buyer_id: str, led: Any) -> asyncio.Future[Any]:
            self.table[buyer_id] = led
            self.durable.append(buyer_id)
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            fut.set_result(None)
            return fut

        self.stage = CapsStage(
            {"b1": BuyerCaps(leads_per_hour=2)},
            {"b1": TTL},
            table=self.table,
            local=lambda: self.table,
            durable=durable,
            owns_buyer=lambda buyer_id: self.owner,
            send_state=self.states.send,
            send_decision=self.decisions.send,
            client=self.client,
            view=self.view,
            dead=DeadLetters(self.dead, "caps"),
            clock=lambda: self.now,
        )
        self.client.local = self.stage.apply_here

    def last_state(self) -> dict[str, Any]:
        name, rec = self.states.records()[-1]
        assert name == "CapState"
        return rec


def cap_request(kind: str, lead_id: str, offset: int, buyer_id: str = "b1") -> Any:
    rec = {
        "request_id": f"r{offset}",
        "kind": kind,
        "buyer_id": buyer_id,
        "lead_id": lead_id,
        "price": 10.0,
        "at_ms": T,
        "expires_at_ms": None,
    }
    return event(schemas.encode("CapRequest", rec), "caps", 0, offset)


def test_the_owner_grants_within_the_cap_and_refuses_beyond() -> None:
    """Through the caps topic: a decision per reservation, the counters after each change."""
    h = Harness()
    stream = Stream([cap_request("reserve", f"l{i}", i) for i in range(3)])
    asyncio.run(h.stage.caps_agent(stream))
    decisions = [r for _, r in h.decisions.records()]
    assert [(d["lead_id"], d["granted"]) for d in decisions] == [
        ("l0", True),
        ("l1", True),
        ("l2", False),
    ]
    assert "leads_per_hour" in decisions[2]["reason"]
    assert [r["leads_hour"] for _, r in h.states.records()] == [1, 2, 2]
    assert set(h.table["b1"]["holds"]) == {"l0", "l1"}

    # Every worker's view, fed by the published states, sees the buyer at its cap.
    for _, value in h.states.sent:
        h.stage.on_state(value)
    assert h.view.counters("b1", BuyerCaps(leads_per_hour=2), T).leads_hour == 2


def test_a_release_frees_the_slot_and_a_commit_counts() -> None:
    h = Harness()

    async def go() -> list[tuple[bool, str]]:
        got = [await h.client.reserve("b1", "l0", 10.0), await h.client.reserve("b1", "l1", 10.0)]
        got.append(await h.client.reserve("b1", "l2", 10.0))  # over the cap
        await h.client.release("b1", "l1")
        got.append(await h.client.reserve("b1", "l2", 10.0))
        await h.client.commit("b1", "l0", 10.0)
        return got

    got = asyncio.run(go())
    assert [g for g, _ in got] == [True, True, False, True]
    assert h.requests.sent == []  # the owner here: all applied in-process, durably
    assert h.durable == ["b1"] * 6
    assert h.table["b1"]["hours"] and sum(h.table["b1"]["hours"].values()) == 1
    assert h.last_state()["leads_hour"] == 2  # l0 counted, l2 held


def test_an_expired_hold_is_released_and_the_state_republished() -> None:
    h = Harness()

    async def go() -> None:
        assert (await h.client.reserve("b1", "l0", 10.0))[0]
        assert (await h.client.reserve("b1", "l1", 10.0))[0]
        assert h.last_state()["leads_hour"] == 2
        sent = len(h.states.sent)
        h.now = T + TTL - 1
        await h.stage.expiry()  # not due yet
        assert len(h.states.sent) == sent and len(h.table["b1"]["holds"]) == 2
        h.now = T + TTL + 1
        await h.stage.expiry()
        assert h.table["b1"]["holds"] == {}
        assert len(h.states.sent) == sent + 1
        assert h.last_state()["leads_hour"] == 0
        assert h.last_state()["at_ms"] == h.now

    asyncio.run(go())
    assert h.stage.expiry_sent == {}


def test_a_worker_not_owning_the_ledger_asks_the_owner_through_the_caps_topic() -> None:
    h = Harness(owner=False)
    h.table["b1"] = {
        "hours": {},
        "days": {},
        "spend": {},
        "holds": {"l0": {"exp": T - 1, "hour": "h", "day": "d", "price": 1.0}},
        "done": {},
    }

    async def go() -> tuple[bool, str]:
        await h.stage.expiry()
        return await h.client.reserve("b1", "l1", 10.0)  # nobody answers: refused

    granted, why = asyncio.run(go())
    assert not granted and "did not answer" in why
    kinds = [r["kind"] for _, r in h.requests.records()]
    assert kinds == ["expire", "reserve"]
    assert h.states.sent == []
