"""The redact stage in memory: a lead split into its PII record and a PII-free ping
request, an invalid lead dead-lettered without raw PII, a producer's retry dropped. No
broker, no Faust worker."""

from __future__ import annotations

import asyncio
from typing import Any

import schemas
from streams.runtime.agents import DeadLetters
from streams.stages.redact import RedactStage
from tests.unit.stages.fakes import FakeProgress, RecordingTopic, Stream, demo_settings, event

T = 1_780_000_000_000  # the fixed clock (ms); the events' Kafka timestamp is T too

PII = {
    "first_name": "Ada",
    "last_name": "Lovelace",
    "email": "ada.lovelace@example.com",
    "phone": "+13105550100",
    "address": "1 Main St, Beverly Hills",
}


def lead(**fields: Any) -> bytes:
    return schemas.encode(
        "Lead",
        {
            "flow": "solar",
            "lead_id": None,
            "created_at": None,
            "fields": {
                "state": "CA",
                "zip": "90210",
                "homeowner": True,
                "electric_bill": "$200-300",
                "credit_range": "700+",
                "property_type": "single_family",
                "consent": True,
                **PII,
                **fields,
            },
            "source": "kafka:crm",
            "received_at_ms": T,
        },
    )


class Harness:
    def __init__(self, *, ping_now: Any = None) -> None:
        self.settings = demo_settings()
        self.pii, self.requests, self.dedupe, self.dead = (
            RecordingTopic("lead-pii"),
            RecordingTopic("ping-requests"),
            RecordingTopic("dedupe"),
            RecordingTopic("deadletter"),
        )
        self.seen: dict[str, Any] = {}
        self.now = T
        self.progress = FakeProgress()
        self.stage = RedactStage(
            self.settings,
            seen=self.seen,
            local=lambda: self.seen,
            send_pii=self.pii.send,
            send_request=self.requests.send,
            send_dedupe=self.dedupe.send,
            dead=DeadLetters(self.dead, "redact", self.settings),
            progress=self.progress,
            ping_now=lambda: ping_now,
            clock=lambda: self.now,
        )

    def run(self, *events: Any) -> Stream:
        stream = Stream(list(events))
        asyncio.run(self.stage.agent(stream))
        return stream


def test_a_lead_is_split_into_its_pii_record_and_a_pii_free_ping_request() -> None:
    h = Harness()
    h.run(event(lead(), "leads", 2, 40))
    assert h.progress.taken == [("redact", "leads", 2, 40)]

    [(pii_key, _)] = h.pii.sent
    [(name, pii)] = h.pii.records()
    assert name == "LeadPii"
    assert {k: v for k, v in pii["fields"].items() if v is not None} == PII
    assert pii["expires_at_ms"] == T + int(h.settings.privacy.pii_ttl_s * 1000)

    [(req_key, raw)] = h.requests.sent
    [(name, req)] = h.requests.records()
    assert name == "PingRequest"
    assert req_key == pii_key == req["lead_id"].encode()
    assert req["lead_id"] == pii["lead_id"]
    assert req["ping_fields"]["state"] == "CA"
    assert req["ping_fields"]["zip"] == "902"  # the zip3 transform
    assert set(req["pii_hashes"]) >= {"email", "phone"}
    # No PII value anywhere in the request, not even inside its bytes.
    for value in PII.values():
        assert value.encode() not in raw, value
        assert value not in repr(req), value
    assert h.dedupe.sent == [] and h.dead.sent == []


def test_the_ping_request_is_handed_to_the_ping_stage_as_the_topic_delivers_it() -> None:
    """The ping stage's hand-off gets each request the stage wrote, decoded as it reads back
    from the topic, with the future of its Kafka acknowledgement (not awaited here)."""
    handed: list[tuple[dict[str, Any], Any]] = []

    async def ping_now(req: dict[str, Any], ack: Any) -> bool:
        handed.append((req, ack))
        return True

    h = Harness(ping_now=ping_now)
    h.run(event(lead(), "leads", 2, 40), event(lead(), "leads", 2, 41))
    assert len(h.requests.sent) == 2
    assert [req for req, _ in handed] == [rec for _, rec in h.requests.records()]
    assert all(isinstance(ack, asyncio.Future) and ack.done() for _, ack in handed)


def test_a_failed_hand_off_leaves_the_request_to_its_topic_and_dead_letters_nothing() -> None:
    async def broken(req: dict[str, Any], ack: Any) -> bool:
        raise RuntimeError("the ping stage is stopping")

    h = Harness(ping_now=broken)
    h.run(event(lead(), "leads", 2, 40))
    assert len(h.requests.sent) == 1 and len(h.pii.sent) == 1
    assert h.dead.sent == []


def test_without_the_hand_off_the_request_goes_through_its_topic_alone() -> None:
    h = Harness(ping_now=None)
    h.run(event(lead(), "leads", 2, 40))
    assert len(h.requests.sent) == 1 and h.dead.sent == []


def test_an_invalid_lead_is_dead_lettered_without_raw_pii() -> None:
    h = Harness()
    h.run(event(lead(email="not-an-email", zip="9021"), "leads", 0, 5))
    assert h.pii.sent == [] and h.requests.sent == []
    [(name, dead)] = h.dead.records()
    assert name == "DeadLetter"
    assert dead["stage"] == "redact" and dead["offset"] == 5
    assert "invalid lead" in dead["reason"]
    [(_, raw)] = h.dead.sent
    for value in [*PII.values(), "not-an-email"]:
        assert value.encode() not in raw, value


def test_an_undecodable_record_is_dead_lettered() -> None:
    h = Harness()
    h.run(event(b"\x00garbage", "leads", 0, 6))
    assert [n for n, _ in h.dead.records()] == ["DeadLetter"]
    assert "undecodable lead" in h.dead.records()[0][1]["reason"]
    assert h.requests.sent == []


def test_a_producer_retry_is_dropped_and_a_redelivery_processed_again() -> None:
    """The same lead_id at another offset within the window is a producer's retry: dropped.
    The same record again (same position, after a crash) is published again."""
    h = Harness()
    first = event(_with_id("lead-42"), "leads", 1, 10)
    h.run(first)
    h.now += 1_000
    h.run(event(_with_id("lead-42"), "leads", 1, 11))  # a retry: dropped
    assert len(h.requests.sent) == 1
    h.run(first)  # a redelivery: processed again
    assert len(h.requests.sent) == 2
    # Past the window, the id is forgotten: the same lead_id is a new lead again.
    h.now += int(h.settings.ingest.idempotency_window_s * 1000) + 1
    h.run(event(_with_id("lead-43"), "leads", 1, 12))
    assert set(h.seen) == {"lead-43"}  # expired ids leave the table as the partition moves on
    h.run(event(_with_id("lead-42"), "leads", 1, 13))
    assert len(h.requests.sent) == 4


def _with_id(lead_id: str) -> bytes:
    name, rec = schemas.decode(lead())
    return schemas.encode(name, {**rec, "lead_id": lead_id})
