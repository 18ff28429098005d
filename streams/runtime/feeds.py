"""Group-less feeds: a worker reading every partition of a topic from a point in time,
without a consumer group (nothing committed, nothing to rebalance). The acceptance, pause,
cap and duplicate views of every auction worker follow their topics this way."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import mode
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from streams.runtime.agents import now_ms
from streams.runtime.faust_patches import FETCH_ROUTINE_PASS_S

__all__ = ["follow_topic", "GROUPLESS_CONSUMER", "FEED_POLL_MS"]

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

    class Feed(mode.Service):
        async def on_start(self) -> None:
            self._consumer = AIOKafkaConsumer(
                bootstrap_servers=settings.kafka.bootstrap,
                fetch_max_wait_ms=100,
                **GROUPLESS_CONSUMER,
            )
            await self._consumer.start()
            parts = self._consumer.partitions_for_topic(topic)
            if not parts:
                await self._consumer._client.force_metadata_update()
                parts = self._consumer.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            self._consumer.assign(tps)
            starts = await self._consumer.offsets_for_times({tp: since_ms for tp in tps})
            for tp in tps:
                if starts.get(tp) is not None:
                    self._consumer.seek(tp, starts[tp].offset)
                else:
                    await self._consumer.seek_to_end(tp)
            log.info("feed: reading %s from %d s ago", topic, (now_ms() - since_ms) // 1000)

        async def on_stop(self) -> None:
            await self._consumer.stop()

        @mode.Service.task
        async def _read(self) -> None:
            while not self.should_stop:
                try:
                    batch = await self._consumer.getmany(timeout_ms=FEED_POLL_MS, max_records=2000)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a feed must never take the worker down
                    log.warning("feed %s: %s; retrying", topic, exc)
                    await asyncio.sleep(1.0)
                    continue
                for records in batch.values():
                    for rec in records:
                        on_record(rec.value)
                res = on_batch()
                if asyncio.iscoroutine(res):
                    await res

    return Feed
