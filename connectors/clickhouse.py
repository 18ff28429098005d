"""The one connector to ClickHouse: clickhouse-connect's async client at a configured URL.

The embedded warehouse (``connectors.warehouse``) and a real ClickHouse server speak the same
HTTP interface, so nothing here knows which one it talks to. Schema changes are versioned
migrations, applied idempotently at start-up and recorded in ``schema_migrations``.

Every event table is a ``ReplacingMergeTree`` ordered by the event's natural id: a redelivered
event (at-least-once) is the same row again, and ``FINAL`` shows each event once. The metric
tables ``flow_minute`` and ``buyer_minute`` are recomputed from the deduplicated events by
refreshable materialized views (see ``_metric_statements``; docs/analytics.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import urlparse

import clickhouse_connect
from clickhouse_connect.driver.exceptions import ClickHouseError, DatabaseError, OperationalError


class Secret(Protocol):
    def get_secret_value(self) -> str: ...


class ClickHouseConfig(Protocol):
    """What the client reads of its configuration (``streams.settings.ClickHouseConfig``
    fits it; connectors import nothing from streams/)."""

    @property
    def url(self) -> str: ...
    @property
    def database(self) -> str: ...
    @property
    def username(self) -> str: ...
    @property
    def password(self) -> Secret: ...


__all__ = [
    "ClickHouseConfig",
    "ClickHouseUnavailable",
    "MIGRATIONS",
    "ClickHouseClient",
    "connect",
    "migrate",
    "TABLE_COLUMNS",
]

log = logging.getLogger(__name__)


class ClickHouseUnavailable(Exception):
    """ClickHouse could not be reached or refused the request; ``retriable`` says if a retry
    can help."""

    def __init__(self, message: str, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable


# --------------------------------------------------------------------------- metric views
#
# flow_minute and buyer_minute hold one row per (flow | buyer, minute) of metrics. They are
# not fed by insert-triggered views: the sink is at-least-once, a redelivered event is
# inserted again in another batch, and a trigger would count it twice (a re-sent ping may
# even carry another status or minute). Instead refreshable materialized views recompute
# whole minutes from the deduplicated event tables (FINAL: one row per event id) and APPEND
# them; the tables are ReplacingMergeTree(refreshed_at), so the newest computation of a
# minute replaces the older ones (query them with FINAL, like every table).
#
# * ``*_mv_recent`` runs every minute (5 s past it, so the sink has landed the minute that
#   just ended) over the last 3 hours: metrics trail the events by at most ~1 minute.
# * ``*_mv_daily`` runs once a day over the last 35 days: events that reached ClickHouse more
#   than 3 hours late (a long warehouse outage) are counted by the next day.
#
# The window starts on a minute boundary, so a minute is always recomputed whole. The SQL is
# frozen here for migration 2: change it with a new migration, never in place.

_FLOW_MINUTE_SELECT = """
SELECT flow, minute,
       sum(pings_sent) AS pings_sent, sum(pings_filtered) AS pings_filtered,
       sum(responses) AS responses, sum(bids) AS bids, sum(no_bids) AS no_bids,
       sum(timeouts) AS timeouts, sum(errors) AS errors, sum(bid_sum) AS bid_sum,
       sum(pings_posted) AS pings_posted, sum(posts) AS posts,
       sum(posts_accepted) AS posts_accepted, sum(leads) AS leads,
       sum(leads_sold) AS leads_sold, sum(revenue) AS revenue,
       if(pings_sent = 0, NULL, responses / pings_sent) AS response_rate,
       if(pings_sent = 0, NULL, bids / pings_sent) AS bid_rate,
       if(bids = 0, NULL, bid_sum / bids) AS avg_bid,
       if(pings_sent = 0, NULL, pings_posted / pings_sent) AS win_rate,
       if(posts = 0, NULL, posts_accepted / posts) AS accept_rate,
       if(pings_sent = 0, NULL, revenue / pings_sent) AS revenue_per_ping,
       if(leads = 0, NULL, revenue / leads) AS revenue_per_lead,
       now64(3) AS refreshed_at
FROM (
    SELECT flow, toStartOfMinute(sent_at) AS minute,
           countIf(status != 'filtered') AS pings_sent,
           countIf(status = 'filtered') AS pings_filtered,
           countIf(status IN ('bid', 'no_bid')) AS responses,
           countIf(status = 'bid') AS bids, countIf(status = 'no_bid') AS no_bids,
           countIf(status = 'timeout') AS timeouts, countIf(status = 'error') AS errors,
           sumIf(coalesce(price, 0), status = 'bid') AS bid_sum,
           countIf(status != 'filtered' AND ping_id IN (
               SELECT ping_id FROM {db}.posts WHERE sent_at >= @SINCE@)) AS pings_posted,
           0 AS posts, 0 AS posts_accepted, 0 AS leads, 0 AS leads_sold, 0 AS revenue
    FROM {db}.pings FINAL WHERE sent_at >= @SINCE@ GROUP BY flow, minute
    UNION ALL
    SELECT flow, toStartOfMinute(sent_at) AS minute, 0, 0, 0, 0, 0, 0, 0, 0, 0,
           count(), countIf(status = 'accepted'), 0, 0, 0
    FROM {db}.posts FINAL WHERE sent_at >= @SINCE@ GROUP BY flow, minute
    UNION ALL
    SELECT flow, toStartOfMinute(closed_at) AS minute, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
           count(), countIf(outcome != 'unsold'), sum(price_total)
    FROM {db}.auctions FINAL WHERE closed_at >= @SINCE@ GROUP BY flow, minute
)
GROUP BY flow, minute"""

_BUYER_MINUTE_SELECT = """
SELECT buyer_id, minute,
       sum(pings_sent) AS pings_sent, sum(pings_filtered) AS pings_filtered,
       sum(bids) AS bids, sum(no_bids) AS no_bids, sum(timeouts) AS timeouts,
       sum(errors) AS errors, sum(bid_sum) AS bid_sum,
       max(latency_p50) AS latency_p50, max(latency_p95) AS latency_p95,
       max(latency_p99) AS latency_p99,
       sum(posts) AS posts, sum(posts_accepted) AS posts_accepted,
       sum(posts_rejected) AS posts_rejected, sum(posts_failed) AS posts_failed,
       sum(spend) AS spend,
       if(pings_sent = 0, NULL, bids / pings_sent) AS bid_rate,
       if(bids = 0, NULL, bid_sum / bids) AS avg_bid,
       if(pings_sent = 0, NULL, timeouts / pings_sent) AS timeout_rate,
       if(pings_sent = 0, NULL, errors / pings_sent) AS error_rate,
       if(posts = 0, NULL, posts_accepted / posts) AS accept_rate,
       now64(3) AS refreshed_at
FROM (
    SELECT buyer_id, toStartOfMinute(sent_at) AS minute,
           countIf(status != 'filtered') AS pings_sent,
           countIf(status = 'filtered') AS pings_filtered,
           countIf(status = 'bid') AS bids, countIf(status = 'no_bid') AS no_bids,
           countIf(status = 'timeout') AS timeouts, countIf(status = 'error') AS errors,
           sumIf(coalesce(price, 0), status = 'bid') AS bid_sum,
           quantilesExactIf(0.5, 0.95, 0.99)(latency_ms, status != 'filtered') AS q,
           if(pings_sent = 0, NULL, q[1]) AS latency_p50,
           if(pings_sent = 0, NULL, q[2]) AS latency_p95,
           if(pings_sent = 0, NULL, q[3]) AS latency_p99,
           0 AS posts, 0 AS posts_accepted, 0 AS posts_rejected, 0 AS posts_failed,
           0 AS spend
    FROM {db}.pings FINAL WHERE sent_at >= @SINCE@ GROUP BY buyer_id, minute
    UNION ALL
    SELECT buyer_id, toStartOfMinute(sent_at) AS minute, 0, 0, 0, 0, 0, 0, 0, [], NULL, NULL,
           NULL, count(), countIf(status = 'accepted'), countIf(status = 'rejected'),
           countIf(status IN ('error', 'timeout')), sumIf(price, status = 'accepted')
    FROM {db}.posts FINAL WHERE sent_at >= @SINCE@ GROUP BY buyer_id, minute
)
GROUP BY buyer_id, minute"""

#: (view suffix, schedule, window start) of the refreshable views that fill each table.
_METRIC_REFRESHES = [
    ("recent", "EVERY 1 MINUTE OFFSET 5 SECOND", "toStartOfMinute(now() - INTERVAL 3 HOUR)"),
    ("daily", "EVERY 1 DAY OFFSET 2 HOUR", "toStartOfMinute(now() - INTERVAL 35 DAY)"),
]


def _metric_statements() -> list[str]:
    rates = "response_rate, bid_rate, avg_bid, win_rate, accept_rate, revenue_per_ping"
    statements = [
        f"""CREATE TABLE IF NOT EXISTS {{db}}.flow_minute (
            flow LowCardinality(String),
            minute DateTime('UTC'),
            pings_sent UInt64, pings_filtered UInt64, responses UInt64, bids UInt64,
            no_bids UInt64, timeouts UInt64, errors UInt64, bid_sum Float64,
            pings_posted UInt64, posts UInt64, posts_accepted UInt64,
            leads UInt64, leads_sold UInt64, revenue Float64,
            {", ".join(f"{c} Nullable(Float64)" for c in rates.split(", "))},
            revenue_per_lead Nullable(Float64),
            refreshed_at DateTime64(3, 'UTC')
        ) ENGINE = ReplacingMergeTree(refreshed_at)
        PARTITION BY toYYYYMM(minute) ORDER BY (flow, minute)""",
        """CREATE TABLE IF NOT EXISTS {db}.buyer_minute (
            buyer_id LowCardinality(String),
            minute DateTime('UTC'),
            pings_sent UInt64, pings_filtered UInt64, bids UInt64, no_bids UInt64,
            timeouts UInt64, errors UInt64, bid_sum Float64,
            latency_p50 Nullable(Float64), latency_p95 Nullable(Float64),
            latency_p99 Nullable(Float64),
            posts UInt64, posts_accepted UInt64, posts_rejected UInt64, posts_failed UInt64,
            spend Float64,
            bid_rate Nullable(Float64), avg_bid Nullable(Float64),
            timeout_rate Nullable(Float64), error_rate Nullable(Float64),
            accept_rate Nullable(Float64),
            refreshed_at DateTime64(3, 'UTC')
        ) ENGINE = ReplacingMergeTree(refreshed_at)
        PARTITION BY toYYYYMM(minute) ORDER BY (buyer_id, minute)""",
    ]
    for table, select in (
        ("flow_minute", _FLOW_MINUTE_SELECT),
        ("buyer_minute", _BUYER_MINUTE_SELECT),
    ):
        for suffix, schedule, since in _METRIC_REFRESHES:
            statements.append(
                f"CREATE MATERIALIZED VIEW IF NOT EXISTS {{db}}.{table}_mv_{suffix}"
                f" REFRESH {schedule} APPEND TO {{db}}.{table} AS"
                + select.replace("@SINCE@", since)
            )
    return statements


#: (version, description, statements). ``{db}`` is the configured database. Append only.
MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "event tables",
        [
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
        ],
    ),
    (
        2,
        "metric tables flow_minute and buyer_minute, filled by refreshable views over FINAL",
        _metric_statements(),
    ),
    (
        3,
        "what a replay needs: ping conditions, wave and timeout; the configuration version "
        "and experiment variant of each auction; the flow_versions table",
        [
            "ALTER TABLE {db}.pings ADD COLUMN IF NOT EXISTS conditions String",
            "ALTER TABLE {db}.pings ADD COLUMN IF NOT EXISTS wave UInt8",
            "ALTER TABLE {db}.pings ADD COLUMN IF NOT EXISTS timeout_ms Nullable(Float64)",
            "ALTER TABLE {db}.auctions ADD COLUMN IF NOT EXISTS config_hash String",
            "ALTER TABLE {db}.auctions ADD COLUMN IF NOT EXISTS variant LowCardinality(String)",
            """CREATE TABLE IF NOT EXISTS {db}.flow_versions (
            hash String,
            flow LowCardinality(String),
            config_json String,
            published_at DateTime64(3, 'UTC')
        ) ENGINE = ReplacingMergeTree(published_at)
        ORDER BY hash""",
        ],
    ),
]

#: Column order of each event table as the sink inserts it.
TABLE_COLUMNS: dict[str, list[str]] = {
    "leads": [
        "lead_id",
        "flow",
        "source",
        "received_at",
        "created_at",
        "ping_fields",
        "pii_hashes",
    ],
    "pings": [
        "ping_id",
        "lead_id",
        "flow",
        "buyer_id",
        "tier",
        "sent_at",
        "answered_at",
        "latency_ms",
        "status",
        "price",
        "exclusive",
        "reason",
        "http_status",
        "conditions",
        "wave",
        "timeout_ms",
    ],
    "auctions": [
        "lead_id",
        "flow",
        "source",
        "outcome",
        "winners",
        "prices",
        "price_total",
        "reason",
        "received_at",
        "opened_at",
        "deadline_at",
        "closed_at",
        "settled_at",
        "duration_ms",
        "close_reason",
        "close_lag_ms",
        "pinged",
        "bids",
        "post_attempts",
        "config_hash",
        "variant",
    ],
    "flow_versions": ["hash", "flow", "config_json", "published_at"],
    "posts": [
        "attempt_id",
        "post_id",
        "lead_id",
        "flow",
        "buyer_id",
        "tier",
        "ping_id",
        "price",
        "exclusive",
        "status",
        "latency_ms",
        "reason",
        "http_status",
        "sent_at",
        "attempt",
    ],
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


class ClickHouseClient:
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
            await self.client.insert(
                table, rows, column_names=TABLE_COLUMNS[table], database=self.database
            )
        except (DatabaseError, OperationalError, ClickHouseError) as exc:
            raise _translate(exc) from exc

    async def close(self) -> None:
        await self.client.close()


def _translate(exc: Exception) -> ClickHouseUnavailable:
    retriable = isinstance(exc, OperationalError) or "Connection" in type(exc).__name__
    return ClickHouseUnavailable(
        str(exc).strip().splitlines()[0][:500] if str(exc) else type(exc).__name__, retriable
    )


async def connect(
    cfg: ClickHouseConfig, *, attempts: int = 1, delay_s: float = 1.0
) -> ClickHouseClient:
    """Connect to ClickHouse at ``cfg.url`` (retrying ``attempts`` times for start-up races)."""
    last: Exception | None = None
    for i in range(attempts):
        try:
            client = await clickhouse_connect.get_async_client(**_client_kwargs(cfg))
            return ClickHouseClient(client, cfg.database)
        except (OperationalError, DatabaseError, ClickHouseError, OSError) as exc:
            last = exc
            if i + 1 < attempts:
                await asyncio.sleep(delay_s)
    raise ClickHouseUnavailable(f"cannot connect to ClickHouse at {cfg.url}: {last}", True)


async def migrate(wh: ClickHouseClient) -> list[int]:
    """Apply pending migrations in order; returns the versions applied now."""
    db = wh.database
    await wh.command(f"CREATE DATABASE IF NOT EXISTS {db}")
    await wh.command(
        f"CREATE TABLE IF NOT EXISTS {db}.schema_migrations (version UInt32, description String,"
        f" applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) ENGINE = ReplacingMergeTree"
        f" ORDER BY version"
    )
    done = {r[0] for r in await wh.query_rows(f"SELECT version FROM {db}.schema_migrations FINAL")}
    applied = []
    for version, desc, statements in MIGRATIONS:
        if version in done:
            continue
        for stmt in statements:
            await wh.command(stmt.format(db=db))
        await wh.command(
            f"INSERT INTO {db}.schema_migrations (version, description) VALUES"
            f" ({version}, {{d:String}})",
            d=desc,
        )
        applied.append(version)
        log.info("applied ClickHouse migration %d: %s", version, desc)
    return applied
