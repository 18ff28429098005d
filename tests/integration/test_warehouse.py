"""The embedded warehouse against the unchanged clickhouse-connect client, sync and async.

Runs the warehouse as a subprocess (``warehouse_fixture``). Process-level tests (restart,
kill -9, a second owner) start their own instances on their own data dirs. No sleeps as
synchronisation: waits poll a condition under a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import clickhouse_connect
import lz4.frame  # type: ignore[import-untyped]
import pytest
import zstandard
from clickhouse_connect.driver.asyncclient import AsyncClient
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError, StreamFailureError

from tests.integration.warehouse_fixture import (
    REPO_ROOT,
    WarehouseProcess,
    WarehouseStartError,
    start_warehouse,
)

pytestmark = pytest.mark.integration

ROWS = 10_000
# clickhouse-connect sizes insert blocks to ~2 MiB, and compresses each block as its own
# frame. ~1 KB rows make 10k rows three blocks, so losing any frame but the first shows.
PAYLOAD = "x" * 1000
COMPRESSIONS: list[Any] = [False, "lz4", "zstd", "gzip"]


def host_port(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname and parts.port
    return parts.hostname, parts.port


def sync_client(url: str, **kwargs: Any) -> Client:
    host, port = host_port(url)
    return clickhouse_connect.get_client(host=host, port=port, **kwargs)


async def async_client(url: str, **kwargs: Any) -> AsyncClient:
    host, port = host_port(url)
    return await clickhouse_connect.get_async_client(host=host, port=port, **kwargs)


def http_request(
    url: str,
    query: dict[str, str],
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    method: str = "POST",
) -> tuple[int, dict[str, str], bytes]:
    host, port = host_port(url)
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request(method, "/?" + urllib.parse.urlencode(query), body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def wait_until(condition: Any, timeout: float = 30.0, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        time.sleep(0.02)


@pytest.fixture
def client(warehouse_url: str) -> Iterator[Client]:
    # Sessionless, as pingpost's own clients are: each request on the pool (the named
    # sessions clickhouse-connect makes by default are tested on their own, below).
    c = sync_client(warehouse_url, autogenerate_session_id=False)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def db(client: Client) -> Iterator[str]:
    """A database of its own per test: the session warehouse is shared."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    client.command(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        client.command(f"DROP DATABASE IF EXISTS {name}")


def create_events(client: Client, db: str, engine: str = "MergeTree") -> str:
    table = f"{db}.events"
    client.command(
        f"CREATE TABLE {table} (id UInt64, name String, payload String) ENGINE = {engine} ORDER BY id"
    )
    return table


def rows(n: int = ROWS) -> list[tuple[int, str, str]]:
    return [(i, f"n{i}", PAYLOAD) for i in range(n)]


# --------------------------------------------------------------------------- basics


def test_ping_and_root(warehouse_url: str) -> None:
    status, _, body = http_request(warehouse_url, {}, method="GET")
    assert (status, body) == (200, b"Ok.\n")
    host, port = host_port(warehouse_url)
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", "/ping")
    response = conn.getresponse()
    assert (response.status, response.read()) == (200, b"Ok.\n")
    conn.close()


def test_connect_reads_version_timezone_and_headers(client: Client, warehouse_url: str) -> None:
    version, tz = cast(list[str], client.command("SELECT version(), timezone()"))
    assert client.server_version == version and version.split(".")[0].isdigit()
    assert tz
    status, headers, body = http_request(
        warehouse_url, {"query": "SELECT 1 AS x FORMAT JSONEachRow", "query_id": "q-123"}
    )
    assert status == 200 and json.loads(body) == {"x": 1}
    assert headers["X-ClickHouse-Query-Id"] == "q-123"
    assert headers["X-ClickHouse-Format"] == "JSONEachRow"
    assert headers["X-ClickHouse-Timezone"] == tz
    assert headers["X-ClickHouse-Server-Display-Name"]
    summary = json.loads(headers["X-ClickHouse-Summary"])
    assert summary["result_rows"] == "1"


def test_the_engine_runs_with_its_server_settings(client: Client) -> None:
    """ENGINE_SETTINGS reach the embedded engine (chDB's connection string): its memory
    worker ticks once a second, not every 50 ms (most of the warehouse's CPU at rest)."""
    from connectors.warehouse.engine import ENGINE_SETTINGS

    for setting in ENGINE_SETTINGS.split("&"):
        name, value = setting.split("=")
        got = client.command(f"SELECT value FROM system.server_settings WHERE name = '{name}'")
        assert str(got) == value, (name, got)


def test_select_1_latency_has_no_nagle_delay(client: Client) -> None:
    # With Nagle on, every response took ~44 ms on loopback instead of ~2 ms.
    timings = []
    for _ in range(60):
        start = time.perf_counter()
        assert client.command("SELECT 1") == 1
        timings.append(time.perf_counter() - start)
    timings.sort()
    assert timings[len(timings) // 2] < 0.02, (
        f"SELECT 1 p50 {timings[len(timings) // 2] * 1000:.1f} ms"
    )


def test_ddl_mergetree_and_replacing_mergetree(client: Client, db: str) -> None:
    table = create_events(client, db)
    client.insert(table, [(1, "a", ""), (2, "b", "")], column_names=["id", "name", "payload"])
    assert client.query(f"SELECT id, name FROM {table} ORDER BY id").result_rows == [
        (1, "a"),
        (2, "b"),
    ]
    assert client.command(f"EXISTS TABLE {table}") == 1

    client.command(
        f"CREATE TABLE {db}.latest (id UInt64, v UInt32) ENGINE = ReplacingMergeTree(v) ORDER BY id"
    )
    client.insert(f"{db}.latest", [(1, 1), (2, 1)])
    client.insert(f"{db}.latest", [(1, 5), (2, 3)])
    assert client.query(f"SELECT id, v FROM {db}.latest FINAL ORDER BY id").result_rows == [
        (1, 5),
        (2, 3),
    ]
    description = client.query(f"DESCRIBE TABLE {db}.latest").result_rows
    assert [(r[0], r[1]) for r in description] == [("id", "UInt64"), ("v", "UInt32")]


@pytest.mark.parametrize("compress", [False, "lz4"], ids=str)
def test_column_types_round_trip(
    warehouse_url: str, client: Client, db: str, compress: Any
) -> None:
    """Types the pipeline stores, through Native both ways (incl. the protocol-version probe)."""
    client.command(
        f"CREATE TABLE {db}.typed (id UInt64, buyer LowCardinality(String), price Nullable(Float64),"
        " at DateTime64(3, 'UTC'), tags Array(String), ok Bool, lead UUID)"
        " ENGINE = MergeTree ORDER BY id"
    )
    at = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    lead = uuid.uuid4()
    data = [(1, "acme", 1.25, at, ["a", "b"], True, lead), (2, "zen", None, at, [], False, lead)]
    c = sync_client(warehouse_url, compress=compress)
    try:
        c.insert(f"{db}.typed", data)
        got = c.query(f"SELECT * FROM {db}.typed ORDER BY id").result_rows
    finally:
        c.close()
    assert [tuple(r[:3]) + tuple(r[4:]) for r in got] == [r[:3] + r[4:] for r in data]
    assert [r[3].replace(tzinfo=UTC) for r in got] == [at, at]


@pytest.mark.parametrize("compress", [False, "zstd"], ids=str)
def test_datetimes_with_time_zones_come_back_tz_aware_as_from_a_server(
    warehouse_url: str, db: str, compress: Any
) -> None:
    """clickhouse-connect negotiates client_protocol_version (its probe checks the block
    info), and a DateTime('tz') / DateTime64(p, 'tz') column, in a table or computed, nested
    or not, streamed in many blocks or held whole (wait_end_of_query), comes back tz-aware in
    its zone: the values a ClickHouse server gives (without the protocol version they came
    back naive and shifted)."""
    from zoneinfo import ZoneInfo

    c = sync_client(warehouse_url, compress=compress)
    try:
        assert c.protocol_version == 54405
        chicago, tokyo = ZoneInfo("America/Chicago"), ZoneInfo("Asia/Tokyo")
        [row] = c.query(
            "SELECT toDateTime('2023-07-05 12:44:22', 'America/Chicago') AS d, "
            "toDateTime64('2023-07-05 12:44:22.5', 3, 'Asia/Tokyo') AS d64, "
            "[toDateTime('2023-07-05 12:44:22', 'America/Chicago')] AS a, 7 AS x"
        ).result_rows
        assert row[0] == datetime(2023, 7, 5, 12, 44, 22, tzinfo=chicago)
        assert row[0].tzinfo == chicago and row[0].utcoffset() is not None
        assert row[1] == datetime(2023, 7, 5, 12, 44, 22, 500000, tzinfo=tokyo)
        assert row[1].tzinfo == tokyo
        assert row[2] == [row[0]] and row[2][0].tzinfo == chicago
        assert row[3] == 7
        c.command(
            f"CREATE TABLE {db}.tz (id UInt64, at DateTime('Europe/Berlin'), "
            "name LowCardinality(String)) ENGINE = MergeTree ORDER BY id"
        )
        base = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
        n = 100_000
        c.command(
            f"INSERT INTO {db}.tz SELECT number, toDateTime({int(base.timestamp())} + number), "
            f"toString(number % 7) FROM numbers({n})"
        )
        berlin = ZoneInfo("Europe/Berlin")
        for settings in ({}, {"wait_end_of_query": 1}):
            got = c.query(f"SELECT * FROM {db}.tz ORDER BY id", settings=settings).result_rows
            assert len(got) == n
            assert got[0][1] == base and got[0][1].tzinfo == berlin
            assert got[-1][1].timestamp() == base.timestamp() + n - 1
            assert got[-1][2] == str((n - 1) % 7)
    finally:
        c.close()


def test_an_inserts_elapsed_time_is_its_own_not_its_sessions_idle_time(
    warehouse_url: str, client: Client, db: str
) -> None:
    """X-ClickHouse-Summary's elapsed_ns of an insert is at most the request's own time.
    (chDB times an insert from its session's last query: after a second of idleness a 4 ms
    insert said ~1 s; found by the JavaScript client's check, bench/clickhouse_js.)"""
    client.command(f"CREATE TABLE {db}.e (x UInt8) ENGINE = MergeTree ORDER BY x")
    idle_until = time.monotonic() + 1.0
    while time.monotonic() < idle_until:  # every pooled session idle for a second
        time.sleep(0.05)
    for _ in range(3):
        t0 = time.monotonic()
        status, headers, _ = http_request(
            warehouse_url, {"query": f"INSERT INTO {db}.e FORMAT TabSeparated"}, b"1\n"
        )
        wall_ns = (time.monotonic() - t0) * 1e9
        assert status == 200
        summary = json.loads(headers["X-ClickHouse-Summary"])
        assert summary["written_rows"] == "1"
        assert 0 < int(summary["elapsed_ns"]) <= wall_ns, (summary, wall_ns)


def test_database_parameter_and_use_do_not_leak(
    warehouse_url: str, client: Client, db: str
) -> None:
    create_events(client, db)
    scoped = sync_client(warehouse_url, database=db)
    try:
        assert scoped.command("SELECT currentDatabase()") == db
        assert scoped.command("SELECT count() FROM events") == 0
        # Stateless like ClickHouse's HTTP without a session: USE/SET last one request.
        client.command(f"USE {db}")
        client.command("SET max_threads = 1")
        for _ in range(8):  # every pooled session
            assert client.command("SELECT currentDatabase()") == "default"
            assert client.command("SELECT getSetting('max_threads')") != 1
    finally:
        scoped.close()


def test_settings_apply_to_one_request(client: Client) -> None:
    assert (
        client.command("SELECT getSetting('max_block_size')", settings={"max_block_size": 1234})
        == 1234
    )
    for _ in range(8):
        assert client.command("SELECT getSetting('max_block_size')") != 1234
    with pytest.raises(DatabaseError, match="UNKNOWN_SETTING"):
        client.command("SELECT 1", settings={"no_such_setting_xyz": 1})
    assert client.command("SELECT 2") == 2


def test_get_requests_are_readonly(warehouse_url: str, client: Client, db: str) -> None:
    status, headers, body = http_request(
        warehouse_url, {"query": f"CREATE TABLE {db}.g (a UInt8) ENGINE = Memory"}, method="GET"
    )
    assert status == 500 and headers["X-ClickHouse-Exception-Code"] == "164", body
    status, _, body = http_request(warehouse_url, {"query": "SELECT 40 + 2"}, method="GET")
    assert (status, body) == (200, b"42\n")
    for _ in range(8):  # the readonly session was reset for the requests after it
        client.command(f"CREATE TABLE IF NOT EXISTS {db}.g (a UInt8) ENGINE = Memory")


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "value", ["plain", "tab\there", "quote ' and \\ backslash", "new\nline", "ünïcødé ✓", ""]
)
def test_server_side_and_client_side_parameters(client: Client, value: str) -> None:
    assert client.query("SELECT {v:String}", parameters={"v": value}).result_rows == [(value,)]
    assert client.query("SELECT %(v)s", parameters={"v": value}).result_rows == [(value,)]


def test_typed_and_long_parameters(client: Client) -> None:
    assert client.query(
        "SELECT {a:Array(UInt32)}, {n:UInt64}", parameters={"a": [1, 2, 3], "n": 7}
    ).result_rows == [([1, 2, 3], 7)]
    long_value = "y" * 10_000  # long binds make clickhouse-connect send a multipart form
    assert client.query("SELECT length({v:String})", parameters={"v": long_value}).result_rows == [
        (10_000,)
    ]


# --------------------------------------------------------------------------- inserts


@pytest.mark.parametrize("compress", COMPRESSIONS, ids=str)
def test_insert_10k_rows_every_compression(
    warehouse_url: str, client: Client, db: str, compress: Any
) -> None:
    table = create_events(client, db)
    writer = sync_client(warehouse_url, compress=compress)
    try:
        summary = writer.insert(table, rows(), column_names=["id", "name", "payload"])
        assert summary.written_rows == ROWS
        # Reading back through the same compression exercises compressed responses too.
        assert writer.query(
            f"SELECT count(), sum(id), uniqExact(name) FROM {table}"
        ).result_rows == [(ROWS, ROWS * (ROWS - 1) // 2, ROWS)]
        assert len(writer.query(f"SELECT * FROM {table}").result_rows) == ROWS
    finally:
        writer.close()


@pytest.mark.parametrize("compress", COMPRESSIONS, ids=str)
async def test_async_insert_10k_rows_every_compression(
    warehouse_url: str, client: Client, db: str, compress: Any
) -> None:
    table = create_events(client, db)
    writer = await async_client(warehouse_url, compress=compress)
    try:
        summary = await writer.insert(table, rows(), column_names=["id", "name", "payload"])
        assert summary.written_rows == ROWS
        result = await writer.query(f"SELECT count(), sum(id) FROM {table}")
        assert result.result_rows == [(ROWS, ROWS * (ROWS - 1) // 2)]
        assert len((await writer.query(f"SELECT * FROM {table}")).result_rows) == ROWS
    finally:
        await writer.close()


def _frames(encoding: str, parts: list[bytes]) -> bytes:
    if encoding == "lz4":
        return b"".join(lz4.frame.compress(p) for p in parts)
    if encoding == "zstd":
        return b"".join(zstandard.ZstdCompressor().compress(p) for p in parts)
    return b"".join(gzip.compress(p) for p in parts)


@pytest.mark.parametrize("encoding", ["lz4", "zstd", "gzip"])
def test_raw_multi_frame_chunked_body(
    warehouse_url: str, client: Client, db: str, encoding: str
) -> None:
    """Three separately compressed frames, sent chunked in odd-sized pieces: all rows land."""
    table = create_events(client, db)
    parts = [
        b"".join(f"{i}\tn{i}\tp\n".encode() for i in range(start, start + 1000))
        for start in (0, 1000, 2000)
    ]
    body = _frames(encoding, parts)
    host, port = host_port(warehouse_url)
    conn = http.client.HTTPConnection(host, port, timeout=30)
    query = urllib.parse.urlencode({"query": f"INSERT INTO {table} FORMAT TabSeparated"})
    conn.request(
        "POST",
        f"/?{query}",
        body=iter([body[i : i + 777] for i in range(0, len(body), 777)]),
        headers={"Content-Encoding": encoding},
        encode_chunked=True,
    )
    response = conn.getresponse()
    assert response.status == 200, response.read()
    assert json.loads(response.getheader("X-ClickHouse-Summary") or "{}")["written_rows"] == "3000"
    conn.close()
    assert client.command(f"SELECT count() FROM {table}") == 3000


def test_insert_statement_in_body_and_values(client: Client, db: str, warehouse_url: str) -> None:
    table = create_events(client, db)
    # Statement and data in one body, data starting with a tab byte right after the newline.
    status, _, body = http_request(
        warehouse_url, {}, f"INSERT INTO {table} FORMAT TabSeparated\n1\t\tp\n2\tb\tq\n".encode()
    )
    assert status == 200, body
    client.command(f"INSERT INTO {table} VALUES (3, 'c', 'r')")
    client.raw_insert(table, ["id", "name", "payload"], b"4,d,s\n", fmt="CSV")
    assert client.query(f"SELECT id, name FROM {table} ORDER BY id").result_rows == [
        (1, ""),
        (2, "b"),
        (3, "c"),
        (4, "d"),
    ]


def test_bad_insert_data_is_an_error_and_server_recovers(client: Client, db: str) -> None:
    table = create_events(client, db)
    with pytest.raises(DatabaseError, match=r"Code: \d+"):
        client.raw_insert(table, ["id", "name", "payload"], b"not-a-number,x,y\n", fmt="CSV")
    with pytest.raises(DatabaseError, match="UNKNOWN_TABLE"):
        client.insert(f"{db}.missing", [(1,)], column_names=["id"], column_type_names=["UInt64"])
    client.insert(table, [(1, "a", "b")], column_names=["id", "name", "payload"])
    assert client.command(f"SELECT count() FROM {table}") == 1


def test_client_disconnect_mid_insert_commits_nothing(
    warehouse_url: str, client: Client, db: str
) -> None:
    table = create_events(client, db)
    host, port = host_port(warehouse_url)
    query = urllib.parse.urlencode({"query": f"INSERT INTO {table} FORMAT TabSeparated"})
    data = b"".join(f"{i}\tn\tp\n".encode() for i in range(1000))
    for _ in range(6):  # more than the pool: every session must come back usable
        with socket.create_connection((host, port)) as sock:
            sock.sendall(
                f"POST /?{query} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            )
            sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")  # no final 0-chunk
    for _ in range(8):
        assert client.command(f"SELECT count() FROM {table}") == 0


def test_truncated_or_unknown_encoding_is_an_error(
    warehouse_url: str, client: Client, db: str
) -> None:
    table = create_events(client, db)
    query = {"query": f"INSERT INTO {table} FORMAT TabSeparated"}
    truncated = lz4.frame.compress(b"1\tn\tp\n" * 100)[:-5]
    status, headers, body = http_request(
        warehouse_url, query, truncated, {"Content-Encoding": "lz4"}
    )
    assert status == 500 and headers["X-ClickHouse-Exception-Code"] == "271", body
    status, _, body = http_request(
        warehouse_url, query, b"1\tn\tp\n", {"Content-Encoding": "snappy"}
    )
    assert status == 500 and b"Unsupported Content-Encoding" in body
    assert client.command(f"SELECT count() FROM {table}") == 0


# --------------------------------------------------------------------------- reads


def test_query_df_and_query_arrow(client: Client, db: str) -> None:
    table = create_events(client, db)
    client.insert(table, rows(100), column_names=["id", "name", "payload"])
    df = client.query_df(f"SELECT id, name FROM {table} ORDER BY id")
    assert list(df.columns) == ["id", "name"] and len(df) == 100 and df["name"].iloc[5] == "n5"
    arrow = client.query_arrow(f"SELECT id, name FROM {table} ORDER BY id")
    assert arrow.num_rows == 100 and arrow.column("id").to_pylist()[:3] == [0, 1, 2]


def test_empty_results(client: Client, db: str) -> None:
    table = create_events(client, db)
    assert client.query(f"SELECT * FROM {table}").result_rows == []
    assert client.command(f"SELECT id FROM {table}") == ""
    assert len(client.query_df(f"SELECT id FROM {table}")) == 0


@pytest.mark.parametrize("compress", COMPRESSIONS, ids=str)
def test_streaming_query(warehouse_url: str, compress: Any) -> None:
    reader = sync_client(warehouse_url, compress=compress)
    try:
        with reader.query_rows_stream(
            "SELECT number, toString(number) FROM numbers(500000)"
        ) as stream:
            total = sum(row[0] for row in stream)
        assert total == 500000 * 499999 // 2
    finally:
        reader.close()


def test_error_after_streaming_started_reaches_client(warehouse_url: str) -> None:
    reader = sync_client(warehouse_url, compress=False)
    seen = 0
    sql = (
        "SELECT throwIf(number = 300000, 'boom'), repeat('x', 100) FROM numbers(1000000)"
        " SETTINGS max_block_size = 10000"
    )
    try:
        with (
            pytest.raises((StreamFailureError, DatabaseError), match="boom"),
            reader.query_rows_stream(sql) as stream,
        ):
            for _ in stream:
                seen += 1
        assert 0 < seen <= 300000  # rows had been streamed before the error
        assert reader.command("SELECT 1") == 1
    finally:
        reader.close()


# --------------------------------------------------------------------------- errors


def test_bad_sql_raises_database_error_with_clickhouse_text(
    client: Client, warehouse_url: str
) -> None:
    with pytest.raises(DatabaseError) as info:
        client.query("SELEC 1")
    assert "Code: 62. DB::Exception: Syntax error" in str(info.value) and "(SYNTAX_ERROR)" in str(
        info.value
    )
    with pytest.raises(DatabaseError, match="UNKNOWN_TABLE"):
        client.command("SELECT * FROM default.no_such_table_xyz")
    status, headers, body = http_request(
        warehouse_url, {"query": "SELECT * FROM no_such_table_xyz"}
    )
    assert status == 404 and headers["X-ClickHouse-Exception-Code"] == "60"  # as a server
    assert body.startswith(b"Code: 60. DB::Exception: ")


async def test_async_errors(warehouse_url: str) -> None:
    c = await async_client(warehouse_url)
    try:
        with pytest.raises(DatabaseError, match="SYNTAX_ERROR"):
            await c.query("SELEC 1")
        assert await c.command("SELECT 3") == 3
    finally:
        await c.close()


# --------------------------------------------------------------------------- concurrency


def test_concurrent_queries_from_threads(warehouse_url: str, client: Client, db: str) -> None:
    table = create_events(client, db)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        c = sync_client(warehouse_url)
        try:
            for i in range(10):
                c.insert(
                    table, [(n * 1000 + i, f"w{n}", "")], column_names=["id", "name", "payload"]
                )
                assert c.query("SELECT {n:UInt32} * 2", parameters={"n": n}).result_rows == [
                    (n * 2,)
                ]
                assert c.command("SELECT sum(number) FROM numbers(100000)") == 4999950000
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            c.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert client.command(f"SELECT count() FROM {table}") == 80


async def test_async_concurrent_queries(warehouse_url: str) -> None:
    c = await async_client(warehouse_url, autogenerate_session_id=False)
    try:
        results = await asyncio.gather(
            *(
                c.query("SELECT {n:UInt32} + sum(number) FROM numbers(100000)", parameters={"n": n})
                for n in range(16)
            )
        )
        assert [r.result_rows[0][0] for r in results] == [4999950000 + n for n in range(16)]
    finally:
        await c.close()


# --------------------------------------------------------------------------- process lifecycle


@pytest.fixture
def own_warehouse(tmp_path: Path) -> Iterator[list[WarehouseProcess]]:
    """Warehouses a test starts itself; any left running are stopped afterwards."""
    started: list[WarehouseProcess] = []
    try:
        yield started
    finally:
        for process in started:
            process.kill()


def _start(started: list[WarehouseProcess], data_dir: Path) -> WarehouseProcess:
    process = start_warehouse(data_dir)
    started.append(process)
    return process


def _fill(url: str, n: int) -> None:
    c = sync_client(url)
    try:
        c.command("CREATE DATABASE IF NOT EXISTS pp")
        c.command(
            "CREATE TABLE IF NOT EXISTS pp.events (id UInt64, name String) ENGINE = MergeTree ORDER BY id"
        )
        c.insert("pp.events", [(i, f"n{i}") for i in range(n)], column_names=["id", "name"])
    finally:
        c.close()


def _count(url: str) -> int:
    c = sync_client(url)
    try:
        return cast(int, c.command("SELECT count() FROM pp.events"))
    finally:
        c.close()


def test_listening_line_and_clean_sigterm_exit(
    own_warehouse: list[WarehouseProcess], tmp_path: Path
) -> None:
    process = _start(own_warehouse, tmp_path / "data")
    assert f"warehouse listening on {process.url} (data: {tmp_path / 'data'})" in process.log()
    assert process.stop() == 0


def test_restart_keeps_data(own_warehouse: list[WarehouseProcess], tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = _start(own_warehouse, data_dir)
    _fill(first.url, 1234)
    assert first.stop() == 0
    second = _start(own_warehouse, data_dir)
    assert _count(second.url) == 1234


def test_kill_9_then_restart_keeps_committed_data(
    own_warehouse: list[WarehouseProcess], tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    first = _start(own_warehouse, data_dir)
    _fill(first.url, 4321)  # returns once the insert is committed
    first.kill()
    second = _start(own_warehouse, data_dir)
    assert _count(second.url) == 4321
    _fill(second.url, 10)
    assert _count(second.url) == 4331


def test_second_instance_on_same_dir_exits_with_plain_message(
    own_warehouse: list[WarehouseProcess], tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    first = _start(own_warehouse, data_dir)
    result = subprocess.run(
        [sys.executable, "-m", "connectors.warehouse", "--data-dir", str(data_dir), "--port", "0"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert (
        f"data directory {data_dir.resolve()} is already in use"
        f" by another warehouse process (pid {first.pid})" in result.stderr
    )
    assert "EmbeddedServer" not in result.stderr
    c = sync_client(first.url)  # the owner is unaffected
    try:
        assert c.command("SELECT 1") == 1
    finally:
        c.close()


def test_fixture_start_fails_loudly_when_dir_is_taken(
    own_warehouse: list[WarehouseProcess], tmp_path: Path
) -> None:
    """What the session fixture turns into pytest.fail: an error with the process's own words."""
    data_dir = tmp_path / "data"
    _start(own_warehouse, data_dir)
    with pytest.raises(WarehouseStartError, match="already in use by another warehouse process"):
        start_warehouse(data_dir, tmp_path / "second.log")


def test_chdb_lock_error_is_translated(
    own_warehouse: list[WarehouseProcess], tmp_path: Path
) -> None:
    """Another (non-warehouse) chDB process holds the dir: say so instead of 'EmbeddedServer'."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    holder_code = (
        "import sys; from chdb.session import Session; s = Session(sys.argv[1]);"
        " print('ready', flush=True); sys.stdin.read()"
    )
    with subprocess.Popen(
        [sys.executable, "-c", holder_code, str(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
            result = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "connectors.warehouse",
                    "--data-dir",
                    str(data_dir),
                    "--port",
                    "0",
                ],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert result.returncode != 0
            expected = (
                f"data directory {data_dir.resolve()} is already in use"
                f" by another process using chDB (pid {holder.pid})"
            )
            assert expected in result.stderr
        finally:
            holder.kill()


def test_sigterm_finishes_in_flight_query(
    own_warehouse: list[WarehouseProcess], tmp_path: Path
) -> None:
    process = _start(own_warehouse, tmp_path / "data")
    outcome: dict[str, Any] = {}

    def slow_query() -> None:
        c = sync_client(process.url)
        try:
            outcome["value"] = c.command(
                "SELECT sum(sleepEachRow(0.3)) + 7 FROM numbers(5) SETTINGS max_block_size = 1"
            )
        except BaseException as exc:  # asserted below
            outcome["error"] = exc

    thread = threading.Thread(target=slow_query)
    thread.start()
    watcher = sync_client(process.url)
    wait_until(
        lambda: (
            watcher.command(
                "SELECT count() FROM system.processes"
                " WHERE query LIKE '%sleepEachRow%' AND query NOT LIKE '%system.processes%'"
            )
            == 1
        ),
        message="the slow query to start",
    )
    watcher.close()
    assert process.stop() == 0  # SIGTERM while the query runs
    thread.join(30)
    assert outcome == {"value": 7}


# --------------------------------------------------------------------------- as a server answers (issue 14)


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ("SELEC 1", 400, "62"),  # SYNTAX_ERROR
        ("SELECT * FROM default.no_such_table_xyz", 404, "60"),  # UNKNOWN_TABLE
        ("SELECT no_such_function_xyz()", 404, "46"),  # UNKNOWN_FUNCTION
        ("SELECT throwIf(1)", 500, "395"),  # FUNCTION_THROW_IF_VALUE_IS_NON_ZERO
    ],
)
def test_an_error_gets_the_http_status_a_server_gives_it(
    warehouse_url: str, query: str, status: int, code: str
) -> None:
    got, headers, body = http_request(warehouse_url, {"query": query})
    assert (got, headers["X-ClickHouse-Exception-Code"]) == (status, code), body
    assert body.startswith(f"Code: {code}.".encode())


def test_the_database_and_format_request_headers_stand_for_their_parameters(
    warehouse_url: str, client: Client, db: str
) -> None:
    client.command(f"CREATE TABLE {db}.h (a UInt8) ENGINE = Memory")
    client.command(f"INSERT INTO {db}.h VALUES (7)")
    status, headers, body = http_request(
        warehouse_url,
        {"query": "SELECT a FROM h"},
        headers={"X-ClickHouse-Database": db, "X-ClickHouse-Format": "JSONEachRow"},
    )
    assert (status, json.loads(body)) == (200, {"a": 7}), body
    assert headers["X-ClickHouse-Format"] == "JSONEachRow"
    # A URL parameter wins over its header.
    status, _, body = http_request(
        warehouse_url,
        {"query": "SELECT a FROM h", "default_format": "CSV"},
        headers={"X-ClickHouse-Database": db, "X-ClickHouse-Format": "JSONEachRow"},
    )
    assert (status, body) == (200, b"7\n")


def test_replicas_status_answers_ok(warehouse_url: str) -> None:
    host, port = host_port(warehouse_url)
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", "/replicas_status")
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"Ok.\n")
    finally:
        conn.close()


def test_a_response_is_compressed_only_when_asked(warehouse_url: str) -> None:
    query = {"query": "SELECT number FROM numbers(1000) FORMAT CSV"}
    _, plain, body = http_request(warehouse_url, query, headers={"Accept-Encoding": "gzip"})
    assert "Content-Encoding" not in plain and body.startswith(b"0\n1\n")
    _, packed, body = http_request(
        warehouse_url,
        {**query, "enable_http_compression": "1"},
        headers={"Accept-Encoding": "gzip"},
    )
    assert packed["Content-Encoding"] == "gzip"
    assert gzip.decompress(body).startswith(b"0\n1\n")


# --------------------------------------------------------------------------- sessions


def test_a_named_session_keeps_temporary_tables_settings_and_database(
    warehouse_url: str, db: str
) -> None:
    sid = f"s-{uuid.uuid4().hex[:8]}"
    c = sync_client(warehouse_url, session_id=sid)
    other = sync_client(warehouse_url, autogenerate_session_id=False)
    try:
        c.command("CREATE TEMPORARY TABLE tt (x UInt8)")
        c.command("INSERT INTO tt VALUES (1), (2)")
        c.command("SET max_threads = 3")
        c.command(f"USE {db}")
        assert c.command("SELECT count() FROM tt") == 2
        assert c.command("SELECT getSetting('max_threads')") == 3
        assert c.command("SELECT currentDatabase()") == db
        # Another client (no session) sees none of it.
        with pytest.raises(DatabaseError, match="UNKNOWN_TABLE|Unknown table"):
            other.command("SELECT count() FROM tt")
        assert other.command("SELECT currentDatabase()") == "default"
    finally:
        c.close()
        other.close()


def test_session_check_close_session_and_the_lock(warehouse_url: str) -> None:
    sid = f"s-{uuid.uuid4().hex[:8]}"
    status, headers, body = http_request(
        warehouse_url, {"query": "SELECT 1", "session_id": sid, "session_check": "1"}
    )
    assert (status, headers["X-ClickHouse-Exception-Code"]) == (500, "372"), body
    assert http_request(warehouse_url, {"query": "SELECT 1", "session_id": sid})[0] == 200
    assert (
        http_request(warehouse_url, {"query": "SELECT 1", "session_id": sid, "session_check": "1"})[
            0
        ]
        == 200
    )
    # One request at a time: a second one while the first sleeps is refused, as a server does.
    results: list[tuple[int, dict[str, str], bytes]] = []
    slow = threading.Thread(
        target=lambda: results.append(
            http_request(warehouse_url, {"query": "SELECT sleep(1)", "session_id": sid})
        )
    )
    slow.start()

    def sleeping() -> bool:
        _, _, out = http_request(
            warehouse_url,
            {
                "query": "SELECT count() FROM system.processes "
                "WHERE query LIKE 'SELECT sleep(1)%' FORMAT CSV"
            },
        )
        return out.strip() == b"1"

    wait_until(sleeping, message="the first request to be running")
    status, headers, body = http_request(warehouse_url, {"query": "SELECT 2", "session_id": sid})
    slow.join()
    assert (status, headers["X-ClickHouse-Exception-Code"]) == (500, "373"), body
    assert b"locked by a concurrent client" in body
    assert results[0][0] == 200
    # close_session=1 ends it: the next check finds nothing.
    assert (
        http_request(warehouse_url, {"query": "SELECT 3", "session_id": sid, "close_session": "1"})[
            0
        ]
        == 200
    )
    wait_until(
        lambda: (
            http_request(
                warehouse_url, {"query": "SELECT 1", "session_id": sid, "session_check": "1"}
            )[0]
            == 500
        ),
        message="the closed session to be gone",
    )


def test_a_requests_settings_and_database_are_for_that_request_only(
    warehouse_url: str, db: str
) -> None:
    sid = f"s-{uuid.uuid4().hex[:8]}"

    def run(query: str, **params: str) -> bytes:
        status, _, body = http_request(warehouse_url, {"query": query, "session_id": sid, **params})
        assert status == 200, body
        return body.strip()

    base = run("SELECT getSetting('max_threads')")
    assert run("SELECT getSetting('max_threads')", max_threads="3") == b"3"
    assert run("SELECT getSetting('max_threads')") == base  # put back
    run("SET max_threads = 5")  # the session's own
    assert run("SELECT getSetting('max_threads')", max_threads="3") == b"3"
    assert run("SELECT getSetting('max_threads')") == b"5"
    assert run("SELECT currentDatabase()", database=db) == db.encode()
    assert run("SELECT currentDatabase()") == b"default"  # the session's own database
    run(f"USE {db}")
    assert run("SELECT currentDatabase()") == db.encode()
    # A GET in a session reads only (it cannot be made readonly=2 for one request).
    status, headers, body = http_request(
        warehouse_url,
        {"query": f"CREATE TABLE {db}.nope (a UInt8) ENGINE = Memory", "session_id": sid},
        method="GET",
    )
    assert (status, headers["X-ClickHouse-Exception-Code"]) == (500, "164"), body
    status, _, body = http_request(
        warehouse_url, {"query": "SELECT 1", "session_id": sid}, method="GET"
    )
    assert (status, body) == (200, b"1\n")


def test_a_late_error_of_a_slow_stream_reaches_the_client_as_a_servers_does(
    warehouse_url: str,
) -> None:
    """Rows trickle out (1 per block, 10 ms each) and the 100th fails: the headers went out
    long before, so the error comes in ClickHouse's tagged trailer, after the rows so far."""
    status, headers, body = http_request(
        warehouse_url,
        {
            "query": "SELECT sleepEachRow(0.01), throwIf(number = 100) FROM numbers(200) "
            "FORMAT TSV",
            "max_block_size": "1",
            "wait_end_of_query": "0",
        },
    )
    assert status == 200 and "X-ClickHouse-Exception-Tag" in headers, (status, headers)
    assert body.startswith(b"0\t0\n") and b"__exception__" in body
    assert b"FUNCTION_THROW_IF_VALUE_IS_NON_ZERO" in body


# --------------------------------------------------------------------------- external data


def test_external_data_is_a_temporary_table_for_that_query_only(
    warehouse_url: str, client: Client
) -> None:
    from clickhouse_connect.driver.external import ExternalData

    data = ExternalData(
        file_name="people.csv",
        data=b"ada,36\ngrace,85\nalan,41\n",
        fmt="CSV",
        structure=["name String", "age UInt8"],
    )
    data.add_file(file_name="ids.tsv", data=b"1\n2\n", types="UInt32")
    rows = client.query(
        "SELECT name, age, (SELECT sum(_1) FROM ids) FROM people ORDER BY age",
        external_data=data,
    ).result_rows
    assert rows == [("ada", 36, 3), ("alan", 41, 3), ("grace", 85, 3)]
    # Gone afterwards, from every pooled session.
    for _ in range(8):
        with pytest.raises(DatabaseError, match="UNKNOWN_TABLE|Unknown table"):
            client.query("SELECT count() FROM people")
    # Without a structure: ClickHouse's own message, naming the fields to send.
    status, headers, body = _multipart(warehouse_url, {"query": "SELECT * FROM t"}, {"t": b"1\n"})
    assert (status, headers["X-ClickHouse-Exception-Code"]) == (400, "36"), body
    assert b"t_structure or t_types" in body


def _multipart(
    url: str, query: dict[str, str], files: dict[str, bytes]
) -> tuple[int, dict[str, str], bytes]:
    boundary = "pingpost-test-boundary"
    parts = []
    for name, data in files.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{name}.tsv"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
            + data
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return http_request(
        url, query, body=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )


# --------------------------------------------------------------------------- concurrency


def test_slow_analyst_queries_never_hold_up_inserts_or_a_select_1(
    warehouse_url: str, client: Client, db: str
) -> None:
    """Four analysts' SELECT sleep(3) take the four sessions the pool opens with (no
    session_id: the worst case); the pool grows, so an insert and a SELECT 1 still answer
    within 100 ms, as on a server."""
    table = create_events(client, db)
    client.insert(table, rows(10), column_names=["id", "name", "payload"])  # warm
    sleepers = [
        threading.Thread(target=http_request, args=(warehouse_url, {"query": "SELECT sleep(3)"}))
        for _ in range(4)
    ]
    for t in sleepers:
        t.start()

    def running() -> bool:
        _, _, out = http_request(
            warehouse_url,
            {
                "query": "SELECT count() FROM system.processes "
                "WHERE query LIKE 'SELECT sleep(3)%' FORMAT CSV"
            },
        )
        return out.strip() == b"4"

    try:
        wait_until(running, message="the four sleeps to be running")
        start = time.perf_counter()
        assert client.command("SELECT 1") == 1
        select_ms = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        client.insert(table, rows(100), column_names=["id", "name", "payload"])
        insert_ms = (time.perf_counter() - start) * 1000
        assert running()  # all of it happened while the four still slept
    finally:
        for t in sleepers:
            t.join()
    assert select_ms < 100 and insert_ms < 100, (select_ms, insert_ms)


# --------------------------------------------------------------------------- authentication


def test_with_a_password_every_query_must_carry_it(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.integration.warehouse_fixture import start_warehouse

    monkeypatch.setenv("PINGPOST_WAREHOUSE_PASSWORD", "s3cret-pw")
    wh = start_warehouse(tmp_path / "data", tmp_path / "wh.log")
    try:
        url = wh.url
        assert http_request(url, {}, method="GET")[0] == 200  # ping needs none
        for creds in (
            {},
            {"user": "default", "password": "wrong"},
            {"user": "bob", "password": "s3cret-pw"},
        ):
            status, headers, body = http_request(url, {"query": "SELECT 1", **creds})
            assert (status, headers["X-ClickHouse-Exception-Code"]) == (403, "516"), body
            assert b"s3cret" not in body
        assert http_request(url, {"query": "SELECT 1", "password": "s3cret-pw"})[2] == b"1\n"
        basic = base64.b64encode(b"default:s3cret-pw").decode()
        assert (
            http_request(url, {"query": "SELECT 2"}, headers={"Authorization": f"Basic {basic}"})[2]
            == b"2\n"
        )
        headers = {"X-ClickHouse-User": "default", "X-ClickHouse-Key": "s3cret-pw"}
        assert http_request(url, {"query": "SELECT 3"}, headers=headers)[2] == b"3\n"
        c = sync_client(url, password="s3cret-pw")
        try:
            assert c.command("SELECT 4") == 4
        finally:
            c.close()
        with pytest.raises(DatabaseError, match="AUTHENTICATION_FAILED|516"):
            sync_client(url, password="nope")
        assert b"s3cret" not in (tmp_path / "wh.log").read_bytes()
    finally:
        wh.proc.terminate()
        wh.proc.wait(30)


# --------------------------------------------------------------------------- query ids


def _sleeper(url: str, query_id: str, seconds: float, out: dict[str, Any]) -> threading.Thread:
    """``SELECT sleep(seconds)`` named ``query_id``, in a thread; its answer lands in ``out``."""

    def run() -> None:
        out["answer"] = http_request(
            url, {"query": f"SELECT sleep({seconds})", "query_id": query_id}
        )

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _running(url: str, query_id: str) -> bool:
    _, _, out = http_request(
        url,
        {
            "query": "SELECT count() FROM system.processes WHERE query_id = {q:String} FORMAT CSV",
            "param_q": query_id,
        },
    )
    return out.strip() == b"1"


def test_a_sessions_own_log_comment_is_kept(warehouse_url: str) -> None:
    """The query id's tag (queries.py) never replaces a log_comment the client set in its
    session: getSetting and system.processes show the client's own."""
    sid = f"s-{uuid.uuid4().hex[:8]}"
    c = sync_client(warehouse_url, session_id=sid)
    try:
        c.command("SET log_comment = 'analyst notebook'")
        assert c.command("SELECT getSetting('log_comment')") == "analyst notebook"
        seen = c.query(
            "SELECT Settings['log_comment'] FROM system.processes WHERE is_initial_query"
            " AND query LIKE '%processes%'"
        ).result_rows
        assert seen == [("analyst notebook",)]
        # a request's own log_comment still wins for that request only
        assert (
            c.command("SELECT getSetting('log_comment')", settings={"log_comment": "once"})
            == "once"
        )
        assert c.command("SELECT getSetting('log_comment')") == "analyst notebook"
    finally:
        c.close()


def test_system_processes_and_kill_query_know_the_clients_query_id(
    warehouse_url: str, client: Client
) -> None:
    """As on a server: a query runs under the id its client gave it, system.processes shows
    that id (and not the tag that carries it), KILL QUERY finds it by that id and says so."""
    query_id = f"analyst-{uuid.uuid4().hex[:8]}"
    out: dict[str, Any] = {}
    thread = _sleeper(warehouse_url, query_id, 3, out)
    try:
        wait_until(lambda: _running(warehouse_url, query_id), message="the sleep to run")
        seen = client.query(
            "SELECT query_id, initial_query_id, Settings['log_comment'], query "
            "FROM system.processes AS p WHERE p.query_id = {q:String}",
            parameters={"q": query_id},
        ).result_rows
        assert [(*row[:3], row[3].strip()) for row in seen] == [
            (query_id, query_id, "", "SELECT sleep(3)")
        ]
        # One id, one running query: a second is refused, as a server refuses it.
        status, headers, body = http_request(
            warehouse_url, {"query": "SELECT 1", "query_id": query_id}
        )
        assert (status, headers["X-ClickHouse-Exception-Code"]) == (500, "216"), body
        start = time.monotonic()
        _, _, killed = http_request(
            warehouse_url,
            {
                "query": "KILL QUERY WHERE query_id = {q:String} SYNC FORMAT JSONEachRow",
                "param_q": query_id,
            },
        )
        row = json.loads(killed)
        assert row == {
            "kill_status": "finished",
            "query_id": query_id,
            "user": "default",
            "query": "SELECT sleep(3)\n",  # the query parameter, then a line break
        }
    finally:
        thread.join()
    status, headers, body = out["answer"]
    assert headers["X-ClickHouse-Exception-Code"] == "394", body  # QUERY_WAS_CANCELLED
    assert time.monotonic() - start < 2.5  # cut short, not slept out
    assert not _running(warehouse_url, query_id)
    assert client.command("KILL QUERY WHERE query_id = 'no-such-query'") == ""


def test_replace_running_query_cancels_the_one_with_the_same_id(warehouse_url: str) -> None:
    query_id = f"dashboard-{uuid.uuid4().hex[:8]}"
    out: dict[str, Any] = {}
    thread = _sleeper(warehouse_url, query_id, 3, out)
    try:
        wait_until(lambda: _running(warehouse_url, query_id), message="the sleep to run")
        start = time.monotonic()
        status, _, body = http_request(
            warehouse_url,
            {"query": "SELECT 42", "query_id": query_id, "replace_running_query": "1"},
        )
        assert (status, body) == (200, b"42\n")
        assert time.monotonic() - start < 2.5
    finally:
        thread.join()
    assert out["answer"][1]["X-ClickHouse-Exception-Code"] == "394"


# --------------------------------------------------------------------------- progress headers

_SLOW_COUNT = (
    "SELECT count() FROM numbers(12) WHERE sleepEachRow(0.1) = 0 SETTINGS max_block_size = 1"
)


def _progress_request(
    url: str, sql: str, read_timeout: float, **params: str
) -> tuple[int, list[dict[str, str]], dict[str, str], bytes]:
    """POST ``sql`` with a socket read timeout; (status, progress headers, headers, body)."""
    host, port = host_port(url)
    conn = http.client.HTTPConnection(host, port, timeout=read_timeout)
    try:
        conn.request("POST", "/?" + urllib.parse.urlencode(params), body=sql.encode())
        response = conn.getresponse()
        progress = [json.loads(v) for k, v in response.getheaders() if k == "X-ClickHouse-Progress"]
        return response.status, progress, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_progress_headers_keep_a_long_query_alive_as_a_servers_do(warehouse_url: str) -> None:
    """send_progress_in_http_headers: progress lines go out while the query runs (a client's
    read timeout shorter than the query does not fire), then the summary and the result."""
    status, progress, headers, body = _progress_request(
        warehouse_url,
        _SLOW_COUNT,
        read_timeout=0.6,  # the query takes ~1.2 s; without progress lines this times out
        wait_end_of_query="1",
        send_progress_in_http_headers="1",
        http_headers_progress_interval_ms="150",
    )
    assert (status, body) == (200, b"12\n")
    assert len(progress) >= 4, progress
    read = [int(p["read_rows"]) for p in progress]
    assert read == sorted(read) and read[-1] > 0
    assert {int(p["total_rows_to_read"]) for p in progress} <= {0, 12}
    elapsed = [int(p["elapsed_ns"]) for p in progress]
    assert elapsed == sorted(elapsed)
    assert json.loads(headers["X-ClickHouse-Summary"])["read_rows"] == "12"
    # Without the setting, the same read timeout fires: the test can fail.
    with pytest.raises(TimeoutError):
        _progress_request(warehouse_url, _SLOW_COUNT, read_timeout=0.6, wait_end_of_query="1")


def test_an_error_after_progress_headers_is_told_by_its_code_header(
    warehouse_url: str, client: Client
) -> None:
    """The status line (200) went out with the first progress line: as a server, the error is
    told by X-ClickHouse-Exception-Code and the body, and clickhouse-connect raises it."""
    failing = (
        "SELECT throwIf(number = 6) FROM numbers(12) WHERE sleepEachRow(0.1) = 0 "
        "SETTINGS max_block_size = 1"
    )
    status, progress, headers, body = _progress_request(
        warehouse_url,
        failing,
        read_timeout=10,
        wait_end_of_query="1",
        send_progress_in_http_headers="1",
        http_headers_progress_interval_ms="100",
    )
    assert status == 200 and progress
    assert headers["X-ClickHouse-Exception-Code"] == "395"
    assert b"FUNCTION_THROW_IF_VALUE_IS_NON_ZERO" in body
    with pytest.raises(DatabaseError, match="FUNCTION_THROW_IF_VALUE_IS_NON_ZERO"):
        client.query(
            failing,
            settings={"send_progress_in_http_headers": 1, "http_headers_progress_interval_ms": 100},
        )
    assert client.query(
        _SLOW_COUNT,
        settings={"send_progress_in_http_headers": 1, "http_headers_progress_interval_ms": 100},
    ).result_rows == [(12,)]
