"""schemas: Avro single-object encoding, checked against the spec and the `avro` library.

The CRC-64-AVRO fingerprint is computed here from the spec's reference algorithm (not with
fastavro, which the code under test uses), over the Parsing Canonical Form produced by the
Apache `avro` library, and the body is decoded/encoded with `avro` too: a producer in another
language sees exactly these bytes.
"""

from __future__ import annotations

import io
import json
import struct
from typing import Any

import avro.io
import avro.schema
import pytest

import schemas
from schemas import SchemaError

# --------------------------------------------------------------------------- CRC-64-AVRO
# The Avro specification's reference implementation ("Schema Fingerprints").

EMPTY = 0xC15D213AA4D7A795


def _fp_table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (EMPTY & -(fp & 1))
        table.append(fp)
    return table


FP_TABLE = _fp_table()


def crc64_avro(data: bytes) -> int:
    fp = EMPTY
    for byte in data:
        fp = (fp >> 8) ^ FP_TABLE[(fp ^ byte) & 0xFF]
    return fp


def signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


@pytest.mark.parametrize(
    ("canonical", "expected"),
    [  # published vectors, Apache Avro share/test/data/schema-tests.txt (signed longs)
        ('"null"', 7195948357588979594),
        ('"boolean"', -6970731678124411036),
        ('"int"', 8247732601305521295),
        ('"long"', -3434872931120570953),
        ('"float"', 5583340709985441680),
        ('"double"', -8181574048448539266),
        ('{"name":"foo","type":"fixed","size":15}', 1756455273707447556),
        (
            '{"name":"foo","type":"record","fields":[{"name":"f1","type":"boolean"}]}',
            7843277075252814651,
        ),
    ],
)
def test_reference_crc64_matches_published_vectors(canonical: str, expected: int) -> None:
    assert signed(crc64_avro(canonical.encode())) == expected


def avro_schema(name: str) -> avro.schema.Schema:
    return avro.schema.parse(json.dumps(schemas.schema_json(name)))


def spec_fingerprint(name: str) -> bytes:
    """8-byte little-endian CRC-64-AVRO of the Parsing Canonical Form (Avro spec)."""
    canonical = avro_schema(name).canonical_form
    return struct.pack("<Q", crc64_avro(canonical.encode("utf-8")))


# --------------------------------------------------------------------------- records

CONDITIONS = {
    "max_age_minutes": 5.0,
    "states": ["CA", "TX"],
    "require_consent": True,
    "exclusive_required": False,
}
NO_CONDITIONS = {
    "max_age_minutes": None,
    "states": None,
    "require_consent": False,
    "exclusive_required": False,
}
PING_FIELDS = {
    "state": "CA",
    "zip": "902",
    "homeowner": True,
    "electric_bill": "$200-300",
    "credit_range": "700+",
    "property_type": "single_family",
    "consent": True,
}
T0 = 1_717_243_200_000  # 2024-06-01T12:00:00Z

RECORDS: dict[str, dict[str, Any]] = {
    "Lead": {
        "flow": "solar",
        "lead_id": "lead-0001",
        "created_at": "2024-06-01T11:59:58Z",
        "fields": {
            "state": "CA",
            "zip": "90210",
            "homeowner": True,
            "electric_bill": "$200-300",
            "credit_range": "700+",
            "property_type": "single_family",
            "consent": True,
            "first_name": "Ada",
            "last_name": "Lovelace",
            "email": "ada@example.com",
            "phone": "+13105550100",
            "address": "1 Main St, Beverly Hills",
            "roof_age": 12,
            "bill_amount": 245.5,
            "notes": None,
        },
        "source": "kafka:crm",
        "received_at_ms": T0,
    },
    "PingRequest": {
        "lead_id": "lead-0001",
        "flow": "solar",
        "source": "http:demo",
        "received_at_ms": T0,
        "created_at_ms": T0 - 2000,
        "ping_fields": PING_FIELDS,
        "pii_hashes": {"email": "a" * 64, "phone": "b" * 64},
        "identity": "c" * 64,
        "skip_buyers": ["b1"],
    },
    "LeadPii": {
        "lead_id": "lead-0001",
        "flow": "solar",
        "fields": {
            "first_name": "Ada",
            "last_name": "Lovelace",
            "email": "ada@example.com",
            "phone": "+13105550100",
            "address": None,
        },
        "expires_at_ms": T0 + 3_600_000,
    },
    "AuctionOpen": {
        "lead_id": "lead-0001",
        "flow": "solar",
        "source": "http:demo",
        "received_at_ms": T0,
        "created_at_ms": T0 - 2000,
        "opened_at_ms": T0 + 3,
        "deadline_at_ms": T0 + 753,
        "ping_fields": PING_FIELDS,
        "pinged": [
            {"buyer_id": "sunrise", "tier": "premium", "ping_id": "p-1"},
            {"buyer_id": "greenleaf", "tier": "standard", "ping_id": "p-2"},
        ],
        "skip_buyers": ["b9"],
        "attempt": 1,
    },
    "Bid": {
        "lead_id": "lead-0001",
        "flow": "solar",
        "ping_id": "p-1",
        "buyer_id": "sunrise",
        "tier": "premium",
        "status": "bid",
        "sent_at_ms": T0 + 4,
        "answered_at_ms": T0 + 71,
        "latency_ms": 67.25,
        "price": 45.5,
        "exclusive": True,
        "buyer_ref": "buyer_123",
        "conditions": CONDITIONS,
        "reason": "",
        "http_status": 200,
        "wave": 1,
        "timeout_ms": 496.0,
    },
    "AuctionClose": {"lead_id": "lead-0001", "reason": "deadline", "at_ms": T0 + 753},
    "PostOrder": {
        "lead_id": "lead-0001",
        "flow": "solar",
        "source": "http:demo",
        "mode": "exclusive",
        "slots": 1,
        "candidates": [
            {
                "buyer_id": "sunrise",
                "tier": "premium",
                "ping_id": "p-1",
                "price": 45.5,
                "exclusive": True,
                "conditions": CONDITIONS,
                "answered_at_ms": T0 + 71,
            },
            {
                "buyer_id": "greenleaf",
                "tier": "standard",
                "ping_id": "p-2",
                "price": 30.0,
                "exclusive": False,
                "conditions": NO_CONDITIONS,
                "answered_at_ms": T0 + 90,
            },
        ],
        "ping_fields": PING_FIELDS,
        "received_at_ms": T0,
        "created_at_ms": T0 - 2000,
        "opened_at_ms": T0 + 3,
        "deadline_at_ms": T0 + 753,
        "closed_at_ms": T0 + 91,
        "close_reason": "all_answered",
        "close_lag_ms": 1.125,
        "pinged": 2,
        "bids": 2,
        "skip_buyers": ["b9"],
        "config_hash": "c4b194fe509cc17e",
        "variant": "",
    },
    "Delivery": {
        "attempt_id": "post-1:1",
        "post_id": "post-1",
        "lead_id": "lead-0001",
        "flow": "solar",
        "buyer_id": "sunrise",
        "tier": "premium",
        "ping_id": "p-1",
        "price": 45.5,
        "exclusive": True,
        "status": "accepted",
        "latency_ms": 88.5,
        "reason": "",
        "http_status": 200,
        "sent_at_ms": T0 + 95,
        "attempt": 1,
    },
    "AuctionResult": {
        "lead_id": "lead-0001",
        "flow": "solar",
        "source": "http:demo",
        "outcome": "sold_shared",
        "winners": ["brightpath", "greenleaf"],
        "prices": [41.0, 30.0],
        "price_total": 71.0,
        "reason": "",
        "received_at_ms": T0,
        "opened_at_ms": T0 + 3,
        "deadline_at_ms": T0 + 753,
        "closed_at_ms": T0 + 91,
        "settled_at_ms": T0 + 190,
        "close_reason": "all_answered",
        "close_lag_ms": 1.125,
        "pinged": 5,
        "bids": 3,
        "post_attempts": 3,
        "config_hash": "c4b194fe509cc17e",
        "variant": "higher-floor",
    },
    "DeadLetter": {
        "id": "pingpost.leads:2:991",
        "stage": "redact",
        "topic": "pingpost.leads",
        "partition": 2,
        "offset": 991,
        "key": b"lead-0002",
        "payload": b"\xc3\x01garbage\x00",
        "reason": "invalid lead: zip: has an invalid format",
        "field": "zip",
        "at_ms": T0 + 5,
        "payload_redacted": True,
        "payload_length": 213,
        "payload_hmac": "ab" * 32,
        "pii_hashes": {"email": "cd" * 32},
    },
    "CapRequest": {
        "request_id": "r1",
        "kind": "reserve",
        "buyer_id": "b1",
        "lead_id": "l1",
        "price": 42.5,
        "at_ms": 1_700_000_000_000,
        "expires_at_ms": 1_700_000_001_000,
    },
    "CapDecision": {
        "request_id": "r1",
        "buyer_id": "b1",
        "lead_id": "l1",
        "granted": False,
        "reason": "cap leads_per_day 10 reached",
    },
    "CapState": {
        "buyer_id": "b1",
        "hour": "2026-01-01T10+00:00",
        "day": "2026-01-01",
        "leads_hour": 3,
        "leads_day": 7,
        "spend_day": 300.0,
        "at_ms": 1_700_000_000_000,
    },
    "Progress": {
        "worker": "host:123:ab12cd",
        "at_ms": T0,
        "offsets": [
            {"stage": "redact", "topic": "pingpost.leads", "partition": 0, "offset": 41},
            {"stage": "ping", "topic": "pingpost.ping-requests", "partition": 3, "offset": 7},
        ],
        "opened": 48,
        "delay_count": 12,
        "delay_p50_ms": 9.5,
        "delay_p99_ms": 30.25,
        "delay_max_ms": 31.0,
    },
    "FlowVersion": {
        "hash": "c4b194fe509cc17e",
        "flow": "solar",
        "config_json": '{"buyers":{"sunrise":{"tier":"premium"}},"flow":{"deadline_ms":750}}',
        "at_ms": T0,
    },
    "Alert": {
        "alert_id": f"slow_buyer|buyer:sunrise|{T0}|firing",
        "rule": "slow_buyer",
        "metric": "avg_response_ms",
        "scope": "buyer",
        "subject": "buyer:sunrise",
        "state": "firing",
        "value": 812.5,
        "threshold": 600.0,
        "comparison": ">",
        "samples": 41,
        "window_s": 30.0,
        "at_ms": T0,
        "message": "contact buyer — avg_response_ms 812.5 > 600 over 30s (41 samples)",
    },
}
# A finished round: its open marker and every answer (one of them filtered, one a timeout).
RECORDS["PingRound"] = {
    "lead_id": "lead-0001",
    "open": {**RECORDS["AuctionOpen"], "attempt": 2},
    "answers": [
        RECORDS["Bid"],
        {
            **RECORDS["Bid"],
            "ping_id": "p-2",
            "buyer_id": "greenleaf",
            "tier": "standard",
            "status": "timeout",
            "price": None,
            "exclusive": False,
            "buyer_ref": None,
            "conditions": NO_CONDITIONS,
            "reason": "timeout after 496 ms",
            "http_status": None,
        },
    ],
}


def test_records_cover_every_event() -> None:
    assert set(RECORDS) == set(schemas.EVENTS)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", sorted(schemas.EVENTS))
def test_round_trip(name: str) -> None:
    data = schemas.encode(name, RECORDS[name])
    assert schemas.decode(data) == (name, RECORDS[name])
    assert schemas.decode_as(name, data) == RECORDS[name]


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_decode_accepts_bytes_like(wrap: Any) -> None:
    data = schemas.encode("AuctionClose", RECORDS["AuctionClose"])
    assert schemas.decode(wrap(data)) == ("AuctionClose", RECORDS["AuctionClose"])


def test_map_value_types_survive() -> None:
    rec = schemas.decode_as("Lead", schemas.encode("Lead", RECORDS["Lead"]))
    f = rec["fields"]
    assert f["homeowner"] is True
    assert f["roof_age"] == 12 and type(f["roof_age"]) is int
    assert f["bill_amount"] == 245.5 and type(f["bill_amount"]) is float
    assert f["notes"] is None


def test_defaults_fill_omitted_optional_fields() -> None:
    rec = schemas.decode_as("Lead", schemas.encode("Lead", {"flow": "solar"}))
    assert rec == {
        "flow": "solar",
        "lead_id": None,
        "created_at": None,
        "fields": {},
        "source": None,
        "received_at_ms": None,
    }


# --------------------------------------------------------------------------- wire format


@pytest.mark.parametrize("name", sorted(schemas.EVENTS))
def test_fingerprint_matches_spec(name: str) -> None:
    assert schemas.fingerprint_of(name) == spec_fingerprint(name)
    assert len(schemas.fingerprint_of(name)) == 8


@pytest.mark.parametrize("name", sorted(schemas.EVENTS))
def test_single_object_encoding_layout(name: str) -> None:
    data = schemas.encode(name, RECORDS[name])
    assert data[0] == 0xC3 and data[1] == 0x01
    assert data[2:10] == spec_fingerprint(name)
    # The body is plain Avro binary: the reference implementation reads it back.
    reader = avro.io.DatumReader(avro_schema(name))
    body = io.BytesIO(data[10:])
    assert reader.read(avro.io.BinaryDecoder(body)) == RECORDS[name]
    assert body.read() == b""  # and nothing is left over


def foreign_encode(name: str, record: dict[str, Any]) -> bytes:
    """What a producer using only the Apache Avro library and the spec would publish."""
    buf = io.BytesIO()
    buf.write(b"\xc3\x01")
    buf.write(spec_fingerprint(name))
    avro.io.DatumWriter(avro_schema(name)).write(record, avro.io.BinaryEncoder(buf))
    return buf.getvalue()


def _string_maps(record: dict[str, Any]) -> dict[str, Any]:
    """Map values as strings: the Python `avro` writer resolves a union to the *last* branch
    that validates (True -> double), so only string/null map values have one encoding."""
    out = dict(record)
    for key in ("fields", "ping_fields"):
        if key in out:
            out[key] = {k: (v if v is None else str(v)) for k, v in out[key].items()}
    if "open" in out:  # a PingRound's open marker
        out["open"] = _string_maps(out["open"])
    return out


@pytest.mark.parametrize("name", sorted(schemas.EVENTS))
def test_foreign_producer_payload_is_byte_identical(name: str) -> None:
    record = _string_maps(RECORDS[name])
    data = foreign_encode(name, record)
    assert data == schemas.encode(name, record)
    assert schemas.decode(data) == (name, record)


@pytest.mark.parametrize("name", sorted(schemas.EVENTS))
def test_foreign_producer_payload_decodes(name: str) -> None:
    data = foreign_encode(name, RECORDS[name])
    assert data[:10] == schemas.encode(name, RECORDS[name])[:10]
    got_name, got = schemas.decode(data)
    assert got_name == name
    assert got == RECORDS[name]  # numerically equal even where avro chose another branch


def test_fingerprints_are_distinct() -> None:
    fps = [schemas.fingerprint_of(n) for n in schemas.EVENTS]
    assert len(set(fps)) == len(fps)


def test_conditions_inlined_once_and_self_contained() -> None:
    for name in ("Bid", "PostOrder"):
        text = json.dumps(schemas.schema_json(name))
        assert text.count('"name": "Conditions"') == 1
        avro_schema(name)  # parses without any named-type registry
    bid_fields = {f["name"]: f for f in schemas.schema_json("Bid")["fields"]}
    assert bid_fields["conditions"]["type"]["name"] == "Conditions"


# --------------------------------------------------------------------------- errors


def _valid() -> bytes:
    return schemas.encode("Bid", RECORDS["Bid"])


def _unknown_fp() -> bytes:
    known = {schemas.fingerprint_of(n) for n in schemas.EVENTS}
    fp = struct.pack("<Q", crc64_avro(b'"string"'))
    assert fp not in known
    return b"\xc3\x01" + fp + _valid()[10:]


BAD_PAYLOADS: list[tuple[str, Any]] = [
    ("empty", b""),
    ("marker only", b"\xc3\x01"),
    ("nine bytes", _valid()[:9]),
    ("wrong marker second byte", b"\xc3\x02" + _valid()[2:]),
    ("wrong marker first byte", b"\xc2\x01" + _valid()[2:]),
    ("confluent wire format", b"\x00\x00\x00\x00\x07" + _valid()[10:]),
    ("json", json.dumps({"flow": "solar"}).encode()),
    ("unknown fingerprint", _unknown_fp()),
    ("header only", _valid()[:10]),
    ("not bytes", "\xc3\x01" + "x" * 20),
    ("none", None),
]


@pytest.mark.parametrize("payload", [p for _, p in BAD_PAYLOADS], ids=[n for n, _ in BAD_PAYLOADS])
def test_decode_rejects(payload: Any) -> None:
    with pytest.raises(SchemaError):
        schemas.decode(payload)


@pytest.mark.parametrize("name", sorted(schemas.EVENTS))
def test_decode_rejects_every_truncation(name: str) -> None:
    data = schemas.encode(name, RECORDS[name])
    for cut in range(10, len(data)):
        with pytest.raises(SchemaError):
            schemas.decode(data[:cut])


def test_decode_as_wrong_type() -> None:
    data = schemas.encode("AuctionClose", RECORDS["AuctionClose"])
    with pytest.raises(SchemaError, match="AuctionClose"):
        schemas.decode_as("Bid", data)


def test_decode_as_propagates_decode_errors() -> None:
    with pytest.raises(SchemaError):
        schemas.decode_as("Bid", b"\xc3\x01")


@pytest.mark.parametrize(
    ("name", "record"),
    [
        ("Bid", {k: v for k, v in RECORDS["Bid"].items() if k != "buyer_id"}),
        ("Bid", {**RECORDS["Bid"], "price": "45.50"}),
        ("Bid", {**RECORDS["Bid"], "sent_at_ms": "now"}),
        ("Bid", {**RECORDS["Bid"], "unexpected": 1}),
        ("AuctionClose", {"lead_id": "x", "reason": "deadline"}),
        ("Lead", {"flow": "solar", "fields": {"nested": {"a": 1}}}),
        ("NoSuchEvent", {"lead_id": "x"}),
    ],
    ids=[
        "missing field",
        "string price",
        "string long",
        "extra field",
        "missing long",
        "nested map value",
        "unknown event",
    ],
)
def test_encode_rejects_invalid_records(name: str, record: dict[str, Any]) -> None:
    with pytest.raises(SchemaError):
        schemas.encode(name, record)


def test_unknown_schema_name() -> None:
    with pytest.raises(SchemaError):
        schemas.schema_json("NoSuchEvent")
    with pytest.raises(SchemaError):
        schemas.decode_as("NoSuchEvent", _valid())


def test_the_module_doc_does_not_claim_changelogs_are_avro() -> None:
    """Faust's table changelogs are JSON (faust: a table without a model type serialises
    keys and values as json); the module's documentation must say so, not that every Kafka
    value is Avro. Checked against the real topics in tests/integration/test_pipeline.py."""
    doc = " ".join((schemas.__doc__ or "").split())
    assert "Every Kafka value" not in doc
    assert "changelog" in doc and "JSON" in doc


def test_the_typed_records_are_generated_from_the_schemas() -> None:
    """``schemas/records.py`` is ``python -m schemas.typed``'s output for today's .avsc files
    (formatted): a schema change without regenerating it fails here."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from schemas.typed import RECORDS_PATH, render

    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    formatted = subprocess.run(
        [ruff, "format", "--stdin-filename", str(RECORDS_PATH), "-"],
        input=render(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert RECORDS_PATH.read_text() == formatted, (
        "run: python -m schemas.typed && ruff format schemas"
    )


def test_every_event_has_its_typed_record() -> None:
    import typing

    from schemas import EVENTS, records, schema_json

    for name in EVENTS:
        td = getattr(records, name)
        fields = [f["name"] for f in schema_json(name)["fields"]]
        assert list(typing.get_type_hints(td)) == fields, name
