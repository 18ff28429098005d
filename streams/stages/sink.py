"""Sink stage: every event into the ClickHouse tables analysts query (CONTRACT §5).

Runs as its own consumer group (``pingpost worker --role sink``) so a slow or absent warehouse
never stalls an auction. Rows are buffered per table and inserted in batches (at
``clickhouse.batch_rows`` rows or every ``clickhouse.batch_seconds``); the events of a batch
are acked only after ClickHouse accepted it. A failed insert is retried with a short capped
backoff (0.25 s doubling to 2 s, :class:`WarehouseRetry`) while the events stay unacked (and
the buffer bounds how far the consumer reads ahead). Redelivered events become identical rows
that ``ReplacingMergeTree`` collapses (query with ``FINAL``).
Raw PII never reaches this stage: it reads only redacted topics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson

import schemas
from connectors.clickhouse import ClickHouseClient, ClickHouseUnavailable, connect, migrate
from streams.context import Context
from streams.runtime.agents import timer
from streams.settings import ClickHouseConfig

__all__ = ["SinkStage", "WarehouseRetry", "register", "to_row", "to_rows"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class WarehouseRetry:
    """Run a warehouse call until it succeeds, through an outage of any length.

    Retries a retriable :class:`ClickHouseUnavailable` after ``first_s``, doubling up to
    ``max_s`` (so delivery resumes within ``max_s`` of the warehouse's return, never 15 s
    later); a non-retriable one is raised. Quiet: the first failure is logged at once, then
    one line per ``log_every_s`` with the count of failed attempts, and one line when it
    succeeds again.
    """

    def __init__(
        self,
        what: str,
        *,
        first_s: float = 0.25,
        max_s: float = 2.0,
        log_every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] | None = None,
    ) -> None:
        self.what, self.first_s, self.max_s, self.log_every_s = what, first_s, max_s, log_every_s
        self.clock, self.sleep = clock, sleep

    async def run(self, call: Callable[[], Awaitable[T]]) -> T:
        delay, failures, since, logged = self.first_s, 0, 0.0, None
        while True:
            try:
                result = await call()
            except ClickHouseUnavailable as exc:
                if not exc.retriable:
                    raise
                now = self.clock()
                if not failures:
                    since = now
                failures += 1
                if logged is None or now - logged >= self.log_every_s:
                    logged = now
                    log.warning(
                        "%s failed (%s); %d attempt(s) in %.0f s, retrying every %.2g s at most",
                        self.what,
                        exc,
                        failures,
                        now - since,
                        self.max_s,
                    )
                await (self.sleep or asyncio.sleep)(delay)
                delay = min(delay * 2, self.max_s)
                continue
            if failures:
                log.warning(
                    "%s succeeded again after %d failed attempt(s) in %.0f s",
                    self.what,
                    failures,
                    self.clock() - since,
                )
            return result


def _ts(ms: int | float) -> datetime:
    return datetime.fromtimestamp(ms / 1000.0, tz=UTC)


def _s(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return "" if v is None else str(v)


def _conditions(c: dict[str, Any] | None) -> str:
    """A bid's conditions as compact JSON with only the ones set ('' for none): what a replay
    re-checks (``JSONExtract`` reads it in SQL)."""
    if not c:
        return ""
    set_ = {k: v for k, v in c.items() if v not in (None, False)}
    return orjson.dumps(set_, option=orjson.OPT_SORT_KEYS).decode() if set_ else ""


def to_rows(name: str, r: dict[str, Any]) -> list[tuple[str, list[Any]]]:
    """Map one decoded event to its ``(table, row)`` pairs: a ``PingRound`` is one ``pings``
    row per answer; other events one row, or none."""
    if name == "PingRound":
        return [row for answer in r["answers"] if (row := to_row("Bid", answer)) is not None]
    mapped = to_row(name, r)
    return [] if mapped is None else [mapped]


def to_row(name: str, r: dict[str, Any]) -> tuple[str, list[Any]] | None:
    """Map one decoded event to ``(table, row)``; None for events with no table."""
    if name == "PingRequest":
        return "leads", [
            r["lead_id"],
            r["flow"],
            r["source"],
            _ts(r["received_at_ms"]),
            _ts(r["created_at_ms"]),
            {k: _s(v) for k, v in r["ping_fields"].items()},
            r["pii_hashes"],
        ]
    if name == "Bid":
        return "pings", [
            r["ping_id"],
            r["lead_id"],
            r["flow"],
            r["buyer_id"],
            r["tier"],
            _ts(r["sent_at_ms"]),
            _ts(r["answered_at_ms"]),
            r["latency_ms"],
            r["status"],
            r["price"],
            r["exclusive"],
            r["reason"],
            r["http_status"],
            _conditions(r.get("conditions")),
            r.get("wave", 0),
            r.get("timeout_ms"),
        ]
    if name == "Delivery":
        if r["status"] == "skipped":
            return None  # a bid whose conditions failed at post time: no post was attempted
        return "posts", [
            r["attempt_id"],
            r["post_id"],
            r["lead_id"],
            r["flow"],
            r["buyer_id"],
            r["tier"],
            r["ping_id"],
            r["price"],
            r["exclusive"],
            r["status"],
            r["latency_ms"],
            r["reason"],
            r["http_status"],
            _ts(r["sent_at_ms"]),
            r["attempt"],
        ]
    if name == "AuctionResult":
        return "auctions", [
            r["lead_id"],
            r["flow"],
            r["source"],
            r["outcome"],
            r["winners"],
            r["prices"],
            r["price_total"],
            r["reason"],
            _ts(r["received_at_ms"]),
            _ts(r["opened_at_ms"]),
            _ts(r["deadline_at_ms"]),
            _ts(r["closed_at_ms"]),
            _ts(r["settled_at_ms"]),
            float(r["closed_at_ms"] - r["opened_at_ms"]),
            r["close_reason"],
            r["close_lag_ms"],
            r["pinged"],
            r["bids"],
            r["post_attempts"],
            r.get("config_hash", ""),
            r.get("variant", ""),
        ]
    if name == "FlowVersion":
        return "flow_versions", [r["hash"], r["flow"], r["config_json"], _ts(r["at_ms"])]
    if name == "Alert":
        value = r["value"]
        return "alerts", [
            r["rule"],
            r["subject"],
            r["state"],
            float("nan") if value is None else value,
            _ts(r["at_ms"]),
            r["message"],
        ]
    if name == "DeadLetter":
        return "dead_letters", [
            r["id"],
            r["stage"],
            r["topic"],
            r["partition"],
            r["offset"],
            r["reason"],
            r["field"],
            _ts(r["at_ms"]),
        ]
    return None


class SinkStage:
    """The sink's state and handlers: buffer rows per table, insert them in batches, ack the
    events of a batch once the warehouse took it.

    ``connect()`` opens (and migrates) the warehouse, retried by the stage through an outage;
    the client it returns is closed by ``closers`` (the worker's list of closers) at stop."""

    def __init__(
        self,
        cfg: ClickHouseConfig,
        *,
        connect: Callable[[], Awaitable[ClickHouseClient]],
        closers: list[Any],
    ) -> None:
        self.cfg = cfg
        self._connect = connect
        self._closers = closers
        self.rows: dict[str, list[list[Any]]] = {}
        self.pending: list[Any] = []  # events whose rows are buffered, acked after the insert
        self.lock = asyncio.Lock()
        self.wh_box: list[ClickHouseClient] = []
        self.room = asyncio.Event()
        self.room.set()
        self.max_buffered = cfg.batch_rows * 4
        self.stream_box: list[Any] = []

    async def warehouse(self) -> ClickHouseClient:
        wh_box = self.wh_box
        if not wh_box:
            wh = await WarehouseRetry("connecting to ClickHouse").run(self._connect)
            wh_box.append(wh)
            self._closers.append(wh.close)
        return wh_box[0]

    async def insert_row_by_row(
        self, table: str, table_rows: list[list[Any]], first: Exception
    ) -> None:
        """ClickHouse refused the batch for a reason a retry cannot fix: insert row by row so
        one bad row does not block the others; rows it refuses are logged, never retried
        forever."""
        log.error(
            "ClickHouse refused a batch of %d rows for %s (%s); inserting row by row",
            len(table_rows),
            table,
            first,
        )
        for row in table_rows:
            try:
                await (await self.warehouse()).insert(table, [row])
            except ClickHouseUnavailable as exc:
                log.error("row refused by %s, not stored: %s (row id %s)", table, exc, row[0])

    async def flush(self) -> None:
        rows, pending, warehouse = self.rows, self.pending, self.warehouse
        async with self.lock:
            if not pending:
                return
            batch, events = dict(rows), list(pending)
            rows.clear()
            pending.clear()
            for table, table_rows in batch.items():

                async def insert(
                    table: str = table, table_rows: list[list[Any]] = table_rows
                ) -> None:
                    await (await warehouse()).insert(table, table_rows)

                try:
                    await WarehouseRetry(f"insert into {table}").run(insert)
                except ClickHouseUnavailable as exc:  # not retriable
                    await self.insert_row_by_row(table, table_rows, exc)
            for ev in events:
                await self.stream_box[0].ack(ev)
            self.room.set()

    async def agent(self, stream: Any) -> None:
        rows, pending, room = self.rows, self.pending, self.room
        manual = stream.noack()
        self.stream_box[:] = [manual]
        await self.warehouse()
        async for event in manual.events():
            try:
                name, rec = schemas.decode(event.value)
                mapped = to_rows(name, rec)
            except Exception as exc:  # one bad record must not wedge the sink's partition
                log.error(
                    "sink cannot map %s:%s:%s (skipped): %s",
                    event.message.topic,
                    event.message.partition,
                    event.message.offset,
                    exc,
                )
                mapped = []
            if not mapped:
                await manual.ack(event)
                continue
            for table, row in mapped:
                rows.setdefault(table, []).append(row)
            pending.append(event)
            if len(pending) >= self.cfg.batch_rows:
                await self.flush()
            while len(pending) >= self.max_buffered:
                room.clear()
                await room.wait()


def register(ctx: Context) -> None:
    app, settings = ctx.app, ctx.settings
    cfg = settings.clickhouse
    n = ctx.names
    source = app.topic(
        n.ping_requests,
        n.bids,
        n.deliveries,
        n.results,
        n.deadletter,
        n.alerts,
        n.flow_versions,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.kafka.partitions,
    )

    async def connected() -> ClickHouseClient:
        wh = await connect(cfg)
        await migrate(wh)
        return wh

    stage = SinkStage(cfg, connect=connected, closers=ctx.closers)

    @app.agent(source, name="sink", concurrency=1)
    async def sink_agent(stream: Any) -> None:
        await stage.agent(stream)

    @timer(app, cfg.batch_seconds, name="sink-flush")
    async def periodic_flush() -> None:
        await stage.flush()
