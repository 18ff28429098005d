"""Group-less feeds: a worker reading every partition of a topic from a point in time,
without a consumer group (nothing committed, nothing to rebalance). The acceptance, pause,
cap and duplicate views of every auction worker follow their topics this way, all of a
worker's on one consumer (:func:`follow`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mode
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from streams.runtime.agents import now_ms
from streams.runtime.faust_patches import FETCH_ROUTINE_PASS_S

__all__ = [
    "follow",
    "follow_topic",
    "follow_topics",
    "Subscription",
    "GROUPLESS_CONSUMER",
    "FEED_POLL_MS",
]

log = logging.getLogger(__name__)

#: aiokafka's settings for a group-less consumer of a fixed set of partitions (the feeds,
#: ingest's outcome and progress readers). aiokafka's fetch routine re-examines its partitions
#: every ``consumer_timeout_ms`` (200 ms) even when nothing happened, to see a rebalance or new
#: partitions sooner; a group-less consumer has neither (a seek, a record taken, a metadata
#: change or a fetch's answer wake the routine at once). At rest that timer was most of these
#: processes' wake-ups: 5 a second per consumer. Set here too (not only by faust_patches
#: point 13) so that a process that applies no patch gets it as well.
GROUPLESS_CONSUMER: dict[str, Any] = {
    "group_id": None,
    "enable_auto_commit": False,
    "consumer_timeout_ms": int(FETCH_ROUTINE_PASS_S * 1000),
}

#: How long a feed's poll waits for records when none come: ``on_batch`` runs at least this
#: often. Records end the wait at once.
FEED_POLL_MS = 1000


@dataclass
class Subscription:
    """One topic a worker follows: from ``since_ms``, ``on_record`` per value, ``on_batch``
    after each poll."""

    topic: str
    since_ms: int
    on_record: Callable[[bytes], None]
    on_batch: Callable[[], Any]


def follow_topic(
    settings: Any,
    topic: str,
    since_ms: int,
    on_record: Callable[[bytes], None],
    on_batch: Callable[[], Any],
) -> type[mode.Service]:
    """A service reading every partition of ``topic`` from ``since_ms`` with a group-less
    consumer (nothing committed, nothing to rebalance), calling ``on_record`` per value and
    ``on_batch`` after each poll (also when idle: at least every ``FEED_POLL_MS``)."""
    return follow_topics(settings, [Subscription(topic, since_ms, on_record, on_batch)])


def follow(
    ctx: Any,
    topic: str,
    since_ms: int,
    on_record: Callable[[bytes], None],
    on_batch: Callable[[], Any],
) -> None:
    """Follow ``topic`` in the worker of ``ctx`` (a :class:`streams.context.Context`): every
    feed of a worker shares one group-less consumer (one connection, one idle fetch every 2 s
    at rest instead of one per feed: each request costs the broker ~1-1.6 ms of CPU on a small
    host, docs/numbers.md). A topic followed twice gets a consumer of its own (one consumer
    reads a partition from one offset)."""
    sub = Subscription(topic, since_ms, on_record, on_batch)
    shared: list[Subscription] | None = ctx.feeds
    if shared is None or any(s.topic == topic for s in shared):
        subs = [sub]
        ctx.app.service(follow_topics(ctx.settings, subs))
        if shared is None:
            ctx.feeds = subs
        return
    shared.append(sub)  # read at the service's start, after every stage registered


def follow_topics(settings: Any, subs: list[Subscription]) -> type[mode.Service]:
    """A service reading every partition of each subscription's topic from its ``since_ms``
    with one group-less consumer. ``subs`` is read when the service starts."""

    class Feed(mode.Service):
        async def on_start(self) -> None:
            self._consumer = AIOKafkaConsumer(
                bootstrap_servers=settings.kafka.bootstrap,
                fetch_max_wait_ms=100,
                **GROUPLESS_CONSUMER,
            )
            await self._consumer.start()
            self._subs = {s.topic: s for s in subs}
            tps: list[TopicPartition] = []
            for topic in self._subs:
                parts = self._consumer.partitions_for_topic(topic)
                if not parts:
                    await self._consumer._client.force_metadata_update()
                    parts = self._consumer.partitions_for_topic(topic) or set()
                tps += [TopicPartition(topic, p) for p in sorted(parts)]
            self._consumer.assign(tps)
            starts = await self._consumer.offsets_for_times(
                {tp: self._subs[tp.topic].since_ms for tp in tps}
            )
            for tp in tps:
                if starts.get(tp) is not None:
                    self._consumer.seek(tp, starts[tp].offset)
                else:
                    await self._consumer.seek_to_end(tp)
            for s in self._subs.values():
                log.info("feed: reading %s from %d s ago", s.topic, (now_ms() - s.since_ms) // 1000)

        async def on_stop(self) -> None:
            await self._consumer.stop()

        @mode.Service.task
        async def _read(self) -> None:
            subs = self._subs
            while not self.should_stop:
                try:
                    batch = await self._consumer.getmany(timeout_ms=FEED_POLL_MS, max_records=2000)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a feed must never take the worker down
                    log.warning("feed %s: %s; retrying", ", ".join(subs), exc)
                    await asyncio.sleep(1.0)
                    continue
                for tp, records in batch.items():
                    on_record = subs[tp.topic].on_record
                    for rec in records:
                        on_record(rec.value)
                for s in subs.values():
                    res = s.on_batch()
                    if asyncio.iscoroutine(res):
                        await res

    return Feed
