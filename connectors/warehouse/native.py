"""ClickHouse's Native format for a client that sends ``client_protocol_version``.

chDB writes Native output as a server does for a client of revision 0: no block info before
each block, and ``DateTime('tz')`` / ``DateTime64(p, 'tz')`` type names without their time
zone. A client that announced a revision (clickhouse-connect sends 54405) reads 8 bytes of
block info before every block, and takes a column's time zone from its type name: without it,
clickhouse-connect returns naive datetimes, shifted. :class:`NativeRevision` rewrites chDB's
blocks into what a server sends that client:

- the block info (``is_overflows`` 0, ``bucket_num`` -1) before every block, for a revision of
  at least 51903 (``DBMS_MIN_REVISION_WITH_BLOCK_INFO``);
- each column's full type name (from ``DESCRIBE`` of the query, run before it) where chDB's
  differs from it only by its time zones, for a revision of at least 54337
  (``DBMS_MIN_REVISION_WITH_TIME_ZONE_PARAMETER_IN_DATETIME_DATA_TYPE``).

Rewriting a type name in the middle of a block means stepping over the columns before it:
their data is sized from their types (numbers, strings, dates, decimals, UUIDs, IPs, enums,
``FixedString``, ``Nullable``, ``Array``, ``Tuple``, ``Map``, ``LowCardinality``, the geo
types). ``Variant``, ``Dynamic``, ``JSON`` and aggregate states are not sized: a block where
such a column comes before one whose name must change is refused with ``NOT_IMPLEMENTED``
naming the type (a client can leave its protocol version out, or use another format).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from typing import Final

import orjson

from connectors.warehouse.sql import without_format

__all__ = [
    "BLOCK_INFO",
    "describe_sql",
    "describe_types",
    "MIN_REVISION_BLOCK_INFO",
    "MIN_REVISION_TIME_ZONE",
    "NativeRevision",
    "NotSizable",
    "skip_column",
    "strip_time_zones",
]

MIN_REVISION_BLOCK_INFO: Final = 51903
MIN_REVISION_TIME_ZONE: Final = 54337
#: Field 1 ``is_overflows`` = 0, field 2 ``bucket_num`` = -1, field 0: the end.
BLOCK_INFO: Final = b"\x01\x00\x02\xff\xff\xff\xff\x00"

_FIXED: Final = {
    "UInt8": 1,
    "Int8": 1,
    "Bool": 1,
    "Nothing": 1,
    "Enum8": 1,
    "UInt16": 2,
    "Int16": 2,
    "Date": 2,
    "BFloat16": 2,
    "Enum16": 2,
    "UInt32": 4,
    "Int32": 4,
    "Float32": 4,
    "Date32": 4,
    "DateTime": 4,
    "IPv4": 4,
    "Decimal32": 4,
    "Time": 4,
    "UInt64": 8,
    "Int64": 8,
    "Float64": 8,
    "DateTime64": 8,
    "Decimal64": 8,
    "Time64": 8,
    "UInt128": 16,
    "Int128": 16,
    "UUID": 16,
    "IPv6": 16,
    "Decimal128": 16,
    "UInt256": 32,
    "Int256": 32,
    "Decimal256": 32,
}
#: The geo types are names for nested columns.
_ALIASES: Final = {
    "Point": "Tuple(Float64, Float64)",
    "Ring": "Array(Point)",
    "LineString": "Array(Point)",
    "MultiLineString": "Array(LineString)",
    "Polygon": "Array(Ring)",
    "MultiPolygon": "Array(Polygon)",
}
_INDEX_WIDTH: Final = (1, 2, 4, 8)
_HAS_ADDITIONAL_KEYS: Final = 1 << 9
_U64: Final = struct.Struct("<Q")
_DATETIME_TZ_RE: Final = re.compile(r"DateTime\(\s*'(?:[^'\\]|\\.)*'\s*\)")
_DATETIME64_TZ_RE: Final = re.compile(r"DateTime64\(\s*(\d+)\s*,\s*'(?:[^'\\]|\\.)*'\s*\)")
_IDENT_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|`(?:[^`\\]|\\.)*`")


class NotSizable(ValueError):
    """A column type whose Native data this module does not step over."""

    def __init__(self, type_name: str) -> None:
        super().__init__(type_name)
        self.type_name = type_name


def describe_sql(sql: bytes) -> bytes:
    """The ``DESCRIBE`` that gives the full column types of query ``sql`` (its trailing
    ``FORMAT`` clause and ``;`` taken off), type names on one line as in Native."""
    return b"DESCRIBE (" + without_format(sql) + b"\n) SETTINGS print_pretty_type_names = 0"


def describe_types(rows: bytes) -> list[str]:
    """The types of a ``DESCRIBE`` answered in ``JSONEachRow``."""
    return [orjson.loads(line)["type"] for line in rows.splitlines() if line.strip()]


def strip_time_zones(type_name: str) -> str:
    """``type_name`` as chDB writes it to a client of revision 0: without time zones."""
    return _DATETIME64_TZ_RE.sub(r"DateTime64(\1)", _DATETIME_TZ_RE.sub("DateTime", type_name))


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _split_type(type_name: str) -> tuple[str, list[str]]:
    """``Name(arg, arg...)`` -> ``("Name", ["arg", ...])``, split at top-level commas."""
    open_at = type_name.find("(")
    if open_at < 0:
        return type_name.strip(), []
    name, inner = type_name[:open_at].strip(), type_name[open_at + 1 : type_name.rindex(")")]
    args, depth, start, quote = [], 0, 0, ""
    i = 0
    while i < len(inner):
        c = inner[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "'`":
            quote = c
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "," and depth == 0:
            args.append(inner[start:i].strip())
            start = i + 1
        i += 1
    args.append(inner[start:].strip())
    return name, args


def _element_type(arg: str) -> str:
    """A ``Tuple`` element: ``name Type`` or ``Type``."""
    match = _IDENT_RE.match(arg)
    if match is not None and match.end() < len(arg) and arg[match.end()] == " ":
        rest = arg[match.end() :].strip()
        if rest and (rest[0].isalpha() or rest[0] == "_"):
            return rest
    return arg


def skip_column(buf: bytes, pos: int, type_name: str, rows: int) -> int:
    """The position after the Native data of ``rows`` values of ``type_name`` at ``pos``.

    A column of no rows has no bytes at all. Otherwise the states of every
    ``LowCardinality`` inside the type (its keys' version, 8 bytes each) come first, before
    any of the data (ClickHouse's bulk state prefix: ``Array(LowCardinality(String))`` is the
    version, then the offsets, then the dictionary and indexes)."""
    if rows == 0:
        return pos
    return _skip_data(buf, pos + 8 * type_name.count("LowCardinality("), type_name, rows)


def _skip_data(buf: bytes, pos: int, type_name: str, rows: int) -> int:
    name, args = _split_type(type_name)
    if name in _ALIASES and not args:
        return _skip_data(buf, pos, _ALIASES[name], rows)
    width = _FIXED.get(name)
    if width is not None:
        return pos + width * rows
    if name == "Decimal":
        precision = int(args[0])
        return pos + rows * (
            4 if precision <= 9 else 8 if precision <= 18 else 16 if precision <= 38 else 32
        )
    if name.startswith("Interval"):
        return pos + 8 * rows
    if name == "FixedString":
        return pos + int(args[0]) * rows
    if name == "String":
        for _ in range(rows):
            length, pos = _varint(buf, pos)
            pos += length
        return pos
    if name == "Nested":  # (flatten_nested=0) an array of tuples
        return _skip_data(buf, pos, f"Array(Tuple({', '.join(args)}))", rows)
    if name == "Nullable":
        return _skip_data(buf, pos + rows, args[0], rows)
    if name in ("Array", "Map"):
        if rows == 0:
            return pos
        end = pos + 8 * rows
        total = int(_U64.unpack_from(buf, end - 8)[0])
        inner = args[0] if name == "Array" else f"Tuple({args[0]}, {args[1]})"
        return _skip_data(buf, end, inner, total)
    if name == "Tuple":
        for arg in args:
            pos = _skip_data(buf, pos, _element_type(arg), rows)
        return pos
    if name == "SimpleAggregateFunction":
        return _skip_data(buf, pos, args[-1], rows)
    if name == "LowCardinality":  # (its keys' version came with the prefix: skip_column)
        if rows == 0:
            return pos
        index_type = int(_U64.unpack_from(buf, pos)[0])
        pos += 8
        if index_type & _HAS_ADDITIONAL_KEYS:
            keys = int(_U64.unpack_from(buf, pos)[0])
            inner_name, inner_args = _split_type(args[0])
            key_type = inner_args[0] if inner_name == "Nullable" else args[0]
            pos = _skip_data(buf, pos + 8, key_type, keys)
        indexes = int(_U64.unpack_from(buf, pos)[0])
        return pos + 8 + indexes * _INDEX_WIDTH[index_type & 0xFF]
    raise NotSizable(type_name)


class NativeRevision:
    """Rewrites chDB's Native blocks for a client of ``revision`` (module docstring).

    ``types``: the result's full column types (``DESCRIBE``), or None when not known (the
    block info is added all the same). Call :meth:`block` on each chunk chDB's streaming
    fetch returns (one block each) or :meth:`blocks` on a whole result."""

    def __init__(self, revision: int, types: Sequence[str] | None) -> None:
        self.block_info = revision >= MIN_REVISION_BLOCK_INFO
        self.types = (
            list(types) if types is not None and revision >= MIN_REVISION_TIME_ZONE else None
        )

    @property
    def changes_anything(self) -> bool:
        return self.block_info or bool(self.types)

    def _renamed(self, column: int, written: str) -> str | None:
        if self.types is None or column >= len(self.types):
            return None
        full = self.types[column]
        if full != written and strip_time_zones(full) == written:
            return full
        return None

    def _one(self, buf: bytes, pos: int, last_in_buffer: bool) -> tuple[bytes, int]:
        """Rewrite the block at ``pos``; returns it and the position after it. With
        ``last_in_buffer`` the block ends where ``buf`` does (a streaming chunk)."""
        out = bytearray(BLOCK_INFO if self.block_info else b"")
        start = pos
        columns, pos = _varint(buf, pos)
        rows, pos = _varint(buf, pos)
        out += buf[start:pos]
        for column in range(columns):
            name_len, name_end = _varint(buf, pos)
            name_end += name_len
            type_len, type_at = _varint(buf, name_end)
            written = buf[type_at : type_at + type_len].decode()
            data_at = type_at + type_len
            out += buf[pos:name_end]
            renamed = self._renamed(column, written)
            if renamed is None:
                out += buf[name_end:data_at]
            else:
                encoded = renamed.encode()
                out += _leb128(len(encoded)) + encoded
            try:
                try:
                    pos = skip_column(buf, data_at, written, rows)
                except NotSizable:
                    raise
                except (IndexError, ValueError, struct.error) as exc:
                    # data that does not fit its type as understood here: never guess
                    raise NotSizable(written) from exc
                if pos > len(buf):
                    raise NotSizable(written)
            except NotSizable:
                if last_in_buffer and not self._any_renamed_after(column, columns):
                    out += buf[data_at:]
                    return bytes(out), len(buf)
                raise
            out += buf[data_at:pos]
        return bytes(out), pos

    def _any_renamed_after(self, column: int, columns: int) -> bool:
        """Whether a column after ``column`` may need its name changed (its type is known
        only from DESCRIBE here: the block's own names lie past an unsized column)."""
        if self.types is None:
            return False
        return any(strip_time_zones(t) != t for t in self.types[column + 1 : columns])

    def block(self, chunk: bytes) -> bytes:
        """One chunk of chDB's streaming fetch: one block (an unsized column with no name
        to change after it takes the rest of the chunk)."""
        return self._all(chunk, last_in_buffer=True)

    def blocks(self, body: bytes) -> bytes:
        """A whole result: any number of blocks, every column sized."""
        return self._all(body, last_in_buffer=False)

    def _all(self, buf: bytes, last_in_buffer: bool) -> bytes:
        out, pos = [], 0
        while pos < len(buf):
            data, pos = self._one(buf, pos, last_in_buffer)
            out.append(data)
        return b"".join(out)


def _leb128(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
