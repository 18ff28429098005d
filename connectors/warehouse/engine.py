"""The chDB side: a pool of chDB sessions on the one data directory, leased one request at a time,
and the blocking engine calls (query, stream, insert) that run in its worker threads."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar, cast

from connectors.warehouse.compression import BodyDecoder, IdentityDecoder, ResponseEncoder
from connectors.warehouse.errors import ClickHouseError, DataDirInUseError, WarehouseError
from connectors.warehouse.lock import chdb_holder_pid
from connectors.warehouse.native import describe_sql, describe_types
from connectors.warehouse.queries import TAG_PREFIX, KillQuery, kill_query
from connectors.warehouse.sql import quote_identifier, quote_string, set_names

__all__ = [
    "DEFAULT_DATABASE",
    "DEFAULT_MAX_POOL_SIZE",
    "ENGINE_SETTINGS",
    "ExternalTable",
    "Lease",
    "RequestState",
    "SessionPool",
    "SessionRequest",
    "cancel_insert",
    "cancel_stream",
    "drop_external",
    "load_external",
    "feed_insert",
    "describe",
    "fetch",
    "query_summary",
    "Progress",
    "run_kill",
    "run_query",
    "start_insert",
    "start_stream",
    "unwatch_progress",
    "watch_progress",
]

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


#: Server settings of the embedded engine, passed in chDB's connection string. Its
#: ``MemoryWorker`` (which re-reads the process's memory use for the memory tracker) ticks every
#: 50 ms by default: 20 wake-ups a second, ~0.2 % of a core with nothing to do, which is most of
#: the warehouse's CPU at rest (docs/numbers.md). Once a second is plenty for a box's memory.
ENGINE_SETTINGS = "memory_worker_period_ms=1000"


class _Session(Protocol):
    def query(
        self,
        sql: str | bytes,
        fmt: str = ...,
        udf_path: str = ...,
        params: dict[str, str] | None = ...,
    ) -> _QueryResult: ...
    def send_query(
        self, sql: str | bytes, fmt: str = ..., params: dict[str, str] | None = ...
    ) -> _StreamingResult: ...
    def send_insert(self, query: str, fmt: str = ...) -> _StreamingInserter: ...
    def close(self) -> None: ...


DEFAULT_DATABASE: Final = "default"


# --------------------------------------------------------------------------- session pool


def _set_sql(values: dict[str, str | None] | dict[str, str]) -> str:
    """``SET k = 'v', ...`` (None: back to the setting's default)."""
    return "SET " + ", ".join(
        f"{k} = {'DEFAULT' if v is None else quote_string(v)}" for k, v in values.items()
    )


@dataclass(eq=False)
class _Slot:
    """One chDB Session plus what this server last did to its state."""

    session: _Session | None
    database: str | None = DEFAULT_DATABASE  # None: unknown (a USE statement ran)
    settings: dict[str, str] = field(default_factory=dict)  # non-default settings in force
    dirty: bool = False  # state unknown (a SET statement ran, a reset failed): reopen
    #: The client's ``session_id`` for a named session (its state outlives a request).
    named: str | None = None
    #: A named session's own state, as the client's SET and USE statements left it: the
    #: values of the settings a request overrode (``None``: not a known setting), and its
    #: database. A request's settings and ``database`` are for that request only.
    baseline: dict[str, str | None] = field(default_factory=dict)
    session_db: str = DEFAULT_DATABASE
    client_set: bool = False  # the client ran SET: its values are no longer the defaults


@dataclass(eq=False)
class _Named:
    """A client's session (``session_id``): its own chDB Session, one request at a time.

    ``in_request`` while a request holds it (another one is refused: SESSION_IS_LOCKED);
    ``free`` is set once its chDB Session is free again (after a request's cleanup, which
    may outlive the request by a moment: the next request waits for it)."""

    slot: _Slot
    timeout_s: float
    idle_since: float
    in_request: bool = False
    free: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.free.set()


@dataclass(frozen=True, slots=True)
class _QueryOutput:
    body: bytes
    summary: dict[str, str]


@dataclass(frozen=True, slots=True)
class RequestState:
    database: str
    settings: dict[str, str]
    #: The request named its database (``database`` parameter or header); a named session
    #: otherwise keeps the one it has (``USE``).
    database_given: bool = True


@dataclass(frozen=True, slots=True)
class ExternalTable:
    """A request's external data: a file sent with the query, read as a temporary table."""

    name: str
    structure: str  # "x UInt8, y String"
    fmt: str
    data: bytes


@dataclass(frozen=True, slots=True)
class SessionRequest:
    """A request's ``session_id``, ``session_timeout`` (s), ``session_check`` and
    ``close_session`` parameters."""

    session_id: str
    timeout_s: float = 60.0
    check: bool = False
    close: bool = False


#: ClickHouse's codes for named sessions.
SESSION_NOT_FOUND: Final = (372, "SESSION_NOT_FOUND")
SESSION_IS_LOCKED: Final = (373, "SESSION_IS_LOCKED")
#: At most this many named sessions at once (each is a chDB Session: a thread's worth of state).
MAX_NAMED_SESSIONS: Final = 256
#: How many requests may run at once outside named sessions, by default (the pool's bound).
DEFAULT_MAX_POOL_SIZE: Final = 32
#: Threads for named sessions' requests running at once (beyond it they queue for a thread).
NAMED_THREADS: Final = 32


class SessionPool:
    """Sessions on the one data directory, each used by one request at a time.

    A chDB Session runs one query at a time and keeps USE/SET state, so a request leases a
    whole Session. ``size`` sessions open at start; when all are busy the pool grows, up to
    ``max_size`` (a session opens in well under a millisecond), so slow queries never make
    the others (the sink's inserts) wait, until ``max_size`` requests run at once. Blocking
    chDB calls run in threads (chDB releases the GIL while it works, so queries on different
    sessions run in parallel): one per pooled session and :data:`NAMED_THREADS` more for the
    named sessions.
    """

    def __init__(self, data_dir: Path, size: int, max_size: int | None = None) -> None:
        self.data_dir = data_dir
        self.size = size
        self.max_size = max(size, max_size if max_size is not None else DEFAULT_MAX_POOL_SIZE)
        self.executor = ThreadPoolExecutor(
            max_workers=self.max_size + NAMED_THREADS, thread_name_prefix="warehouse-chdb"
        )
        self._opening = 0  # sessions being opened to grow the pool
        self.slots: list[_Slot] = []
        self.version = ""
        self.timezone = "UTC"
        self.default_settings: dict[str, str] = {}
        self._free: asyncio.Queue[_Slot] = asyncio.Queue()
        self._releasing: set[asyncio.Task[None]] = set()
        #: Named sessions by session_id (ClickHouse's HTTP sessions).
        self.named: dict[str, _Named] = {}

    # -- blocking, run in the executor

    def _open_session(self) -> _Session:
        from chdb.session import Session as ChdbSession  # late: loading the engine takes a while

        try:
            return cast(_Session, ChdbSession(f"{self.data_dir}?{ENGINE_SETTINGS}"))  # type: ignore[no-untyped-call]
        except Exception as exc:
            if "EmbeddedServer" in str(exc) or "Cannot lock file" in str(exc):
                # chDB's message is empty; the real reason (lock held) only goes to stderr.
                raise DataDirInUseError(
                    self.data_dir, chdb_holder_pid(self.data_dir), "another process using chDB"
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
        rows = (
            first.query("SELECT name, value FROM system.settings", "TabSeparated").bytes().decode()
        )
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

    def prepare(self, slot: _Slot, state: RequestState) -> _Session:
        """Bring a leased session to the request's database and settings, defaults elsewhere.

        Settings are diffed against what the session already has, so a client that sends
        the same settings on every request (clickhouse-connect does) costs no extra calls.
        A named session keeps its state (``SET``, ``USE``, temporary tables): the request's
        settings are applied on top, its database only when the request names one.
        """
        if slot.named is not None:
            return self._prepare_named(slot, state)
        wanted = {k: v for k, v in state.settings.items() if self.default_settings.get(k) != v}
        session = self._reopen(slot) if slot.dirty or slot.session is None else slot.session
        stale = [k for k in slot.settings if k not in wanted]
        if stale:
            try:
                session.query(_set_sql(dict.fromkeys(stale)), "TabSeparated")
                for k in stale:
                    del slot.settings[k]
            except Exception:
                # e.g. readonly=2 (every GET) forbids resetting readonly: start afresh.
                session = self._reopen(slot)
        try:
            changes = {k: v for k, v in wanted.items() if slot.settings.get(k) != v}
            if changes:
                session.query(_set_sql(changes), "TabSeparated")
                slot.settings.update(changes)
            if slot.database != state.database:
                session.query(f"USE {quote_identifier(state.database)}", "TabSeparated")
                slot.database = state.database
        except Exception as exc:
            slot.dirty = True  # a partly applied SET or USE: reopen before the next request
            raise ClickHouseError.from_engine(exc) from exc
        return session

    def _prepare_named(self, slot: _Slot, state: RequestState) -> _Session:
        """A named session for one request: the request's settings and database on top of
        the session's own state, and the previous request's put back (as a server applies
        a request's settings to that query only). ``slot.settings`` holds what is overridden
        now, ``slot.baseline`` the session's own values for those keys."""
        session = slot.session
        assert session is not None
        try:
            keys = set(slot.settings) | set(state.settings)
            missing = sorted(k for k in keys if k not in slot.baseline)
            if missing and not slot.client_set:
                # Until the client's own SET, its session has the engine's defaults, which
                # the pool read at start.
                for k in missing:
                    slot.baseline[k] = self.default_settings.get(k)
            elif missing:
                known = dict(
                    line.split("\t", 1)
                    for line in session.query(
                        "SELECT name, value FROM system.settings WHERE name IN ("
                        + ", ".join(quote_string(k) for k in missing)
                        + ")",
                        "TabSeparated",
                    )
                    .bytes()
                    .decode()
                    .splitlines()
                )
                for k in missing:
                    slot.baseline[k] = known.get(k)
            wanted = state.settings
            if wanted.get("log_comment", "").startswith(TAG_PREFIX) and slot.baseline.get(
                "log_comment"
            ):
                # The session's own log_comment (the client's SET) wins over the query id's
                # tag, as a request's own does (queries.py): that query keeps the engine's id.
                wanted = {k: v for k, v in wanted.items() if k != "log_comment"}
            changes: dict[str, str | None] = {}
            for k in keys:
                want = wanted.get(k, slot.baseline[k])
                if slot.settings.get(k, slot.baseline[k]) != want:
                    changes[k] = want
            if changes:
                session.query(_set_sql(changes), "TabSeparated")
            slot.settings = dict(wanted)
            target = state.database if state.database_given else slot.session_db
            if slot.database != target:
                session.query(f"USE {quote_identifier(target)}", "TabSeparated")
                slot.database = target
        except Exception as exc:
            raise ClickHouseError.from_engine(exc) from exc
        return session

    @staticmethod
    def after_named_statement(slot: _Slot, keyword: str, sql: bytes = b"") -> None:
        """The client's own SET or USE changed the session's state: learn it (USE), or
        put back our overrides of the settings the SET did not name, and forget what we
        knew (SET)."""
        session = slot.session
        if session is None or keyword not in ("SET", "USE"):
            return
        if keyword == "USE":
            slot.session_db = slot.database = (
                session.query("SELECT currentDatabase()", "TabSeparated").bytes().decode().strip()
            )
            return
        named = set_names(sql)
        restore = {k: slot.baseline.get(k) for k in slot.settings if k not in named}
        slot.settings, slot.baseline, slot.client_set = {}, {}, True
        if restore:
            session.query(_set_sql(restore), "TabSeparated")

    @staticmethod
    def after_statement(slot: _Slot, keyword: str, sql: bytes = b"") -> None:
        if slot.named is not None:
            try:
                SessionPool.after_named_statement(slot, keyword, sql)
            except Exception:
                logger.debug(
                    "session %s: state after %s unknown", slot.named, keyword, exc_info=True
                )
                slot.database = None
                slot.settings, slot.baseline, slot.client_set = {}, {}, True
            return
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

    async def acquire(self, session: SessionRequest | None = None) -> Lease:
        """A pooled session for one request, or the client's named session (created on
        first use; ``SESSION_NOT_FOUND`` with ``session_check``, ``SESSION_IS_LOCKED`` while
        another request uses it, as ClickHouse answers)."""
        if session is None:
            if self._free.empty() and len(self.slots) + self._opening < self.max_size:
                return Lease(self, await self._grow())
            return Lease(self, await self._free.get())
        await self.expire_sessions()
        named = self.named.get(session.session_id)
        if named is None:
            if session.check:
                raise ClickHouseError.server(
                    SESSION_NOT_FOUND, f"Session {session.session_id} not found"
                )
            if len(self.named) >= MAX_NAMED_SESSIONS:
                raise ClickHouseError.server(
                    SESSION_IS_LOCKED,
                    f"Too many sessions ({MAX_NAMED_SESSIONS}): close some (close_session=1) "
                    "or let them time out",
                )
            loop = asyncio.get_running_loop()
            chdb_session = await loop.run_in_executor(self.executor, self._open_session)
            if session.session_id in self.named:  # opened meanwhile by a concurrent request
                await loop.run_in_executor(self.executor, chdb_session.close)
                raise ClickHouseError.server(
                    SESSION_IS_LOCKED,
                    f"Session {session.session_id} is locked by a concurrent client",
                )
            named = _Named(_Slot(chdb_session, named=session.session_id), 0.0, 0.0)
            self.named[session.session_id] = named
        if named.in_request:
            raise ClickHouseError.server(
                SESSION_IS_LOCKED, f"Session {session.session_id} is locked by a concurrent client"
            )
        named.in_request = True
        try:
            await named.free.wait()  # the previous request's cleanup, if still running
        except BaseException:
            named.in_request = False
            raise
        if self.named.get(session.session_id) is not named:  # closed meanwhile
            raise ClickHouseError.server(
                SESSION_NOT_FOUND, f"Session {session.session_id} not found"
            )
        named.free.clear()
        named.timeout_s = session.timeout_s
        return Lease(self, named.slot, close=session.close)

    async def _grow(self) -> _Slot:
        """One more pooled session, for a request that found every one busy."""
        self._opening += 1
        try:
            chdb_session = await asyncio.get_running_loop().run_in_executor(
                self.executor, self._open_session
            )
        finally:
            self._opening -= 1
        slot = _Slot(chdb_session)
        self.slots.append(slot)
        logger.info("session pool grew to %d (at most %d)", len(self.slots), self.max_size)
        return slot

    async def expire_sessions(self, now: float | None = None) -> int:
        """Close the named sessions idle for longer than their timeout; returns how many."""
        now = time.monotonic() if now is None else now
        expired = [
            sid
            for sid, n in self.named.items()
            if not n.in_request and n.free.is_set() and now - n.idle_since > n.timeout_s
        ]
        for sid in expired:
            await self._close_named(sid)
        return len(expired)

    async def _close_named(self, session_id: str) -> None:
        named = self.named.pop(session_id, None)
        if named is not None:
            await self._close_slot(named.slot)

    async def _close_slot(self, slot: _Slot) -> None:
        chdb_session, slot.session = slot.session, None
        if chdb_session is not None:
            with contextlib.suppress(Exception):
                await asyncio.get_running_loop().run_in_executor(self.executor, chdb_session.close)

    def _request_done(self, slot: _Slot) -> None:
        """A named session's request is over (its cleanup may still run): the next request
        for it is no longer refused, it waits for :meth:`_put_back`."""
        named = self.named.get(slot.named) if slot.named is not None else None
        if named is not None:
            named.in_request = False

    def _put_back(self, slot: _Slot, close: bool) -> None:
        if slot.named is None:
            self._free.put_nowait(slot)
            return
        named = self.named.get(slot.named)
        if named is None:
            return
        named.idle_since = time.monotonic()
        named.free.set()
        if close:  # gone at once: the next request with this id starts a new session
            del self.named[slot.named]
            task = asyncio.get_running_loop().create_task(self._close_slot(slot))
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)

    def _give_back(
        self,
        slot: _Slot,
        inflight: Future[Any] | None,
        cleanup: Callable[[], None] | None,
        close: bool = False,
    ) -> None:
        self._request_done(slot)
        if cleanup is None and (inflight is None or inflight.done()):
            self._put_back(slot, close)
            return

        async def finish() -> None:
            # A cancelled request may leave a chDB call running in its thread (cancelling
            # the awaiting task does not stop it): the session is only free once that call
            # returned and the request's cleanup (cancel an insert or a stream) ran.
            broken = False
            try:
                if inflight is not None and not inflight.done():
                    await asyncio.wait([asyncio.wrap_future(inflight)])
                if cleanup is not None:
                    try:
                        await asyncio.get_running_loop().run_in_executor(self.executor, cleanup)
                    except Exception:
                        logger.debug("session cleanup failed; reopening it", exc_info=True)
                        slot.dirty = True
                        broken = True  # a named session in an unknown state is closed
            finally:
                self._put_back(slot, close or (broken and slot.named is not None))

        task = asyncio.get_running_loop().create_task(finish())
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def close(self) -> None:
        if self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)
        for sid in list(self.named):
            await self._close_named(sid)
        await asyncio.get_running_loop().run_in_executor(self.executor, self.close_blocking)
        self.executor.shutdown(wait=True)


class Lease:
    """Exclusive use of one pooled session for the duration of one request."""

    def __init__(self, pool: SessionPool, slot: _Slot, close: bool = False) -> None:
        self.pool = pool
        self.slot = slot
        self._close = close  # a named session's last request (close_session=1)
        self._inflight: Future[Any] | None = None
        self._cleanups: list[Callable[[], None]] = []
        self._released = False

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        # Keep the thread's own future: an asyncio wrapper reads "done" once cancelled
        # even though the chDB call is still running.
        self._inflight = self.pool.executor.submit(fn, *args)
        return await asyncio.wrap_future(self._inflight)

    def on_release(self, cleanup: Callable[[], None]) -> None:
        """Run ``cleanup`` (in the session's thread) before the session is free again; the
        last one added runs first."""
        self._cleanups.append(cleanup)

    def _cleanup(self) -> None:
        for cleanup in reversed(self._cleanups):
            cleanup()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.pool._give_back(
                self.slot, self._inflight, self._cleanup if self._cleanups else None, self._close
            )


# --------------------------------------------------------------------------- engine calls
# Everything below runs in a worker thread with the session leased.


def query_summary(
    *,
    read_rows: int = 0,
    read_bytes: int = 0,
    written_rows: int = 0,
    written_bytes: int = 0,
    total_rows_to_read: int | None = None,
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
        "total_rows_to_read": str(read_rows if total_rows_to_read is None else total_rows_to_read),
        "result_rows": str(result_rows),
        "result_bytes": str(result_bytes),
        "elapsed_ns": str(int(elapsed * 1e9)),
    }


def _result_summary(result: Any) -> dict[str, str]:
    return query_summary(
        read_rows=result.storage_rows_read(),
        read_bytes=result.storage_bytes_read(),
        written_rows=result.rows_written(),
        written_bytes=result.bytes_written(),
        result_rows=result.rows_read(),
        result_bytes=result.bytes_read(),
        elapsed=result.elapsed(),
    )


class Progress:
    """A running query's progress, as chDB's progress callback reports it (on chDB's thread;
    replacing the dict is atomic) for ``X-ClickHouse-Progress`` headers."""

    __slots__ = ("payload", "started")

    def __init__(self) -> None:
        self.payload: dict[str, int] = {}
        self.started = time.monotonic()

    def __call__(self, payload: dict[str, int]) -> None:
        self.payload = payload

    def summary(self) -> dict[str, str]:
        """As ClickHouse's progress header: the counters so far, the time since the start."""
        p = self.payload
        return query_summary(
            read_rows=int(p.get("read_rows", 0)),
            read_bytes=int(p.get("read_bytes", 0)),
            written_rows=int(p.get("written_rows", 0)),
            written_bytes=int(p.get("written_bytes", 0)),
            total_rows_to_read=int(p.get("total_rows_to_read", 0)),
            result_rows=int(p.get("result_rows", 0)),
            result_bytes=int(p.get("result_bytes", 0)),
            elapsed=time.monotonic() - self.started,
        )


def watch_progress(session: _Session, progress: Progress | None) -> None:
    """Report the session's next queries' progress to ``progress`` (None: stop)."""
    conn = getattr(session, "_conn", None)  # chDB's connection: the callback lives there
    if conn is not None:
        conn.set_progress_callback(progress)


def unwatch_progress(slot: _Slot) -> None:
    if slot.session is not None:
        watch_progress(slot.session, None)


def run_query(
    pool: SessionPool,
    slot: _Slot,
    state: RequestState,
    sql: bytes,
    fmt: str,
    params: dict[str, str],
    keyword: str,
    progress: Progress | None = None,
) -> _QueryOutput:
    session = pool.prepare(slot, state)
    if progress is not None:
        watch_progress(session, progress)
    try:
        result = session.query(sql, fmt, params=params)
    except Exception as exc:
        raise ClickHouseError.from_engine(exc) from exc
    finally:
        if progress is not None:
            watch_progress(session, None)
        pool.after_statement(slot, keyword, sql)
    return _QueryOutput(result.bytes(), _result_summary(result))


def run_kill(
    pool: SessionPool,
    slot: _Slot,
    state: RequestState,
    kill: KillQuery,
    fmt: str,
    params: dict[str, str],
) -> _QueryOutput:
    """``KILL QUERY WHERE``, seen with the clients' query ids (``queries.kill_query``)."""
    session = pool.prepare(slot, state)
    started = time.monotonic()

    def run(sql: str, out_fmt: str, bind: dict[str, str]) -> bytes:
        try:
            return bytes(session.query(sql, out_fmt, params=bind).bytes())
        except Exception as exc:
            raise ClickHouseError.from_engine(exc) from exc

    body = kill_query(run, kill, fmt, params)
    return _QueryOutput(body, query_summary(elapsed=time.monotonic() - started))


def describe(
    pool: SessionPool, slot: _Slot, state: RequestState, sql: bytes, params: dict[str, str]
) -> list[str] | None:
    """The full column types of query ``sql`` (``DESCRIBE``), or None when it cannot be
    described (the query itself then says why)."""
    session = pool.prepare(slot, state)
    try:
        return describe_types(
            session.query(describe_sql(sql), "JSONEachRow", params=params).bytes()
        )
    except Exception:
        return None


def start_stream(
    pool: SessionPool,
    slot: _Slot,
    state: RequestState,
    sql: bytes,
    fmt: str,
    params: dict[str, str],
    progress: Progress | None = None,
) -> _StreamingResult:
    """(With ``progress``, the caller stops watching, ``unwatch_progress``, when done.)"""
    session = pool.prepare(slot, state)
    if progress is not None:
        watch_progress(session, progress)
    try:
        return session.send_query(sql, fmt, params=params)
    except Exception as exc:
        raise ClickHouseError.from_engine(exc) from exc


def fetch(
    stream: _StreamingResult,
    encoder: ResponseEncoder | None,
    transform: Callable[[bytes], bytes] | None = None,
) -> tuple[bytes, int, int] | None:
    """Next block as (bytes ready to send, rows, storage rows read); None at the end.
    ``transform`` rewrites the block before it is compressed (``native.NativeRevision``)."""
    try:
        result = stream.fetch()
    except Exception as exc:
        raise ClickHouseError.from_engine(exc) from exc
    if result is None:
        return None
    body = result.bytes()
    if transform is not None:
        body = transform(body)
    if encoder is not None:
        body = encoder.compress(body)
    return body, result.rows_read(), result.storage_rows_read()


def cancel_stream(stream: _StreamingResult) -> None:
    stream.cancel()


def start_insert(
    pool: SessionPool, slot: _Slot, state: RequestState, statement: str, fmt: str
) -> _StreamingInserter:
    session = pool.prepare(slot, state)
    try:
        return session.send_insert(statement, fmt)
    except Exception as exc:
        raise ClickHouseError.from_engine(exc) from exc


def feed_insert(
    inserter: _StreamingInserter,
    decoder: BodyDecoder | IdentityDecoder,
    decoded: bytes,
    raw: list[bytes],
    last: bool,
    started: float | None = None,
) -> dict[str, str] | None:
    """Decode ``raw`` body chunks and append them; on ``last`` also commit the insert.
    ``started`` (``time.monotonic()`` when the insert began) times it: chDB's own figure
    counts from its session's last query, so an idle pooled session's insert reported the
    idle time (0.5-1 s for a 4 ms insert)."""
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
        raise ClickHouseError.from_engine(exc) from exc
    return query_summary(
        written_rows=result.rows_written,
        written_bytes=result.bytes_written,
        result_rows=result.rows_written,
        result_bytes=result.bytes_written,
        elapsed=time.monotonic() - started if started is not None else result.elapsed,
    )


def cancel_insert(inserter: _StreamingInserter) -> None:
    inserter.cancel()  # no-op once finished


def load_external(
    pool: SessionPool, slot: _Slot, state: RequestState, tables: list[ExternalTable]
) -> None:
    """Each external file as a temporary table of its session, for the request's query (as
    ClickHouse's HTTP external data); :func:`drop_external` removes them after."""
    session = pool.prepare(slot, state)
    for t in tables:
        name = quote_identifier(t.name)
        try:
            session.query(
                f"CREATE TEMPORARY TABLE {name} ({t.structure}) ENGINE = Memory", "TabSeparated"
            )
            if t.data:
                inserter = session.send_insert(f"INSERT INTO {name}", t.fmt)
                inserter.append(t.data)
                inserter.finish()
        except Exception as exc:
            drop_external(slot, tables)
            raise ClickHouseError.from_engine(exc) from exc


def drop_external(slot: _Slot, tables: list[ExternalTable]) -> None:
    session = slot.session
    if session is None:
        return
    try:
        for t in tables:
            session.query(
                f"DROP TEMPORARY TABLE IF EXISTS {quote_identifier(t.name)}", "TabSeparated"
            )
    except Exception:
        logger.debug("could not drop external tables; the session is reopened", exc_info=True)
        slot.dirty = True
