"""Redact stage: validate each lead from the leads topic and split it.

The ping view (configured fields after transforms, no PII) goes to ``ping-requests``; the PII
part goes to ``lead-pii``, which only the post stage reads. Invalid records go to the
dead-letter topic with the reason and the field; processing continues.

A lead id seen within ``ingest.idempotency_window_s`` at another position of the leads topic
is a producer's retry (the same ``Idempotency-Key`` or ``lead_id``, streams/stages/ingest/idempotency.py):
it is dropped here, once for every ingest process and across restarts, because the ``lead_ids``
table lives in Kafka (its changelog). The record at the same position, redelivered after a
crash, is processed again as before (what it published may not have reached Kafka).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from functools import partial
from typing import Any

import schemas
from streams.context import Context, PingNow, ProgressPort
from streams.rules.dedupe import identity_of
from streams.rules.leads import (
    LeadError,
    PingView,
    ValidLead,
    deterministic_lead_id,
    redact,
    validate_lead,
)
from streams.runtime.agents import DeadLetters, now_ms
from streams.runtime.progress import tracker
from streams.settings import Settings

__all__ = ["RedactStage", "register", "lead_from_record", "ping_request"]

log = logging.getLogger(__name__)

#: A topic's ``send(key=..., value=...)`` (its result, the Kafka ack future, is not used here).
Send = Callable[..., Awaitable[Any]]


def lead_from_record(record: dict[str, Any]) -> dict[str, Any]:
    """Flatten a decoded Avro ``Lead`` into the JSON shape of CONTRACT §1."""
    raw: dict[str, Any] = dict(record.get("fields") or {})
    for meta in ("flow", "lead_id", "created_at"):
        if meta in raw:
            raise LeadError("belongs at the top level of the record, not in fields", meta)
        if record.get(meta) is not None:
            raw[meta] = record[meta]
    return raw


def ping_request(lead: ValidLead, view: PingView, identity: str | None = None) -> dict[str, Any]:
    """The ``PingRequest`` of a validated lead and its redacted ``view`` (``redact``): the
    ping fields and the PII's keyed hashes, never a PII value."""
    return {
        "lead_id": lead.lead_id,
        "flow": lead.flow,
        "source": lead.source,
        "received_at_ms": lead.received_at_ms,
        "created_at_ms": lead.created_at_ms,
        "ping_fields": view.ping_fields,
        "pii_hashes": view.pii_hashes,
        "identity": identity,
        "skip_buyers": [],
    }


def _received_at(claimed: int | None, kafka_timestamp_s: float) -> int:
    """The producer's receipt time if plausible (within a day of the Kafka record's
    timestamp), else the Kafka timestamp: an absurd value must not reach the tables."""
    kafka_ms = int(kafka_timestamp_s * 1000)
    if claimed is None or abs(claimed - kafka_ms) > 24 * 3600 * 1000:
        return kafka_ms
    return claimed


class RedactStage:
    """The redact stage's state and handlers: validate, drop a producer's retry, split.

    ``seen`` is the ``lead_ids`` table (``local()`` its local store, read when the expiry
    cache is rebuilt); ``send_pii``, ``send_request`` and ``send_dedupe`` send to the
    ``lead-pii``, ``ping-requests`` and ``dedupe`` topics; ``ping_now()`` is the ping stage's
    hand-off (the port, read per lead; None: every request goes through its topic alone)."""

    def __init__(
        self,
        settings: Settings,
        *,
        seen: MutableMapping[str, Any],
        local: Callable[[], Mapping[str, Any]],
        send_pii: Send,
        send_request: Send,
        send_dedupe: Send,
        dead: DeadLetters,
        progress: ProgressPort,
        ping_now: Callable[[], PingNow | None] = lambda: None,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.settings = settings
        self._ping_now = ping_now
        self.seen = seen
        self._local = local
        self._send_pii = send_pii
        self._send_request = send_request
        self._send_dedupe = send_dedupe
        self.dead = dead
        self.progress = progress
        self._clock = clock
        self.pii_ttl_ms = int(settings.privacy.pii_ttl_s * 1000)
        self.window_ms = int(settings.ingest.idempotency_window_s * 1000)
        # Per partition, ids in the order they expire (a cache over the table, rebuilt on
        # recovery); expired ones are removed while that partition's events are processed (a
        # table changes only inside its partition's stream).
        self.expiry: dict[int, deque[tuple[int, str]]] = {}
        self.rescan = True
        self.repeats = {"dropped": 0, "logged": 0}

    async def recovered(self) -> None:
        self.rescan = True

    def rebuild(self) -> None:
        expiry = self.expiry
        expiry.clear()
        for lead_id, v in sorted(self._local().items(), key=lambda kv: kv[1]["at"]):
            expiry.setdefault(v["p"], deque()).append((v["at"], lead_id))

    def forget_expired(self, partition: int, now: int) -> None:
        seen, window_ms = self.seen, self.window_ms
        q = self.expiry.get(partition)
        n = 0
        while q and q[0][0] <= now - window_ms and n < 100:
            _, lead_id = q.popleft()
            v = seen.get(lead_id)
            if v is not None and v["at"] <= now - window_ms:
                seen.pop(lead_id, None)
            n += 1

    def is_repeat(self, lead_id: str, partition: int, offset: int) -> bool:
        """Whether the lead id was first seen elsewhere within the window; records it if new."""
        seen, window_ms, repeats = self.seen, self.window_ms, self.repeats
        now = self._clock()
        if self.rescan:
            self.rescan = False
            self.rebuild()
        self.forget_expired(partition, now)
        first = seen.get(lead_id)
        if first is not None and first["at"] > now - window_ms:
            if (first["p"], first["o"]) == (partition, offset):
                return False  # the same record again (a redelivery): process it again
            repeats["dropped"] += 1
            if repeats["dropped"] - repeats["logged"] >= 100 or repeats["logged"] == 0:
                log.info(
                    "lead %s repeated (a producer retry): not auctioned again; %d repeats "
                    "dropped since start",
                    lead_id,
                    repeats["dropped"],
                )
                repeats["logged"] = repeats["dropped"]
            return True
        seen[lead_id] = {"at": now, "p": partition, "o": offset}
        self.expiry.setdefault(partition, deque()).append((now, lead_id))
        return False

    async def agent(self, stream: Any) -> None:
        settings, dead, progress = self.settings, self.dead, self.progress
        async for event in stream.events():
            msg = event.message
            progress.took("redact", msg.topic, msg.partition, msg.offset)
            try:
                name, record = schemas.decode(event.value)
                if name != "Lead":
                    raise LeadError(f"expected a Lead record, got {name}")
                lead = validate_lead(
                    settings,
                    lead_from_record(record),
                    received_at_ms=_received_at(record.get("received_at_ms"), msg.timestamp),
                    source=record.get("source") or "kafka",
                    lead_id=deterministic_lead_id(msg.topic, msg.partition, msg.offset),
                )
            except schemas.SchemaError as exc:
                await dead.send(event, f"undecodable lead: {exc}")
                continue
            except LeadError as exc:
                await dead.send(
                    event, f"invalid lead: {exc.field or 'body'}: {exc.message}", exc.field
                )
                continue
            if self.is_repeat(lead.lead_id, msg.partition, msg.offset):
                continue
            await dead.guarded(event, partial(self.publish, lead), "redact")

    async def publish(self, lead: ValidLead) -> None:
        settings = self.settings
        view = redact(settings, lead)
        key = lead.lead_id.encode()
        # PII first: by the time a post order exists, the post stage can find the PII.
        await self._send_pii(
            key=key,
            value=schemas.encode(
                "LeadPii",
                {
                    "lead_id": lead.lead_id,
                    "flow": lead.flow,
                    "fields": view.pii,
                    "expires_at_ms": lead.received_at_ms + self.pii_ttl_ms,
                },
            ),
        )
        identity = identity_of(settings, lead.flow, lead.fields, view.pii_hashes)
        request = schemas.encode("PingRequest", ping_request(lead, view, identity))
        if identity is None:
            ack = await self._send_request(key=key, value=request)
            # This worker owns the lead's partition of ping-requests too (co-partitioned):
            # its ping stage pings now, not after the record's trip through the topic.
            # It gets the request as the topic delivers it (decoded: Avro's own types).
            ping_now = self._ping_now()
            if ping_now is not None:
                try:
                    await ping_now(schemas.decode_as("PingRequest", request), ack)
                except Exception:  # the request is on its topic: the ping stage reads it there
                    log.warning("lead %s: ping hand-off refused", lead.lead_id, exc_info=True)
        else:  # a flow with duplicate checks: the identity's owner decides first
            await self._send_dedupe(key=identity.encode(), value=request)


def register(ctx: Context) -> None:
    app, settings = ctx.app, ctx.settings
    leads, pii_topic, requests = (
        ctx.topic("leads"),
        ctx.topic("lead_pii"),
        ctx.topic("ping_requests"),
    )
    dedupe = ctx.topic("dedupe")
    dead = DeadLetters(ctx.topic("deadletter"), "redact", settings)
    progress = tracker(ctx)
    # lead_id -> {"at": first seen (ms), "p": partition, "o": offset} of the leads topic.
    seen = app.Table(
        "lead_ids",
        default=None,
        partitions=settings.kafka.partitions,
        key_type=str,
        value_type=None,
    )
    stage = RedactStage(
        settings,
        seen=seen,
        local=lambda: seen.data,
        send_pii=pii_topic.send,
        send_request=requests.send,
        send_dedupe=dedupe.send,
        dead=dead,
        progress=progress,
        ping_now=lambda: ctx.ping_now,
    )

    @seen.on_recover
    async def _recovered() -> None:
        await stage.recovered()

    @app.agent(leads, name="redact", concurrency=1)
    async def redact_agent(stream: Any) -> None:
        await stage.agent(stream)
