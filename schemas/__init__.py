"""Event schemas (one ``.avsc`` per event) and the Avro single-object codec.

Every value on pingpost's event topics (``<prefix>.leads``, ``.bids``, ``.deliveries``, ...:
the topics of :func:`streams.topics.topic_specs` other than changelogs) is Avro
*single-object encoding* (Avro spec): ``C3 01`` marker, the schema's 8-byte little-endian
CRC-64-AVRO fingerprint, then the binary body. A producer in any language with an Avro library
can publish a lead without a schema registry, and a consumer can tell which event a record
holds from its first ten bytes. fastavro does the hot-path encoding; ``avro`` checks
compatibility in the tests.

Not Avro: the changelog topics of the Faust tables (``<app_id>-<table>-changelog``) hold
Faust's own JSON (key and value: the table's key string and state dict), and Faust's internal
topics are Faust's. They are the workers' private state, not an interface.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

__all__ = [
    "MARKER",
    "SCHEMA_DIR",
    "EVENTS",
    "SchemaError",
    "decode",
    "decode_as",
    "encode",
    "fingerprint_of",
    "schema_json",
]

SCHEMA_DIR = Path(__file__).resolve().parent
MARKER = b"\xc3\x01"

#: Event name -> file stem. Shared named types (Conditions; AuctionOpen and Bid in a PingRound)
#: are inlined at their first reference.
EVENTS = {
    "Lead": "lead",
    "PingRequest": "ping_request",
    "LeadPii": "lead_pii",
    "AuctionOpen": "auction_open",
    "Bid": "bid",
    "AuctionClose": "auction_close",
    "PingRound": "ping_round",
    "PostOrder": "post_order",
    "Delivery": "delivery",
    "AuctionResult": "auction_result",
    "DeadLetter": "dead_letter",
    "Alert": "alert",
    "CapRequest": "cap_request",
    "CapDecision": "cap_decision",
    "CapState": "cap_state",
    "Progress": "progress",
    "FlowVersion": "flow_version",
}
_SHARED = {
    "pingpost.Conditions": "conditions",
    "pingpost.AuctionOpen": "auction_open",
    "pingpost.Bid": "bid",
}


class SchemaError(ValueError):
    """A payload is not a valid single-object encoded record of a known schema."""


RELEASED_DIR = SCHEMA_DIR / "released"


def _load(stem: str, directory: Path | None = None) -> Any:
    return json.loads(((directory or SCHEMA_DIR) / f"{stem}.avsc").read_text())


def _inline(node: Any, seen: set[str], directory: Path | None = None) -> Any:
    """Replace the first reference to each shared named type by its definition."""
    if isinstance(node, str):
        if node in _SHARED and node not in seen:
            seen.add(node)
            return _inline(_load(_SHARED[node], directory), seen, directory)
        return node
    if isinstance(node, list):
        return [_inline(n, seen, directory) for n in node]
    if isinstance(node, dict):
        return {
            k: (_inline(v, seen, directory) if k in ("type", "items", "values", "fields") else v)
            for k, v in node.items()
        }
    return node


def released_schema_json(version_dir: Path, name: str) -> dict[str, Any]:
    """The complete JSON schema of event ``name`` as released in ``version_dir``."""
    schema: dict[str, Any] = _inline(_load(EVENTS[name], version_dir), set(), version_dir)
    return schema


@cache
def schema_json(name: str) -> dict[str, Any]:
    """The complete, self-contained JSON schema of event ``name``."""
    try:
        stem = EVENTS[name]
    except KeyError:
        raise SchemaError(f"unknown event schema {name!r}") from None
    schema: dict[str, Any] = _inline(_load(stem), set())
    return schema


@cache
def _parsed(name: str) -> Any:
    return fastavro.parse_schema(schema_json(name))


@cache
def fingerprint_of(name: str) -> bytes:
    canonical = to_parsing_canonical_form(_parsed(name))
    # fastavro returns the CRC-64-AVRO fingerprint as hex of the little-endian bytes.
    return bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))


@cache
def _by_fingerprint() -> dict[bytes, str]:
    return {fingerprint_of(n): n for n in EVENTS}


@cache
def _released_writers() -> dict[bytes, tuple[str, Any]]:
    """Fingerprint -> (event, writer schema) of every released version that differs from the
    current one: records written by older producers are resolved into the current schema."""
    out: dict[bytes, tuple[str, Any]] = {}
    if not RELEASED_DIR.is_dir():
        return out
    for version_dir in sorted(p for p in RELEASED_DIR.iterdir() if p.is_dir()):
        for name, stem in EVENTS.items():
            if not (version_dir / f"{stem}.avsc").exists():
                continue
            parsed = fastavro.parse_schema(released_schema_json(version_dir, name))
            fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))
            if fp not in _by_fingerprint():
                out[fp] = (name, parsed)
    return out


def encode(name: str, record: Mapping[str, Any]) -> bytes:
    """Encode ``record`` as event ``name`` in Avro single-object encoding."""
    buf = io.BytesIO()
    buf.write(MARKER)
    buf.write(fingerprint_of(name))
    try:
        fastavro.schemaless_writer(buf, _parsed(name), record, strict_allow_default=True)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise SchemaError(f"cannot encode {name}: {exc}") from exc
    return buf.getvalue()


def decode(data: bytes) -> tuple[str, dict[str, Any]]:
    """Decode a single-object encoded payload; returns ``(event name, record)``."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) < 10:
        raise SchemaError("not Avro single-object encoding: payload shorter than 10 bytes")
    if bytes(data[:2]) != MARKER:
        raise SchemaError("not Avro single-object encoding: missing C3 01 marker")
    fp = bytes(data[2:10])
    name = _by_fingerprint().get(fp)
    writer = None
    if name is None:
        old = _released_writers().get(fp)
        if old is None:
            raise SchemaError(f"unknown schema fingerprint {fp.hex()}")
        name, writer = old
    try:
        if writer is None:
            record = fastavro.schemaless_reader(io.BytesIO(data[10:]), _parsed(name), None)
        else:
            record = fastavro.schemaless_reader(io.BytesIO(data[10:]), writer, _parsed(name))
    except Exception as exc:  # fastavro raises assorted errors on truncated bodies
        raise SchemaError(f"corrupt {name} body: {exc}") from exc
    # fastavro types a message as any Avro value; every event schema is a record.
    return name, record  # type: ignore[return-value]


def decode_as(name: str, data: bytes) -> dict[str, Any]:
    """Decode and insist on event ``name``."""
    got, record = decode(data)
    if got != name:
        raise SchemaError(f"expected a {name} record, got {got}")
    return record
