"""The HTTP side: :class:`EmbeddedWarehouse` (lifecycle: lock, session pool, aiohttp site) and its
handlers, which turn ClickHouse HTTP requests into engine calls and engine output into responses."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Final

from aiohttp import BodyPartReader, web

from connectors.warehouse.compression import (
    BodyDecoder,
    IdentityDecoder,
    ResponseEncoder,
    choose_encoding,
)
from connectors.warehouse.engine import (
    DEFAULT_DATABASE,
    DEFAULT_MAX_POOL_SIZE,
    ExternalTable,
    Lease,
    Progress,
    RequestState,
    SessionPool,
    SessionRequest,
    cancel_insert,
    cancel_stream,
    describe,
    drop_external,
    feed_insert,
    fetch,
    load_external,
    query_summary,
    run_kill,
    run_query,
    start_insert,
    start_stream,
    unwatch_progress,
)
from connectors.warehouse.errors import (
    AUTHENTICATION_FAILED,
    BAD_ARGUMENTS,
    NETWORK_ERROR,
    NOT_IMPLEMENTED,
    QUERY_WITH_SAME_ID_IS_ALREADY_RUNNING,
    READONLY,
    STD_EXCEPTION,
    ClickHouseError,
    WarehouseError,
    http_status,
)
from connectors.warehouse.lock import DataDirLock
from connectors.warehouse.native import MIN_REVISION_TIME_ZONE, NativeRevision, NotSizable
from connectors.warehouse.progress import EarlyHead, progress_interval
from connectors.warehouse.queries import KillQuery, map_processes, parse_kill, tag
from connectors.warehouse.sql import (
    PLAIN,
    InsertSplit,
    classify,
    leading_keyword,
    output_format,
    quote_string,
)

__all__ = ["EmbeddedWarehouse"]

logger = logging.getLogger("pingpost.warehouse")

DEFAULT_FORMAT: Final = "TabSeparated"

# Request parameters that steer the HTTP exchange, not the engine. chDB rejects most of them
# as unknown settings, and the HTTP-only ones it knows are meaningless without ClickHouse's
# HTTP server. ``user``/``password`` are checked by ``_authenticate``, never passed on.
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
#: What a GET may run in a named session (elsewhere readonly=2 holds a GET to reading).
_READ_KEYWORDS: Final = frozenset(
    {"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN", "("}
)

_SETTING_NAME_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Sizes. A non-INSERT request is SQL text and is buffered whole; inserts stream.
_MAX_QUERY_BYTES: Final = 64 * 1024 * 1024
_MAX_STATEMENT_BYTES: Final = 256 * 1024  # ClickHouse's max_query_size: where data must start
_INSERT_BATCH_BYTES: Final = 1024 * 1024  # compressed bytes handed to a worker at a time
_STREAM_PREFETCH_BYTES: Final = 1024 * 1024  # results up to this size get Content-Length...
#: ...when they are done this soon: past it the headers and the blocks so far go out, and the
#: rest streams as produced (a slow query's rows, and a late error's trailer, reach the client
#: as a server's would; a fast small result is still one plain response).
_STREAM_HOLD_S: Final = 0.1
_INLINE_ENCODE_BYTES: Final = 64 * 1024  # compress smaller bodies on the event loop


_PING_BODY: Final = b"Ok.\n"
_DEFAULT_STATE: Final = RequestState(database=DEFAULT_DATABASE, settings={})
#: How often idle named sessions are checked for their timeout.
SESSION_SWEEP_S: Final = 5.0


@dataclass(slots=True)
class _ParsedRequest:
    query_id: str
    state: RequestState
    bind: dict[str, str]
    default_format: str
    wait_end_of_query: bool
    encoding: str | None
    prefix: bytes
    body: AsyncIterator[bytes] | None
    decoder: BodyDecoder | IdentityDecoder
    session: SessionRequest | None = None
    read_only_session: bool = False  # a GET in a named session: reading statements only
    protocol: int = 0  # client_protocol_version: the Native output's revision
    external: list[ExternalTable] = field(default_factory=list)
    #: send_progress_in_http_headers: seconds between progress lines; the head they start.
    progress_s: float | None = None
    head: EarlyHead | None = None


def _external_tables(params: dict[str, str], files: dict[str, bytes]) -> list[ExternalTable]:
    """ClickHouse's external data: each file field is a table named after the field, with
    ``<name>_structure`` (``x UInt8, y String``) or ``<name>_types`` (``UInt8,String``: columns
    ``_1``, ``_2``...) and ``<name>_format`` (default TabSeparated). Their parameters are
    taken out of ``params`` (they are not settings)."""
    tables = []
    for name, data in files.items():
        structure = params.pop(f"{name}_structure", "")
        types = params.pop(f"{name}_types", "")
        fmt = params.pop(f"{name}_format", "") or "TabSeparated"
        if not structure and types:
            structure = ", ".join(
                f"_{i} {t.strip()}" for i, t in enumerate(_split_types(types), start=1)
            )
        if not structure:
            raise ClickHouseError.server(
                BAD_ARGUMENTS,
                f"Neither structure nor types have not been provided for external table {name}."
                f" Use fields {name}_structure or {name}_types to do so",
            )
        if not _SETTING_NAME_RE.match(fmt):
            raise ClickHouseError.server(BAD_ARGUMENTS, f"Invalid format {fmt!r} for {name}")
        tables.append(ExternalTable(name, structure, fmt, data))
    return tables


def _split_types(types: str) -> list[str]:
    """``UInt8,Decimal(10, 2),String`` -> the three types (commas inside parentheses kept)."""
    out, depth, cur = [], 0, ""
    for ch in types:
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        depth += ch == "("
        depth -= ch == ")"
        cur += ch
    out.append(cur)
    return [t for t in (x.strip() for x in out) if t]


def _session_request(params: dict[str, str]) -> SessionRequest | None:
    """The request's named session, if any: ``session_id``, ``session_timeout`` (seconds,
    default 60, at most 3600 as ClickHouse's ``max_session_timeout``), ``session_check``,
    ``close_session``."""
    session_id = params.get("session_id")
    if not session_id:
        return None
    raw = params.get("session_timeout") or "60"
    try:
        timeout = float(raw)
    except ValueError:
        raise ClickHouseError.server(BAD_ARGUMENTS, f"Invalid session timeout: '{raw}'") from None
    if not 0 <= timeout <= 3600:
        raise ClickHouseError.server(
            BAD_ARGUMENTS, f"Session timeout '{raw}' is larger than max_session_timeout: 3600"
        )
    flag = ("1", "true", "True")
    return SessionRequest(
        session_id=session_id,
        timeout_s=timeout,
        check=params.get("session_check", "0") in flag,
        close=params.get("close_session", "0") in flag,
    )


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


def _rewritten(rewrite: Callable[[bytes], bytes], body: bytes) -> bytes:
    """``body`` rewritten for the client's protocol version; a column this cannot step over
    before one whose type name must change is ClickHouse's NOT_IMPLEMENTED, naming the type."""
    try:
        return rewrite(body)
    except NotSizable as exc:
        raise ClickHouseError.server(
            NOT_IMPLEMENTED,
            f"the embedded warehouse cannot send a {exc.type_name} column before a DateTime "
            "column with a time zone in Native format to a client with "
            "client_protocol_version; leave the protocol version out (clickhouse-connect: "
            "use_protocol_version=False) or use another format",
        ) from None


def _exception_trailer(error: ClickHouseError, tag: str) -> bytes:
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


class EmbeddedWarehouse:
    """A ClickHouse-HTTP-compatible server over one chDB data directory.

    ``await start()`` takes the directory lock, opens ``pool_size`` chDB sessions (the pool
    grows up to ``max_pool_size`` when they are all busy) and starts listening; ``await stop()`` stops accepting, lets in-flight requests finish (up to
    ``shutdown_timeout`` seconds), closes the sessions and releases the lock.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        host: str = "127.0.0.1",
        port: int = 8123,
        pool_size: int = 4,
        *,
        max_pool_size: int = DEFAULT_MAX_POOL_SIZE,
        shutdown_timeout: float = 30.0,
        user: str = "default",
        password: str = "",
    ) -> None:
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        if max_pool_size < pool_size:
            raise ValueError("max_pool_size must be at least pool_size")
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self.port = port
        self.pool_size = pool_size
        self.max_pool_size = max_pool_size
        #: With a password, every query must carry the user and password (as a server's
        #: only user would); without one, any credentials are accepted (loopback use).
        self._credentials = (user, password) if password else None
        self.shutdown_timeout = shutdown_timeout
        self.display_name = socket.gethostname()
        self._lock = DataDirLock(self.data_dir)
        self._pool: SessionPool | None = None
        self._runner: web.AppRunner | None = None
        self._sweeper: asyncio.Task[None] | None = None
        #: Requests running now, by query_id: set when each is done.
        self._running: dict[str, asyncio.Event] = {}

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def __aenter__(self) -> EmbeddedWarehouse:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self._lock.acquire()  # before chDB touches the directory
        try:
            self._pool = SessionPool(self.data_dir, self.pool_size, self.max_pool_size)
            await self._pool.open()
            app = web.Application(client_max_size=_MAX_QUERY_BYTES)
            app.router.add_get("/ping", self._handle_ping)
            # No replicated tables here, so never a lagging replica: "Ok." as a server says.
            app.router.add_get("/replicas_status", self._handle_ping)
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
                self._sweeper = asyncio.get_running_loop().create_task(self._expire_sessions())
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

    async def _expire_sessions(self) -> None:
        """Close named sessions idle past their timeout, even when no request comes."""
        while self._pool is not None:
            await asyncio.sleep(SESSION_SWEEP_S)
            if self._pool is not None:
                try:
                    await self._pool.expire_sessions()
                except Exception:
                    logger.warning("could not close expired sessions", exc_info=True)

    async def _teardown(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
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
        parsed: _ParsedRequest | None = None
        try:
            self._authenticate(request)
            parsed = await self._parse(request, query_id)
            if query_id in self._running:
                await self._replace_running(parsed)
            done = self._running[query_id] = asyncio.Event()
            try:
                return await self._execute(request, parsed)
            finally:
                if parsed.head is not None:
                    await parsed.head.stop()  # before the rest of the head goes out
                done.set()
                if self._running.get(query_id) is done:
                    del self._running[query_id]
        except ClickHouseError as exc:
            return self._error_response(exc, query_id, parsed)
        except ConnectionError as exc:
            # The client went away mid-request (the lease's cleanup cancelled any insert);
            # nobody reads this answer, but it keeps aiohttp from logging a traceback.
            logger.debug("client of query %s went away: %s", query_id, exc)
            return self._error_response(
                ClickHouseError.server(NETWORK_ERROR, str(exc)), query_id, parsed
            )
        except Exception as exc:
            logger.exception("unexpected error in query %s", query_id)
            return self._error_response(
                ClickHouseError.server(STD_EXCEPTION, f"{type(exc).__name__}: {exc}"),
                query_id,
                parsed,
            )

    async def _replace_running(self, req: _ParsedRequest) -> None:
        """A query with this id runs already: as a server, refuse, or with
        ``replace_running_query=1`` cancel it and wait for it to end
        (``replace_running_query_max_wait_ms``, default 5000)."""
        assert self._pool is not None
        settings = req.state.settings
        message = f"Query with id = {req.query_id} is already running"
        if settings.get("replace_running_query", "0") not in ("1", "true", "True"):
            raise ClickHouseError.server(QUERY_WITH_SAME_ID_IS_ALREADY_RUNNING, message)
        raw_wait = settings.get("replace_running_query_max_wait_ms", "5000")
        try:
            wait_s = int(raw_wait) / 1000
        except ValueError:
            raise ClickHouseError.server(
                BAD_ARGUMENTS, f"Invalid replace_running_query_max_wait_ms: {raw_wait!r}"
            ) from None
        old = self._running[req.query_id]
        lease = await self._pool.acquire()
        try:
            kill = KillQuery(b"query_id = " + quote_string(req.query_id).encode(), "ASYNC")
            await lease.call(
                run_kill, self._pool, lease.slot, _DEFAULT_STATE, kill, "TabSeparated", {}
            )
        finally:
            lease.release()
        try:
            await asyncio.wait_for(old.wait(), wait_s)
        except TimeoutError:
            raise ClickHouseError.server(
                QUERY_WITH_SAME_ID_IS_ALREADY_RUNNING, message + " and can't be stopped"
            ) from None

    def _authenticate(self, request: web.Request) -> None:
        """ClickHouse's three ways to send credentials: HTTP basic auth, the
        ``X-ClickHouse-User``/``X-ClickHouse-Key`` headers, the ``user``/``password``
        parameters. No user means ``default``, as on a server."""
        if self._credentials is None:
            return
        user = request.headers.get("X-ClickHouse-User") or request.query.get("user")
        key = request.headers.get("X-ClickHouse-Key")
        if key is None:
            key = request.query.get("password")
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("basic "):
            try:
                decoded = base64.b64decode(auth[6:].strip()).decode()
            except (ValueError, UnicodeDecodeError):
                decoded = ""
            basic_user, _, basic_key = decoded.partition(":")
            user, key = user or basic_user, key if key is not None else basic_key
        user = user or "default"
        want_user, want_key = self._credentials
        if not (
            hmac.compare_digest(user.encode(), want_user.encode())
            and hmac.compare_digest((key or "").encode(), want_key.encode())
        ):
            raise ClickHouseError.server(
                AUTHENTICATION_FAILED,
                f"{user}: Authentication failed: password is incorrect, or there is no user "
                "with such name",
            )

    async def _parse(self, request: web.Request, query_id: str) -> _ParsedRequest:
        params: dict[str, str] = dict(request.query)  # the last of repeated keys wins
        # ClickHouse's request headers for two parameters; a URL parameter wins.
        for header, key in (
            ("X-ClickHouse-Database", "database"),
            ("X-ClickHouse-Format", "default_format"),
        ):
            if header in request.headers and key not in params:
                params[key] = request.headers[header]
        body: AsyncIterator[bytes] | None = (
            request.content.iter_any() if request.body_exists else None
        )
        files: dict[str, bytes] = {}
        if request.content_type == "multipart/form-data":
            fields, files = await self._form_fields(request)
            params.update(fields)
            body = None
        external = _external_tables(params, files)  # takes its <name>_structure/_types/_format
        settings: dict[str, str] = {}
        bind: dict[str, str] = {}
        for key, value in params.items():
            if key.startswith("param_"):
                bind[key[len("param_") :]] = value
            elif key in _TRANSPORT_PARAMS:
                if key in ("compress", "decompress") and value not in ("", "0", "false", "False"):
                    # ClickHouse's native block compression needs CityHash checksums; no
                    # client we serve uses it (clickhouse-connect uses Content-Encoding).
                    raise ClickHouseError.server(
                        NOT_IMPLEMENTED,
                        f"{key}=1 (ClickHouse native block compression) is not supported;"
                        " use Content-Encoding",
                    )
            elif not _SETTING_NAME_RE.match(key):
                raise ClickHouseError.server(BAD_ARGUMENTS, f"Invalid setting name {key!r}")
            else:
                settings[key] = value
        tag(settings, query_id)  # system.processes and KILL QUERY know it (queries.py)
        session = _session_request(params)
        read_only = request.method == "GET"  # as ClickHouse: a GET must not change data
        if read_only and session is None:
            settings["readonly"] = "2"
        # (A named session cannot take readonly=2 for one request: it could never be set
        # back. Its GETs are held to reading statements by their keyword instead.)
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        decoder: BodyDecoder | IdentityDecoder = (
            IdentityDecoder() if encoding in ("", "identity") else BodyDecoder(encoding)
        )
        accept = request.headers.get("Accept-Encoding", "")
        # As ClickHouse: a response is compressed only when asked (clickhouse-connect asks).
        compress_response = params.get("enable_http_compression", "0") in ("1", "true", "True")
        query = params.get("query", "")
        try:
            progress_s = progress_interval(params)
        except ValueError as exc:
            raise ClickHouseError.server(BAD_ARGUMENTS, str(exc)) from None
        protocol = params.get("client_protocol_version", "0") or "0"
        if not protocol.isdigit():
            raise ClickHouseError.server(
                BAD_ARGUMENTS, f"client_protocol_version must be a number, not {protocol!r}"
            )
        return _ParsedRequest(
            progress_s=progress_s,
            protocol=int(protocol),
            query_id=query_id,
            state=RequestState(
                database=params.get("database") or DEFAULT_DATABASE,
                settings=settings,
                database_given=bool(params.get("database")),
            ),
            session=session,
            read_only_session=read_only and session is not None,
            external=external,
            bind=bind,
            default_format=params.get("default_format") or DEFAULT_FORMAT,
            wait_end_of_query=params.get("wait_end_of_query", "0") in ("1", "true", "True"),
            encoding=choose_encoding(accept) if compress_response and accept else None,
            prefix=(query.encode() + b"\n") if query else b"",
            body=body,
            decoder=decoder,
        )

    @staticmethod
    async def _form_fields(request: web.Request) -> tuple[dict[str, str], dict[str, bytes]]:
        """The form's fields, and its files (external data: the field name is the table's)."""
        fields: dict[str, str] = {}
        files: dict[str, bytes] = {}
        reader = await request.multipart()
        size = 0
        async for part in reader:
            if not isinstance(part, BodyPartReader) or part.name is None:
                continue
            data = await part.read()
            size += len(data)
            if size > _MAX_QUERY_BYTES:
                raise ClickHouseError.server(
                    BAD_ARGUMENTS, f"The form is larger than {_MAX_QUERY_BYTES} bytes"
                )
            if part.filename is not None:
                files[part.name] = bytes(data)
            else:
                fields[part.name] = data.decode("utf-8")
        return fields, files

    async def _execute(self, request: web.Request, req: _ParsedRequest) -> web.StreamResponse:
        assert self._pool is not None
        head = bytearray(req.prefix)
        body = req.body if req.body is not None else _no_body()
        finished = False
        while True:
            decision = classify(head, final=finished)
            if decision is None and len(head) > _MAX_STATEMENT_BYTES:
                decision = PLAIN  # no data section this far in: let the engine parse it all
            if decision is not None:
                break
            chunk = await anext(body, None)
            if chunk is None:
                req.decoder.finish()
                finished = True
            else:
                head += req.decoder.decompress(chunk)
        if req.read_only_session and (
            isinstance(decision, InsertSplit) or leading_keyword(bytes(head)) not in _READ_KEYWORDS
        ):
            raise ClickHouseError.server(
                READONLY, "Cannot execute query in readonly mode: a GET request reads only"
            )
        if isinstance(decision, InsertSplit):
            return await self._insert(req, decision, head, body if not finished else _no_body())
        if not finished:
            async for chunk in body:
                head += req.decoder.decompress(chunk)
                if len(head) > _MAX_QUERY_BYTES:
                    raise ClickHouseError.server(
                        BAD_ARGUMENTS, f"Query is larger than {_MAX_QUERY_BYTES} bytes"
                    )
            req.decoder.finish()
        return await self._query(request, req, bytes(head))

    def _headers(
        self, req: _ParsedRequest, summary: dict[str, str], fmt: str | None
    ) -> dict[str, str]:
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
        self, req: _ParsedRequest, split: InsertSplit, head: bytearray, body: AsyncIterator[bytes]
    ) -> web.StreamResponse:
        assert self._pool is not None
        pool = self._pool
        lease = await pool.acquire(req.session)
        try:
            await self._load_external(lease, req)
            started = time.monotonic()
            inserter = await lease.call(
                start_insert, pool, lease.slot, req.state, split.statement, split.fmt
            )
            lease.on_release(lambda: cancel_insert(inserter))
            decoded = bytes(head[split.data_start :])
            raw: list[bytes] = []
            size = 0
            async for chunk in body:
                raw.append(chunk)
                size += len(chunk)
                if size >= _INSERT_BATCH_BYTES:
                    await lease.call(feed_insert, inserter, req.decoder, decoded, raw, False)
                    decoded, raw, size = b"", [], 0
            summary = await lease.call(
                feed_insert, inserter, req.decoder, decoded, raw, True, started
            )
        finally:
            lease.release()
        assert summary is not None
        return web.Response(body=b"", headers=self._headers(req, summary, None))

    async def _query(
        self, request: web.Request, req: _ParsedRequest, sql: bytes
    ) -> web.StreamResponse:
        assert self._pool is not None
        pool = self._pool
        keyword = leading_keyword(sql)
        fmt = output_format(sql, req.default_format)
        result_fmt = fmt if keyword in _RESULT_KEYWORDS else None
        sql = map_processes(sql)  # the clients' query ids (queries.py)
        kill = parse_kill(sql) if keyword == "KILL" else None
        progress = None
        if req.progress_s is not None:
            progress = Progress()
            first = self._headers(req, {}, result_fmt)
            del first["X-ClickHouse-Summary"]
            req.head = EarlyHead(request, first)
            req.head.start(progress.summary, req.progress_s)
        lease = await pool.acquire(req.session)
        try:
            await self._load_external(lease, req)
            revision = None
            if req.protocol and fmt.lower() == "native" and keyword in _RESULT_KEYWORDS:
                # What a server sends a client of that revision (connectors/warehouse/native.py):
                # the types come from DESCRIBE, before the query (not while it streams).
                types = None
                if keyword in _STREAM_KEYWORDS and req.protocol >= MIN_REVISION_TIME_ZONE:
                    types = await lease.call(describe, pool, lease.slot, req.state, sql, req.bind)
                revision = NativeRevision(req.protocol, types)
            if (
                keyword in _STREAM_KEYWORDS
                and fmt.lower() in _STREAMABLE_FORMATS
                and (not req.wait_end_of_query or revision is not None)
            ):
                # (a rewritten Native result always goes block by block: chDB's streaming
                # fetch hands over one block at a time; wait_end_of_query holds them all)
                return await self._stream(request, req, lease, sql, fmt, revision, progress)
            encoder = ResponseEncoder(req.encoding) if req.encoding else None
            if kill is not None:
                output = await lease.call(
                    run_kill, pool, lease.slot, req.state, kill, fmt, req.bind
                )
            else:
                output = await lease.call(
                    run_query, pool, lease.slot, req.state, sql, fmt, req.bind, keyword, progress
                )
            body = output.body
            if revision is not None and body:
                body = _rewritten(revision.blocks, body)
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
        return self._response(req, body, headers)

    @staticmethod
    def _response(req: _ParsedRequest, body: bytes, headers: dict[str, str]) -> web.Response:
        """The whole answer (after progress headers, the rest of its head)."""
        if req.head is not None:
            return req.head.response(body=body, headers=headers)
        return web.Response(body=body, headers=headers)

    async def _load_external(self, lease: Lease, req: _ParsedRequest) -> None:
        """The request's external data as temporary tables, dropped when the lease ends."""
        if req.external:
            assert self._pool is not None
            await lease.call(load_external, self._pool, lease.slot, req.state, req.external)
            lease.on_release(partial(drop_external, lease.slot, req.external))

    async def _stream(
        self,
        request: web.Request,
        req: _ParsedRequest,
        lease: Lease,
        sql: bytes,
        fmt: str,
        revision: NativeRevision | None = None,
        progress: Progress | None = None,
    ) -> web.StreamResponse:
        """Send blocks as chDB produces them; small results still get one plain response
        (and every result, with ``wait_end_of_query``). ``revision`` rewrites Native blocks
        for the client's protocol version."""
        assert self._pool is not None
        if progress is not None:
            lease.on_release(partial(unwatch_progress, lease.slot))
        stream = await lease.call(
            start_stream, self._pool, lease.slot, req.state, sql, fmt, req.bind, progress
        )
        lease.on_release(lambda: cancel_stream(stream))
        encoder = ResponseEncoder(req.encoding) if req.encoding else None
        transform = partial(_rewritten, revision.block) if revision is not None else None
        started = time.monotonic()
        pending: list[bytes] = []
        size = rows = read_rows = 0
        done = False
        hold_all = req.wait_end_of_query
        # Errors while holding are still plain HTTP errors.
        while hold_all or (
            size < _STREAM_PREFETCH_BYTES and time.monotonic() - started < _STREAM_HOLD_S
        ):
            block = await lease.call(fetch, stream, encoder, transform)
            if block is None:
                done = True
                break
            pending.append(block[0])
            size += len(block[0])
            rows += block[1]
            read_rows += block[2]
        summary = query_summary(
            read_rows=read_rows, result_rows=rows, elapsed=time.monotonic() - started
        )
        headers = self._headers(req, summary, fmt)
        if encoder is not None:
            headers["Content-Encoding"] = encoder.encoding
        if done:
            tail = encoder.finish() if encoder is not None else b""
            return self._response(req, b"".join(pending) + tail, headers)
        tag = uuid.uuid4().hex[:16]
        headers["X-ClickHouse-Exception-Tag"] = tag
        if req.head is not None:
            await req.head.stop()  # the body starts: no more progress lines
            response = req.head.stream_response(headers=headers)
        else:
            response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        try:
            for data in pending:
                await response.write(data)
            while True:
                try:
                    block = await lease.call(fetch, stream, encoder, transform)
                except ClickHouseError as exc:
                    # Headers are gone: report the error inside the body, the way ClickHouse does.
                    trailer = _exception_trailer(exc, tag)
                    await response.write(
                        encoder.compress(trailer) if encoder is not None else trailer
                    )
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

    def _error_response(
        self, error: ClickHouseError, query_id: str, req: _ParsedRequest | None = None
    ) -> web.Response:
        version = self._pool.version if self._pool else ""
        logger.debug("query %s failed: %s", query_id, error.text)
        # After progress headers the status line (200) is out: as a server, the error is
        # told by its X-ClickHouse-Exception-Code header and the body.
        respond = req.head.response if req is not None and req.head is not None else web.Response
        return respond(
            # As ClickHouse: 400 for a bad query, 404 for an unknown table, 501 for what is
            # not implemented... (a 503 is retried by clickhouse-connect, as against a server)
            status=http_status(error.code),
            body=f"{error.text} (version {version})\n".encode(),
            headers={
                "X-ClickHouse-Exception-Code": str(error.code),
                "X-ClickHouse-Query-Id": query_id,
                "X-ClickHouse-Server-Display-Name": self.display_name,
                "Content-Type": "text/plain; charset=UTF-8",
            },
        )
