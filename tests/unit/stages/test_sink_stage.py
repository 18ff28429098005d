"""The sink stage in memory: events become rows, inserted in batches and acked after the
warehouse took them; a warehouse that is down is retried while the events stay unacked; a
refused batch goes row by row. A fake ClickHouse client, virtual time. No broker, no Faust
worker (tests/unit/test_sink_retry.py covers the retry's timing)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import schemas
from connectors.clickhouse import ClickHouseUnavailable
from streams.stages import sink
from streams.stages.sink import SinkStage, to_row
from tests.unit.stages.fakes import Stream, demo_settings, event
from tests.unit.test_schemas import RECORDS


class FakeWarehouse:
    """Refuses ``down`` inserts (retriable), then ``refuse`` rows (not retriable)."""

    def __init__(self, log: list[Any], down: int = 0, refuse: set[Any] | None = None) -> None:
        self.log, self.down, self.refuse = log, down, refuse or set()
        self.rows: dict[str, list[list[Any]]] = {}
        self.attempts = 0

    async def insert(self, table: str, rows: list[list[Any]]) -> None:
        self.attempts += 1
        if self.down:
            self.down -= 1
            raise ClickHouseUnavailable("Connection refused", True)
        if any(r[0] in self.refuse for r in rows):
            raise ClickHouseUnavailable("Code: 53. Type mismatch", False)
        self.rows.setdefault(table, []).extend(rows)
        self.log.append(("insert", table, len(rows)))

    async def close(self) -> None:
        pass


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(sink.asyncio, "sleep", sleep)
    return slept


def harness(wh: FakeWarehouse, batch_rows: int) -> tuple[SinkStage, list[Any]]:
    cfg = demo_settings().clickhouse.model_copy(update={"batch_rows": batch_rows})
    closers: list[Any] = []

    async def connect() -> Any:
        return wh

    return SinkStage(cfg, connect=connect, closers=closers), closers


def events() -> list[Any]:
    return [
        event(schemas.encode(name, RECORDS[name]), "t", 0, i)
        for i, name in enumerate(["PingRequest", "Bid", "AuctionResult", "Delivery"])
    ]


def test_events_become_rows_inserted_then_acked(sleeps: list[float]) -> None:
    log: list[Any] = []
    wh = FakeWarehouse(log)
    stage, closers = harness(wh, batch_rows=4)
    junk = event(b"junk", "t", 0, 99)
    evs = events()
    stream = Stream([evs[0], junk, *evs[1:]], log)
    asyncio.run(stage.agent(stream))

    expected: dict[str, list[list[Any]]] = {}
    for name in ["PingRequest", "Bid", "AuctionResult", "Delivery"]:
        mapped = to_row(name, schemas.decode(schemas.encode(name, RECORDS[name]))[1])
        assert mapped is not None
        expected.setdefault(mapped[0], []).append(mapped[1])
    assert wh.rows == expected
    assert set(wh.rows) == {"leads", "pings", "auctions", "posts"}
    # The junk record is acked at once (skipped); the batch's events after their inserts.
    assert log[0] == ("ack", 99)
    inserts = [i for i, x in enumerate(log) if x[0] == "insert"]
    acks = [i for i, x in enumerate(log) if x[0] == "ack" and x[1] != 99]
    assert len(inserts) == 4 and len(acks) == 4 and max(inserts) < min(acks)
    assert closers == [wh.close]
    assert sleeps == []


def test_a_warehouse_that_is_down_is_retried_and_events_wait_unacked(
    sleeps: list[float],
) -> None:
    log: list[Any] = []
    wh = FakeWarehouse(log, down=3)
    stage, _ = harness(wh, batch_rows=100)
    stream = Stream(events()[:2], log)

    async def go() -> None:
        await stage.agent(stream)
        assert stream.acked == [] and stage.pending  # buffered, below the batch size
        await stage.flush()  # the timer's flush: 3 refusals, then the rows go in

    asyncio.run(go())
    assert sleeps == [0.25, 0.5, 1.0]
    assert set(wh.rows) == {"leads", "pings"}
    assert len(stream.acked) == 2
    assert stage.pending == [] and stage.rows == {}


def test_a_refused_batch_goes_row_by_row(sleeps: list[float]) -> None:
    log: list[Any] = []
    bad = RECORDS["Bid"]["ping_id"]
    wh = FakeWarehouse(log, refuse={bad})
    stage, _ = harness(wh, batch_rows=100)
    good_bid = {**RECORDS["Bid"], "ping_id": "good-ping"}
    stream = Stream(
        [
            event(schemas.encode("Bid", RECORDS["Bid"]), "bids", 0, 1),
            event(schemas.encode("Bid", good_bid), "bids", 0, 2),
        ],
        log,
    )

    async def go() -> None:
        await stage.agent(stream)
        await stage.flush()

    asyncio.run(go())
    assert [r[0] for r in wh.rows["pings"]] == ["good-ping"]  # the bad row logged, dropped
    assert len(stream.acked) == 2  # never retried forever
    assert sleeps == []
