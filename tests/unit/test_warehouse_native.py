"""connectors.warehouse.native: chDB's Native blocks rewritten for a client that sent
``client_protocol_version``, checked against chDB's own output (the real engine, in process).

What must hold: the column walker steps over exactly the data chDB wrote for every type it
sizes (a block ends where the next begins, the last where the body does); the rewrite adds
the 8 bytes of block info before every block and puts the time zones back into the type
names. (clickhouse-connect reading them over HTTP, tz-aware: tests/integration/test_warehouse.py.)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from chdb import session as chdb_session

from connectors.warehouse.native import (
    BLOCK_INFO,
    NativeRevision,
    NotSizable,
    describe_sql,
    describe_types,
    skip_column,
    strip_time_zones,
)

#: Expressions over ``number`` (0..n-1) covering the sized types, NULLs and empty values.
COLUMNS = {
    "u8": "toUInt8(number)",
    "i64": "toInt64(number) - 5",
    "f32": "toFloat32(number) / 3",
    "u256": "toUInt256(number)",
    "b": "number % 2 = 0",
    "s": "repeat('x', number % 4)",
    "fs": "toFixedString(toString(number % 10), 3)",
    "d": "toDate('2024-01-01') + number",
    "d32": "toDate32('2024-01-01') + number",
    "dt": "toDateTime('2024-01-01 00:00:00', 'America/Chicago') + number",
    "dt64": "toDateTime64('2024-01-01 00:00:00.123', 3, 'Asia/Tokyo') + number",
    "dtn": "toDateTime(1700000000 + number)",
    "dec": "toDecimal128(number, 4)",
    "dec9": "CAST(number AS Decimal(9, 2))",
    "uuid": "toUUID(concat('61f0c404-5cb3-11e7-907b-a6006ad3dba', toString(number % 10)))",
    "ip4": "toIPv4(number)",
    "ip6": "toIPv6('::1')",
    "enum": "CAST(if(number % 2, 'a', 'b') AS Enum8('a' = 1, 'b' = 2))",
    "n": "if(number % 3 = 0, NULL, toString(number))",
    "nothing": "NULL",
    "arr": "range(number % 5)",
    "arr_dt": "[toDateTime('2024-01-01 00:00:00', 'UTC') + number]",
    "arr_s": "arrayMap(x -> toString(x), range(number % 3))",
    "nested": "[range(number % 3), []]",
    "tup": "CAST((number, toString(number)) AS Tuple(a UInt64, b String))",
    "tup_dt": "(number, toDateTime64(number, 6, 'Europe/Berlin'))",
    "map": "map(toString(number % 3), number)",
    "lc": "toLowCardinality(toString(number % 4))",
    "lcn": "toLowCardinality(if(number % 2, NULL, toString(number)))",
    # LowCardinality inside a container: every LowCardinality's state comes before the data
    "arr_lc": "CAST(arrayMap(x -> toString(x), range(number % 4)) AS Array(LowCardinality(String)))",
    "map_lc": "CAST(map(toString(number % 3), toString(number)) AS Map(LowCardinality(String), "
    "LowCardinality(Nullable(String))))",
    "tup_lc": "CAST((toString(number % 2), toString(number % 5)) AS "
    "Tuple(LowCardinality(String), LowCardinality(String)))",
    "nested_lc": "CAST([(number, toString(number % 3))] AS Nested(a UInt64, b LowCardinality(String)))",
    "point": "(toFloat64(number), 2.0)::Point",
    "ring": "[(toFloat64(number), 2.0)]::Ring",
    "interval": "toIntervalDay(number)",
}


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    s = chdb_session.Session()
    yield s
    s.close()


def native(engine: Any, sql: str) -> bytes:
    body: bytes = engine.query(sql, "Native").bytes()
    return body


def described(engine: Any, sql: str) -> list[str]:
    return describe_types(engine.query(describe_sql(sql.encode()), "JSONEachRow").bytes())


def select(rows: int, block: int, columns: dict[str, str] = COLUMNS) -> str:
    exprs = ", ".join(f"{e} AS {name}" for name, e in columns.items())
    return f"SELECT {exprs} FROM numbers({rows}) SETTINGS max_block_size = {block}"


def walk(body: bytes) -> list[tuple[int, list[str]]]:
    """Step over every block of a revision-0 body with ``skip_column``: (rows, types) each."""

    def varint(pos: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = body[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value, pos
            shift += 7

    blocks, pos = [], 0
    while pos < len(body):
        columns, pos = varint(pos)
        rows, pos = varint(pos)
        types = []
        for _ in range(columns):
            n, pos = varint(pos)
            pos += n
            n, pos = varint(pos)
            types.append(body[pos : pos + n].decode())
            pos = skip_column(body, pos + n, types[-1], rows)
        blocks.append((rows, types))
    assert pos == len(body)  # not one byte short or over
    return blocks


@pytest.mark.parametrize("name", sorted(COLUMNS))
@pytest.mark.parametrize("rows", [0, 1, 7, 300])
def test_the_walker_steps_over_exactly_each_types_data(engine: Any, name: str, rows: int) -> None:
    sql = select(rows, 64, {name: COLUMNS[name], "after": "toUInt16(number)"})
    blocks = walk(native(engine, sql))
    assert sum(r for r, _ in blocks) == rows
    assert len(blocks) == max(1, -(-rows // 64)) or rows == 0


def test_many_types_in_many_blocks_are_rewritten_for_a_revision(engine: Any) -> None:
    sql = select(1000, 128)
    body = native(engine, sql)
    types = described(engine, sql)
    plain = walk(body)
    assert len(plain) == 8
    out = NativeRevision(54405, types).blocks(body)
    # Every block now starts with the block info, and the types are the full ones.
    assert out.startswith(BLOCK_INFO)
    assert out.count(BLOCK_INFO) >= len(plain)
    assert b"DateTime('America/Chicago')" in out
    assert b"DateTime64(3, 'Asia/Tokyo')" in out
    assert b"Array(DateTime('UTC'))" in out
    assert b"DateTime64(6, 'Europe/Berlin')" in out
    assert out.count(b"DateTime('America/Chicago')") == len(plain)
    # The streaming path's chunks (one block each) give the same bytes.
    revision = NativeRevision(54405, types)
    stream = engine.send_query(sql, "Native")
    chunks = []
    while (result := stream.fetch()) is not None:
        chunks.append(revision.block(result.bytes()))
    assert b"".join(chunks) == out
    # A client of revision 0 gets chDB's bytes; a revision before time zones, only the info.
    assert not NativeRevision(0, types).changes_anything
    older = NativeRevision(54000, types).blocks(body)
    assert older.startswith(BLOCK_INFO) and b"America/Chicago" not in older


def test_an_unsized_type_before_a_renamed_column_is_refused_else_passed_through(
    engine: Any,
) -> None:
    before = "SELECT 1::Dynamic AS dyn, toDateTime(0, 'UTC') AS t"
    with pytest.raises(NotSizable) as err:
        NativeRevision(54405, described(engine, before)).block(native(engine, before))
    assert err.value.type_name == "Dynamic"
    after = "SELECT toDateTime(0, 'UTC') AS t, 1::Dynamic AS dyn"
    out = NativeRevision(54405, described(engine, after)).block(native(engine, after))
    assert out.startswith(BLOCK_INFO) and b"DateTime('UTC')" in out
    assert out.endswith(native(engine, after)[-20:])


@pytest.mark.parametrize(
    "full, stripped",
    [
        ("DateTime('UTC')", "DateTime"),
        ("DateTime64(3, 'Asia/Tokyo')", "DateTime64(3)"),
        ("Array(Nullable(DateTime('Europe/Berlin')))", "Array(Nullable(DateTime))"),
        ("Tuple(a DateTime64(6, 'UTC'), b String)", "Tuple(a DateTime64(6), b String)"),
        ("DateTime", "DateTime"),
        ("String", "String"),
    ],
)
def test_strip_time_zones_is_what_chdb_writes(engine: Any, full: str, stripped: str) -> None:
    assert strip_time_zones(full) == stripped
