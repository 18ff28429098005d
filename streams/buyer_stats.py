"""Each buyer's observed post acceptance rate, streamed from the deliveries topic.

Ranking by score (``strategy.rank_by: score``) weighs a bid by its buyer's acceptance rate.
Deliveries are keyed by lead, so any one worker owns only some of each buyer's posts; every
auction worker therefore reads *all* partitions of the deliveries topic with its own
group-less consumer (no offsets committed, nothing to rebalance) and keeps the counts of the
last ``WINDOW_S`` in memory. At start it replays that window (``offsets_for_times``), so a
restarted worker ranks like the others within seconds. Every worker sees the same events, so
the rates agree up to a few ms of lag; a new buyer starts at the flow's prior
(``strategy.acceptance_prior``) and its own record takes over as posts accumulate.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

import mode
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

import schemas
from streams import rules
from streams.runtime import now_ms

__all__ = ["AcceptanceCounter", "WINDOW_S", "register"]

log = logging.getLogger(__name__)

#: How far back acceptance is counted (a buyer's recent behaviour, not its history).
WINDOW_S = 24 * 3600.0

#: Post answers that count as "posted"; ``skipped`` was never sent.
POSTED = frozenset({"accepted", "rejected", "error", "timeout"})


class AcceptanceCounter:
    """Accepted / posted per buyer over a sliding window, counting each attempt once."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_ms = int(window_s * 1000)
        self._seen: dict[str, tuple[str, bool]] = {}  # attempt_id -> (buyer, accepted)
        self._order: deque[tuple[int, str]] = deque()  # (at_ms, attempt_id), oldest first
        self.accepted: dict[str, int] = {}
        self.posted: dict[str, int] = {}

    def add(self, attempt_id: str, buyer_id: str, status: str, at_ms: int) -> None:
        if status not in POSTED or attempt_id in self._seen:
            return  # not a post answer, or a redelivered one
        ok = status == "accepted"
        self._seen[attempt_id] = (buyer_id, ok)
        self._order.append((at_ms, attempt_id))
        self.posted[buyer_id] = self.posted.get(buyer_id, 0) + 1
        if ok:
            self.accepted[buyer_id] = self.accepted.get(buyer_id, 0) + 1

    def expire(self, now: int) -> None:
        while self._order and self._order[0][0] <= now - self.window_ms:
            _, attempt_id = self._order.popleft()
            buyer, ok = self._seen.pop(attempt_id)
            self.posted[buyer] -= 1
            if ok:
                self.accepted[buyer] -= 1

    def rates(self, prior_rate: float, prior_weight: float) -> dict[str, float]:
        return {b: rules.acceptance_rate(self.accepted.get(b, 0), n, prior_rate, prior_weight)
                for b, n in self.posted.items()}


def register(ctx: Any) -> None:
    """Start the acceptance feed in this worker if any flow ranks by score."""
    if not any(f.strategy.rank_by == "score" for f in ctx.settings.flows.values()):
        return
    counter = AcceptanceCounter()
    ctx.resources["acceptance"] = counter
    settings, topic = ctx.settings, ctx.names.deliveries

    class AcceptanceFeed(mode.Service):
        async def on_start(self) -> None:
            self._consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap,
                                              group_id=None, enable_auto_commit=False,
                                              fetch_max_wait_ms=100)
            await self._consumer.start()
            parts = self._consumer.partitions_for_topic(topic)
            if not parts:
                await self._consumer._client.force_metadata_update()  # noqa: SLF001
                parts = self._consumer.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            self._consumer.assign(tps)
            since = now_ms() - counter.window_ms
            starts = await self._consumer.offsets_for_times({tp: since for tp in tps})
            for tp in tps:
                if starts.get(tp) is not None:
                    self._consumer.seek(tp, starts[tp].offset)
                else:
                    await self._consumer.seek_to_end(tp)
            log.info("acceptance feed: reading %s from %d s ago", topic, int(WINDOW_S))

        async def on_stop(self) -> None:
            await self._consumer.stop()

        @mode.Service.task
        async def _read(self) -> None:
            while not self.should_stop:
                try:
                    batch = await self._consumer.getmany(timeout_ms=500, max_records=2000)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the feed must never take the worker down
                    log.warning("acceptance feed: %s; retrying", exc)
                    await asyncio.sleep(1.0)
                    continue
                for records in batch.values():
                    for rec in records:
                        try:
                            d = schemas.decode_as("Delivery", rec.value)
                        except schemas.SchemaError:
                            continue  # the post stage dead-letters what it cannot read
                        counter.add(d["attempt_id"], d["buyer_id"], d["status"],
                                    d["sent_at_ms"])
                counter.expire(now_ms())

    ctx.app.service(AcceptanceFeed)
