"""streams.stages.sink.to_row: events -> ClickHouse rows (shape, types, no PII)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import schemas
from connectors.clickhouse import TABLE_COLUMNS
from streams.rules.leads import redact, validate_lead
from streams.settings import load_settings
from streams.stages.redact import ping_request
from streams.stages.sink import to_row, to_rows
from tests.unit.test_schemas import RECORDS, T0

REPO = Path(__file__).resolve().parents[2]
UTC = UTC
#: T0 = 1_717_243_200_000 ms
T0_DT = datetime(2024, 6, 1, 12, 0, 0, tzinfo=UTC)

TABLE_OF = {
    "PingRequest": "leads",
    "Bid": "pings",
    "Delivery": "posts",
    "AuctionResult": "auctions",
    "DeadLetter": "dead_letters",
    "FlowVersion": "flow_versions",
}


def row_of(name: str, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Decode-then-map, as the sink does; returns the row keyed by column name."""
    rec = schemas.decode_as(name, schemas.encode(name, record or RECORDS[name]))
    mapped = to_row(name, rec)
    assert mapped is not None
    table, row = mapped
    assert table == TABLE_OF[name]
    assert len(row) == len(TABLE_COLUMNS[table])
    return dict(zip(TABLE_COLUMNS[table], row))


def test_t0_constant() -> None:
    assert T0_DT == datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=T0)


@pytest.mark.parametrize("name", sorted(TABLE_OF))
def test_row_length_matches_table(name: str) -> None:
    row_of(name)


@pytest.mark.parametrize("name", ["AuctionOpen", "AuctionClose", "Lead", "LeadPii", "PostOrder"])
def test_events_without_table(name: str) -> None:
    assert to_row(name, RECORDS[name]) is None


def test_every_row_table_is_a_known_table() -> None:
    assert set(TABLE_OF.values()) <= set(TABLE_COLUMNS)


@pytest.mark.parametrize("name", sorted(TABLE_OF))
def test_timestamps_are_utc_datetimes(name: str) -> None:
    row = row_of(name)
    stamps = {k: v for k, v in row.items() if k.endswith("_at") or k == "at"}
    assert stamps, f"{name} has no timestamp column"
    for col, value in stamps.items():
        assert isinstance(value, datetime), col
        assert value.tzinfo is not None and value.utcoffset() == timedelta(0), col


def test_leads_row() -> None:
    row = row_of("PingRequest")
    assert row["lead_id"] == "lead-0001"
    assert row["flow"] == "solar"
    assert row["source"] == "http:demo"
    assert row["received_at"] == T0_DT
    assert row["created_at"] == T0_DT - timedelta(seconds=2)
    assert row["ping_fields"] == {
        "state": "CA",
        "zip": "902",
        "homeowner": "true",
        "electric_bill": "$200-300",
        "credit_range": "700+",
        "property_type": "single_family",
        "consent": "true",
    }
    assert row["pii_hashes"] == {"email": "a" * 64, "phone": "b" * 64}


def test_map_values_become_strings() -> None:
    rec = {
        **RECORDS["PingRequest"],
        "ping_fields": {"t": True, "f": False, "n": 12, "x": 2.5, "s": "CA", "z": None},
    }
    row = row_of("PingRequest", rec)
    assert row["ping_fields"] == {
        "t": "true",
        "f": "false",
        "n": "12",
        "x": "2.5",
        "s": "CA",
        "z": "",
    }
    assert all(isinstance(v, str) for v in row["ping_fields"].values())


def test_pings_row() -> None:
    row = row_of("Bid")
    assert row == {
        "ping_id": "p-1",
        "lead_id": "lead-0001",
        "flow": "solar",
        "buyer_id": "sunrise",
        "tier": "premium",
        "sent_at": T0_DT + timedelta(milliseconds=4),
        "answered_at": T0_DT + timedelta(milliseconds=71),
        "latency_ms": 67.25,
        "status": "bid",
        "price": 45.5,
        "exclusive": True,
        "reason": "",
        "http_status": 200,
        "conditions": '{"max_age_minutes":5.0,"require_consent":true,"states":["CA","TX"]}',
        "wave": 1,
        "timeout_ms": 496.0,
    }


def test_pings_row_without_conditions_or_the_fields_older_records_lack() -> None:
    rec = {k: v for k, v in RECORDS["Bid"].items() if k not in ("wave", "timeout_ms")}
    row = row_of("Bid", {**rec, "conditions": {"states": None, "require_consent": False}})
    assert (row["conditions"], row["wave"], row["timeout_ms"]) == ("", 0, None)


def test_flow_versions_row() -> None:
    row = row_of("FlowVersion")
    assert row["hash"] == "c4b194fe509cc17e"
    assert row["flow"] == "solar"
    assert row["published_at"] == T0_DT


def test_pings_row_for_a_failed_ping() -> None:
    rec = {
        **RECORDS["Bid"],
        "status": "timeout",
        "price": None,
        "exclusive": False,
        "reason": "no answer within 500 ms",
        "http_status": None,
    }
    row = row_of("Bid", rec)
    assert (row["status"], row["price"], row["http_status"]) == ("timeout", None, None)
    assert row["reason"] == "no answer within 500 ms"


def test_posts_row() -> None:
    row = row_of("Delivery")
    assert row == {
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
        "sent_at": T0_DT + timedelta(milliseconds=95),
        "attempt": 1,
    }


def test_auctions_row() -> None:
    row = row_of("AuctionResult")
    assert row["outcome"] == "sold_shared"
    assert row["winners"] == ["brightpath", "greenleaf"]
    assert row["prices"] == [41.0, 30.0]
    assert row["price_total"] == 71.0
    assert row["received_at"] == T0_DT
    assert row["opened_at"] == T0_DT + timedelta(milliseconds=3)
    assert row["deadline_at"] == T0_DT + timedelta(milliseconds=753)
    assert row["closed_at"] == T0_DT + timedelta(milliseconds=91)
    assert row["settled_at"] == T0_DT + timedelta(milliseconds=190)
    assert row["duration_ms"] == 88.0  # closed - opened
    assert (row["close_reason"], row["close_lag_ms"]) == ("all_answered", 1.125)
    assert (row["pinged"], row["bids"], row["post_attempts"]) == (5, 3, 3)
    assert (row["config_hash"], row["variant"]) == ("c4b194fe509cc17e", "higher-floor")


def test_dead_letters_row() -> None:
    row = row_of("DeadLetter")
    assert row == {
        "id": "pingpost.leads:2:991",
        "stage": "redact",
        "topic": "pingpost.leads",
        "partition": 2,
        "offset": 991,
        "reason": "invalid lead: zip: has an invalid format",
        "field": "zip",
        "at": T0_DT + timedelta(milliseconds=5),
    }


def test_millisecond_precision_survives() -> None:
    rec = {**RECORDS["Delivery"], "sent_at_ms": 1_704_067_200_123}
    assert row_of("Delivery", rec)["sent_at"] == datetime(2024, 1, 1, 0, 0, 0, 123_000, tzinfo=UTC)


# --------------------------------------------------------------------------- no PII

LEAD = {
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
PII_VALUES = [
    "Ada",
    "Lovelace",
    "ada@example.com",
    "+13105550100",
    "3105550100",
    "1 Main St, Beverly Hills",
    "Beverly Hills",
    "90210",
]


def test_leads_row_of_a_redacted_lead_has_no_pii() -> None:
    settings = load_settings(REPO / "config" / "demo.yaml")
    lead = validate_lead(
        settings, LEAD, received_at_ms=T0, source="http:demo", lead_id="lead-pii-1"
    )
    req = ping_request(lead, redact(settings, lead))
    row = row_of("PingRequest", req)
    assert set(row["pii_hashes"]) == {"first_name", "last_name", "email", "phone", "address"}
    text = repr(mapped_row(req))
    for value in PII_VALUES:
        assert value not in text
    # case-insensitively too, outside the hex digests (where "ada" may occur by chance)
    plain = repr({k: v for k, v in row.items() if k != "pii_hashes"}).lower()
    for value in PII_VALUES:
        assert value.lower() not in plain
    for name, digest in row["pii_hashes"].items():
        assert len(digest) == 64 and set(digest) <= set("0123456789abcdef"), name


def mapped_row(record: dict[str, Any]) -> list[Any]:
    mapped = to_row(
        "PingRequest", schemas.decode_as("PingRequest", schemas.encode("PingRequest", record))
    )
    assert mapped is not None
    return mapped[1]


def test_skipped_delivery_is_not_a_post_row() -> None:
    """`posts` holds post attempts (CONTRACT §5); a bid skipped at post time was not one."""
    from tests.unit.test_schemas import RECORDS

    attempt = dict(RECORDS["Delivery"], status="rejected")
    assert to_row("Delivery", attempt) is not None
    assert to_row("Delivery", dict(attempt, status="skipped")) is None


def test_a_ping_round_is_one_pings_row_per_answer() -> None:
    rec = schemas.decode_as("PingRound", schemas.encode("PingRound", RECORDS["PingRound"]))
    rows = to_rows("PingRound", rec)
    assert rows == [to_row("Bid", answer) for answer in rec["answers"]]
    assert [r[1][0] for r in rows] == ["p-1", "p-2"]  # ping ids
    assert to_rows("AuctionClose", RECORDS["AuctionClose"]) == []
    assert to_rows("Bid", RECORDS["Bid"]) == [to_row("Bid", RECORDS["Bid"])]
