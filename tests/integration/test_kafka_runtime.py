"""The project's own Kafka runtime, end to end against the real broker.

Proves the stack we ship on works together: Kafka 4.1 (KRaft, started by
connectors.kafka_broker) + aiokafka 0.14 + faust-streaming 0.15.3 with the classic
consumer group protocol. No sleeps as synchronisation: every wait polls a condition
under a deadline.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import UnknownTopicOrPartitionError
from aiokafka.structs import ConsumerRecord

from connectors.kafka_broker import KafkaBroker, KafkaRuntimeError, create_topics
from tests.integration.kafka_fixture import start_test_broker

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


def unique(prefix: str) -> str:
    """Topic/group names unique per test run: the broker is shared by the session."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def produce(bootstrap: str, topic: str, items: Iterable[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        # Exercises InitProducerId on Kafka 4 too (what a careful producer would use).
        enable_idempotence=True,
    )
    await producer.start()
    try:
        futures = [await producer.send(topic, key=k, value=v) for k, v in items]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def consume(
    bootstrap: str,
    topic: str,
    count: int,
    *,
    timeout: float,
    group_id: str | None = None,
) -> list[ConsumerRecord[bytes, bytes]]:
    """Read ``count`` records from the start of ``topic``, or fail at the deadline."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group_id,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(records) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"got {len(records)} of {count} records from {topic} in {timeout}s")
            batches = await consumer.getmany(timeout_ms=int(min(remaining, 1.0) * 1000))
            for batch in batches.values():
                records.extend(batch)
        if group_id is not None:
            await consumer.commit()
    finally:
        await consumer.stop()
    return records


# --------------------------------------------------------------------- broker


def test_session_broker_is_ready(kafka_broker: KafkaBroker) -> None:
    assert kafka_broker.is_running()
    assert kafka_broker.is_ready()
    assert kafka_broker.bootstrap == f"127.0.0.1:{kafka_broker.port}"
    rss = kafka_broker.rss_bytes()
    assert rss is not None and rss > 0
    print(f"\nsession broker RSS: {rss / 2**20:.0f} MiB")


def test_start_is_idempotent(kafka_broker: KafkaBroker) -> None:
    pid = kafka_broker.pid()
    kafka_broker.start(wait=True, timeout=10)
    assert kafka_broker.pid() == pid
    # Another handle on the same dir (e.g. a second CLI call) sees the same broker.
    same = KafkaBroker(
        port=kafka_broker.port,
        controller_port=kafka_broker.controller_port,
        data_dir=kafka_broker.data_dir,
    )
    assert same.pid() == pid
    same.start(wait=True, timeout=10)
    assert same.pid() == pid
    # ...but a conflicting port on the same dir is an error, not a silent no-op.
    wrong = KafkaBroker(port=kafka_broker.port + 7, data_dir=kafka_broker.data_dir)
    with pytest.raises(KafkaRuntimeError, match="already runs"):
        wrong.start(wait=False)


async def test_topics_produce_consume(kafka_bootstrap: str) -> None:
    topic = unique("rt-six")
    assert await create_topics(kafka_bootstrap, [(topic, 6, {"retention.ms": "3600000"})]) == {
        topic: True
    }
    # Idempotent: an existing topic with the same partition count is fine.
    assert await create_topics(kafka_bootstrap, [(topic, 6, {})]) == {topic: False}
    # A different count is a co-partitioning bug waiting to happen: refuse.
    with pytest.raises(KafkaRuntimeError, match="6 partitions, expected 3"):
        await create_topics(kafka_bootstrap, [(topic, 3, {})], timeout=10)

    messages = [(f"lead-{i}".encode(), f"payload-{i}".encode()) for i in range(600)]
    await produce(kafka_bootstrap, topic, messages)

    started = time.monotonic()
    records = await consume(kafka_bootstrap, topic, 600, timeout=60, group_id=unique("rt-group"))
    print(f"\ngroup consumer: 600 records in {time.monotonic() - started:.2f}s (incl. join)")
    assert sorted((r.key, r.value) for r in records) == sorted(messages)
    per_partition = Counter(r.partition for r in records)
    assert set(per_partition) == set(range(6)), per_partition
    # Same key -> same partition (what keyed state and per-lead ordering rely on).
    partition_of: dict[bytes | None, int] = {}
    for r in records:
        assert partition_of.setdefault(r.key, r.partition) == r.partition


async def test_unknown_topic_is_not_auto_created(kafka_bootstrap: str) -> None:
    name = unique("rt-typo")
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, request_timeout_ms=3000)
    await producer.start()
    try:
        # aiokafka waits request_timeout_ms for the topic to appear in metadata.
        with pytest.raises(UnknownTopicOrPartitionError):
            await asyncio.wait_for(producer.send_and_wait(name, b"x"), timeout=30)
    finally:
        await producer.stop()
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        assert name not in await admin.list_topics()
    finally:
        await admin.close()


async def test_second_broker_restart_keeps_data(tmp_path: Path) -> None:
    """An independent broker (own dir and ports) next to the session one; data and the
    cluster id survive stop/start, and the dir is formatted only once."""
    started = time.monotonic()
    broker = start_test_broker(tmp_path / "kafka2")
    first_start = time.monotonic() - started
    try:
        cluster_id = (tmp_path / "kafka2" / "cluster.id").read_text()
        topic = unique("rt-restart")
        await create_topics(broker.bootstrap, [(topic, 2, {})])
        await produce(broker.bootstrap, topic, [(b"k", b"before-restart")])

        stop_started = time.monotonic()
        broker.stop()
        stop_seconds = time.monotonic() - stop_started
        assert not broker.is_running()
        assert not broker.pid_file.exists()

        started = time.monotonic()
        broker.start(wait=True, timeout=120)
        restart = time.monotonic() - started
        assert (tmp_path / "kafka2" / "cluster.id").read_text() == cluster_id
        assert await create_topics(broker.bootstrap, [(topic, 2, {})]) == {topic: False}
        records = await consume(broker.bootstrap, topic, 1, timeout=30)
        assert records[0].value == b"before-restart"
        print(
            f"\nsecond broker: first start {first_start:.2f}s (incl. format), "
            f"stop {stop_seconds:.2f}s, restart {restart:.2f}s"
        )
    finally:
        broker.stop()
    assert not broker.is_running()


# ---------------------------------------------------------------------- faust

FAUST_APP = """
import faust

app = faust.App(
    {app_id!r},
    broker={broker!r},
    store="memory://",
    processing_guarantee="at_least_once",
    topic_partitions=6,
    topic_replication_factor=1,
    web_enabled=False,
)
source = app.topic({source!r}, key_serializer="raw", value_serializer="raw", partitions=6)
sink = app.topic({sink!r}, key_serializer="raw", value_serializer="raw", partitions=6)
# A table makes Faust create its own changelog topic (Faust's CreateTopics path against
# Kafka 4, with auto-creation off) and drive the changelog/recovery machinery.
seen = app.Table("seen", default=int, partitions=6)


@app.agent(source, concurrency=1)
async def forward(stream):
    async for event in stream.events():
        seen[event.key.decode()] += 1
        await sink.send(key=event.key, value=event.value)
"""


def _stop_worker(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(timeout=10)


def _log_has(log: Path, needle: str) -> bool:
    return log.exists() and needle in log.read_text(errors="replace")


async def test_faust_worker_forwards(kafka_bootstrap: str, tmp_path: Path) -> None:
    source, sink = unique("rt-faust-a"), unique("rt-faust-b")
    await create_topics(kafka_bootstrap, [(source, 6, {}), (sink, 6, {})])
    module = f"smoke_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(FAUST_APP).format(
            app_id=unique("rt-faust"),
            broker=f"kafka://{kafka_bootstrap}",
            source=source,
            sink=sink,
        )
    )
    log = tmp_path / "worker.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO_ROOT)])}
    spawned = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "faust", "-A", module),
                *("--datadir", str(tmp_path / "faust")),
                # The CLI's default --with-web overrides web_enabled=False in the app and
                # binds :6066, which would collide with any other worker on the machine.
                *("worker", "--without-web", "-l", "info"),
            ],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        messages = [(f"lead-{i % 17}".encode(), f"ping-{i}".encode()) for i in range(100)]
        await produce(kafka_bootstrap, source, messages)
        try:
            records = await consume(kafka_bootstrap, sink, 100, timeout=120)
        except BaseException:
            print(log.read_text(errors="replace")[-8000:])
            raise
        first_to_all = time.monotonic() - spawned
        assert sorted(r.value for r in records) == sorted(v for _, v in messages)
        assert all(r.key == f"lead-{int(r.value[5:]) % 17}".encode() for r in records)
        # The worker announces readiness only after it joined the group and recovered
        # its table; poll the log (bounded) to time that.
        deadline = time.monotonic() + 30
        while not _log_has(log, "Ready"):
            assert time.monotonic() < deadline, "worker never logged Ready"
            await asyncio.sleep(0.1)
        print(f"\nfaust worker: spawn -> 100 forwarded in {first_to_all:.2f}s")
    finally:
        rc = _stop_worker(proc)
    text = log.read_text(errors="replace")
    print("faust worker warnings/errors:")
    for line in text.splitlines():
        if any(w in line for w in ("WARN", "ERROR", "Traceback", "Unsupported")):
            print("  " + line[:300])
    assert "UnsupportedVersion" not in text, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    assert rc == 0, f"faust worker exited {rc}:\n{text[-4000:]}"
