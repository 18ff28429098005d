"""The sink through a warehouse outage: it resumes within ~2 s of the warehouse's return and
logs a line per interval, not per attempt. Time is virtual (a fake sleep and clock)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import schemas
from connectors.clickhouse import ClickHouseUnavailable
from streams.settings import load_settings
from streams.stages import sink
from streams.stages.sink import WarehouseRetry
from streams.topics import TopicNames
from tests.unit.test_schemas import RECORDS

REPO = Path(__file__).resolve().parents[2]


class VirtualTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def down_until(vt: VirtualTime, back_at: float, result: Any = "ok") -> Callable[[], Any]:
    async def call() -> Any:
        if vt.now < back_at:
            raise ClickHouseUnavailable("Connection refused", True)
        return result

    return call


@pytest.mark.parametrize("back_at", [0.1, 3.0, 16.0, 100.0, 3600.0])
def test_retry_resumes_within_two_seconds_of_the_return(
    back_at: float, caplog: pytest.LogCaptureFixture
) -> None:
    vt = VirtualTime()
    retry = WarehouseRetry("insert into pings", clock=vt.clock, sleep=vt.sleep)
    with caplog.at_level(logging.WARNING, logger="streams.stages.sink"):
        assert asyncio.run(retry.run(down_until(vt, back_at))) == "ok"
    assert back_at <= vt.now <= back_at + 2.0
    assert vt.sleeps[0] <= 0.5 and max(vt.sleeps) <= 2.0
    # one line when it fails, one per 30 s while it stays down, one when it is back
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) <= 2 + back_at // 30, lines
    assert "succeeded again" in lines[-1]


def test_retry_raises_what_a_retry_cannot_fix() -> None:
    vt = VirtualTime()

    async def refused() -> None:
        raise ClickHouseUnavailable("Code: 53. Type mismatch", False)

    with pytest.raises(ClickHouseUnavailable, match="Type mismatch"):
        asyncio.run(WarehouseRetry("insert", clock=vt.clock, sleep=vt.sleep).run(refused))
    assert vt.sleeps == []


class FakeApp:
    def __init__(self) -> None:
        self.agents: dict[str, Any] = {}
        self.timers: dict[str, Any] = {}

    def topic(self, *names: str, **_: Any) -> tuple[str, ...]:
        return names

    def agent(self, _source: Any, *, name: str, **_: Any) -> Callable[[Any], Any]:
        def register(fn: Any) -> Any:
            self.agents[name] = fn
            return fn

        return register

    def timer(self, *, name: str, **_: Any) -> Callable[[Any], Any]:
        def register(fn: Any) -> Any:
            self.timers[name] = fn
            return fn

        return register


class FakeClickHouseClient:
    def __init__(self, vt: VirtualTime, back_at: float) -> None:
        self.vt, self.back_at = vt, back_at
        self.inserted: list[tuple[str, float]] = []

    async def insert(self, table: str, rows: list[list[Any]]) -> None:
        if self.vt.now < self.back_at:
            raise ClickHouseUnavailable("Connection refused", True)
        self.inserted.append((table, self.vt.now))

    async def close(self) -> None:
        pass


class Stream:
    def __init__(self, events: list[Any]) -> None:
        self._events, self.acked = events, []

    def noack(self) -> Stream:
        return self

    async def events(self) -> Any:
        for ev in self._events:
            yield ev

    async def ack(self, ev: Any) -> None:
        self.acked.append(ev)


def test_the_sink_delivers_within_two_seconds_of_the_warehouse_return(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sink stage as registered: first the warehouse is down at start (connect), then
    again for a batch (insert); each time delivery resumes within 2 s of its return."""
    vt = VirtualTime()
    monkeypatch.setattr(sink.asyncio, "sleep", vt.sleep)
    settings = load_settings(REPO / "config" / "demo.yaml")
    wh = FakeClickHouseClient(vt, back_at=0.0)
    connected_at: list[float] = []

    async def connect(_cfg: Any) -> FakeClickHouseClient:
        if vt.now < 16.0:
            raise ClickHouseUnavailable("cannot connect to ClickHouse", True)
        connected_at.append(vt.now)
        return wh

    async def migrate(_wh: Any) -> list[int]:
        return []

    monkeypatch.setattr(sink, "connect", connect)
    monkeypatch.setattr(sink, "migrate", migrate)
    app = FakeApp()
    ctx = SimpleNamespace(
        app=app, settings=settings, names=TopicNames.from_settings(settings), closers=[]
    )
    sink.register(ctx)
    event = SimpleNamespace(
        value=schemas.encode("Bid", RECORDS["Bid"]),
        message=SimpleNamespace(topic="bids", partition=0, offset=1),
    )
    stream = Stream([event])

    async def go() -> None:
        await app.agents["sink"](stream)  # connects, then buffers the one event
        assert connected_at and 16.0 <= connected_at[0] <= 18.0
        wh.back_at = vt.now + 40.0  # the warehouse goes away for 40 s
        await app.timers["sink-flush"]()

    asyncio.run(go())
    assert [t for t, _ in wh.inserted] == ["pings"]
    assert wh.back_at <= wh.inserted[0][1] <= wh.back_at + 2.0
    assert stream.acked == [event]  # acked only after the insert
