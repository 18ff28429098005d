"""Schema compatibility gate: the current schemas must read data written with every released
version (schemas/released/v*/) and with the schemas of the last commit (git HEAD).

Compared are fully inlined schemas: ``schemas.schema_json`` for the current ones and the same
inlining (``pingpost.Conditions`` replaced by conditions.avsc at its first reference) for the
released / committed files. The checker is Apache avro's ReaderWriterCompatibilityChecker; the
negative tests prove it actually fails on breaking changes.
"""

from __future__ import annotations

import copy
import io
import json
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import avro.schema
import fastavro
import pytest
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType

import schemas
from tests.unit.test_schemas import RECORDS, crc64_avro

RELEASED = schemas.SCHEMA_DIR / "released"
RELEASE_DIRS = sorted(p for p in RELEASED.glob("v*") if p.is_dir())
SHARED = dict(schemas._SHARED)  # the shared named types (Conditions, AuctionOpen, Bid)
REPO = schemas.SCHEMA_DIR.parent

Loader = Callable[[str], Any]  # file stem -> parsed JSON, or None when absent


def inline(node: Any, load: Loader, seen: set[str]) -> Any:
    """Replace the first reference to each shared named type by its definition."""
    if isinstance(node, str):
        if node in SHARED and node not in seen:
            seen.add(node)
            return inline(load(SHARED[node]), load, seen)
        return node
    if isinstance(node, list):
        return [inline(n, load, seen) for n in node]
    if isinstance(node, dict):
        return {
            k: (inline(v, load, seen) if k in ("type", "items", "values", "fields") else v)
            for k, v in node.items()
        }
    return node


def dir_loader(directory: Path) -> Loader:
    def load(stem: str) -> Any:
        path = directory / f"{stem}.avsc"
        return json.loads(path.read_text()) if path.exists() else None

    return load


def inlined(load: Loader, stem: str) -> Any:
    raw = load(stem)
    return None if raw is None else inline(raw, load, set())


def parse(schema_json: Any) -> avro.schema.Schema:
    return avro.schema.parse(json.dumps(schema_json))


def compatibility(reader_json: Any, writer_json: Any) -> tuple[bool, str]:
    result = ReaderWriterCompatibilityChecker().get_compatibility(
        parse(reader_json), parse(writer_json)
    )
    ok = result.compatibility is SchemaCompatibilityType.compatible
    return ok, "; ".join(sorted(result.messages)) + " at " + ", ".join(sorted(result.locations))


def current(name: str) -> Any:
    return schemas.schema_json(name)


# --------------------------------------------------------------------------- released versions


def test_a_released_version_exists() -> None:
    assert RELEASE_DIRS, f"no released schema versions under {RELEASED}"


@pytest.mark.parametrize("release", RELEASE_DIRS, ids=[p.name for p in RELEASE_DIRS])
def test_no_released_event_or_shared_type_was_removed(release: Path) -> None:
    current_stems = set(schemas.EVENTS.values()) | set(SHARED.values())
    released_stems = {p.stem for p in release.glob("*.avsc")}
    assert released_stems, f"{release} is empty"
    assert released_stems <= current_stems, released_stems - current_stems


@pytest.mark.parametrize("release", RELEASE_DIRS, ids=[p.name for p in RELEASE_DIRS])
@pytest.mark.parametrize("name", sorted(schemas.EVENTS))
def test_current_reads_released(release: Path, name: str) -> None:
    writer = inlined(dir_loader(release), schemas.EVENTS[name])
    if writer is None:
        pytest.skip(f"{name} was not part of {release.name}")
    ok, why = compatibility(current(name), writer)
    assert ok, f"{name}: current schema cannot read {release.name} data: {why}"


@pytest.mark.parametrize("release", RELEASE_DIRS, ids=[p.name for p in RELEASE_DIRS])
@pytest.mark.parametrize("name", sorted(schemas.EVENTS))
def test_released_payloads_decode(release: Path, name: str) -> None:
    """A record in the topics written with a released schema (a producer that has not
    upgraded, a compacted lead-pii record) is still decoded: its fingerprint must be known."""
    writer = inlined(dir_loader(release), schemas.EVENTS[name])
    if writer is None:
        pytest.skip(f"{name} was not part of {release.name}")
    written = {f["name"] for f in writer["fields"]}
    record = {k: v for k, v in RECORDS[name].items() if k in written}  # fields of that release
    parsed = fastavro.parse_schema(copy.deepcopy(writer))
    canonical = parse(writer).canonical_form
    buf = io.BytesIO()
    buf.write(b"\xc3\x01" + struct.pack("<Q", crc64_avro(canonical.encode())))
    fastavro.schemaless_writer(buf, parsed, record)
    got_name, got = schemas.decode(buf.getvalue())
    assert got_name == name
    for key, value in record.items():
        assert got[key] == value


# --------------------------------------------------------------------------- git HEAD


def _git(*args: str) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None


def _head_available() -> bool:
    proc = _git("rev-parse", "--verify", "--quiet", "HEAD")
    return proc is not None and proc.returncode == 0


def head_loader() -> Loader:
    rel = schemas.SCHEMA_DIR.relative_to(REPO).as_posix()

    def load(stem: str) -> Any:
        proc = _git("show", f"HEAD:{rel}/{stem}.avsc")
        if proc is None or proc.returncode != 0:
            return None
        return json.loads(proc.stdout)

    return load


@pytest.mark.parametrize("name", sorted(schemas.EVENTS))
def test_current_reads_git_head(name: str) -> None:
    if not _head_available():
        pytest.skip("not a git checkout with a HEAD commit")
    writer = inlined(head_loader(), schemas.EVENTS[name])
    if writer is None:
        pytest.skip(f"{name} is new since HEAD")
    ok, why = compatibility(current(name), writer)
    assert ok, f"{name}: current schema cannot read data written with HEAD's schema: {why}"


# --------------------------------------------------------------------------- the gate can fail


def _fields(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return schema["fields"]  # type: ignore[no-any-return]


def _add_required(s: dict[str, Any]) -> None:
    _fields(s).append({"name": "campaign", "type": "string"})


def _add_optional(s: dict[str, Any]) -> None:
    _fields(s).append({"name": "campaign", "type": ["null", "string"], "default": None})


def _retype(field: str, new_type: Any) -> Callable[[dict[str, Any]], None]:
    def mut(s: dict[str, Any]) -> None:
        for f in _fields(s):
            if f["name"] == field:
                f["type"] = new_type
                return
        raise AssertionError(f"no field {field}")

    return mut


def _rename_record(s: dict[str, Any]) -> None:
    s["name"] = s["name"] + "V2"


def _drop_default(field: str) -> Callable[[dict[str, Any]], None]:
    def mut(s: dict[str, Any]) -> None:
        for f in _fields(s):
            if f["name"] == field:
                f.pop("default")
                return
        raise AssertionError(f"no field {field}")

    return mut


def _narrow_union(s: dict[str, Any]) -> None:
    for f in _fields(s):
        if f["name"] == "fields":
            f["type"] = {"type": "map", "values": ["null", "boolean", "string"]}


def _nested_condition_change(s: dict[str, Any]) -> None:
    cond = next(f for f in _fields(s) if f["name"] == "conditions")["type"]
    next(f for f in cond["fields"] if f["name"] == "max_age_minutes")["type"] = "string"


BREAKING: list[tuple[str, str, Callable[[dict[str, Any]], None]]] = [
    ("new field without default", "Bid", _add_required),
    ("long -> string", "AuctionClose", _retype("at_ms", "string")),
    ("double -> int", "Delivery", _retype("price", "int")),
    ("optional -> required", "Lead", _retype("lead_id", "string")),
    ("record renamed", "AuctionClose", _rename_record),
    ("union branch removed", "Lead", _narrow_union),
    ("nested shared type changed", "Bid", _nested_condition_change),
]


@pytest.mark.parametrize(
    ("name", "mutate"), [(n, m) for _, n, m in BREAKING], ids=[d for d, _, _ in BREAKING]
)
def test_checker_rejects_breaking_change(
    name: str, mutate: Callable[[dict[str, Any]], None]
) -> None:
    reader = copy.deepcopy(current(name))
    mutate(reader)
    ok, _ = compatibility(reader, current(name))
    assert not ok


def test_field_without_default_is_breaking_only_when_written_data_lacks_it() -> None:
    # Dropping a default is fine for reading old data that carries the field...
    reader = copy.deepcopy(current("Bid"))
    _drop_default("reason")(reader)
    assert compatibility(reader, current("Bid"))[0]
    # ...but a new reader field without default cannot read old data.
    writer = copy.deepcopy(current("Bid"))
    writer["fields"] = [f for f in writer["fields"] if f["name"] != "reason"]
    assert not compatibility(reader, writer)[0]
    assert compatibility(current("Bid"), writer)[0]  # with its default it can


@pytest.mark.parametrize(
    ("name", "mutate"),
    [
        ("Bid", _add_optional),
        ("AuctionClose", _retype("at_ms", "double")),
        ("Delivery", _retype("attempt", "long")),
    ],
    ids=["new optional field", "long -> double promotion", "int -> long promotion"],
)
def test_checker_accepts_compatible_evolution(
    name: str, mutate: Callable[[dict[str, Any]], None]
) -> None:
    reader = copy.deepcopy(current(name))
    mutate(reader)
    assert compatibility(reader, current(name))[0]


# --------------------------------------------------------------------------- evolution end to end


@pytest.fixture
def evolved_lead_schema(tmp_path: Path) -> Any:
    """The schema directory as it would look after a compatible evolution of Lead (a new
    optional field), with v1 still released next to it."""
    for f in schemas.SCHEMA_DIR.glob("*.avsc"):
        shutil.copy(f, tmp_path / f.name)
    if RELEASED.exists():
        shutil.copytree(RELEASED, tmp_path / "released")
    lead = json.loads((tmp_path / "lead.avsc").read_text())
    lead["fields"].append({"name": "campaign", "type": ["null", "string"], "default": None})
    (tmp_path / "lead.avsc").write_text(json.dumps(lead))

    caches = [
        schemas.schema_json,
        schemas._parsed,
        schemas.fingerprint_of,
        schemas._by_fingerprint,
        schemas._released_writers,
    ]
    original = schemas.SCHEMA_DIR
    for c in caches:
        c.cache_clear()
    schemas.SCHEMA_DIR = tmp_path
    try:
        yield
    finally:
        schemas.SCHEMA_DIR = original
        for c in caches:
            c.cache_clear()


def test_lead_written_with_v1_decodes_after_compatible_evolution(evolved_lead_schema: Any) -> None:
    v1 = RELEASED / "v1"
    writer = inlined(dir_loader(v1), "lead")
    assert writer is not None
    assert compatibility(schemas.schema_json("Lead"), writer)[0]  # the gate would pass
    record = {
        "flow": "solar",
        "lead_id": "old-producer-1",
        "created_at": None,
        "fields": {"state": "CA"},
        "source": "kafka:legacy",
        "received_at_ms": None,
    }
    buf = io.BytesIO()
    buf.write(b"\xc3\x01" + struct.pack("<Q", crc64_avro(parse(writer).canonical_form.encode())))
    fastavro.schemaless_writer(buf, fastavro.parse_schema(copy.deepcopy(writer)), record)
    name, got = schemas.decode(buf.getvalue())
    assert name == "Lead"
    assert got == {**record, "campaign": None}
