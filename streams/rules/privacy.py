"""What a dead letter may keep of the record it is about: never a raw PII value.

The dead-letter topic (30 days) and the ``dead_letters`` table sit outside the places PII may
live (the leads topic, ``lead-pii``, the PII table's changelog, posts to winners). So
:func:`dead_letter_payload` decides, from the record's bytes alone, what is kept:

* a record of an event that carries no PII (ping requests, bids, post orders, ...): its bytes;
* a ``Lead``: a JSON view with its flow, ids, source, and the values of the fields the flow
  declares and that are not PII (scrubbed of the PII values all the same, clipped); the PII
  fields and any field the flow does not declare are withheld, each replaced by its keyed
  hash (``streams.rules.leads.pii_hash``, the hash of ``leads.pii_hashes``);
* a ``LeadPii``: its lead_id, flow and the names of its fields, their values withheld;
* anything undecodable: nothing — which of its bytes are PII cannot be known.

Every record keeps its length and a keyed hash (HMAC-SHA256) of its bytes, so an operator can
match it against what a producer still holds. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

import schemas
from streams.rules.leads import pii_hash
from streams.rules.scrub import scrub
from streams.settings import Settings

__all__ = ["PII_EVENTS", "SafePayload", "dead_letter_payload"]

#: Events whose records hold raw PII values.
PII_EVENTS: Final = frozenset({"Lead", "LeadPii"})
_MAX_VALUE_CHARS: Final = 200


@dataclass(frozen=True)
class SafePayload:
    """What a dead letter records of a record, and the values to scrub from its reason."""

    payload: bytes
    redacted: bool
    length: int
    hmac: str
    pii_hashes: dict[str, str] = field(default_factory=dict)
    #: The withheld values, to scrub from the reason and the log line. Never recorded.
    pii_values: tuple[Any, ...] = ()


def _key(settings: Settings | None) -> bytes:
    # Without settings (a unit test's bare DeadLetters) the hashes are still keyed, just not
    # with the operator's key.
    return (
        settings.privacy.hash_key.get_secret_value()
        if settings is not None
        else "pingpost-dead-letter"
    ).encode()


def _clip(value: Any) -> Any:
    if isinstance(value, str) and len(value) > _MAX_VALUE_CHARS:
        return value[: _MAX_VALUE_CHARS - 1] + "…"
    return value


def _lead_view(
    rec: dict[str, Any], settings: Settings | None, key: bytes
) -> tuple[dict[str, Any], dict[str, str], tuple[Any, ...]]:
    fields: dict[str, Any] = dict(rec.get("fields") or {})
    flow = settings.flows.get(rec.get("flow") or "") if settings is not None else None
    keep = set() if flow is None else {n for n in flow.fields if n not in set(flow.pii_fields)}
    withheld = {n: v for n, v in fields.items() if n not in keep}
    secret = tuple(v for v in withheld.values() if v is not None)
    shown = {
        n: _clip(scrub(v, secret) if isinstance(v, str) else v)
        for n, v in sorted(fields.items())
        if n in keep
    }
    meta = {
        k: _clip(scrub(rec[k], secret)) if isinstance(rec.get(k), str) else rec.get(k)
        for k in ("flow", "lead_id", "created_at", "source", "received_at_ms")
    }
    view = {"event": "Lead", **meta, "fields": shown, "withheld": sorted(withheld)}
    hashes = {n: pii_hash(key, n, v) for n, v in withheld.items() if v is not None}
    return view, hashes, secret


def dead_letter_payload(raw: Any, settings: Settings | None = None) -> SafePayload:
    """The payload a dead letter may keep of ``raw`` (a Kafka record's value)."""
    data = raw if isinstance(raw, bytes) else repr(raw).encode()
    key = _key(settings)
    digest = hmac.new(key, data, hashlib.sha256).hexdigest()
    try:
        name, rec = schemas.decode(data)
    except schemas.SchemaError:
        return SafePayload(b"", True, len(data), digest)
    if name not in PII_EVENTS:
        return SafePayload(data, False, len(data), digest)
    if name == "Lead":
        view, hashes, secret = _lead_view(rec, settings, key)
    else:  # LeadPii: every field is PII
        pii = {n: v for n, v in (rec.get("fields") or {}).items()}
        secret = tuple(v for v in pii.values() if v is not None)
        view = {
            "event": name,
            "lead_id": rec.get("lead_id"),
            "flow": rec.get("flow"),
            "expires_at_ms": rec.get("expires_at_ms"),
            "withheld": sorted(pii),
        }
        hashes = {n: pii_hash(key, n, v) for n, v in pii.items() if v is not None}
    return SafePayload(orjson.dumps(view), True, len(data), digest, hashes, secret)
