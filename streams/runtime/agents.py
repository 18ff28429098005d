"""Per-event concurrency and failure policy for Faust agents.

Faust acks an event when the agent loop moves past it, and an exception inside the loop acks
(skips) the event. Agents here keep ``concurrency=1`` and instead run slow work (HTTP to
buyers) in tasks with *manual* acks: the event is acked only when its task is done, so events
are acked out of order. Faust itself would then commit past an event still in flight (faust
#606, the same bug that makes ``concurrency>1`` unsafe); with ``streams/runtime/faust_patches.py`` an
offset is committed only past a contiguous run of acked offsets starting at the committed
one, so a crash or a stop re-delivers every event whose task had not finished. Each task's
failure is routed to the dead-letter topic with the reason, then acked: nothing is skipped
silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any

import faust
from aiokafka.partitioner import DefaultPartitioner, murmur2
from faust.types import EventT, StreamT

import schemas

__all__ = [
    "InFlight",
    "DeadLetters",
    "KeyedLocks",
    "Requeue",
    "now_ms",
    "is_transient",
    "retry_transient",
    "durable_set",
    "durable_pop",
    "key_partition",
    "KeyPartitioner",
    "assigned_here",
    "member_confirmed",
    "membership_age_s",
    "hold_unconfirmed",
    "Job",
    "timer",
    "task",
]

log = logging.getLogger(__name__)


class Requeue(Exception):
    """Raised by a task's work to hand its event back: the event is published again at the
    end of its own partition (same key, value and partition), then acked, so whoever owns
    the partition next processes it again. For work that cannot progress now and has
    recorded nothing for this step yet — a post waiting for a cap decision while a rebalance
    pauses the cap owner. (Leaving the event unacked instead would hold the rebalance: Faust
    waits for every delivered event to be acked before it gives partitions up.)"""


def now_ms() -> int:
    return int(time.time() * 1000)


def is_transient(exc: BaseException) -> bool:
    """Errors a retry can fix: Kafka hiccups, metadata not yet propagated, connections."""
    from aiokafka.errors import KafkaError
    from faust.exceptions import PartitionsMismatch

    if isinstance(exc, (PartitionsMismatch, ConnectionError, asyncio.TimeoutError)):
        return True
    if isinstance(exc, KafkaError):
        return bool(getattr(exc, "retriable", False)) or type(exc).__name__ in (
            "KafkaTimeoutError",
            "KafkaConnectionError",
            "NodeNotReadyError",
        )
    return False


async def retry_transient(
    work: Callable[[], Awaitable[Any]], what: str, attempts: int = 8, first_delay: float = 0.1
) -> Any:
    """Run ``work``; on a transient error wait (0.1 s, doubling) and run it again. Work
    passed here is idempotent (deterministic ids, table-recorded progress), so a rerun
    after a partial effect is safe. The last error propagates to the failure policy."""
    delay = first_delay
    for attempt in range(attempts):
        try:
            return await work()
        except Exception as exc:
            if attempt == attempts - 1 or not is_transient(exc):
                raise
            log.warning(
                "%s: transient %s (%s); retry %d in %.1fs",
                what,
                type(exc).__name__,
                str(exc).splitlines()[0][:200],
                attempt + 1,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")


@functools.lru_cache(maxsize=8192)
def _key_hash(key: bytes) -> int:
    """murmur2 of a key, positive, as Kafka's default partitioner takes it. Cached: a lead's
    id is the key of some fifteen records and lookups, and aiokafka's murmur2 is pure Python
    (~6 µs a key, ~1 % of the auction worker's CPU at 100 leads/s, py-spy)."""
    hashed: int = murmur2(key)
    return hashed & 0x7FFFFFFF


def key_partition(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2 of the key bytes) gives ``key``:
    a lead's partition of every lead-keyed topic and table, a buyer's of the caps topic."""
    return _key_hash(key.encode()) % partitions


class KeyPartitioner:
    """aiokafka's default partitioner (the Java client's: murmur2 of the key), with the key's
    hash cached (``_key_hash``): the producers' ``producer_partitioner``. A record without a
    key goes where the default sends it (a random available partition)."""

    def __call__(
        self, key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]
    ) -> int:
        if key is None:
            chosen: int = DefaultPartitioner()(key, all_partitions, available)
            return chosen
        return all_partitions[_key_hash(bytes(key)) % len(all_partitions)]


#: The body of a timer or a start-up task (``timer``, ``task``).
Job = Callable[[], Awaitable[None]]


def timer(app: faust.App, interval: float, *, name: str) -> Callable[[Job], Job]:
    """``@app.timer(interval=interval, name=name)``, typed: Faust hides ``App.timer`` from
    the type checker (``@no_type_check``), which leaves every function it decorates untyped.
    What Faust's decorator returns (a wrapper running the job) is returned as is."""
    decorate: Callable[[Job], Job] = app.timer(interval=interval, name=name)
    return decorate


def task(app: faust.App) -> Callable[[Job], Job]:
    """``@app.task``, typed (as :func:`timer`): the job runs once when the worker starts."""

    def decorate(job: Job) -> Job:
        started: Job = app.task(job)
        return started

    return decorate


def assigned_here(app: Any, topic: str, partition: int) -> bool:
    """Whether ``partition`` of ``topic`` is one of this worker's active partitions now.

    Read from the assignment's topic -> partitions map: ``assigned_actives()`` builds a set
    of every active partition of every topic (~130 here) on each call, and this is asked up
    to four times a lead (~1 % of the auction worker's CPU at 100 leads/s, py-spy)."""
    assignor = app.assignor
    actives = getattr(getattr(assignor, "_assignment", None), "actives", None)
    if isinstance(actives, Mapping):
        return partition in actives.get(topic, ())
    return any(
        tp.partition == partition and tp.topic == topic for tp in assignor.assigned_actives()
    )


#: What is left of the group session a worker acts on: membership is confirmed while the
#: last proof of it is younger than the session timeout less this margin (time to finish an
#: action: close an auction and send its order, send a post).
MEMBERSHIP_MARGIN_S = 3.0


def membership_age_s(app: Any) -> float | None:
    """Seconds since this worker's consumer last had proof that it is a member of its group
    (``faust_patches`` point 7); None without a group consumer (an app that never started one,
    unit tests) or before the first proof."""
    try:
        coordinator = app.consumer._thread._consumer._coordinator
    except AttributeError:
        return None
    at = getattr(coordinator, "_pingpost_member_at", None)
    return None if at is None else time.monotonic() - at


def member_confirmed(app: Any) -> bool:
    """Whether this worker may act on its partitions now: its membership of the consumer
    group was confirmed within the session timeout (less a margin). A worker cut off from
    the group coordinator — its consumer stuck after a broker outage, its heartbeats failing
    — keeps its view of its partitions after the group gave them to another worker; acting on
    that view closed auctions the new owner closed again. Such a worker holds its effects
    (closes, pings, posts) until it has proof again (or exits: ``streams.runtime.liveness``).
    True when nothing is known (no group consumer)."""
    age = membership_age_s(app)
    if age is None:
        return True
    session_s = float(getattr(app.conf, "broker_session_timeout", 10.0))
    return age < session_s - MEMBERSHIP_MARGIN_S


_fence_log = logging.getLogger("streams.fence")


def hold_unconfirmed(app: Any, what: str) -> None:
    """Log that ``what`` is held for want of confirmed membership: once per interval with a
    count (a cut-off worker would otherwise log every lead it holds)."""
    if not _fence_log.filters:
        from streams.runtime.quiet import RepeatThrottle

        _fence_log.addFilter(RepeatThrottle())
    age = membership_age_s(app)
    _fence_log.warning(
        "holding %s: this worker's group membership is not confirmed (last proof %.1f s ago)",
        what,
        -1.0 if age is None else age,
    )


def durable_set(table: Any, key: str, value: Any, partition: int) -> Any:
    """Set ``table[key]`` and return the acknowledgement of its changelog record (awaitable).

    Faust's ``table[key] = value`` sends the changelog record "soon" and gives no handle on
    it, and only inside the stream of the key's partition. This writes the local store and
    the changelog record of ``partition`` (the key's partition: every lead-keyed table is
    co-partitioned with its topics) directly, so a caller can wait until the state is
    durable before acting on it (an outbox), and can do so from a timer too."""
    table.data[key] = value
    return table.send_changelog(partition, key, value)


def durable_pop(table: Any, key: str, partition: int) -> Any:
    """Remove ``table[key]`` and send its tombstone to the changelog of ``partition`` (like
    :func:`durable_set`: also outside the key's stream, e.g. from a timer)."""
    table.data.pop(key, None)
    return table.send_changelog(partition, key, None, value_serializer="raw")


class DeadLetters:
    """Routes records a stage cannot process to the dead-letter topic, with the reason.

    A dead letter never holds a raw PII value (``streams.rules.privacy``): a lead or a lead's PII
    record is kept as a PII-free view plus keyed hashes, an undecodable record as its length
    and keyed hash only; the reason and the log line are scrubbed of the record's PII values.
    ``settings`` gives the flows' PII fields and the hash key (by default those of the app
    the topic belongs to)."""

    def __init__(self, topic: Any, stage: str, settings: Any = None) -> None:
        self.topic = topic
        self.stage = stage
        self.settings = settings

    def _safe(self, value: Any) -> Any:
        from streams.rules.privacy import dead_letter_payload

        settings = self.settings
        if settings is None:  # the Context that create_app attaches to its app
            ctx = getattr(getattr(self.topic, "app", None), "pingpost_context", None)
            settings = getattr(ctx, "settings", None)
        return dead_letter_payload(value, settings)

    async def send(self, event: EventT[Any], reason: str, field: str | None = None) -> None:
        from streams.rules.scrub import scrub

        msg = event.message
        safe = self._safe(msg.value)
        if safe.pii_values:
            reason = scrub(reason, safe.pii_values)
        record = {
            "id": f"{msg.topic}:{msg.partition}:{msg.offset}",
            "stage": self.stage,
            "topic": msg.topic,
            "partition": msg.partition,
            "offset": msg.offset,
            "key": msg.key if isinstance(msg.key, (bytes, type(None))) else str(msg.key).encode(),
            "payload": safe.payload,
            "reason": reason[:1000],
            "field": field,
            "at_ms": now_ms(),
            "payload_redacted": safe.redacted,
            "payload_length": safe.length,
            "payload_hmac": safe.hmac,
            "pii_hashes": safe.pii_hashes,
        }
        value = schemas.encode("DeadLetter", record)
        await retry_transient(
            lambda: self.topic.send(key=msg.key, value=value), f"dead-letter {record['id']}"
        )
        log.warning("dead-lettered %s (%s): %s", record["id"], self.stage, reason)

    async def guarded(
        self, event: EventT[Any], work: Callable[[], Awaitable[Any]], what: str
    ) -> bool:
        """The per-event failure policy in one place: run ``work``, retrying transient
        errors; on any other failure dead-letter the event with the reason. True if the
        work succeeded. A failure to dead-letter propagates (the caller must not ack)."""
        try:
            await retry_transient(work, what)
            return True
        except (asyncio.CancelledError, Requeue):
            raise
        except Exception as exc:
            from streams.rules.scrub import scrub

            msg = event.message
            secret = self._safe(msg.value).pii_values  # an error message may quote a value
            log.error(
                "%s failed on %s:%s:%s\n%s",
                what,
                msg.topic,
                msg.partition,
                msg.offset,
                scrub(traceback.format_exc(), secret) if secret else traceback.format_exc(),
            )
            await self.send(event, f"{what}: {type(exc).__name__}: {exc}")
            return False


class KeyedLocks:
    """An asyncio lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


class InFlight:
    """Run one task per event, at most ``limit`` at once; ack each event when its task ends."""

    def __init__(self, name: str, limit: int, dead: DeadLetters) -> None:
        self.name = name
        self.limit = limit
        self._sem = asyncio.Semaphore(limit)
        self._tasks: set[asyncio.Task[None]] = set()
        self.dead = dead

    def __len__(self) -> int:
        return len(self._tasks)

    async def submit(
        self, stream: StreamT[Any], event: EventT[Any], work: Callable[[], Awaitable[None]]
    ) -> None:
        await self._sem.acquire()  # backpressure: the agent stops reading when full
        self._start(self._run(stream, event, work))

    async def detached(self, work: Callable[[], Awaitable[None]]) -> bool:
        """Run ``work`` as one of the tasks, with no event to ack, if a slot is free now;
        False (nothing started) when all are taken. For a hand-off the topic also delivers:
        under load the event then waits its turn there instead. ``work`` handles its own
        errors."""
        if self._sem.locked():
            return False
        await self._sem.acquire()  # a free slot: taken without suspending
        self._start(self._run_detached(work))
        return True

    def _start(self, job: Coroutine[Any, Any, None]) -> None:
        """Run ``job`` (it holds a slot, released when it ends) as a tracked task."""
        task = asyncio.create_task(job, name=f"{self.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_detached(self, work: Callable[[], Awaitable[None]]) -> None:
        try:
            await work()
        finally:
            self._sem.release()

    async def _run(
        self, stream: StreamT[Any], event: EventT[Any], work: Callable[[], Awaitable[None]]
    ) -> None:
        try:
            await self.dead.guarded(event, work, self.name)
        except asyncio.CancelledError:
            # Shutdown: leave the event unacked so it is redelivered, never half-done.
            self._sem.release()
            raise
        except Requeue as why:
            msg = event.message
            try:
                await retry_transient(
                    lambda: event.app.producer.send_and_wait(
                        msg.topic, msg.key, msg.value, msg.partition, None, None
                    ),
                    f"requeue {msg.topic}:{msg.partition}:{msg.offset}",
                    attempts=6,
                )
            except Exception:  # Kafka down: keep the event unacked, it will be redelivered
                log.exception(
                    "could not requeue %s:%s:%s; leaving it unacked: the partition's "
                    "offset is not committed past it until a restart or rebalance "
                    "redelivers it",
                    msg.topic,
                    msg.partition,
                    msg.offset,
                )
                self._sem.release()
                return
            log.info(
                "%s: requeued %s:%s:%s at the end of its partition (%s)",
                self.name,
                msg.topic,
                msg.partition,
                msg.offset,
                why,
            )
            self._sem.release()
            await stream.ack(event)
            return
        except Exception:  # Kafka down: keep the event unacked, it will be redelivered
            log.exception("could not dead-letter; leaving event unacked")
            self._sem.release()
            return
        self._sem.release()
        await stream.ack(event)

    async def drain(self, timeout: float) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        for t in list(self._tasks):
            t.cancel()
