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
  when the request sets ``enable_http_compression=1`` and sends ``Accept-Encoding``
  (clickhouse-connect does both, with lz4/zstd/gzip/deflate). The request headers
  ``X-ClickHouse-Database`` and ``X-ClickHouse-Format`` stand for ``database`` and
  ``default_format``; ``GET /replicas_status`` answers ``Ok.``. ``wait_end_of_query=1`` (what ``client.query()`` sends) buffers the result, so
  every error is an HTTP error; streaming requests (``query_*_stream``) stream blocks and
  report a late error in ClickHouse's tagged ``__exception__`` trailer.
* Errors carry ``X-ClickHouse-Exception-Code`` and ClickHouse's own text (``Code: N.
  DB::Exception: ... (NAME)``), with the HTTP status a server gives that code (400 for a
  syntax error, 404 for an unknown table, 501 for what is not implemented, 500 otherwise).

* Sessions as a server has them: without ``session_id`` every request starts from the
  default database and settings (its ``SET``/``USE`` last that request) on a pooled chDB
  session; the pool opens ``pool_size`` and grows up to ``max_pool_size`` when all are busy,
  so slow queries never hold the others up. With ``session_id`` the client gets a chDB
  session of its own (temporary tables, ``SET``, ``USE`` kept; ``session_timeout``,
  ``session_check``, ``close_session``; one request at a time, else ``SESSION_IS_LOCKED``).
* External data: each multipart file field is a temporary table for that query.
* A streamed result is held at most 100 ms (or 1 MiB) before its headers go out; a later
  error comes in the tagged ``__exception__`` trailer.

* With a password (``PINGPOST_WAREHOUSE_PASSWORD``, or ``clickhouse.password`` for ``pingpost
  warehouse``) every query must carry the user and password, as on a server; without one any
  credentials are accepted (it binds to loopback by default).

* With ``client_protocol_version`` a Native result is what a server sends that client: the block
  info before every block, ``DateTime('tz')`` type names (from a ``DESCRIBE`` run first; see
  ``native``).

* ``query_id`` as the client named it: ``system.processes`` shows it and ``KILL QUERY WHERE
  query_id = ...`` finds it (see ``queries``); a second query with a running one's id is
  refused (216) unless ``replace_running_query=1``, which cancels the old one.
* ``send_progress_in_http_headers=1``: ``X-ClickHouse-Progress`` lines every
  ``http_headers_progress_interval_ms`` while a query runs (see ``progress``).

docs/warehouse-conformance.md has the whole list, its limits and the conformance run.

Modules, by concern: ``server`` (the :class:`EmbeddedWarehouse` and its HTTP handlers), ``engine``
(the chDB session pool and engine calls), ``sql`` (statement scanning), ``native`` (Native
blocks for a client's protocol version), ``queries`` (the client's ``query_id`` in
``system.processes`` and ``KILL QUERY``), ``progress`` (progress headers), ``compression``
(request and response bodies),
``lock`` (data-dir ownership), ``errors``, ``cli`` (the process entry).
"""

from __future__ import annotations

from connectors.warehouse.cli import main, run
from connectors.warehouse.errors import DataDirInUseError, WarehouseError
from connectors.warehouse.server import EmbeddedWarehouse

__all__ = ["DataDirInUseError", "EmbeddedWarehouse", "WarehouseError", "main", "run"]
