"""streams.rules.leads: validate_lead, redact, pii hashes and deterministic lead ids."""

from __future__ import annotations

import calendar
import dataclasses
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from streams.rules.leads import (
    LeadError,
    PingView,
    ValidLead,
    deterministic_lead_id,
    redact,
    validate_lead,
)
from streams.settings import Settings, load_settings, parse_settings

REPO = Path(__file__).resolve().parents[2]
DEMO = load_settings(REPO / "config" / "demo.yaml")
RECEIVED = 1_717_243_200_000  # 2024-06-01T12:00:00Z

#: CONTRACT §1's solar lead.
SOLAR: dict[str, Any] = {
    "flow": "solar",
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
}
PII = {
    "first_name": "Ada",
    "last_name": "Lovelace",
    "email": "ada@example.com",
    "phone": "+13105550100",
    "address": "1 Main St, Beverly Hills",
}


def lead(**changes: Any) -> dict[str, Any]:
    raw = dict(SOLAR)
    for k, v in changes.items():
        if v is _DROP:
            raw.pop(k, None)
        else:
            raw[k] = v
    return raw


_DROP = object()


def validate(raw: Any, settings: Settings = DEMO, **kw: Any) -> ValidLead:
    kw.setdefault("received_at_ms", RECEIVED)
    kw.setdefault("source", "http:test")
    kw.setdefault("lead_id", "default-id")
    return validate_lead(settings, raw, **kw)


def lead_error(raw: Any, settings: Settings = DEMO, **kw: Any) -> LeadError:
    with pytest.raises(LeadError) as info:
        validate(raw, settings, **kw)
    return info.value


def utc_ms(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0, ms: int = 0) -> int:
    return calendar.timegm((y, mo, d, h, mi, s)) * 1000 + ms


# --------------------------------------------------------------------------- valid leads


def test_contract_solar_lead_is_valid() -> None:
    v = validate(SOLAR, source="http:demo")
    assert v.flow == "solar"
    assert v.lead_id == "default-id"
    assert v.source == "http:demo"
    assert v.received_at_ms == RECEIVED
    assert v.created_at_ms == RECEIVED  # no created_at: receipt time
    assert v.fields == {k: val for k, val in SOLAR.items() if k != "flow"}


def test_own_lead_id_is_kept() -> None:
    assert validate(lead(lead_id="lead:2024-06.01_abc-9")).lead_id == "lead:2024-06.01_abc-9"


def test_default_lead_id_used_when_absent_or_null() -> None:
    assert validate(SOLAR, lead_id="gen-1").lead_id == "gen-1"
    assert validate(lead(lead_id=None), lead_id="gen-2").lead_id == "gen-2"


def test_lead_id_required_when_no_default() -> None:
    err = lead_error(SOLAR, lead_id=None)
    assert err.field == "lead_id"


def test_optional_field_may_be_absent_or_null() -> None:
    assert "address" not in validate(lead(address=_DROP)).fields
    assert validate(lead(address=None)).fields["address"] is None
    assert "electric_bill" not in validate(lead(electric_bill=_DROP)).fields


@pytest.mark.parametrize(
    ("created_at", "expected_ms"),
    [
        ("2024-01-01T00:00:00Z", utc_ms(2024, 1, 1)),
        ("2024-01-01T00:00:00+00:00", utc_ms(2024, 1, 1)),
        ("2024-01-01T02:30:00+02:30", utc_ms(2024, 1, 1)),
        ("2023-12-31T19:00:00-05:00", utc_ms(2024, 1, 1)),
        ("2024-01-01T00:00:00.250Z", utc_ms(2024, 1, 1, ms=250)),
        ("2024-06-01T11:59:59.999Z", utc_ms(2024, 6, 1, 11, 59, 59, 999)),
        ("2024-02-29T23:59:59.5+00:00", utc_ms(2024, 2, 29, 23, 59, 59, 500)),
    ],
)
def test_created_at_is_parsed_to_utc_ms(created_at: str, expected_ms: int) -> None:
    v = validate(lead(created_at=created_at))
    assert v.created_at_ms == expected_ms
    assert v.received_at_ms == RECEIVED
    assert "created_at" not in v.fields


@pytest.mark.parametrize(
    ("created_at", "expected_ms"),
    [
        ("2004-03-15T07:55:47.472Z", utc_ms(2004, 3, 15, 7, 55, 47, 472)),
        ("2038-08-15T15:00:50.430Z", utc_ms(2038, 8, 15, 15, 0, 50, 430)),
    ],
)
def test_created_at_ms_is_exact(created_at: str, expected_ms: int) -> None:
    # Received a minute later: within the accepted age window whatever the instant.
    got = validate(lead(created_at=created_at), received_at_ms=expected_ms + 60_000)
    assert got.created_at_ms == expected_ms


@pytest.mark.parametrize(
    ("offset_ms", "ok"),
    [
        (5 * 60_000, True),  # clock skew allowed
        (5 * 60_000 + 1000, False),  # in the future
        (-365 * 24 * 3600_000, True),
        (-367 * 24 * 3600_000, False),  # more than a year old
    ],
)
def test_created_at_bounds(offset_ms: int, ok: bool) -> None:
    received = 1_767_225_600_000  # 2026-01-01T00:00:00Z
    created = datetime.fromtimestamp((received + offset_ms) / 1000, tz=UTC)
    raw = lead(created_at=created.isoformat().replace("+00:00", "Z"))
    if ok:
        assert validate(raw, received_at_ms=received).created_at_ms == received + offset_ms
    else:
        assert lead_error(raw, received_at_ms=received).field == "created_at"


def test_created_at_lowercase_z_is_rfc3339() -> None:
    assert validate(lead(created_at="2024-01-01T00:00:00z")).created_at_ms == utc_ms(2024, 1, 1)


# --------------------------------------------------------------------------- invalid leads

INVALID: list[tuple[str, dict[str, Any], str | None]] = [
    # flow
    ("missing flow", lead(flow=_DROP), "flow"),
    ("null flow", lead(flow=None), "flow"),
    ("flow not a string", lead(flow=7), "flow"),
    ("flow is a list", lead(flow=["solar"]), "flow"),
    ("unknown flow", lead(flow="roofing"), "flow"),
    # required fields, each one
    *[
        (f"missing {f}", lead(**{f: _DROP}), f)
        for f in (
            "state",
            "zip",
            "homeowner",
            "consent",
            "first_name",
            "last_name",
            "email",
            "phone",
        )
    ],
    ("required field null", lead(email=None), "email"),
    # types
    ("string where bool", lead(homeowner="yes"), "homeowner"),
    ("int where bool", lead(consent=1), "consent"),
    ("bool where string", lead(state=True), "state"),
    ("int for string", lead(zip=90210), "zip"),
    ("float for string", lead(first_name=1.5), "first_name"),
    ("list for string", lead(last_name=["Lovelace"]), "last_name"),
    ("dict for string", lead(address={"street": "Main"}), "address"),
    ("too long", lead(first_name="A" * 101), "first_name"),
    # enum
    ("enum violation", lead(credit_range="800+"), "credit_range"),
    ("enum case", lead(property_type="Condo"), "property_type"),
    ("enum violation 2", lead(electric_bill="$1000"), "electric_bill"),
    # pattern
    ("zip too short", lead(zip="9021"), "zip"),
    ("zip too long", lead(zip="902100"), "zip"),
    ("zip with letters", lead(zip="9021a"), "zip"),
    ("zip trailing newline", lead(zip="90210\n"), "zip"),
    ("state lower case", lead(state="ca"), "state"),
    ("state three letters", lead(state="CAL"), "state"),
    ("email without @", lead(email="ada.example.com"), "email"),
    ("phone too short", lead(phone="555-0100"), "phone"),
    # unknown field
    ("unknown field", lead(ssn="123-45-6789"), "ssn"),
    # lead_id
    ("empty lead_id", lead(lead_id=""), "lead_id"),
    ("lead_id with space", lead(lead_id="a b"), "lead_id"),
    ("lead_id with slash", lead(lead_id="a/b"), "lead_id"),
    ("lead_id too long", lead(lead_id="x" * 129), "lead_id"),
    ("lead_id int", lead(lead_id=123), "lead_id"),
    # created_at
    ("created_at garbage", lead(created_at="yesterday"), "created_at"),
    ("created_at no timezone", lead(created_at="2024-01-01T12:00:00"), "created_at"),
    ("created_at date only", lead(created_at="2024-01-01"), "created_at"),
    ("created_at bad month", lead(created_at="2024-13-01T00:00:00Z"), "created_at"),
    ("created_at epoch number", lead(created_at=1704067200), "created_at"),
    ("created_at empty", lead(created_at=""), "created_at"),
]


@pytest.mark.parametrize(
    ("raw", "field"), [(r, f) for _, r, f in INVALID], ids=[n for n, _, _ in INVALID]
)
def test_invalid_lead_names_the_field(raw: dict[str, Any], field: str) -> None:
    err = lead_error(raw)
    assert err.field == field
    assert err.message
    assert str(err) == err.message


@pytest.mark.parametrize("raw", [["flow", "solar"], "solar", None, 42])
def test_non_object_lead(raw: Any) -> None:
    err = lead_error(raw)
    assert err.field is None


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("first_name", "Ada\x00", "U+0000"),
        ("address", "1 Main St\x1b[2J", "U+001B"),
        ("email", "ada@example.com\x7f", "U+007F"),
        ("last_name", "Love\x85lace", "U+0085"),
        ("state", "C\x00A", "U+0000"),  # before the enum/pattern check: the reason is the NUL
        ("flow", "solar\x00", "U+0000"),
        ("lead_id", "id\x01", "U+0001"),
    ],
)
def test_control_characters_are_refused_naming_the_field(field: str, value: str, code: str) -> None:
    err = lead_error(lead(**{field: value}))
    assert err.field == field
    assert "control character" in err.message and code in err.message
    assert value not in err.message  # the value (maybe PII) is not echoed


def test_tab_and_newlines_are_allowed_in_free_text() -> None:
    v = validate(lead(address="1 Main St\r\nApt 2\tBeverly Hills"))
    assert v.fields["address"] == "1 Main St\r\nApt 2\tBeverly Hills"


def test_lead_id_boundary_length() -> None:
    assert validate(lead(lead_id="x" * 128)).lead_id == "x" * 128


def test_lead_id_with_trailing_newline_is_rejected() -> None:
    assert lead_error(lead(lead_id="abc\n")).field == "lead_id"


@pytest.mark.parametrize(
    "created_at", ["2024-W01-1T00:00:00Z", "20240101T000000Z", "2024-01-01T00:00Z"]
)
def test_created_at_non_rfc3339_iso_forms_rejected(created_at: str) -> None:
    assert lead_error(lead(created_at=created_at)).field == "created_at"


# --------------------------------------------------------------------------- numeric types

NUMERIC = parse_settings(
    {
        "flows": {
            "loan": {
                "fields": {
                    "amount": {"type": "number", "min": 1000, "max": 50000},
                    "term": {"type": "integer", "enum": [12, 24, 36]},
                    "email": {},
                },
                "ping_fields": {"amount": {}, "term": {}},
                "pii_fields": ["email"],
            }
        }
    },
    env={},
)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"amount": "5000"}, "amount"),
        ({"amount": True}, "amount"),
        ({"amount": float("inf")}, "amount"),
        ({"amount": float("nan")}, "amount"),
        ({"amount": 999.99}, "amount"),
        ({"amount": 50000.01}, "amount"),
        ({"term": 12.0}, "term"),
        ({"term": False}, "term"),
        ({"term": 18}, "term"),
        ({"term": "12"}, "term"),
    ],
)
def test_numeric_fields(changes: dict[str, Any], field: str) -> None:
    raw = {"flow": "loan", "amount": 5000, "term": 24, **changes}
    assert lead_error(raw, NUMERIC).field == field


def test_numeric_fields_valid() -> None:
    v = validate({"flow": "loan", "amount": 1000, "term": 36}, NUMERIC)
    assert v.fields == {"amount": 1000, "term": 36}
    assert validate({"flow": "loan", "amount": 50000.0}, NUMERIC).fields["amount"] == 50000.0


# --------------------------------------------------------------------------- PII in pings

FREE_TEXT = parse_settings(
    {
        "flows": {
            "solar": {
                "fields": {
                    "state": {},
                    "notes": {},
                    "comment": {},
                    "email": {},
                    "phone": {},
                    "first_name": {},
                },
                "ping_fields": {"state": {}, "notes": {}, "comment": {"rename": "remark"}},
                "pii_fields": ["email", "phone", "first_name"],
            }
        }
    },
    env={},
)
FT_PII = {"email": "ada@example.com", "phone": "+13105550100", "first_name": "Al"}


@pytest.mark.parametrize(
    "notes",
    ["call ada@example.com after 5", "CALL ADA@EXAMPLE.COM", "+13105550100", "ph +13105550100!"],
)
def test_ping_field_containing_pii_value_is_rejected(notes: str) -> None:
    err = lead_error({"flow": "solar", "state": "CA", "notes": notes, **FT_PII}, FREE_TEXT)
    assert err.field == "notes"
    assert "PII" in err.message


def test_short_pii_values_do_not_block_ping_fields() -> None:
    # A two-letter first name would otherwise "occur" in many words.
    v = validate({"flow": "solar", "state": "CA", "notes": "Always home", **FT_PII}, FREE_TEXT)
    assert v.fields["notes"] == "Always home"


def test_pii_in_renamed_ping_field_names_the_lead_field() -> None:
    err = lead_error({"flow": "solar", "comment": "mail ada@example.com", **FT_PII}, FREE_TEXT)
    assert err.field == "comment"


# --------------------------------------------------------------------------- redact


def redacted(raw: dict[str, Any] = SOLAR, settings: Settings = DEMO) -> PingView:
    return redact(settings, validate(raw, settings))


def test_redact_ping_view_of_demo_lead() -> None:
    view = redacted()
    assert view.ping_fields == {
        "state": "CA",
        "zip": "902",
        "homeowner": True,
        "electric_bill": "$200-300",
        "credit_range": "700+",
        "property_type": "single_family",
        "consent": True,
    }


def test_redact_keeps_no_pii_in_ping_fields() -> None:
    view = redacted()
    assert not set(view.ping_fields) & set(PII)
    text = json.dumps(view.ping_fields).lower()
    for value in PII.values():
        assert value.lower() not in text
    assert "90210" not in text  # the full zip is not a ping value


def test_redact_pii_is_complete() -> None:
    assert redacted().pii == PII


def test_redact_without_optional_pii() -> None:
    view = redacted(lead(address=_DROP, electric_bill=_DROP))
    assert "address" not in view.pii and "address" not in view.pii_hashes
    assert "electric_bill" not in view.ping_fields
    assert set(view.pii) == set(PII) - {"address"}


def test_redact_null_pii_has_no_hash() -> None:
    view = redacted(lead(address=None))
    assert view.pii["address"] is None
    assert "address" not in view.pii_hashes


@pytest.mark.parametrize(
    ("transform", "value", "expected"),
    [
        ("zip3", "90210", "902"),
        ("prefix", "Beverly", "Bev"),
        ("lower", "MiXeD", "mixed"),
        ("upper", "MiXeD", "MIXED"),
        ("keep", "MiXeD", "MiXeD"),
    ],
)
def test_transforms(transform: str, value: str, expected: str) -> None:
    spec: dict[str, Any] = {"transform": transform, "rename": "out"}
    if transform == "prefix":
        spec["length"] = 3
    s = parse_settings(
        {
            "flows": {
                "f": {
                    "fields": {"v": {}, "email": {}},
                    "ping_fields": {"v": spec},
                    "pii_fields": ["email"],
                }
            }
        },
        env={},
    )
    view = redact(s, validate({"flow": "f", "v": value}, s))
    assert view.ping_fields == {"out": expected}


def test_pii_hashes_are_keyed_hex_digests() -> None:
    view = redacted()
    assert set(view.pii_hashes) == set(PII)
    for name, h in view.pii_hashes.items():
        assert len(h) == 64 and int(h, 16) >= 0
        raw = PII[name]
        assert h != raw
        # not a plain (unkeyed, brute-forceable) hash of the value
        for candidate in (raw, raw.lower(), f"{name}:{raw.lower()}"):
            assert h != hashlib.sha256(candidate.encode()).hexdigest()


def test_pii_hashes_depend_on_the_key() -> None:
    other = DEMO.model_copy(
        update={
            "privacy": DEMO.privacy.model_copy(
                update={"hash_key": type(DEMO.privacy.hash_key)("another-key-entirely")}
            )
        }
    )
    a = redact(DEMO, validate(SOLAR))
    b = redact(other, validate(SOLAR, other))
    for name in PII:
        assert a.pii_hashes[name] != b.pii_hashes[name]
    assert redact(DEMO, validate(SOLAR)).pii_hashes == a.pii_hashes  # deterministic


def test_pii_hashes_are_per_field() -> None:
    v = validate(lead(first_name="Lovelace"))
    h = redact(DEMO, v).pii_hashes
    assert h["first_name"] != h["last_name"]


def _with_fields(**changes: Any) -> ValidLead:
    v = validate(SOLAR)
    return dataclasses.replace(v, fields={**v.fields, **changes})


@pytest.mark.parametrize(
    ("field", "a", "b"),
    [
        ("phone", "+1 (310) 555-0100", "+13105550100"),
        ("phone", "1-310-555-0100", "+13105550100"),
        ("email", "  Ada@Example.COM ", "ada@example.com"),
    ],
)
def test_pii_hash_normalisation(field: str, a: str, b: str) -> None:
    ha = redact(DEMO, _with_fields(**{field: a})).pii_hashes[field]
    hb = redact(DEMO, _with_fields(**{field: b})).pii_hashes[field]
    assert ha == hb


def test_pii_hash_distinguishes_values() -> None:
    ha = redact(DEMO, _with_fields(phone="+13105550100")).pii_hashes["phone"]
    hb = redact(DEMO, _with_fields(phone="+13105550101")).pii_hashes["phone"]
    assert ha != hb


# --------------------------------------------------------------------------- lead ids


def test_deterministic_lead_id_is_stable() -> None:
    a = deterministic_lead_id("pingpost.leads", 3, 1234)
    assert a == deterministic_lead_id("pingpost.leads", 3, 1234)
    # usable as a lead id of its own (it is re-validated on the way)
    assert validate(lead(lead_id=a)).lead_id == a


def test_deterministic_lead_id_is_distinct_per_position() -> None:
    ids = {deterministic_lead_id("pingpost.leads", p, o) for p in range(4) for o in range(250)}
    ids.add(deterministic_lead_id("other.leads", 0, 0))
    assert len(ids) == 4 * 250 + 1
    # no ambiguity between (partition, offset) pairs that print alike
    assert deterministic_lead_id("t", 1, 23) != deterministic_lead_id("t", 12, 3)
