"""The one connector to ClickHouse: clickhouse-connect's async client at a configured URL.

The embedded warehouse (``connectors.warehouse``) and a real ClickHouse server speak the same
HTTP interface, so nothing here knows which one it talks to. Schema changes are versioned
migrations, applied idempotently at start-up and recorded in ``schema_migrations``.

Every event table is a ``ReplacingMergeTree`` ordered by the event's natural id: a redelivered
event (at-least-once) is the same row again, and ``FINAL`` (or the ``*_v`` views) shows each
event once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Sequence
from urllib.parse import urlparse

import clickhouse_connect
from clickhouse_connect.driver.exceptions import ClickHouseError, DatabaseError, OperationalError

from streams.settings import ClickHouseConfig

__all__ = ["ClickHouseUnavailable", "MIGRATIONS", "Warehouse", "connect", "migrate", "TABLE_COLUMNS"]

log = logging.getLogger(__name__)


class ClickHouseUnavailable(Exception):
    """ClickHouse could not be reached or refused the request; ``retriable`` says if a retry
    can help."""

    def __init__(self, message: str, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable


#: (version, description, statements). ``{db}`` is the configured database. Append only.
MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "event tables", [
        """CREATE TABLE IF NOT EXISTS {db}.leads (
            lead_id String,
            flow LowCardinality(String),
            source LowCardinality(String),
            received_at DateTime64(3, 'UTC'),
            created_at DateTime64(3, 'UTC'),
            ping_fields Map(String, String),
            pii_hashes Map(String, String)
        ) ENGINE = ReplacingMergeTree
        PARTITION BY toYYYYMM(received_at) ORDER BY lead_id""",
        """CREATE TABLE IF NOT EXISTS {db}.pings (
            ping_id String,
            lead_id String,
            flow LowCardinality(String),
            buyer_id LowCardinality(String),
            tier LowCardinality(String),
            sent_at DateTime64(3, 'UTC'),
            answered_at DateTime64(3, 'UTC'),
            latency_ms Float64,
            status LowCardinality(String),
            price Nullable(Float64),
            exclusive Bool,
            reason String,
            http_status Nullable(UInt16)
        ) ENGINE = ReplacingMergeTree
        PARTITION BY toYYYYMM(sent_at) ORDER BY ping_id""",
        """CREATE TABLE IF NOT EXISTS {db}.auctions (
            lead_id String,
            flow LowCardinality(String),
            source LowCardinality(String),
            outcome LowCardinality(String),
            winners Array(String),
            prices Array(Float64),
            price_total Float64,
            reason String,
            received_at DateTime64(3, 'UTC'),
            opened_at DateTime64(3, 'UTC'),
            deadline_at DateTime64(3, 'UTC'),
            closed_at DateTime64(3, 'UTC'),
            settled_at DateTime64(3, 'UTC'),
            duration_ms Float64,
            close_reason LowCardinality(String),
            close_lag_ms Float64,
            pinged UInt16,
            bids UInt16,
            post_attempts UInt16
        ) ENGINE = ReplacingMergeTree
        PARTITION BY toYYYYMM(closed_at) ORDER BY lead_id""",
        """CREATE TABLE IF NOT EXISTS {db}.posts (
            attempt_id String,
            post_id String,
            lead_id String,
            flow LowCardinality(String),
            buyer_id LowCardinality(String),
            tier LowCardinality(String),
            ping_id String,
            price Float64,
            exclusive Bool,
            status LowCardinality(String),
            latency_ms Float64,
            reason String,
            http_status Nullable(UInt16),
            sent_at DateTime64(3, 'UTC'),
            attempt UInt16
        ) ENGINE = ReplacingMergeTree
        PARTITION BY toYYYYMM(sent_at) ORDER BY attempt_id""",
        """CREATE TABLE IF NOT EXISTS {db}.alerts (
            rule String,
            subject String,
            state LowCardinality(String),
            value Float64,
            at DateTime64(3, 'UTC'),
            message String
        ) ENGINE = ReplacingMergeTree
        PARTITION BY toYYYYMM(at) ORDER BY (rule, subject, at, state)""",
        """CREATE TABLE IF NOT EXISTS {db}.dead_letters (
            id String,
            stage LowCardinality(String),
            topic String,
            partition UInt32,
            offset UInt64,
            reason String,
            field Nullable(String),
            at DateTime64(3, 'UTC')
        ) ENGINE = ReplacingMergeTree
        PARTITION BY toYYYYMM(at) ORDER BY id""",
    ]),
]

#: Column order of each event table as the sink inserts it.
TABLE_COLUMNS: dict[str, list[str]] = {
    "leads": ["lead_id", "flow", "source", "received_at", "created_at", "ping_fields",
              "pii_hashes"],
    "pings": ["ping_id", "lead_id", "flow", "buyer_id", "tier", "sent_at", "answered_at",
              "latency_ms", "status", "price", "exclusive", "reason", "http_status"],
    "auctions": ["lead_id", "flow", "source", "outcome", "winners", "prices", "price_total",
                 "reason", "received_at", "opened_at", "deadline_at", "closed_at",
                 "settled_at", "duration_ms", "close_reason", "close_lag_ms", "pinged", "bids",
                 "post_attempts"],
    "posts": ["attempt_id", "post_id", "lead_id", "flow", "buyer_id", "tier", "ping_id",
              "price", "exclusive", "status", "latency_ms", "reason", "http_status", "sent_at",
              "attempt"],
    "alerts": ["rule", "subject", "state", "value", "at", "message"],
    "dead_letters": ["id", "stage", "topic", "partition", "offset", "reason", "field", "at"],
}


def _client_kwargs(cfg: ClickHouseConfig) -> dict[str, Any]:
    u = urlparse(cfg.url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"clickhouse.url: '{cfg.url}' is not an http(s) URL")
    return {
        "host": u.hostname,
        "port": u.port or (8443 if u.scheme == "https" else 8123),
        "secure": u.scheme == "https",
        "username": cfg.username,
        "password": cfg.password.get_secret_value(),
        "connect_timeout": 5,
        "send_receive_timeout": 60,
        "autogenerate_session_id": False,
    }


class Warehouse:
    """A thin async facade over clickhouse-connect with translated errors."""

    def __init__(self, client: Any, database: str) -> None:
        self.client = client
        self.database = database

    async def command(self, sql: str, **params: Any) -> Any:
        try:
            return await self.client.command(sql, parameters=params or None)
        except (DatabaseError, OperationalError, ClickHouseError) as exc:
            raise _translate(exc) from exc

    async def query_rows(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        try:
            res = await self.client.query(sql, parameters=params or None)
        except (DatabaseError, OperationalError, ClickHouseError) as exc:
            raise _translate(exc) from exc
        return list(res.result_rows)

    async def insert(self, table: str, rows: Sequence[Sequence[Any]]) -> None:
        try:
            await self.client.insert(table, rows, column_names=TABLE_COLUMNS[table],
                                     database=self.database)
        except (DatabaseError, OperationalError, ClickHouseError) as exc:
            raise _translate(exc) from exc

    async def close(self) -> None:
        await self.client.close()


def _translate(exc: Exception) -> ClickHouseUnavailable:
    retriable = isinstance(exc, OperationalError) or "Connection" in type(exc).__name__
    return ClickHouseUnavailable(str(exc).strip().splitlines()[0][:500] if str(exc) else
                                 type(exc).__name__, retriable)


async def connect(cfg: ClickHouseConfig, *, attempts: int = 1, delay_s: float = 1.0) -> Warehouse:
    """Connect to ClickHouse at ``cfg.url`` (retrying ``attempts`` times for start-up races)."""
    last: Exception | None = None
    for i in range(attempts):
        try:
            client = await clickhouse_connect.get_async_client(**_client_kwargs(cfg))
            return Warehouse(client, cfg.database)
        except (OperationalError, DatabaseError, ClickHouseError, OSError) as exc:
            last = exc
            if i + 1 < attempts:
                await asyncio.sleep(delay_s)
    raise ClickHouseUnavailable(f"cannot connect to ClickHouse at {cfg.url}: {last}", True)


async def migrate(wh: Warehouse) -> list[int]:
    """Apply pending migrations in order; returns the versions applied now."""
    db = wh.database
    await wh.command(f"CREATE DATABASE IF NOT EXISTS {db}")
    await wh.command(
        f"CREATE TABLE IF NOT EXISTS {db}.schema_migrations (version UInt32, description String,"
        f" applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) ENGINE = ReplacingMergeTree"
        f" ORDER BY version")
    done = {r[0] for r in await wh.query_rows(f"SELECT version FROM {db}.schema_migrations FINAL")}
    applied = []
    for version, desc, statements in MIGRATIONS:
        if version in done:
            continue
        for stmt in statements:
            await wh.command(stmt.format(db=db))
        await wh.command(f"INSERT INTO {db}.schema_migrations (version, description) VALUES"
                         f" ({version}, {{d:String}})", d=desc)
        applied.append(version)
        log.info("applied ClickHouse migration %d: %s", version, desc)
    return applied
