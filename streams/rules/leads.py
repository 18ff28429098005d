"""Lead validation and redaction: pure functions shared by HTTP ingest and the Kafka path.

``validate_lead`` turns a raw lead (the flat JSON of CONTRACT §1, or a decoded Avro ``Lead``)
into a :class:`ValidLead` or raises :class:`LeadError` naming the field. ``redact`` splits a
valid lead into the ping view (configured fields after their transforms) and the PII part.
Both the HTTP path and the Kafka path call the same functions, so "same validation, same
result" holds by construction.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from streams.settings import FlowConfig, PingField, Settings

__all__ = [
    "LeadError",
    "PingView",
    "ValidLead",
    "deterministic_lead_id",
    "redact",
    "validate_lead",
]

Scalar = bool | int | float | str | None

_LEAD_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
#: RFC 3339 date-time (section 5.6): full date, 'T' (any case), full time, offset.
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: A lead created in the future would pass every max_age condition; allow only clock skew.
_MAX_CLOCK_SKEW_MS = 5 * 60 * 1000
_MAX_LEAD_AGE_MS = 366 * 24 * 3600 * 1000
_META = ("flow", "lead_id", "created_at")
#: Control characters (Unicode Cc: C0, DEL, C1) refused in every string value of a lead;
#: tab, line feed and carriage return are allowed (free text such as an address).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
#: Values shorter than this are not treated as identifying when scanning ping values for PII
#: (a two-letter state would otherwise "contain" an initial).
_MIN_PII_MATCH = 5


class LeadError(ValueError):
    """A lead failed validation. ``field`` names the offending key (None: the whole body)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


@dataclass(frozen=True, slots=True)
class ValidLead:
    lead_id: str
    flow: str
    created_at_ms: int
    received_at_ms: int
    source: str
    fields: dict[str, Scalar]


@dataclass(frozen=True, slots=True)
class PingView:
    ping_fields: dict[str, Scalar]
    pii: dict[str, Scalar]
    pii_hashes: dict[str, str]


def deterministic_lead_id(topic: str, partition: int, offset: int) -> str:
    """Lead id for a Kafka lead published without one: derived from its position, so a
    redelivered record gets the same id (a fresh uuid4 would auction it twice)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"kafka://{topic}/{partition}/{offset}"))


def _parse_time(value: Any) -> int:
    if not isinstance(value, str):
        raise LeadError("must be an RFC 3339 timestamp string", "created_at")
    if not _RFC3339.fullmatch(value):
        raise LeadError("is not an RFC 3339 timestamp (e.g. 2026-01-31T12:00:00Z)", "created_at")
    try:
        dt = datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        raise LeadError("is not a valid RFC 3339 timestamp", "created_at") from None
    # Integer arithmetic: float seconds * 1000 truncates some instants 1 ms early.
    return (dt - _EPOCH) // timedelta(milliseconds=1)


def _check_value(name: str, value: Any, flow: FlowConfig) -> Scalar:
    spec = flow.fields[name]
    if value is None:
        return None
    t = spec.type
    if t == "string":
        if not isinstance(value, str):
            raise LeadError(f"must be a string, got {type(value).__name__}", name)
        if len(value) > spec.max_length:
            raise LeadError(f"is longer than {spec.max_length} characters", name)
        if spec.pattern is not None and not re.fullmatch(spec.pattern, value):
            raise LeadError("has an invalid format", name)
    elif t == "boolean":
        if not isinstance(value, bool):
            raise LeadError(f"must be true or false, got {type(value).__name__}", name)
    elif t == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            raise LeadError(f"must be an integer, got {type(value).__name__}", name)
    elif t == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LeadError(f"must be a number, got {type(value).__name__}", name)
        if not math.isfinite(value):
            raise LeadError("must be a finite number", name)
    if spec.enum is not None and value not in spec.enum:
        raise LeadError(f"must be one of {spec.enum}", name)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if spec.min is not None and value < spec.min:
            raise LeadError(f"must be >= {spec.min}", name)
        if spec.max is not None and value > spec.max:
            raise LeadError(f"must be <= {spec.max}", name)
    checked: Scalar = value  # one of the JSON scalars the checks above let through
    return checked


def validate_lead(
    settings: Settings,
    raw: Mapping[str, Any],
    *,
    received_at_ms: int,
    source: str,
    lead_id: str | None = None,
) -> ValidLead:
    """Validate a flat lead object against its flow. ``lead_id`` is used when the lead has
    none of its own (HTTP generates a uuid4, Kafka derives one from the record position)."""
    if not isinstance(raw, Mapping):
        raise LeadError("the lead must be a JSON object")
    for name, value in raw.items():
        bad = _CONTROL.search(value) if isinstance(value, str) else None
        if bad is not None:
            raise LeadError(
                f"contains a control character (U+{ord(bad.group()):04X}); only "
                "tab, line feed and carriage return are allowed",
                name,
            )
    flow_name = raw.get("flow")
    if flow_name is None:
        raise LeadError("is required", "flow")
    if not isinstance(flow_name, str):
        raise LeadError("must be a string", "flow")
    flow = settings.flows.get(flow_name)
    if flow is None:
        raise LeadError(f"unknown flow '{flow_name}'", "flow")

    own_id = raw.get("lead_id")
    if own_id is not None:
        if not isinstance(own_id, str) or not _LEAD_ID.fullmatch(own_id):
            raise LeadError("must be 1-128 letters, digits, '_', '.', ':' or '-'", "lead_id")
        lid = own_id
    elif lead_id is not None:
        lid = lead_id
    else:
        raise LeadError("is required here", "lead_id")

    created = raw.get("created_at")
    created_ms = received_at_ms if created is None else _parse_time(created)
    if created_ms > received_at_ms + _MAX_CLOCK_SKEW_MS:
        raise LeadError("is in the future", "created_at")
    if created_ms < received_at_ms - _MAX_LEAD_AGE_MS:
        raise LeadError("is more than a year before receipt", "created_at")

    fields: dict[str, Scalar] = {}
    for name, value in raw.items():
        if name in _META:
            continue
        if name not in flow.fields:
            raise LeadError(f"unknown field for flow '{flow_name}'", name)
        fields[name] = _check_value(name, value, flow)
    for name in flow.required:
        if fields.get(name) is None:
            raise LeadError("is required", name)

    pii_values = [
        str(fields[n]).lower()
        for n in flow.pii_fields
        if fields.get(n) is not None and len(str(fields[n])) >= _MIN_PII_MATCH
    ]
    for name, spec in flow.ping_fields.items():
        value = _transform(fields.get(name), spec)
        if isinstance(value, str) and any(p in value.lower() for p in pii_values):
            raise LeadError("contains a PII value and cannot be sent in pings", name)
    return ValidLead(lid, flow_name, created_ms, received_at_ms, source, fields)


def _transform(value: Scalar, spec: PingField) -> Scalar:
    if value is None or spec.transform == "keep":
        return value
    s = str(value)
    if spec.transform == "zip3":
        return s[:3]
    if spec.transform == "prefix":
        return s[: spec.length]
    if spec.transform == "lower":
        return s.lower()
    if spec.transform == "upper":
        return s.upper()
    raise AssertionError(spec.transform)


def _ping_values(fields: Mapping[str, Scalar], flow: FlowConfig) -> dict[str, Scalar]:
    out: dict[str, Scalar] = {}
    for name, spec in flow.ping_fields.items():
        if name in fields:
            out[spec.rename or name] = _transform(fields[name], spec)
    return out


def pii_hash(key: bytes, field: str, value: Scalar) -> str:
    norm = str(value).strip().lower()
    if field == "phone":
        norm = re.sub(r"[^0-9]", "", norm)
    return hmac.new(key, f"{field}:{norm}".encode(), hashlib.sha256).hexdigest()


def redact(settings: Settings, lead: ValidLead) -> PingView:
    """Split a valid lead into what buyers may see at ping time and the PII part."""
    flow = settings.flows[lead.flow]
    key = settings.privacy.hash_key.get_secret_value().encode()
    pii = {n: lead.fields[n] for n in flow.pii_fields if n in lead.fields}
    hashes = {n: pii_hash(key, n, v) for n, v in pii.items() if v is not None}
    return PingView(_ping_values(lead.fields, flow), pii, hashes)
