"""Fakes at the stages' seams: no broker, no Faust worker. A topic records what is sent to
it, a stream yields events and records acks, an event carries a message's coordinates."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import schemas
from streams.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[3]

__all__ = ["REPO", "FakeProgress", "RecordingTopic", "Stream", "demo_settings", "event"]


def demo_settings() -> Settings:
    return load_settings(REPO / "config" / "demo.yaml")


class RecordingTopic:
    """A topic's ``send``: records ``(key, value)`` and returns an acknowledged future."""

    def __init__(self, name: str = "topic", log: list[Any] | None = None) -> None:
        self.name = name
        self.sent: list[tuple[bytes | None, bytes]] = []
        self.log = log

    async def send(self, *, key: bytes | None = None, value: bytes) -> asyncio.Future[Any]:
        self.sent.append((key, value))
        if self.log is not None:
            self.log.append(("send", self.name, schemas.decode(value)[0]))
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    def records(self) -> list[tuple[str, dict[str, Any]]]:
        return [schemas.decode(v) for _, v in self.sent]

    def get_topic_name(self) -> str:
        return self.name


class Stream:
    """A Faust stream of ``events`` (manual ack or not); ``acked`` lists the acked events."""

    def __init__(self, events: list[Any], log: list[Any] | None = None) -> None:
        self._events = events
        self.acked: list[Any] = []
        self.log = log

    def noack(self) -> Stream:
        return self

    async def events(self) -> AsyncIterator[Any]:
        for ev in self._events:
            yield ev

    async def ack(self, ev: Any) -> None:
        self.acked.append(ev)
        if self.log is not None:
            self.log.append(("ack", ev.message.offset))


class FakeProgress:
    def __init__(self) -> None:
        self.taken: list[tuple[str, str, int, int]] = []
        self.delays: list[float] = []

    def took(
        self, stage: str, topic: str, partition: int, offset: int, *, ping: bool = False
    ) -> None:
        self.taken.append((stage, topic, partition, offset))

    def opened(self, delay_ms: float) -> None:
        self.delays.append(delay_ms)


def event(value: bytes, topic: str = "t", partition: int = 0, offset: int = 0) -> Any:
    """A Faust event as the stages read it: ``value`` and ``message`` (topic, partition,
    offset, key, value, timestamp in seconds)."""
    return SimpleNamespace(
        value=value,
        message=SimpleNamespace(
            topic=topic,
            partition=partition,
            offset=offset,
            key=b"k",
            value=value,
            timestamp=1_780_000_000.0,
        ),
    )
