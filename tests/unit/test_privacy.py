"""Dead letters never hold a raw PII value (streams/rules/privacy.py, DeadLetters)."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

import schemas
from streams.rules.leads import pii_hash
from streams.rules.privacy import dead_letter_payload
from streams.runtime.agents import DeadLetters
from streams.settings import Settings, parse_settings

PII = {
    "first_name": "Ada",
    "last_name": "Lovelace",
    "email": "ada.lovelace@example.com",
    "phone": "+15558000237",
    "address": "1 Main St, Beverly Hills",
}
LEAD = {
    "state": "CA",
    "zip": "90210",
    "homeowner": True,
    "consent": True,
    "credit_range": "700+",
    **PII,
}


@pytest.fixture(scope="module")
def settings() -> Settings:
    raw = yaml.safe_load(Path("config/demo.yaml").read_text())
    return parse_settings(raw, env={"PINGPOST_HASH_KEY": "k-test"})


def _leaks(data: bytes | str) -> list[str]:
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    low = text.lower()
    digits = "".join(c for c in low if c.isdigit())
    found = [v for v in ("ada", "lovelace", "main st", "beverly") if v in low]
    return found + (["phone"] if "5558000237" in digits else [])


def _lead(fields: dict[str, Any], flow: str = "solar") -> bytes:
    return schemas.encode(
        "Lead", {"flow": flow, "fields": fields, "source": "kafka-test", "lead_id": "l-1"}
    )


def test_an_invalid_lead_keeps_its_non_pii_fields_and_hashes_the_rest(settings: Settings) -> None:
    raw = _lead({**LEAD, "zip": "ABCDE"})
    assert _leaks(raw)  # the record itself holds every value
    safe = dead_letter_payload(raw, settings)
    assert safe.redacted and safe.length == len(raw) and not _leaks(safe.payload)
    view = orjson.loads(safe.payload)
    assert view["fields"] == {
        "state": "CA",
        "zip": "ABCDE",
        "homeowner": True,
        "consent": True,
        "credit_range": "700+",
    }
    assert (view["flow"], view["lead_id"], view["source"]) == ("solar", "l-1", "kafka-test")
    assert view["withheld"] == sorted(PII)
    key = b"k-test"
    assert safe.pii_hashes == {n: pii_hash(key, n, v) for n, v in PII.items()}
    assert safe.hmac == hmac.new(key, raw, hashlib.sha256).hexdigest()
    assert set(safe.pii_values) == set(PII.values())


def test_pii_in_a_non_pii_field_or_an_unknown_field_is_withheld(settings: Settings) -> None:
    # a producer that put the phone in `state` and added a field the flow does not declare
    raw = _lead(
        {**LEAD, "state": "call 555-800-0237", "mobile": "555.800.0237", "notes": "Ada Lovelace"}
    )
    safe = dead_letter_payload(raw, settings)
    assert not _leaks(safe.payload), safe.payload
    view = orjson.loads(safe.payload)
    assert view["fields"]["state"] == "call [redacted]"
    assert {"mobile", "notes"} <= set(view["withheld"]) and "mobile" in safe.pii_hashes


def test_a_lead_of_an_unknown_flow_shows_no_field_value(settings: Settings) -> None:
    safe = dead_letter_payload(_lead(LEAD, flow="roofing"), settings)
    view = orjson.loads(safe.payload)
    assert view["fields"] == {} and view["withheld"] == sorted(LEAD)
    assert not _leaks(safe.payload)


def test_a_pii_record_keeps_only_ids_and_field_names(settings: Settings) -> None:
    raw = schemas.encode(
        "LeadPii", {"lead_id": "l-1", "flow": "solar", "fields": PII, "expires_at_ms": 5}
    )
    safe = dead_letter_payload(raw, settings)
    assert orjson.loads(safe.payload) == {
        "event": "LeadPii",
        "lead_id": "l-1",
        "flow": "solar",
        "expires_at_ms": 5,
        "withheld": sorted(PII),
    }
    assert set(safe.pii_hashes) == set(PII)


@pytest.mark.parametrize(
    "raw", [orjson.dumps({"flow": "solar", **LEAD}), b"\x00garbage", _lead(LEAD)[:-3]]
)
def test_an_undecodable_record_keeps_only_its_length_and_hash(
    settings: Settings, raw: bytes
) -> None:
    safe = dead_letter_payload(raw, settings)
    assert (safe.payload, safe.redacted, safe.length) == (b"", True, len(raw))
    assert safe.hmac == hmac.new(b"k-test", raw, hashlib.sha256).hexdigest()


def test_a_record_without_pii_is_kept_as_is(settings: Settings) -> None:
    raw = schemas.encode(
        "CapDecision",
        {
            "request_id": "r1",
            "buyer_id": "b1",
            "lead_id": "l1",
            "granted": False,
            "reason": "cap reached",
        },
    )
    safe = dead_letter_payload(raw, settings)
    assert (safe.payload, safe.redacted, safe.pii_hashes) == (raw, False, {})


class _Topic:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send(self, key: bytes, value: bytes) -> None:
        self.sent.append(value)


class _Event:
    def __init__(self, value: bytes) -> None:
        self.message = type(
            "Msg",
            (),
            {"topic": "p.leads", "partition": 1, "offset": 7, "key": b"l-1", "value": value},
        )()


async def test_dead_letters_record_and_log_no_pii(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    topic = _Topic()
    dead = DeadLetters(topic, "redact", settings)
    event = _Event(_lead({**LEAD, "zip": "ABCDE"}))
    caplog.set_level(logging.INFO)
    # an error whose message quotes values (fastavro's do)
    await dead.send(event, "invalid lead: ADA.LOVELACE@EXAMPLE.COM / (555) 800-0237", "zip")  # type: ignore[arg-type]

    async def work() -> None:
        raise ValueError(f"cannot encode {PII}")

    assert not await dead.guarded(event, work, "redact")  # type: ignore[arg-type]
    assert len(topic.sent) == 2
    for value in topic.sent:
        rec = schemas.decode_as("DeadLetter", value)
        assert rec["payload_redacted"] and rec["payload_length"] > 0
        assert (rec["id"], rec["field"] or "zip") == ("p.leads:1:7", "zip")
        assert not _leaks(orjson.dumps(rec, default=str)), rec
    assert "cannot encode" in caplog.text and "Traceback" in caplog.text
    assert not _leaks(caplog.text), caplog.text


def test_pii_topics_are_deleted_hour_by_hour_and_leads_retention_is_configurable(
    settings: Settings,
) -> None:
    from streams.topics import TopicNames, changelog_topic, topic_specs

    n = TopicNames.from_settings(settings)
    specs = {t.name: t.config for t in topic_specs(settings)}
    pii_topics = (n.leads, n.lead_pii, changelog_topic(settings.kafka.app_id, "pii"))
    for name in pii_topics:
        assert specs[name]["segment.ms"] == "3600000", name
    assert specs[n.leads]["retention.ms"] == str(24 * 3600 * 1000)  # the default: one day
    assert specs[n.lead_pii]["retention.ms"] == str(24 * 3600 * 1000)
    short = settings.model_copy(
        update={"privacy": settings.privacy.model_copy(update={"leads_retention_hours": 6})}
    )
    assert {t.name: t.config for t in topic_specs(short)}[n.leads]["retention.ms"] == str(
        6 * 3600 * 1000
    )


def _open_bits(root: Path) -> list[str]:
    """Every path under ``root`` (itself included) with a group or other permission bit."""
    paths = [root, *root.rglob("*")]
    return [f"{p} {oct(p.stat().st_mode & 0o777)}" for p in paths if p.stat().st_mode & 0o077]


@pytest.fixture
def lax_umask() -> Any:
    """The usual 022: what the code creates must be private without relying on the umask."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_the_run_dir_and_what_the_stack_creates_are_owner_only(
    settings: Settings, tmp_path: Path, lax_umask: None
) -> None:
    from streams.tools.stack import Stack

    run = tmp_path / "run"
    run.mkdir(mode=0o755)  # left world-readable by an older version
    os.chmod(run, 0o755)
    (run / "kafka").mkdir()
    stack = Stack(settings, Path("config/demo.yaml").resolve(), run, say=lambda m: None)
    stack.spawn("probe", ["--help"])  # a real CLI process: creates its pid file and log
    stack.stop("probe")
    assert (run / "logs" / "probe.log").exists()
    assert not _open_bits(run / "logs") and not _open_bits(run / "pids")
    assert run.stat().st_mode & 0o777 == 0o700


def test_data_dirs_are_owner_only(
    settings: Settings, tmp_path: Path, lax_umask: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from connectors.kafka_broker import KafkaBroker
    from connectors.warehouse.lock import DataDirLock
    from streams.app import create_app

    broker = KafkaBroker(data_dir=tmp_path / "kafka")
    monkeypatch.setattr(broker, "_launch", lambda: None)  # the directory, not the JVM
    broker.start(wait=False)
    assert broker.data_dir is not None and broker.data_dir.stat().st_mode & 0o777 == 0o700
    lock = DataDirLock(tmp_path / "warehouse")
    lock.acquire()
    try:
        assert not _open_bits(tmp_path / "warehouse")
    finally:
        lock.release()
    app = create_app(settings, "sink", data_root=tmp_path / "faust")
    assert Path(app.conf.datadir).stat().st_mode & 0o777 == 0o700


def test_every_cli_process_creates_files_owner_only(lax_umask: None) -> None:
    from streams.tools.cli import main

    assert main(["--config", "config/demo.yaml", "check-config"]) == 0
    assert os.umask(0o022) == 0o077
