"""Redact stage: validate each lead from the leads topic and split it.

The ping view (configured fields after transforms, no PII) goes to ``ping-requests``; the PII
part goes to ``lead-pii``, which only the post stage reads. Invalid records go to the
dead-letter topic with the reason and the field; processing continues.
"""

from __future__ import annotations

import logging
from typing import Any

import schemas
from streams.dedupe import identity_of
from streams.app import Context
from streams.leads import LeadError, ValidLead, deterministic_lead_id, redact, validate_lead
from streams.progress import tracker
from streams.runtime import DeadLetters

__all__ = ["register", "lead_from_record"]

log = logging.getLogger(__name__)


def lead_from_record(record: dict[str, Any]) -> dict[str, Any]:
    """Flatten a decoded Avro ``Lead`` into the JSON shape of CONTRACT §1."""
    raw: dict[str, Any] = dict(record.get("fields") or {})
    for meta in ("flow", "lead_id", "created_at"):
        if meta in raw:
            raise LeadError("belongs at the top level of the record, not in fields", meta)
        if record.get(meta) is not None:
            raw[meta] = record[meta]
    return raw


def _received_at(claimed: int | None, kafka_timestamp_s: float) -> int:
    """The producer's receipt time if plausible (within a day of the Kafka record's
    timestamp), else the Kafka timestamp: an absurd value must not reach the tables."""
    kafka_ms = int(kafka_timestamp_s * 1000)
    if claimed is None or abs(claimed - kafka_ms) > 24 * 3600 * 1000:
        return kafka_ms
    return claimed


def register(ctx: Context) -> None:
    app, settings = ctx.app, ctx.settings
    leads, pii_topic, requests = ctx.topic("leads"), ctx.topic("lead_pii"), ctx.topic("ping_requests")
    dedupe = ctx.topic("dedupe")
    dead = DeadLetters(ctx.topic("deadletter"), "redact")
    pii_ttl_ms = int(settings.privacy.pii_ttl_s * 1000)
    progress = tracker(ctx)

    @app.agent(leads, name="redact", concurrency=1)
    async def redact_agent(stream: Any) -> None:
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
                await dead.send(event, f"invalid lead: {exc.field or 'body'}: {exc.message}",
                                exc.field)
                continue
            await dead.guarded(event, lambda lead=lead: publish(lead), "redact")

    async def publish(lead: ValidLead) -> None:
        view = redact(settings, lead)
        key = lead.lead_id.encode()
        # PII first: by the time a post order exists, the post stage can find the PII.
        await pii_topic.send(key=key, value=schemas.encode("LeadPii", {
            "lead_id": lead.lead_id, "flow": lead.flow, "fields": view.pii,
            "expires_at_ms": lead.received_at_ms + pii_ttl_ms,
        }))
        identity = identity_of(settings, lead.flow, lead.fields, view.pii_hashes)
        request = schemas.encode("PingRequest", {
            "lead_id": lead.lead_id, "flow": lead.flow, "source": lead.source,
            "received_at_ms": lead.received_at_ms, "created_at_ms": lead.created_at_ms,
            "ping_fields": view.ping_fields, "pii_hashes": view.pii_hashes,
            "identity": identity, "skip_buyers": [],
        })
        if identity is None:
            await requests.send(key=key, value=request)
        else:  # a flow with duplicate checks: the identity's owner decides first
            await dedupe.send(key=identity.encode(), value=request)
