"""A consumer at rest asks the broker rarely, and still gets the first record after the rest
at once (streams/runtime/faust_patches.py, point 8; issue 12: the stack at rest).

Real broker, real aiokafka consumer with the auction worker's 10 ms fetch wait. Unpatched it
sends a fetch every ~10 ms while nothing arrives (hundreds in the idle window); patched, a
fetch that leaves no partition out waits the idle wait, and the broker answers it as soon as a
record lands. The count of fetches is read from aiokafka's own request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.consumer.fetcher import Fetcher

from streams.runtime import faust_patches
from streams.runtime.feeds import FEED_POLL_MS, follow_topic

pytestmark = pytest.mark.integration

IDLE_S = 3.0


async def _new_topic(bootstrap: str, prefix: str, partitions: int) -> str:
    """A fresh topic of ``partitions`` partitions; its name."""
    topic = f"{prefix}-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, num_partitions=partitions, replication_factor=1)]
        )
    finally:
        await admin.close()
    return topic


@contextlib.asynccontextmanager
async def _group_member(
    bootstrap: str, prefix: str, **consumer_config: int
) -> AsyncIterator[tuple[str, AIOKafkaProducer, AIOKafkaConsumer]]:
    """A fresh 4-partition topic, a producer, and a group member of it that has read the
    record ``b"warm-up"`` (partition 0, offset 0): assigned and fetching."""
    topic = await _new_topic(bootstrap, prefix, 4)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"g-{topic}",
        auto_offset_reset="earliest",
        **consumer_config,
    )
    await producer.start()
    await consumer.start()
    try:
        # Until the group has assigned the partitions, fetches do not count.
        while not consumer.assignment():
            await asyncio.sleep(0.05)
        await producer.send_and_wait(topic, b"warm-up", partition=0)
        await asyncio.wait_for(consumer.getone(), 30)
        yield topic, producer, consumer
    finally:
        await consumer.stop()
        await producer.stop()


def _count_passes(fetcher: Fetcher) -> Callable[[], int]:
    """Counts the fetch routine's passes from now on; the count so far."""
    passes = 0
    orig = fetcher._get_actions_per_node

    def counting(assignment: object) -> object:
        nonlocal passes
        passes += 1
        return orig(assignment)

    fetcher._get_actions_per_node = counting  # type: ignore[method-assign]
    return lambda: passes


async def _idle_then_one_record(
    bootstrap: str, idle_s: float = IDLE_S, **consumer_config: int
) -> tuple[int, float, float]:
    """(fetches sent while idle, seconds from send to delivery of the record after the rest,
    seconds of a record while busy)"""
    config = consumer_config or {"fetch_max_wait_ms": faust_patches.WORKER_FETCH_MAX_WAIT_MS}
    async with _group_member(bootstrap, "idle", **config) as (topic, producer, consumer):
        fetcher = consumer._fetcher
        sent = 0
        orig = fetcher._proc_fetch_request

        async def counting(*args: object, **kwargs: object) -> object:
            nonlocal sent
            sent += 1
            return await orig(*args, **kwargs)

        fetcher._proc_fetch_request = counting  # type: ignore[method-assign]
        reader = asyncio.ensure_future(consumer.getone())
        await asyncio.sleep(idle_s)  # the rest being measured, not a synchronization
        idle_fetches = sent
        t0 = time.monotonic()
        await producer.send_and_wait(topic, b"after-rest", partition=3)
        msg = await asyncio.wait_for(reader, 10)
        after_rest = time.monotonic() - t0
        assert msg.value == b"after-rest"
        t0 = time.monotonic()
        await producer.send_and_wait(topic, b"busy", partition=1)
        msg = await asyncio.wait_for(consumer.getone(), 10)
        busy = time.monotonic() - t0
        assert msg.value == b"busy"
        return idle_fetches, after_rest, busy


def test_idle_consumer_fetches_rarely_and_first_record_is_prompt(kafka_bootstrap: str) -> None:
    faust_patches.apply()
    assert getattr(Fetcher, "_pingpost_idle_wait", False)
    idle_fetches, after_rest, busy = asyncio.run(_idle_then_one_record(kafka_bootstrap))
    # At most one fetch per idle wait (plus the one in flight at each end); unpatched: ~200.
    bound = IDLE_S / (faust_patches.IDLE_FETCH_MAX_WAIT_MS / 1000) + 2
    assert idle_fetches <= bound, f"{idle_fetches} fetches in {IDLE_S}s at rest"
    # The broker answers the pending long fetch when the record lands: not after the idle wait.
    assert after_rest < 0.2, f"first record after the rest took {after_rest * 1000:.0f} ms"
    assert busy < 0.2, f"a record took {busy * 1000:.0f} ms"


def test_a_batching_consumer_at_rest_fetches_rarely_and_reads_the_first_record_at_once(
    kafka_bootstrap: str,
) -> None:
    """Point 9 at rest: the sink's and metrics' batched fetch (32 KiB or 500 ms) turns into
    point 8's idle fetch once a fetch comes back empty. Unpatched it asks every 500 ms, and a
    lone record waits up to 500 ms for bytes that do not come."""
    faust_patches.apply()
    idle_s, batch_wait = 4.0, 500
    idle_fetches, after_rest, _ = asyncio.run(
        _idle_then_one_record(
            kafka_bootstrap, idle_s, fetch_max_wait_ms=batch_wait, fetch_min_bytes=32768
        )
    )
    # One empty batched fetch, then one per idle wait (plus one in flight at each end);
    # unpatched: idle_s / 0.5 s = 8.
    bound = 1 + idle_s / (faust_patches.IDLE_FETCH_MAX_WAIT_MS / 1000) + 1
    assert idle_fetches <= bound, f"{idle_fetches} fetches in {idle_s}s at rest"
    assert after_rest < 0.2, f"first record after the rest took {after_rest * 1000:.0f} ms"


def test_fetch_wait_is_short_while_a_read_partition_waits() -> None:
    """The rule itself: short while anything the consumer reads is left out of the fetch."""
    short = faust_patches.WORKER_FETCH_MAX_WAIT_MS
    idle = faust_patches.IDLE_FETCH_MAX_WAIT_MS
    assert faust_patches.fetch_params(short, 1, waiting_to_be_read=True, any_paused=False) == (
        short,
        1,
    )
    assert faust_patches.fetch_params(short, 1, waiting_to_be_read=False, any_paused=True) == (
        short,
        1,
    )
    for last_empty in (True, False):
        assert faust_patches.fetch_params(short, 1, False, False, last_empty) == (idle, 1)
    longer = idle + 1000  # a configured wait above the idle one is kept
    assert faust_patches.fetch_params(longer, 1, False, False) == (longer, 1)


def test_a_batching_fetch_keeps_its_configuration_while_records_flow() -> None:
    """Point 9: a consumer that fetches in batches (the sink and metrics roles) waits its
    configured bound for its bytes while records flow (point 8's idle wait would be how late
    it reads at low traffic); once a fetch came back empty it fetches as any consumer at rest:
    one record ends the wait."""
    batch_wait, batch_bytes = 500, 32768
    idle = faust_patches.IDLE_FETCH_MAX_WAIT_MS
    for waiting, paused in [(False, False), (True, False), (False, True)]:
        assert faust_patches.fetch_params(batch_wait, batch_bytes, waiting, paused, False) == (
            batch_wait,
            batch_bytes,
        )
    assert faust_patches.fetch_params(batch_wait, batch_bytes, False, False, True) == (idle, 1)
    # Records of a partition it reads are buffered: the configured fetch, empty or not.
    assert faust_patches.fetch_params(batch_wait, batch_bytes, True, False, True) == (
        batch_wait,
        batch_bytes,
    )


async def _record_behind_an_unread_partition(bootstrap: str, trials: int = 6) -> list[float]:
    """Seconds from send to delivery of a record on the partition the consumer reads, each
    sent just after a record of a partition it does not read was fetched (Faust's view of a
    table's changelog after recovery: assigned, fetched, never taken)."""
    topic = await _new_topic(bootstrap, "unread", trials + 1)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=faust_patches.WORKER_FETCH_MAX_WAIT_MS,
    )
    await producer.start()
    await consumer.start()
    try:
        read = TopicPartition(topic, trials)
        consumer.assign([TopicPartition(topic, p) for p in range(trials + 1)])
        assert await consumer.getmany(read, timeout_ms=200) == {}
        fetcher = consumer._fetcher
        took = []
        for p in range(trials):
            unread = TopicPartition(topic, p)
            await producer.send_and_wait(topic, b"changelog", partition=p)
            deadline = time.monotonic() + 10
            while unread not in fetcher._records:  # the fetcher holds it, untaken
                assert time.monotonic() < deadline, f"{unread} was never fetched"
                await asyncio.sleep(0.002)
            t0 = time.monotonic()
            await producer.send_and_wait(topic, f"event {p}".encode(), partition=trials)
            got = await consumer.getmany(read, timeout_ms=5000)
            took.append(time.monotonic() - t0)
            assert [m.value for m in got.get(read, [])] == [f"event {p}".encode()]
        return took
    finally:
        await consumer.stop()
        await producer.stop()


def test_records_nobody_reads_do_not_hold_back_the_partitions_read(kafka_bootstrap: str) -> None:
    """Point 10: unpatched, aiokafka sends no fetch for 100 ms after a batch of a partition
    the consumer does not read arrives, so a record landing meanwhile on a partition it reads
    waits out that backoff (~100 ms; it held the first leads after a worker's start)."""
    faust_patches.apply()
    took = sorted(asyncio.run(_record_behind_an_unread_partition(kafka_bootstrap)))
    median = took[len(took) // 2]
    assert median < 0.05, "delivery after an unread partition's batch: " + ", ".join(
        f"{t * 1000:.0f} ms" for t in took
    )


async def _feed_at_rest(bootstrap: str, rest_s: float) -> tuple[int, int, float]:
    """A worker's feed (``follow_topic``) at rest: (its fetch routine's passes, its
    ``on_batch`` calls, seconds from send to ``on_record`` of a record after the rest)."""
    topic = await _new_topic(bootstrap, "feed", 3)
    got = asyncio.Event()
    batches = 0

    def on_batch() -> None:
        nonlocal batches
        batches += 1

    settings = SimpleNamespace(kafka=SimpleNamespace(bootstrap=bootstrap))
    feed = follow_topic(settings, topic, int(time.time() * 1000), lambda v: got.set(), on_batch)()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await producer.start()
    await feed.start()
    try:
        passes = _count_passes(feed._consumer._fetcher)
        batches = 0
        await asyncio.sleep(rest_s)  # the rest being measured, not a synchronization
        counted = (passes(), batches)
        t0 = time.monotonic()
        await producer.send_and_wait(topic, b"after-rest", partition=2)
        await asyncio.wait_for(got.wait(), 10)
        return counted[0], counted[1], time.monotonic() - t0
    finally:
        await feed.stop()
        await producer.stop()


def test_a_feed_at_rest_wakes_rarely_and_reads_the_next_record_at_once(
    kafka_bootstrap: str,
) -> None:
    """The feeds (and ingest's group-less readers) at rest: aiokafka's fetch routine used to
    re-examine its partitions every 200 ms and the feed's poll to end every 250 ms, ~9 wake-ups
    a second per feed with nothing to do; now about one a second each. A record still ends the
    wait at once."""
    faust_patches.apply()
    rest_s = 4.0
    passes, batches, after_rest = asyncio.run(_feed_at_rest(kafka_bootstrap, rest_s))
    # One pass per routine timeout plus one per idle fetch's answer (point 8: every 2 s);
    # unpatched ~20 + 2.
    assert passes <= rest_s * 1.5 + 2, f"{passes} fetch-routine passes in {rest_s} s at rest"
    assert batches <= rest_s * 1000 / FEED_POLL_MS + 2, f"{batches} polls in {rest_s} s at rest"
    assert after_rest < 0.2, f"the record after the rest took {after_rest * 1000:.0f} ms"


async def _group_consumer_at_rest(bootstrap: str, rest_s: float) -> tuple[int, float, float]:
    """A group member (as Faust's worker consumer: aiokafka's default routine timer) at rest:
    (its fetch routine's passes, seconds to the record after the rest, seconds from a seek
    back to the re-read record)."""
    async with _group_member(bootstrap, "group") as (topic, producer, consumer):
        passes = _count_passes(consumer._fetcher)
        reader = asyncio.ensure_future(consumer.getone())
        await asyncio.sleep(rest_s)  # the rest being measured, not a synchronization
        counted = passes()
        t0 = time.monotonic()
        await producer.send_and_wait(topic, b"after-rest", partition=2)
        assert (await asyncio.wait_for(reader, 10)).value == b"after-rest"
        after_rest = time.monotonic() - t0
        await asyncio.sleep(rest_s / 2)  # at rest again, then a seek back
        t0 = time.monotonic()
        consumer.seek(TopicPartition(topic, 0), 0)
        assert (await asyncio.wait_for(consumer.getone(), 10)).value == b"warm-up"
        return counted, after_rest, time.monotonic() - t0


def test_a_group_consumer_at_rest_wakes_rarely_and_a_record_or_a_seek_acts_at_once(
    kafka_bootstrap: str,
) -> None:
    """Point 13: Faust's worker consumers keep aiokafka's 200 ms routine timer (Faust passes
    no ``consumer_timeout_ms``), so each re-examined its partitions five times a second at
    rest. Now once a second; what the routine must act on still wakes it at once."""
    faust_patches.apply()
    rest_s = 4.0
    passes, after_rest, after_seek = asyncio.run(_group_consumer_at_rest(kafka_bootstrap, rest_s))
    # One pass per routine timeout plus one per idle fetch's answer (every 2 s); unpatched
    # ~20 + 2.
    bound = rest_s / faust_patches.FETCH_ROUTINE_PASS_S + rest_s / 2 + 2
    assert passes <= bound, f"{passes} fetch-routine passes in {rest_s} s at rest"
    assert after_rest < 0.2, f"the record after the rest took {after_rest * 1000:.0f} ms"
    assert after_seek < 0.2, f"the record after a seek took {after_seek * 1000:.0f} ms"
