"""The embedded warehouse: one process owns a chDB data directory and speaks ClickHouse's HTTP.

chDB is the real ClickHouse engine in-process, but only one process can open a data
directory. So the project runs this small server as the single owner of the directory,
and everything else (stream processors, CLI, tests) talks to it with the stock
``clickhouse-connect`` client (sync or async) exactly as it would talk to a ClickHouse
server. Start it with::

    python -m connectors.warehouse --data-dir ./warehouse-data --port 8123

What it implements of the ClickHouse HTTP interface, and why:

* ``GET /ping`` and ``GET /`` without a query answer ``Ok.``.
* ``GET|POST /``: SQL is the ``query`` URL parameter, then a newline, then the body (the
  server's own rule), or the ``query`` field of a ``multipart/form-data`` body (the client
  switches to that when bound parameters are long).
* Request bodies: chunked transfer encoding (aiohttp), and ``Content-Encoding`` lz4, zstd,
  gzip, deflate. clickhouse-connect compresses every insert block as a separate lz4/zstd
  frame, so the decoder restarts after each frame; decoding only the first frame silently
  drops rows.
* ``INSERT ... FORMAT X`` followed by data is split into the statement and the data; the
  data is decoded and streamed through chDB's ``Session.send_insert(...).append().finish()``
  as it arrives (inline data in ``query()`` breaks on some byte patterns, and streaming
  keeps memory flat).
* ``param_x`` -> chDB query parameters; ``database`` -> ``USE``; other unknown parameters
  are ClickHouse settings, applied with ``SET`` for that request only. Transport-only
  parameters (``session_id``, ``query_id``, ``compress``...) are consumed here.
* Responses: the output format the SQL asks for is passed through untouched; ``X-ClickHouse-
  Summary/Format/Timezone/Query-Id/Server-Display-Name`` headers; the response is compressed
  when the client sends ``Accept-Encoding`` (clickhouse-connect does, with lz4/zstd/gzip/
  deflate). ``wait_end_of_query=1`` (what ``client.query()`` sends) buffers the result, so
  every error is an HTTP error; streaming requests (``query_*_stream``) stream blocks and
  report a late error in ClickHouse's tagged ``__exception__`` trailer.
* Errors are HTTP 500 with ``X-ClickHouse-Exception-Code`` and ClickHouse's own text
  (``Code: N. DB::Exception: ... (NAME)``). Never 429/503/504: the client retries those.

It is sessionless like ClickHouse's HTTP interface without ``session_id``: every request
starts from the default database and default settings (``SET``/``USE`` statements affect
only their own request). There is no authentication; it binds to loopback by default.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import socket
import sys
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NoReturn, Protocol, TypeVar, cast

import lz4.frame  # type: ignore[import-untyped]
import zstandard
from aiohttp import BodyPartReader, web

__all__ = ["DataDirInUseError", "Warehouse", "WarehouseError", "main", "run"]

logger = logging.getLogger("pingpost.warehouse")

T = TypeVar("T")


# The slice of chDB's (unannotated) Python API this module uses, typed at the boundary.
class _QueryResult(Protocol):
    def bytes(self) -> bytes: ...
    def rows_read(self) -> int: ...
    def bytes_read(self) -> int: ...
    def storage_rows_read(self) -> int: ...
    def storage_bytes_read(self) -> int: ...
    def rows_written(self) -> int: ...
    def bytes_written(self) -> int: ...
    def elapsed(self) -> float: ...


class _StreamingResult(Protocol):
    def fetch(self) -> _QueryResult | None: ...
    def cancel(self) -> None: ...


class _InsertResult(Protocol):
    rows_written: int
    bytes_written: int
    elapsed: float


class _StreamingInserter(Protocol):
    def append(self, data: bytes) -> None: ...
    def finish(self) -> _InsertResult: ...
    def cancel(self) -> None: ...


class _Session(Protocol):
    def query(
        self, sql: str | bytes, fmt: str = ..., udf_path: str = ..., params: dict[str, str] | None = ...
    ) -> _QueryResult: ...
    def send_query(
        self, sql: str | bytes, fmt: str = ..., params: dict[str, str] | None = ...
    ) -> _StreamingResult: ...
    def send_insert(self, query: str, fmt: str = ...) -> _StreamingInserter: ...
    def close(self) -> None: ...


DEFAULT_DATABASE: Final = "default"
DEFAULT_FORMAT: Final = "TabSeparated"
LOCK_FILE_NAME: Final = "warehouse.lock"
EXIT_DATA_DIR_IN_USE: Final = 3

# Request parameters that steer the HTTP exchange, not the engine. chDB rejects most of them
# as unknown settings, and the HTTP-only ones it knows are meaningless without ClickHouse's
# HTTP server. ``user``/``password`` are ignored: there is no authentication.
_TRANSPORT_PARAMS: Final = frozenset(
    {
        "query",
        "database",
        "default_format",
        "query_id",
        "session_id",
        "session_timeout",
        "session_check",
        "close_session",
        "wait_end_of_query",
        "client_protocol_version",
        "compress",
        "decompress",
        "user",
        "password",
        "quota_key",
        "role",
        "buffer_size",
        "stacktrace",
        "send_progress_in_http_headers",
        "http_headers_progress_interval_ms",
        "enable_http_compression",
        "cancel_http_readonly_queries_on_client_close",
        "http_wait_end_of_query",
        "http_response_buffer_size",
        "add_http_cors_header",
    }
)

# chDB's send_query yields every block as a self-contained document in the requested format;
# concatenated blocks are a valid response only for formats without a header or footer.
_STREAMABLE_FORMATS: Final = frozenset(
    {
        "native",
        "tabseparated",
        "tsv",
        "tabseparatedraw",
        "tsvraw",
        "csv",
        "rowbinary",
        "jsoneachrow",
        "jsoncompacteachrow",
    }
)

# Leading keywords of statements that produce a result set. ClickHouse sends
# X-ClickHouse-Format only for those, and clickhouse-connect's command() relies on it to
# tell "empty result" from "statement without result".
_RESULT_KEYWORDS: Final = frozenset(
    {"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN", "CHECK", "KILL", "("}
)
_STREAM_KEYWORDS: Final = frozenset({"SELECT", "WITH", "("})

_SETTING_NAME_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TRAILING_FORMAT_RE: Final = re.compile(rb"\bFORMAT\s+([A-Za-z0-9_]+)\s*;?\s*$", re.IGNORECASE)
_CODE_RE: Final = re.compile(r"^Code: (\d+)\.")
_STATUS_PID_RE: Final = re.compile(rb"PID:\s*(\d+)")

# Sizes. A non-INSERT request is SQL text and is buffered whole; inserts stream.
_MAX_QUERY_BYTES: Final = 64 * 1024 * 1024
_MAX_STATEMENT_BYTES: Final = 256 * 1024  # ClickHouse's max_query_size: where data must start
_INSERT_BATCH_BYTES: Final = 1024 * 1024  # compressed bytes handed to a worker at a time
_STREAM_PREFETCH_BYTES: Final = 1024 * 1024  # results up to this size get Content-Length
_INLINE_ENCODE_BYTES: Final = 64 * 1024  # compress smaller bodies on the event loop

# ClickHouse error codes used for errors raised by the server itself.
_STD_EXCEPTION: Final = (1001, "STD_EXCEPTION")
_BAD_ARGUMENTS: Final = (36, "BAD_ARGUMENTS")
_NOT_IMPLEMENTED: Final = (48, "NOT_IMPLEMENTED")
_CANNOT_DECOMPRESS: Final = (271, "CANNOT_DECOMPRESS")
_NETWORK_ERROR: Final = (210, "NETWORK_ERROR")


class WarehouseError(RuntimeError):
    """The warehouse could not start or run."""


class DataDirInUseError(WarehouseError):
    """Another process already owns the data directory."""

    def __init__(self, data_dir: Path, pid: int | None, holder: str = "another warehouse process") -> None:
        self.data_dir = data_dir
        self.pid = pid
        who = f"{holder} (pid {pid})" if pid is not None else f"{holder} (pid unknown)"
        super().__init__(f"data directory {data_dir} is already in use by {who}")


class _ClickHouseError(Exception):
    """An error to report to the client the way ClickHouse does."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text

    @classmethod
    def server(cls, kind: tuple[int, str], message: str) -> _ClickHouseError:
        code, name = kind
        return cls(code, f"Code: {code}. DB::Exception: {message}. ({name})")

    @classmethod
    def from_engine(cls, exc: BaseException) -> _ClickHouseError:
        """Keep ClickHouse's text from a chDB exception, minus chDB's wrapper prefixes."""
        message = str(exc)
        start = message.find("Code: ")
        if start >= 0:
            message = message[start:].strip()
            match = _CODE_RE.match(message)
            if match:
                return cls(int(match.group(1)), message)
        return cls.server(_STD_EXCEPTION, message or type(exc).__name__)


# --------------------------------------------------------------------------- data dir lock


class _DataDirLock:
    """An exclusive ``flock`` on ``DIR/warehouse.lock`` holding the owner's pid.

    Taken before chDB opens the directory, so a second warehouse fails with a plain
    message instead of chDB's "Error initializing EmbeddedServer". The kernel drops the
    lock when the process dies, kill -9 included, so there is never a stale lock to clean.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / LOCK_FILE_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)  # owner only: the warehouse is every event pingpost saw
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = self._holder_pid(fd)
            os.close(fd)
            raise DataDirInUseError(self.data_dir, pid) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    @staticmethod
    def _holder_pid(fd: int) -> int | None:
        # The holder writes its pid right after locking; give it a moment if we raced it.
        deadline = time.monotonic() + 0.5
        while True:
            raw = os.pread(fd, 32, 0).strip()
            if raw.isdigit():
                return int(raw)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    def release(self) -> None:
        # The file stays: unlinking a lock file races with a process that just opened it.
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _chdb_holder_pid(data_dir: Path) -> int | None:
    """The pid in ClickHouse's ``status`` file, written by whichever process opened the dir."""
    try:
        match = _STATUS_PID_RE.search((data_dir / "status").read_bytes())
    except OSError:
        return None
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------- SQL scanning


class _NeedMore(Exception):
    """The buffered SQL ends inside a token: read more of the body before deciding."""


_WORD, _STRING, _OPEN, _CLOSE, _OTHER = range(5)
_SPACE: Final = frozenset(b" \t\n\r\f\v")
_WORD_BYTES: Final = frozenset(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_$"
) | frozenset(range(0x80, 0x100))


@dataclass(frozen=True, slots=True)
class _Token:
    kind: int
    start: int
    end: int


def _tokens(buf: bytes | bytearray, final: bool) -> Iterator[_Token]:
    """ClickHouse SQL tokens of ``buf`` without whitespace and comments.

    Just enough lexing to find statement keywords at parenthesis depth 0 without being
    fooled by strings, quoted identifiers or comments. Raises ``_NeedMore`` when a token
    may continue past the end of ``buf`` and more input can follow (``final`` false).
    """
    n = len(buf)
    i = 0
    while i < n:
        c = buf[i]
        if c in _SPACE:
            i += 1
        elif buf.startswith(b"--", i):
            j = buf.find(b"\n", i)
            if j < 0:
                if final:
                    return
                raise _NeedMore
            i = j + 1
        elif buf.startswith(b"/*", i):
            j = buf.find(b"*/", i + 2)
            if j < 0:
                if final:
                    return
                raise _NeedMore
            i = j + 2
        elif c in b"'\"`":
            j = i + 1
            while True:
                if j >= n:
                    if final:
                        yield _Token(_STRING, i, n)
                        return
                    raise _NeedMore
                if buf[j] == 0x5C:  # backslash escapes the next byte
                    j += 2
                elif buf[j] == c:
                    if j + 1 < n and buf[j + 1] == c:  # doubled quote
                        j += 2
                    elif j + 1 >= n and not final:
                        raise _NeedMore  # can't tell a closing quote from a doubled one yet
                    else:
                        j += 1
                        break
                else:
                    j += 1
            yield _Token(_STRING, i, j)
            i = j
        elif c in _WORD_BYTES:
            j = i + 1
            while j < n and buf[j] in _WORD_BYTES:
                j += 1
            if j == n and not final:
                raise _NeedMore
            yield _Token(_WORD, i, j)
            i = j
        else:
            if c in b"-/" and i + 1 == n and not final:
                raise _NeedMore  # could be the start of a comment
            kind = _OPEN if c in b"([" else _CLOSE if c in b")]" else _OTHER
            yield _Token(kind, i, i + 1)
            i += 1


@dataclass(frozen=True, slots=True)
class _InsertSplit:
    """``INSERT ... FORMAT <fmt>`` then data from ``data_start``."""

    statement: str
    fmt: str
    data_start: int


_PLAIN: Final = object()  # not an INSERT with inline data: run the whole text as one query


def _classify(buf: bytes | bytearray, final: bool) -> _InsertSplit | object | None:
    """Decide how to run the request text buffered so far; ``None`` means read more."""
    try:
        tokens = _tokens(buf, final)
        first = next(tokens, None)
        if first is None:
            return _PLAIN if final else None
        if first.kind != _WORD or bytes(buf[first.start : first.end]).upper() != b"INSERT":
            return _PLAIN
        depth = 0
        prev = first
        for tok in tokens:
            if tok.kind == _OPEN:
                depth += 1
            elif tok.kind == _CLOSE:
                depth = max(0, depth - 1)
            elif tok.kind == _WORD and depth == 0:
                word = bytes(buf[tok.start : tok.end]).upper()
                if word in (b"VALUES", b"SELECT", b"WITH", b"FROM"):
                    # VALUES data, INSERT SELECT, FROM INFILE: chDB parses these itself.
                    return _PLAIN
                prev_word = bytes(buf[prev.start : prev.end]).upper()
                # ``FORMAT`` right after INTO/TABLE or a dot is a table named "format".
                if word == b"FORMAT" and prev_word not in (b"INTO", b"TABLE", b"."):
                    name = next(tokens, None)
                    if name is None or name.kind != _WORD:
                        return _PLAIN if final or name is not None else None
                    statement = bytes(buf[: tok.start]).decode("utf-8", errors="replace").strip()
                    fmt = bytes(buf[name.start : name.end]).decode("ascii", errors="replace")
                    return _InsertSplit(statement, fmt, _data_start(buf, name.end, final))
            prev = tok
        return _PLAIN if final else None
    except _NeedMore:
        return None


def _data_start(buf: bytes | bytearray, i: int, final: bool) -> int:
    """Where inline data starts after the format name: ClickHouse's own rule.

    Skip spaces and tabs, then one line break. Binary data (a Native block of 9 columns
    starts with a tab byte) is safe because clients put a newline right after the name.
    """
    n = len(buf)
    while i < n and buf[i] in b" \t\f":
        i += 1
    if i < n and buf[i] == 0x0D:
        i += 1
    if i >= n and not final:
        raise _NeedMore
    if i < n and buf[i] == 0x0A:
        i += 1
    return i


def _leading_keyword(sql: bytes | bytearray) -> str:
    try:
        first = next(_tokens(sql, final=True), None)
    except _NeedMore:  # pragma: no cover - final=True never asks for more
        return ""
    if first is None:
        return ""
    return bytes(sql[first.start : first.end]).decode("ascii", errors="replace").upper()


def _output_format(sql: bytes | bytearray, default_format: str) -> str:
    tail = bytes(sql[-256:])
    match = _TRAILING_FORMAT_RE.search(tail)
    return match.group(1).decode() if match else default_format


def _quote_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def _quote_string(value: str) -> str:
    # Quoted literals are coerced to the setting's type, so numbers and words both work.
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# --------------------------------------------------------------------------- compression


class _BodyDecoder:
    """Incremental decoder for a request body of concatenated lz4/zstd/gzip/deflate frames."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._active: Any = None
        if encoding not in ("lz4", "zstd", "gzip", "x-gzip", "deflate"):
            raise _ClickHouseError.server(_NOT_IMPLEMENTED, f"Unsupported Content-Encoding: {encoding!r}")

    def _new_frame(self, first: bytes) -> Any:
        if self.encoding == "lz4":
            return lz4.frame.LZ4FrameDecompressor()
        if self.encoding == "zstd":
            return zstandard.ZstdDecompressor().decompressobj()
        if self.encoding in ("gzip", "x-gzip"):
            return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        # HTTP "deflate" is zlib-wrapped (RFC 9110), but some clients send raw deflate.
        zlib_header = len(first) >= 2 and first[0] & 0x0F == 8 and (first[0] << 8 | first[1]) % 31 == 0
        return zlib.decompressobj(wbits=zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS)

    def decompress(self, data: bytes) -> bytes:
        out: list[bytes] = []
        try:
            while data:
                if self._active is None:
                    self._active = self._new_frame(data)
                out.append(self._active.decompress(data))
                if self._active.eof:
                    # One frame per block: the next frame starts in the leftover bytes.
                    data = self._active.unused_data
                    self._active = None
                else:
                    data = b""
        except _ClickHouseError:
            raise
        except Exception as exc:
            raise _ClickHouseError.server(
                _CANNOT_DECOMPRESS, f"Cannot decode {self.encoding} request body: {exc}"
            ) from exc
        return b"".join(out)

    def finish(self) -> None:
        if self._active is not None:  # a frame started but never ended
            raise _ClickHouseError.server(_CANNOT_DECOMPRESS, f"Truncated {self.encoding} request body")


class _IdentityDecoder:
    def decompress(self, data: bytes) -> bytes:
        return data

    def finish(self) -> None:
        return None


_RESPONSE_ENCODINGS: Final = ("lz4", "zstd", "gzip", "deflate")


class _ResponseEncoder:
    """One compressed stream (a single frame) across all chunks of a response.

    clickhouse-connect's sync client feeds the whole response to one decompressor, so the
    response must be one lz4/zstd frame or gzip member, flushed per chunk when streaming.
    """

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._started = False
        self._lz4: Any = None
        self._zstd: Any = None
        self._zlib: Any = None
        if encoding == "lz4":
            self._lz4 = lz4.frame.LZ4FrameCompressor()
        elif encoding == "zstd":
            # Level 1: on loopback the CPU spent compressing is the cost that matters.
            self._zstd = zstandard.ZstdCompressor(level=1).compressobj()
        elif encoding == "gzip":
            self._zlib = zlib.compressobj(3, wbits=16 + zlib.MAX_WBITS)
        else:
            self._zlib = zlib.compressobj(3, wbits=zlib.MAX_WBITS)

    def compress(self, data: bytes, flush: bool = True) -> bytes:
        """Compress one chunk; ``flush`` makes it decodable now (a streamed response)."""
        out: bytes
        if self._lz4 is not None:
            out = self._lz4_begin() + self._lz4.compress(data)
        elif self._zstd is not None:
            out = self._zstd.compress(data)
            if flush:
                out += self._zstd.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        else:
            out = self._zlib.compress(data)
            if flush:
                out += self._zlib.flush(zlib.Z_SYNC_FLUSH)
        return out

    def finish(self) -> bytes:
        out: bytes
        if self._lz4 is not None:
            out = self._lz4_begin() + self._lz4.flush()
        elif self._zstd is not None:
            out = self._zstd.flush()
        else:
            out = self._zlib.flush()
        return out

    def _lz4_begin(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        head: bytes = self._lz4.begin()
        return head

    def whole(self, data: bytes) -> bytes:
        return self.compress(data, flush=False) + self.finish()


def _choose_encoding(accept_encoding: str) -> str | None:
    """First supported coding in the client's Accept-Encoding, in the client's order.

    clickhouse-connect lists its codings by preference (lz4 first), which is also the
    cheapest choice on loopback. ``q=0`` excludes a coding.
    """
    for item in accept_encoding.split(","):
        name, *params = item.split(";")
        name = name.strip().lower()
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if quality <= 0:
            continue
        if name == "x-gzip":
            name = "gzip"
        if name in _RESPONSE_ENCODINGS:
            return name
    return None


# --------------------------------------------------------------------------- session pool


@dataclass(eq=False)
class _Slot:
    """One chDB Session plus what this server last did to its state."""

    session: _Session | None
    database: str | None = DEFAULT_DATABASE  # None: unknown (a USE statement ran)
    settings: dict[str, str] = field(default_factory=dict)  # non-default settings in force
    dirty: bool = False  # state unknown (a SET statement ran, a reset failed): reopen


@dataclass(frozen=True, slots=True)
class _QueryOutput:
    body: bytes
    summary: dict[str, str]


@dataclass(frozen=True, slots=True)
class _RequestState:
    database: str
    settings: dict[str, str]


class _SessionPool:
    """Sessions on the one data directory, each used by one request at a time.

    A chDB Session runs one query at a time and keeps USE/SET state, so a request leases a
    whole Session. Blocking chDB calls run in a thread pool sized like the session pool
    (chDB releases the GIL while it works, so queries on different sessions run in parallel).
    """

    def __init__(self, data_dir: Path, size: int) -> None:
        self.data_dir = data_dir
        self.size = size
        self.executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="warehouse-chdb")
        self.slots: list[_Slot] = []
        self.version = ""
        self.timezone = "UTC"
        self.default_settings: dict[str, str] = {}
        self._free: asyncio.Queue[_Slot] = asyncio.Queue()
        self._releasing: set[asyncio.Task[None]] = set()

    # -- blocking, run in the executor

    def _open_session(self) -> _Session:
        from chdb.session import Session as ChdbSession  # late: loading the engine takes a while

        try:
            return cast(_Session, ChdbSession(str(self.data_dir)))  # type: ignore[no-untyped-call]
        except Exception as exc:
            if "EmbeddedServer" in str(exc) or "Cannot lock file" in str(exc):
                # chDB's message is empty; the real reason (lock held) only goes to stderr.
                raise DataDirInUseError(
                    self.data_dir, _chdb_holder_pid(self.data_dir), "another process using chDB"
                ) from None
            raise WarehouseError(f"cannot open chDB data directory {self.data_dir}: {exc}") from exc

    def open_blocking(self) -> None:
        for _ in range(self.size):
            self.slots.append(_Slot(self._open_session()))
        first = self.slots[0].session
        assert first is not None
        version, tz = (
            first.query("SELECT version(), timezone()", "TabSeparated")
            .bytes()
            .decode()
            .rstrip("\n")
            .split("\t")
        )
        self.version, self.timezone = version, tz
        rows = first.query("SELECT name, value FROM system.settings", "TabSeparated").bytes().decode()
        for line in rows.splitlines():
            name, _, value = line.partition("\t")
            self.default_settings[name] = value

    def close_blocking(self) -> None:
        for slot in self.slots:
            if slot.session is not None:
                with contextlib.suppress(Exception):
                    slot.session.close()
                slot.session = None
        self.slots.clear()

    def _reopen(self, slot: _Slot) -> _Session:
        if slot.session is not None:
            with contextlib.suppress(Exception):
                slot.session.close()
            slot.session = None
        slot.session = self._open_session()
        slot.database, slot.settings, slot.dirty = DEFAULT_DATABASE, {}, False
        return slot.session

    def prepare(self, slot: _Slot, state: _RequestState) -> _Session:
        """Bring a leased session to the request's database and settings, defaults elsewhere.

        Settings are diffed against what the session already has, so a client that sends
        the same settings on every request (clickhouse-connect does) costs no extra calls.
        """
        wanted = {k: v for k, v in state.settings.items() if self.default_settings.get(k) != v}
        session = self._reopen(slot) if slot.dirty or slot.session is None else slot.session
        stale = [k for k in slot.settings if k not in wanted]
        if stale:
            try:
                session.query("SET " + ", ".join(f"{k} = DEFAULT" for k in stale), "TabSeparated")
                for k in stale:
                    del slot.settings[k]
            except Exception:
                # e.g. readonly=2 (every GET) forbids resetting readonly: start afresh.
                session = self._reopen(slot)
        try:
            changes = {k: v for k, v in wanted.items() if slot.settings.get(k) != v}
            if changes:
                session.query(
                    "SET " + ", ".join(f"{k} = {_quote_string(v)}" for k, v in changes.items()),
                    "TabSeparated",
                )
                slot.settings.update(changes)
            if slot.database != state.database:
                session.query(f"USE {_quote_identifier(state.database)}", "TabSeparated")
                slot.database = state.database
        except Exception as exc:
            slot.dirty = True  # a partly applied SET or USE: reopen before the next request
            raise _ClickHouseError.from_engine(exc) from exc
        return session

    @staticmethod
    def after_statement(slot: _Slot, keyword: str) -> None:
        if keyword == "SET":
            slot.dirty = True  # names are hard to parse back out; a fresh session is cheap
        elif keyword == "USE":
            slot.database = None

    # -- async leasing

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.executor, self.open_blocking)
        except BaseException:
            await loop.run_in_executor(self.executor, self.close_blocking)
            raise
        for slot in self.slots:
            self._free.put_nowait(slot)

    async def acquire(self) -> _Lease:
        return _Lease(self, await self._free.get())

    def _give_back(
        self, slot: _Slot, inflight: Future[Any] | None, cleanup: Callable[[], None] | None
    ) -> None:
        if cleanup is None and (inflight is None or inflight.done()):
            self._free.put_nowait(slot)
            return

        async def finish() -> None:
            # A cancelled request may leave a chDB call running in its thread (cancelling
            # the awaiting task does not stop it): the session is only free once that call
            # returned and the request's cleanup (cancel an insert or a stream) ran.
            try:
                if inflight is not None and not inflight.done():
                    await asyncio.wait([asyncio.wrap_future(inflight)])
                if cleanup is not None:
                    try:
                        await asyncio.get_running_loop().run_in_executor(self.executor, cleanup)
                    except Exception:
                        logger.debug("session cleanup failed; reopening it", exc_info=True)
                        slot.dirty = True
            finally:
                self._free.put_nowait(slot)

        task = asyncio.get_running_loop().create_task(finish())
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def close(self) -> None:
        if self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(self.executor, self.close_blocking)
        self.executor.shutdown(wait=True)


class _Lease:
    """Exclusive use of one pooled session for the duration of one request."""

    def __init__(self, pool: _SessionPool, slot: _Slot) -> None:
        self.pool = pool
        self.slot = slot
        self._inflight: Future[Any] | None = None
        self._cleanup: Callable[[], None] | None = None
        self._released = False

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        # Keep the thread's own future: an asyncio wrapper reads "done" once cancelled
        # even though the chDB call is still running.
        self._inflight = self.pool.executor.submit(fn, *args)
        return await asyncio.wrap_future(self._inflight)

    def on_release(self, cleanup: Callable[[], None] | None) -> None:
        self._cleanup = cleanup

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.pool._give_back(self.slot, self._inflight, self._cleanup)


# --------------------------------------------------------------------------- engine calls
# Everything below runs in a worker thread with the session leased.


def _summary(
    *,
    read_rows: int = 0,
    read_bytes: int = 0,
    written_rows: int = 0,
    written_bytes: int = 0,
    result_rows: int = 0,
    result_bytes: int = 0,
    elapsed: float = 0.0,
) -> dict[str, str]:
    # ClickHouse sends every counter as a string.
    return {
        "read_rows": str(read_rows),
        "read_bytes": str(read_bytes),
        "written_rows": str(written_rows),
        "written_bytes": str(written_bytes),
        "total_rows_to_read": str(read_rows),
        "result_rows": str(result_rows),
        "result_bytes": str(result_bytes),
        "elapsed_ns": str(int(elapsed * 1e9)),
    }


def _result_summary(result: Any) -> dict[str, str]:
    return _summary(
        read_rows=result.storage_rows_read(),
        read_bytes=result.storage_bytes_read(),
        written_rows=result.rows_written(),
        written_bytes=result.bytes_written(),
        result_rows=result.rows_read(),
        result_bytes=result.bytes_read(),
        elapsed=result.elapsed(),
    )


def _run_query(
    pool: _SessionPool,
    slot: _Slot,
    state: _RequestState,
    sql: bytes,
    fmt: str,
    params: dict[str, str],
    keyword: str,
) -> _QueryOutput:
    session = pool.prepare(slot, state)
    try:
        result = session.query(sql, fmt, params=params)
    except Exception as exc:
        raise _ClickHouseError.from_engine(exc) from exc
    finally:
        pool.after_statement(slot, keyword)
    return _QueryOutput(result.bytes(), _result_summary(result))


def _start_stream(
    pool: _SessionPool, slot: _Slot, state: _RequestState, sql: bytes, fmt: str, params: dict[str, str]
) -> _StreamingResult:
    session = pool.prepare(slot, state)
    try:
        return session.send_query(sql, fmt, params=params)
    except Exception as exc:
        raise _ClickHouseError.from_engine(exc) from exc


def _fetch(stream: _StreamingResult, encoder: _ResponseEncoder | None) -> tuple[bytes, int, int] | None:
    """Next block as (bytes ready to send, rows, storage rows read); None at the end."""
    try:
        result = stream.fetch()
    except Exception as exc:
        raise _ClickHouseError.from_engine(exc) from exc
    if result is None:
        return None
    body = result.bytes()
    if encoder is not None:
        body = encoder.compress(body)
    return body, result.rows_read(), result.storage_rows_read()


def _cancel_stream(stream: _StreamingResult) -> None:
    stream.cancel()


def _start_insert(
    pool: _SessionPool, slot: _Slot, state: _RequestState, statement: str, fmt: str
) -> _StreamingInserter:
    session = pool.prepare(slot, state)
    try:
        return session.send_insert(statement, fmt)
    except Exception as exc:
        raise _ClickHouseError.from_engine(exc) from exc


def _feed_insert(
    inserter: _StreamingInserter,
    decoder: _BodyDecoder | _IdentityDecoder,
    decoded: bytes,
    raw: list[bytes],
    last: bool,
) -> dict[str, str] | None:
    """Decode ``raw`` body chunks and append them; on ``last`` also commit the insert."""
    data = decoded + b"".join(decoder.decompress(chunk) for chunk in raw)
    if last:
        decoder.finish()
    try:
        if data:
            inserter.append(data)
        if not last:
            return None
        result = inserter.finish()
    except Exception as exc:
        raise _ClickHouseError.from_engine(exc) from exc
    return _summary(
        written_rows=result.rows_written,
        written_bytes=result.bytes_written,
        result_rows=result.rows_written,
        result_bytes=result.bytes_written,
        elapsed=result.elapsed,
    )


def _cancel_insert(inserter: _StreamingInserter) -> None:
    inserter.cancel()  # no-op once finished


# --------------------------------------------------------------------------- HTTP


_PING_BODY: Final = b"Ok.\n"


@dataclass(slots=True)
class _ParsedRequest:
    query_id: str
    state: _RequestState
    bind: dict[str, str]
    default_format: str
    wait_end_of_query: bool
    encoding: str | None
    prefix: bytes
    body: AsyncIterator[bytes] | None
    decoder: _BodyDecoder | _IdentityDecoder


async def _no_body() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover - makes this an async generator


def _content_type(fmt: str) -> str:
    lower = fmt.lower()
    if lower.startswith("json") or lower.startswith("ndjson"):
        return "application/json; charset=UTF-8"
    if lower.startswith(
        (
            "tabseparated",
            "tsv",
            "csv",
            "pretty",
            "vertical",
            "markdown",
            "values",
            "xml",
            "template",
            "custom",
        )
    ):
        return "text/plain; charset=UTF-8"
    return "application/octet-stream"


def _exception_trailer(error: _ClickHouseError, tag: str) -> bytes:
    """ClickHouse's (v25.11+) marker for an error after the response has started."""
    message = error.text.encode()
    return (
        b"__exception__\r\n"
        + tag.encode()
        + b"\r\n"
        + message
        + b"\n"
        + str(len(message)).encode()
        + b" "
        + tag.encode()
        + b"\r\n__exception__\r\n"
    )


class Warehouse:
    """A ClickHouse-HTTP-compatible server over one chDB data directory.

    ``await start()`` takes the directory lock, opens ``pool_size`` chDB sessions and starts
    listening; ``await stop()`` stops accepting, lets in-flight requests finish (up to
    ``shutdown_timeout`` seconds), closes the sessions and releases the lock.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        host: str = "127.0.0.1",
        port: int = 8123,
        pool_size: int = 4,
        *,
        shutdown_timeout: float = 30.0,
    ) -> None:
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self.port = port
        self.pool_size = pool_size
        self.shutdown_timeout = shutdown_timeout
        self.display_name = socket.gethostname()
        self._lock = _DataDirLock(self.data_dir)
        self._pool: _SessionPool | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def __aenter__(self) -> Warehouse:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self._lock.acquire()  # before chDB touches the directory
        try:
            self._pool = _SessionPool(self.data_dir, self.pool_size)
            await self._pool.open()
            app = web.Application(client_max_size=_MAX_QUERY_BYTES)
            app.router.add_get("/ping", self._handle_ping)
            app.router.add_route("*", "/", self._handle_root)
            # No access log: it would cost more than a SELECT 1. Request lines may carry
            # settings and bound parameters, so allow up to ClickHouse's 1 MiB URI limit.
            # aiohttp turns Nagle off on every accepted socket (BaseProtocol.connection_made).
            # auto_decompress off: we decode lz4/zstd too and must see every frame ourselves.
            self._runner = web.AppRunner(
                app,
                access_log=None,
                handle_signals=False,
                shutdown_timeout=self.shutdown_timeout,
                auto_decompress=False,
                max_line_size=1024 * 1024,
                max_field_size=64 * 1024,
            )
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
            try:
                await site.start()
            except OSError as exc:
                raise WarehouseError(
                    f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}"
                ) from exc
            self.port = self._runner.addresses[0][1]  # the real one when port=0
        except BaseException:
            await self._teardown()
            raise

    async def stop(self) -> None:
        await self._teardown()

    async def _teardown(self) -> None:
        try:
            if self._runner is not None:
                # Closes the listener, then waits for in-flight requests to finish.
                await self._runner.cleanup()
                self._runner = None
            if self._pool is not None:
                await self._pool.close()
                self._pool = None
        finally:
            self._lock.release()

    # -- handlers

    async def _handle_ping(self, request: web.Request) -> web.Response:
        return web.Response(body=_PING_BODY, content_type="text/plain", charset="UTF-8")

    async def _handle_root(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "POST", "HEAD"):
            return web.Response(status=405, text="Method not allowed\n")
        if request.method in ("GET", "HEAD") and "query" not in request.query:
            return await self._handle_ping(request)
        query_id = request.query.get("query_id") or str(uuid.uuid4())
        try:
            parsed = await self._parse(request, query_id)
            return await self._execute(request, parsed)
        except _ClickHouseError as exc:
            return self._error_response(exc, query_id)
        except ConnectionError as exc:
            # The client went away mid-request (the lease's cleanup cancelled any insert);
            # nobody reads this answer, but it keeps aiohttp from logging a traceback.
            logger.debug("client of query %s went away: %s", query_id, exc)
            return self._error_response(_ClickHouseError.server(_NETWORK_ERROR, str(exc)), query_id)
        except Exception as exc:
            logger.exception("unexpected error in query %s", query_id)
            return self._error_response(
                _ClickHouseError.server(_STD_EXCEPTION, f"{type(exc).__name__}: {exc}"), query_id
            )

    async def _parse(self, request: web.Request, query_id: str) -> _ParsedRequest:
        params: dict[str, str] = dict(request.query)  # the last of repeated keys wins
        body: AsyncIterator[bytes] | None = request.content.iter_any() if request.body_exists else None
        if request.content_type == "multipart/form-data":
            params.update(await self._form_fields(request))
            body = None
        settings: dict[str, str] = {}
        bind: dict[str, str] = {}
        for key, value in params.items():
            if key.startswith("param_"):
                bind[key[len("param_") :]] = value
            elif key in _TRANSPORT_PARAMS:
                if key in ("compress", "decompress") and value not in ("", "0", "false", "False"):
                    # ClickHouse's native block compression needs CityHash checksums; no
                    # client we serve uses it (clickhouse-connect uses Content-Encoding).
                    raise _ClickHouseError.server(
                        _NOT_IMPLEMENTED,
                        f"{key}=1 (ClickHouse native block compression) is not supported;"
                        " use Content-Encoding",
                    )
            elif not _SETTING_NAME_RE.match(key):
                raise _ClickHouseError.server(_BAD_ARGUMENTS, f"Invalid setting name {key!r}")
            else:
                settings[key] = value
        if request.method == "GET":
            settings["readonly"] = "2"  # as ClickHouse: a GET must not change data
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        decoder: _BodyDecoder | _IdentityDecoder = (
            _IdentityDecoder() if encoding in ("", "identity") else _BodyDecoder(encoding)
        )
        accept = request.headers.get("Accept-Encoding", "")
        compress_response = params.get("enable_http_compression", "1") not in ("0", "false", "False")
        query = params.get("query", "")
        return _ParsedRequest(
            query_id=query_id,
            state=_RequestState(database=params.get("database") or DEFAULT_DATABASE, settings=settings),
            bind=bind,
            default_format=params.get("default_format") or DEFAULT_FORMAT,
            wait_end_of_query=params.get("wait_end_of_query", "0") in ("1", "true", "True"),
            encoding=_choose_encoding(accept) if compress_response and accept else None,
            prefix=(query.encode() + b"\n") if query else b"",
            body=body,
            decoder=decoder,
        )

    @staticmethod
    async def _form_fields(request: web.Request) -> dict[str, str]:
        fields: dict[str, str] = {}
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader) or part.name is None:
                continue
            if part.filename is not None:
                raise _ClickHouseError.server(
                    _NOT_IMPLEMENTED, "External data (file form fields) is not supported"
                )
            fields[part.name] = (await part.read()).decode("utf-8")
        return fields

    async def _execute(self, request: web.Request, req: _ParsedRequest) -> web.StreamResponse:
        assert self._pool is not None
        head = bytearray(req.prefix)
        body = req.body if req.body is not None else _no_body()
        finished = False
        while True:
            decision = _classify(head, final=finished)
            if decision is None and len(head) > _MAX_STATEMENT_BYTES:
                decision = _PLAIN  # no data section this far in: let the engine parse it all
            if decision is not None:
                break
            chunk = await anext(body, None)
            if chunk is None:
                req.decoder.finish()
                finished = True
            else:
                head += req.decoder.decompress(chunk)
        if isinstance(decision, _InsertSplit):
            return await self._insert(req, decision, head, body if not finished else _no_body())
        if not finished:
            async for chunk in body:
                head += req.decoder.decompress(chunk)
                if len(head) > _MAX_QUERY_BYTES:
                    raise _ClickHouseError.server(
                        _BAD_ARGUMENTS, f"Query is larger than {_MAX_QUERY_BYTES} bytes"
                    )
            req.decoder.finish()
        return await self._query(request, req, bytes(head))

    def _headers(self, req: _ParsedRequest, summary: dict[str, str], fmt: str | None) -> dict[str, str]:
        headers = {
            "X-ClickHouse-Query-Id": req.query_id,
            "X-ClickHouse-Server-Display-Name": self.display_name,
            "X-ClickHouse-Timezone": req.state.settings.get("session_timezone")
            or (self._pool.timezone if self._pool else "UTC"),
            "X-ClickHouse-Summary": json.dumps(summary, separators=(",", ":")),
        }
        if fmt is not None:
            headers["X-ClickHouse-Format"] = fmt
            headers["Content-Type"] = _content_type(fmt)
        else:
            headers["Content-Type"] = "text/plain; charset=UTF-8"
        return headers

    async def _insert(
        self, req: _ParsedRequest, split: _InsertSplit, head: bytearray, body: AsyncIterator[bytes]
    ) -> web.StreamResponse:
        assert self._pool is not None
        pool = self._pool
        lease = await pool.acquire()
        try:
            inserter = await lease.call(
                _start_insert, pool, lease.slot, req.state, split.statement, split.fmt
            )
            lease.on_release(lambda: _cancel_insert(inserter))
            decoded = bytes(head[split.data_start :])
            raw: list[bytes] = []
            size = 0
            async for chunk in body:
                raw.append(chunk)
                size += len(chunk)
                if size >= _INSERT_BATCH_BYTES:
                    await lease.call(_feed_insert, inserter, req.decoder, decoded, raw, False)
                    decoded, raw, size = b"", [], 0
            summary = await lease.call(_feed_insert, inserter, req.decoder, decoded, raw, True)
        finally:
            lease.release()
        assert summary is not None
        return web.Response(body=b"", headers=self._headers(req, summary, None))

    async def _query(self, request: web.Request, req: _ParsedRequest, sql: bytes) -> web.StreamResponse:
        assert self._pool is not None
        pool = self._pool
        keyword = _leading_keyword(sql)
        fmt = _output_format(sql, req.default_format)
        result_fmt = fmt if keyword in _RESULT_KEYWORDS else None
        lease = await pool.acquire()
        try:
            if (
                not req.wait_end_of_query
                and keyword in _STREAM_KEYWORDS
                and fmt.lower() in _STREAMABLE_FORMATS
            ):
                return await self._stream(request, req, lease, sql, fmt)
            encoder = _ResponseEncoder(req.encoding) if req.encoding else None
            output = await lease.call(_run_query, pool, lease.slot, req.state, sql, fmt, req.bind, keyword)
            body = output.body
            if encoder is not None:
                body = (
                    encoder.whole(body)
                    if len(body) <= _INLINE_ENCODE_BYTES
                    else await lease.call(encoder.whole, body)
                )
        finally:
            lease.release()
        if result_fmt is None and output.body:
            result_fmt = fmt  # a statement we did not recognise returned rows
        headers = self._headers(req, output.summary, result_fmt)
        if encoder is not None:
            headers["Content-Encoding"] = encoder.encoding
        return web.Response(body=body, headers=headers)

    async def _stream(
        self, request: web.Request, req: _ParsedRequest, lease: _Lease, sql: bytes, fmt: str
    ) -> web.StreamResponse:
        """Send blocks as chDB produces them; small results still get one plain response."""
        assert self._pool is not None
        stream = await lease.call(_start_stream, self._pool, lease.slot, req.state, sql, fmt, req.bind)
        lease.on_release(lambda: _cancel_stream(stream))
        encoder = _ResponseEncoder(req.encoding) if req.encoding else None
        started = time.monotonic()
        pending: list[bytes] = []
        size = rows = read_rows = 0
        done = False
        while size < _STREAM_PREFETCH_BYTES:  # errors here are still plain HTTP errors
            block = await lease.call(_fetch, stream, encoder)
            if block is None:
                done = True
                break
            pending.append(block[0])
            size += len(block[0])
            rows += block[1]
            read_rows += block[2]
        summary = _summary(read_rows=read_rows, result_rows=rows, elapsed=time.monotonic() - started)
        headers = self._headers(req, summary, fmt)
        if encoder is not None:
            headers["Content-Encoding"] = encoder.encoding
        if done:
            tail = encoder.finish() if encoder is not None else b""
            return web.Response(body=b"".join(pending) + tail, headers=headers)
        tag = uuid.uuid4().hex[:16]
        headers["X-ClickHouse-Exception-Tag"] = tag
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        try:
            for data in pending:
                await response.write(data)
            while True:
                try:
                    block = await lease.call(_fetch, stream, encoder)
                except _ClickHouseError as exc:
                    # Headers are gone: report the error inside the body, the way ClickHouse does.
                    trailer = _exception_trailer(exc, tag)
                    await response.write(encoder.compress(trailer) if encoder is not None else trailer)
                    break
                if block is None:
                    break
                await response.write(block[0])
            if encoder is not None:
                await response.write(encoder.finish())
            await response.write_eof()
        except ConnectionError:
            logger.debug("client of query %s went away mid-stream", req.query_id)
        return response

    def _error_response(self, error: _ClickHouseError, query_id: str) -> web.Response:
        version = self._pool.version if self._pool else ""
        logger.debug("query %s failed: %s", query_id, error.text)
        return web.Response(
            status=500,  # not 429/503/504: clickhouse-connect retries those
            body=f"{error.text} (version {version})\n".encode(),
            headers={
                "X-ClickHouse-Exception-Code": str(error.code),
                "X-ClickHouse-Query-Id": query_id,
                "X-ClickHouse-Server-Display-Name": self.display_name,
                "Content-Type": "text/plain; charset=UTF-8",
            },
        )


# --------------------------------------------------------------------------- entry points


async def _serve(data_dir: str, host: str, port: int, pool_size: int) -> None:
    warehouse = Warehouse(data_dir, host, port, pool_size)
    await warehouse.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"warehouse listening on {warehouse.url} (data: {warehouse.data_dir})", flush=True)
    try:
        await stop.wait()
        logger.info("shutting down: finishing in-flight queries")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await warehouse.stop()


def run(data_dir: str, host: str = "127.0.0.1", port: int = 8123, pool_size: int = 4) -> None:
    """Serve until SIGTERM/SIGINT, then shut down cleanly. Raises ``WarehouseError``."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a project dependency
        asyncio.run(_serve(data_dir, host, port, pool_size))
    else:
        uvloop.run(_serve(data_dir, host, port, pool_size))


def _fail(message: str, code: int) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m connectors.warehouse",
        description="Embedded ClickHouse warehouse: owns a chDB data directory"
        " and serves ClickHouse's HTTP interface.",
    )
    parser.add_argument("--data-dir", required=True, help="chDB data directory (created if missing)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: loopback; there is no auth)"
    )
    parser.add_argument("--port", type=int, default=8123, help="HTTP port (default 8123, 0 picks a free one)")
    parser.add_argument(
        "--pool-size", type=int, default=4, help="chDB sessions = concurrent queries (default 4)"
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        run(args.data_dir, args.host, args.port, args.pool_size)
    except DataDirInUseError as exc:
        _fail(str(exc), EXIT_DATA_DIR_IN_USE)
    except (WarehouseError, OSError) as exc:
        _fail(str(exc), 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
