"""Ingest's admission control on Kafka: feeds :class:`streams.rules.admission.Estimator`.

A group-less consumer follows the progress topic (the workers' reports, from its end: only the
last seconds matter); another one, on its own connection, fetches the end offsets of the
pre-ping topics (leads, dedupe, ping-requests) every
:data:`~streams.rules.admission.ENDS_INTERVAL_S`.

While the pipeline is idle (nothing waiting at the last fetch, nothing admitted since) it
fetches them every :data:`~streams.rules.admission.ENDS_IDLE_INTERVAL_S` instead, until a lead is
admitted, which brings the next fetch forward at once (ingest's CPU at rest: 0.8-1.0 % of a
core -> 0.6 %, docs/numbers.md). Only the leads that come before that fetch returns (a few ms)
are decided on end offsets up to a second old: nothing was waiting then, so they wait behind at
most what other ingest processes admitted meanwhile, which the fetch then sees.

Not one consumer for both: the broker answers a connection's requests in order, and the
progress fetch waits up to 2 s when no report comes (faust_patches point 8), so the end offsets
came every ~1.2 s whenever reports were sparse; the leads admitted meanwhile counted as waiting,
the prediction passed the setpoint, ingest refused, and fewer leads meant sparser reports: 100
leads/s offered, 11-16 admitted, with the pipeline idle. ``refuse()`` is what the HTTP handler
asks, synchronously and in O(1). Every Kafka call is bounded; when the broker cannot be reached
the estimate goes stale (blind): leads are admitted at the capacity last measured (publishing
then answers 503 while the broker is down), the rest refused with 429.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

import schemas
from streams.rules.admission import (
    ENDS_IDLE_INTERVAL_S,
    ENDS_INTERVAL_S,
    Estimator,
    report_from_record,
)
from streams.runtime.feeds import GROUPLESS_CONSUMER
from streams.settings import Settings
from streams.topics import TopicNames

__all__ = ["Admission"]

log = logging.getLogger(__name__)

#: Bound on one end-offset fetch and on start-up metadata requests (seconds).
KAFKA_CALL_TIMEOUT_S = 2.0
#: Refusals and feed errors are logged at most this often (seconds), with a count.
LOG_EVERY_S = 10.0


def _mono_ms() -> float:
    return time.monotonic() * 1000.0


class Admission:
    def __init__(self, settings: Settings, names: TopicNames) -> None:
        self.settings = settings
        self.names = names
        self.bound_ms = settings.ingest.max_queue_delay_ms
        self.estimator = Estimator(self.bound_ms)
        self.refused = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._ends_consumer: AIOKafkaConsumer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._tps: list[TopicPartition] = []
        self._refused_logged = 0
        self._logged_at = 0.0
        self._errors = 0
        self._error_logged_at = 0.0
        #: Set when a lead is admitted: ends an idle wait between end-offset fetches.
        self._admitted = asyncio.Event()
        #: When (monotonic s) the broker last answered an end-offset fetch that covers the
        #: leads topic (see :meth:`leads_topic_answered_within`).
        self._leads_answered_at: float | None = None

    @property
    def enabled(self) -> bool:
        return self.bound_ms > 0

    async def start(self) -> None:
        if not self.enabled:
            return
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka.bootstrap,
            fetch_max_wait_ms=100,
            **GROUPLESS_CONSUMER,
        )
        await consumer.start()
        self._consumer = consumer
        ends_consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka.bootstrap,
            group_id=None,
            enable_auto_commit=False,
        )
        await ends_consumer.start()
        self._ends_consumer = ends_consumer
        try:
            # Metadata of every topic into each consumer's own view (``topics()`` returns a
            # separate copy): a group-less consumer tracking no topic asks for all of them.
            for c in (consumer, ends_consumer):
                await asyncio.wait_for(c._client.force_metadata_update(), KAFKA_CALL_TIMEOUT_S * 5)
        except Exception as exc:
            log.warning("admission control off: no topic metadata (%s)", exc)
            return
        n = self.names
        self._tps = [
            TopicPartition(t, p)
            for t in (n.leads, n.dedupe, n.ping_requests)
            for p in sorted(consumer.partitions_for_topic(t) or ())
        ]
        if not consumer.partitions_for_topic(n.progress):
            log.warning(
                "admission control off: topic %s does not exist (run `pingpost topics create`)",
                n.progress,
            )
            return
        tp = TopicPartition(n.progress, 0)
        consumer.assign([tp])
        await consumer.seek_to_end(tp)
        self._tasks = [
            asyncio.create_task(self._read_reports(), name="admission-reports"),
            asyncio.create_task(self._poll_ends(), name="admission-ends"),
        ]

    def leads_topic_answered_within(self, seconds: float) -> bool:
        """Whether the broker answered, in the last ``seconds``, an end-offset fetch of the
        leads topic's partitions: it is reachable and knows the topic, which is what ingest's
        readiness probe asks (it then sends no request of its own)."""
        at = self._leads_answered_at
        return at is not None and time.monotonic() - at <= seconds

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks = []
        for c in (self._consumer, self._ends_consumer):
            if c is not None:
                await c.stop()
        self._consumer = self._ends_consumer = None

    def refuse(self) -> int | None:
        """None to admit the lead; else the Retry-After (seconds) of a 429."""
        retry_after = self.estimator.refuse(_mono_ms())
        if retry_after is None:
            self._admitted.set()
        else:
            self.refused += 1
            now = time.monotonic()
            if now - self._logged_at >= LOG_EVERY_S:
                st = self.estimator.status(_mono_ms())
                if st["blind_rate"] is not None:
                    log.warning(
                        "admission estimate blind (no fresh progress report or end offsets: "
                        "the broker or the workers are coming back): admitting at most ~%s "
                        "leads/s (the capacity last measured, or the idle floor); refusing the "
                        "rest with 429 (%d since the last such line)",
                        st["blind_rate"],
                        self.refused - self._refused_logged,
                    )
                else:
                    log.warning(
                        "over capacity: refusing leads with 429 (%d since the last such "
                        "line; backlog %s leads, capacity ~%s/s, predicted queue delay %s "
                        "ms > %.0f ms, the admission setpoint for ingest.max_queue_delay_ms "
                        "%s)",
                        self.refused - self._refused_logged,
                        st["backlog"],
                        st["capacity"],
                        st["predicted_delay_ms"],
                        self.estimator.target_ms,
                        self.bound_ms,
                    )
                self._logged_at, self._refused_logged = now, self.refused
        return retry_after

    def status(self) -> dict[str, Any]:
        if not self.enabled:
            return {"bound_ms": 0}
        return {**self.estimator.status(_mono_ms()), "refused": self.refused}

    # -- feeds -----------------------------------------------------------------------------
    def _feed_error(self, what: str, exc: BaseException) -> None:
        self._errors += 1
        now = time.monotonic()
        if now - self._error_logged_at >= LOG_EVERY_S:
            log.warning(
                "admission control: %s failed %d times (last: %r); leads are admitted "
                "while the estimate is stale",
                what,
                self._errors,
                exc,
            )
            self._error_logged_at, self._errors = now, 0

    async def _read_reports(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                async for msg in self._consumer:
                    try:
                        rec = schemas.decode_as("Progress", msg.value)
                    except schemas.SchemaError:
                        continue
                    self.estimator.add_report(report_from_record(rec), _mono_ms())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._feed_error("reading progress reports", exc)
                await asyncio.sleep(1.0)

    async def _poll_ends(self) -> None:
        assert self._ends_consumer is not None
        while True:
            try:
                ends = await asyncio.wait_for(
                    self._ends_consumer.end_offsets(self._tps), KAFKA_CALL_TIMEOUT_S
                )
                self.estimator.set_ends(
                    {(tp.topic, tp.partition): off for tp, off in ends.items()}, _mono_ms()
                )
                if any(tp.topic == self.names.leads for tp in ends):
                    self._leads_answered_at = time.monotonic()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._feed_error("fetching end offsets", exc)
            await self._until_next_fetch()

    async def _until_next_fetch(self) -> None:
        """``ENDS_INTERVAL_S``; while the pipeline is idle, up to ``ENDS_IDLE_INTERVAL_S`` or
        until a lead is admitted, whichever comes first."""
        await asyncio.sleep(ENDS_INTERVAL_S)
        if not self.estimator.idle():
            return
        self._admitted.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._admitted.wait(), ENDS_IDLE_INTERVAL_S - ENDS_INTERVAL_S)
