"""The dedupe stage in memory: one owner per identity rejects a duplicate within the window,
lets the same lead redelivered through, and tells a duplicate which buyers to skip. A dict
is the identities table, recording topics the ping-requests and results topics, the clock
is fixed. No broker, no Faust worker."""

from __future__ import annotations

import asyncio
from typing import Any

import schemas
from streams.runtime.agents import DeadLetters
from streams.settings import DuplicatesConfig
from streams.stages.dedupe import DedupeStage
from tests.unit.stages.fakes import FakeProgress, RecordingTopic, Stream, event
from tests.unit.test_schemas import RECORDS

T = 1_780_000_000_000
DAY_MS = 86_400_000


class Harness:
    def __init__(self, action: str = "reject") -> None:
        self.table: dict[str, Any] = {}
        self.requests, self.results, self.dead = (
            RecordingTopic("ping-requests"),
            RecordingTopic("results"),
            RecordingTopic("deadletter"),
        )
        self.now = T
        self.progress = FakeProgress()
        self.stage = DedupeStage(
            {"solar": DuplicatesConfig(fields=["email", "phone"], action=action)},
            table=self.table,
            send_request=self.requests.send,
            send_result=self.results.send,
            dead=DeadLetters(self.dead, "dedupe"),
            progress=self.progress,
            clock=lambda: self.now,
        )

    def run(self, *reqs: dict[str, Any]) -> Stream:
        events = [
            event(schemas.encode("PingRequest", r), "dedupe", 0, i) for i, r in enumerate(reqs)
        ]
        stream = Stream(events)
        asyncio.run(self.stage.agent(stream))
        return stream


def req(lead_id: str, at_ms: int = T, identity: str | None = "id-ada") -> dict[str, Any]:
    return {
        **RECORDS["PingRequest"],
        "lead_id": lead_id,
        "flow": "solar",
        "received_at_ms": at_ms,
        "identity": identity,
        "skip_buyers": [],
    }


def test_a_duplicate_within_the_window_is_rejected_and_a_redelivery_passes() -> None:
    h = Harness()
    h.run(req("l1"), req("l2", T + 1_000), req("l1", T + 2_000))
    assert [r["lead_id"] for _, r in h.requests.records()] == ["l1", "l1"]
    [(name, result)] = h.results.records()
    assert name == "AuctionResult"
    assert result["lead_id"] == "l2" and result["outcome"] == "unsold"
    assert result["close_reason"] == "duplicate"
    assert result["reason"].startswith("duplicate of lead l1 (same email, phone)")
    assert result["opened_at_ms"] == result["settled_at_ms"] == T
    assert h.results.sent[0][0] == b"l2"
    assert [x[0] for x in h.table["id-ada"]["leads"]] == ["l1"]
    # Past the window, the same person is a new lead.
    h.run(req("l3", T + DAY_MS + 1))
    assert [r["lead_id"] for _, r in h.requests.records()] == ["l1", "l1", "l3"]


def test_a_lead_without_identity_passes_unchanged() -> None:
    h = Harness()
    h.run(req("l1", identity=None), req("l2", identity=None))
    assert [r["lead_id"] for _, r in h.requests.records()] == ["l1", "l2"]
    assert h.table == {} and h.results.sent == []


def test_a_duplicate_skips_the_buyers_that_bought_the_earlier_lead() -> None:
    h = Harness("skip_buyers")
    h.run(req("l1"))
    h.stage.on_result(
        schemas.encode(
            "AuctionResult",
            {
                **RECORDS["AuctionResult"],
                "lead_id": "l1",
                "flow": "solar",
                "winners": ["sunrise"],
                "settled_at_ms": T + 500,
            },
        )
    )
    h.run(req("l2", T + 1_000))
    assert [(r["lead_id"], r["skip_buyers"]) for _, r in h.requests.records()] == [
        ("l1", []),
        ("l2", ["sunrise"]),
    ]
    assert h.results.sent == []


def test_purge_forgets_identities_and_sales_past_the_window() -> None:
    h = Harness()
    h.run(req("l1"), req("x1", T + DAY_MS // 2, identity="id-bob"))
    h.stage.on_result(
        schemas.encode(
            "AuctionResult",
            {**RECORDS["AuctionResult"], "lead_id": "l1", "flow": "solar", "settled_at_ms": T},
        )
    )
    h.now = T + DAY_MS + 1
    asyncio.run(h.stage.purge())
    assert set(h.table) == {"id-bob"}
    assert h.stage.sold == {}


def test_an_undecodable_request_is_dead_lettered() -> None:
    h = Harness()
    stream = Stream([event(b"junk", "dedupe", 3, 9)])
    asyncio.run(h.stage.agent(stream))
    assert [n for n, _ in h.dead.records()] == ["DeadLetter"]
    assert h.progress.taken == [("dedupe", "dedupe", 3, 9)]
