"""A worker's feeds share one group-less consumer (streams/runtime/feeds.py, ``follow``): each
topic is read from its own point in time and its records reach only its own subscriber; a topic
followed twice gets a consumer of its own. Real broker, real consumer; the worker's app is a
stand-in that collects the services registered on it."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from streams.runtime.feeds import follow
from tests.integration.test_idle_fetch import _new_topic

pytestmark = pytest.mark.integration


class App:
    def __init__(self) -> None:
        self.services: list[type[Any]] = []

    def service(self, cls: type[Any]) -> type[Any]:
        self.services.append(cls)
        return cls


async def _run(bootstrap: str) -> tuple[int, dict[str, list[bytes]], list[int], set[int]]:
    old, new = (
        await _new_topic(bootstrap, "feed-old", 3),
        await _new_topic(bootstrap, "feed-new", 2),
    )
    now = int(time.time() * 1000)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await producer.start()
    try:
        # an hour ago and now, in each topic
        for topic in (old, new):
            for p in range(2):
                await producer.send_and_wait(
                    topic, f"{topic}:{p}:past".encode(), partition=p, timestamp_ms=now - 3_600_000
                )
                await producer.send_and_wait(
                    topic, f"{topic}:{p}:recent".encode(), partition=p, timestamp_ms=now - 1_000
                )
    finally:
        await producer.stop()
    got: dict[str, list[bytes]] = {"old": [], "new": [], "new-again": []}
    everything = asyncio.Event()
    batches = [0, 0]

    def record(name: str) -> Any:
        def on_record(value: bytes) -> None:
            got[name].append(value)
            if len(got["old"]) == 4 and len(got["new"]) == 2 and len(got["new-again"]) == 4:
                everything.set()

        return on_record

    def batch(i: int) -> Any:
        def on_batch() -> None:
            batches[i] += 1

        return on_batch

    app = App()
    ctx = SimpleNamespace(
        app=app, settings=SimpleNamespace(kafka=SimpleNamespace(bootstrap=bootstrap)), feeds=None
    )
    follow(ctx, old, 0, record("old"), batch(0))  # from the beginning
    follow(ctx, new, now - 60_000, record("new"), batch(1))  # the last minute
    follow(ctx, new, 0, record("new-again"), lambda: None)  # the same topic again
    services = [cls() for cls in app.services]
    for s in services:
        await s.start()
    try:
        await asyncio.wait_for(everything.wait(), 20)
        consumers = {id(s._consumer) for s in services}
        return len(services), got, batches, consumers
    finally:
        for s in services:
            await s.stop()


def test_a_workers_feeds_share_one_consumer_each_from_its_own_point_in_time(
    kafka_bootstrap: str,
) -> None:
    n, got, batches, consumers = asyncio.run(_run(kafka_bootstrap))
    assert n == 2 and len(consumers) == 2  # the shared consumer, and the repeated topic's own
    old = sorted(v.decode().split(":", 1)[1] for v in got["old"])
    assert old == ["0:past", "0:recent", "1:past", "1:recent"]
    assert sorted(v.decode().split(":", 1)[1] for v in got["new"]) == ["0:recent", "1:recent"]
    assert len(got["new-again"]) == 4
    assert min(batches) >= 1  # each subscriber's on_batch ran after the polls
