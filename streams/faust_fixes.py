"""Two corrections to faust-streaming's consumer, applied once per process by ``create_app``.

1. **Fetch wait.** Faust hard-codes the worker consumer's ``fetch_max_wait_ms=1500``. aiokafka
   leaves out of a fetch every partition that still has unconsumed records and the broker
   holds that fetch up to this long, so an event landing on such a partition (a bid, a close
   marker) waited hundreds of ms: measured close lag p50 375 ms. A short wait costs an idle
   fetch every few ms on loopback and brings the close lag to a few ms.

2. **No record skipped across a rebalance (the offset guard).** After a rebalance Faust seeks
   every partition back to its committed offset ``C``, but a batch fetched *before* the seek
   can still be iterated after it (faust-streaming #216/#221). Its first record has an offset
   ``> C + 1``; Faust takes the difference for a legitimate hole (compaction, transaction
   markers), marks ``C+1 … offset-1`` as processed (``Consumer._add_gap``) and commits past
   them; the refetched records below the stale one are then dropped as already read. Measured
   before this fix: 1 lead of 1,500 never auctioned while workers joined, left and were killed,
   with gaps logged on every stage's topic after each rebalance.

   The guard tracks, per partition, the next offset this consumer must deliver: set from every
   seek (the committed offsets Faust seeks to, or an explicit ``seek``), advanced by every
   record delivered. A record below it was already delivered (or committed) and is dropped; a
   record *above* it is stale or follows a real hole, so the guard drops it and seeks the
   partition back to the expected offset: a stale record is then fetched again in order, while
   a real hole (compacted or expired records) shows the same jump again after the seek and is
   let through. A revoked partition is fenced until it is sought again: records of a batch
   fetched before the revocation are not delivered in between. Changelog topics (compacted,
   read by table recovery) are not guarded.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator

log = logging.getLogger(__name__)

#: The worker consumer's fetch wait (see point 1).
WORKER_FETCH_MAX_WAIT_MS = 10


def apply(fetch_max_wait_ms: int | None = WORKER_FETCH_MAX_WAIT_MS) -> None:
    """Apply both fixes; ``fetch_max_wait_ms=None`` keeps Faust's fetch wait (roles that are
    not latency-critical: an idle fetch every 10 ms costs CPU the auctions need)."""
    if fetch_max_wait_ms is not None:
        _shorten_worker_fetch_wait(fetch_max_wait_ms)
    _guard_offsets()


def _shorten_worker_fetch_wait(ms: int) -> None:
    from faust.transport.drivers import aiokafka as driver

    cls = driver.AIOKafkaConsumerThread
    if getattr(cls, "_pingpost_fetch_wait_ms", None) == ms:
        return
    original = getattr(cls, "_pingpost_original_create", cls._create_worker_consumer)

    def _create_worker_consumer(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = ms  # read by consumer.start() when it builds the Fetcher
        log.info("worker consumer fetch_max_wait_ms=%d", ms)
        return consumer

    cls._pingpost_original_create = original
    cls._create_worker_consumer = _create_worker_consumer
    cls._pingpost_fetch_wait_ms = ms


def guarded(topic: str) -> bool:
    """Whether the offset guard applies to ``topic`` (everything but table changelogs)."""
    return not topic.endswith("-changelog")


class OffsetGuard:
    """Per-partition expected next offset; pure bookkeeping (unit-tested on its own)."""

    DELIVER, DROP, RESEEK = "deliver", "drop", "reseek"

    def __init__(self) -> None:
        self.expected: dict[Any, int] = {}
        #: (expected, seen) of the last jump that made us re-seek, per partition.
        self.jumps: dict[Any, tuple[int, int]] = {}
        #: Revoked partitions: nothing is delivered from them until they are sought again.
        self.fenced: set[Any] = set()

    def sought(self, tp: Any, offset: int | None) -> None:
        self.fenced.discard(tp)
        if offset is None or offset < 0:
            self.expected.pop(tp, None)  # no committed offset: auto.offset.reset decides
        else:
            self.expected[tp] = offset

    def forget(self, tp: Any) -> None:
        """The partition was revoked. Until the next seek (Faust seeks every partition it is
        assigned to its committed offset), records still arriving from it belong to a batch
        fetched before the revocation: delivering them would let Faust take the jump to
        them for a hole and commit past unprocessed records, or set an expected offset that
        makes the refetched records look already delivered. Seen before this fence: 1 lead of
        900 committed past without being processed, in one of about ten churn-test runs."""
        self.expected.pop(tp, None)
        self.jumps.pop(tp, None)
        self.fenced.add(tp)

    def check(self, tp: Any, offset: int) -> str:
        if tp in self.fenced:
            return self.DROP
        exp = self.expected.get(tp)
        if exp is not None and offset < exp:
            return self.DROP
        if exp is not None and offset > exp:
            if self.jumps.get(tp) != (exp, offset):
                self.jumps[tp] = (exp, offset)
                return self.RESEEK
            log.warning("partition %s: offsets %d..%d do not exist (compacted or expired); "
                        "continuing at %d", tp, exp, offset - 1, offset)
        self.jumps.pop(tp, None)
        self.expected[tp] = offset + 1
        return self.DELIVER


def _guard_offsets() -> None:
    from faust.transport import consumer as cmod

    base, delegate = cmod.Consumer, cmod.ThreadDelegateConsumer
    if getattr(base, "_pingpost_guarded", False):
        return

    def guard(self: Any) -> OffsetGuard:
        g = self.__dict__.get("_pingpost_guard")
        if g is None:
            g = self.__dict__["_pingpost_guard"] = OffsetGuard()
        return g

    orig_getmany = base.getmany
    orig_seek = base.seek
    orig_seek_to_committed = delegate.seek_to_committed
    orig_revoked = base.on_partitions_revoked

    async def getmany(self: Any, timeout: float) -> AsyncIterator[tuple[Any, Any]]:
        g = guard(self)
        reseeking: set[Any] = set()
        async for tp, message in orig_getmany(self, timeout):
            if not guarded(tp.topic):
                yield tp, message
                continue
            if tp in reseeking:
                continue  # the rest of a stale batch: fetched again after the seek
            verdict = g.check(tp, message.offset)
            if verdict == OffsetGuard.DELIVER:
                yield tp, message
            elif verdict == OffsetGuard.RESEEK:
                exp = g.expected[tp]
                log.warning("partition %s: got offset %d, expected %d (a batch fetched before "
                            "a rebalance); seeking back to %d", tp, message.offset, exp, exp)
                reseeking.add(tp)
                await self.seek(tp, exp)

    async def seek(self: Any, partition: Any, offset: int) -> None:
        await orig_seek(self, partition, offset)
        guard(self).sought(partition, offset)

    async def seek_to_committed(self: Any) -> Any:
        offsets = await orig_seek_to_committed(self)
        g = guard(self)
        for tp, offset in offsets.items():
            g.sought(tp, offset)
        return offsets

    async def on_partitions_revoked(self: Any, revoked: Any) -> None:
        g = guard(self)
        for tp in revoked:
            g.forget(tp)
        await orig_revoked(self, revoked)

    base.getmany = getmany
    base.seek = seek
    delegate.seek_to_committed = seek_to_committed
    base.on_partitions_revoked = on_partitions_revoked
    base._pingpost_guarded = True
