"""Per-lead locking and the PII scrub of buyer reasons."""

from __future__ import annotations

import asyncio
from pathlib import Path

from streams.rules.scrub import scrub
from streams.runtime.agents import KeyedLocks, is_transient


async def test_keyed_locks_serialise_one_key_and_not_others() -> None:
    locks = KeyedLocks()
    events: list[str] = []
    gate = asyncio.Event()

    async def worker(key: str, name: str, wait: bool) -> None:
        async with locks.hold(key):
            events.append(f"{name} in")
            if wait:
                await gate.wait()
            events.append(f"{name} out")

    first = asyncio.create_task(worker("lead-1", "a", True))
    await asyncio.sleep(0)
    second = asyncio.create_task(worker("lead-1", "b", False))
    other = asyncio.create_task(worker("lead-2", "c", False))
    await other
    assert events == ["a in", "c in", "c out"]  # lead-2 did not wait; b waits for a
    gate.set()
    await asyncio.gather(first, second)
    assert events[3:] == ["a out", "b in", "b out"]
    assert len(locks) == 0  # nothing kept once nobody holds or waits


def test_scrub_removes_pii_values_case_insensitively() -> None:
    pii = ["ada@example.com", "+13105550100", "Lovelace"]
    assert (
        scrub("duplicate: ADA@example.com (lovelace)", pii) == "duplicate: [redacted] ([redacted])"
    )
    assert scrub("daily cap reached", pii) == "daily cap reached"


def test_transient_errors_are_told_apart() -> None:
    from aiokafka.errors import KafkaTimeoutError, UnknownTopicOrPartitionError
    from faust.exceptions import PartitionsMismatch

    assert is_transient(PartitionsMismatch("changelog has 0 partitions"))
    assert is_transient(KafkaTimeoutError())
    assert is_transient(UnknownTopicOrPartitionError())
    assert not is_transient(KeyError("sunrise"))
    assert not is_transient(ValueError("bad"))


def test_lead_partition_matches_the_producer_partitioner() -> None:
    """Stale-key cleanup after a rebalance relies on knowing a lead's partition."""
    import uuid

    from aiokafka.partitioner import DefaultPartitioner

    from streams.stages.auction import lead_partition

    parts = list(range(6))
    seen = set()
    for i in range(300):
        key = str(uuid.UUID(int=i * 7919))
        expected = DefaultPartitioner()(key.encode(), parts, parts)
        assert lead_partition(key, 6) == expected
        seen.add(expected)
    assert seen == set(parts)


def test_the_producers_partitioner_is_kafkas_default_with_the_hash_cached(
    tmp_path: Path,
) -> None:
    """Every role's producer partitions a key where aiokafka's (the Java client's) default
    partitioner does, twice in a row (the second time from the cache), for any partition
    count; a record without a key goes to an available partition."""
    import random
    import uuid

    import yaml
    from aiokafka.partitioner import DefaultPartitioner

    from streams.app import create_app
    from streams.runtime.agents import KeyPartitioner, key_partition
    from streams.settings import parse_settings

    settings = parse_settings(yaml.safe_load(Path("config/demo.yaml").read_text()), env={})
    for role in ("auction", "sink", "metrics"):
        part = create_app(settings, role, data_root=tmp_path).conf.producer_partitioner
        assert isinstance(part, KeyPartitioner), role
    ours, kafka = KeyPartitioner(), DefaultPartitioner()
    rng = random.Random(5)
    for n in (1, 3, 6, 24):
        parts = list(range(n))
        hit = set()
        for i in range(400):
            key = f"lead-{uuid.UUID(int=rng.getrandbits(128))}-{i}".encode()
            want = kafka(key, parts, parts)
            assert ours(key, parts, parts) == ours(bytearray(key), parts, parts) == want
            assert key_partition(key.decode(), n) == want
            hit.add(want)
        assert hit == set(parts)
    assert ours(None, [0, 1, 2], [2]) == 2


def test_assigned_here_agrees_with_fausts_assignment() -> None:
    """``assigned_here`` reads the assignment's map; it answers what Faust's public
    ``assigned_actives()`` answers, before any assignment and after one."""
    import faust
    from faust.assignor.client_assignment import ClientAssignment

    from streams.runtime.agents import assigned_here

    app = faust.App("t-assigned", broker="kafka://127.0.0.1:1", store="memory://")
    topics = ("pp.bids", "pp.posts", "pp.results")

    def agree() -> int:
        actives = app.assignor.assigned_actives()
        yes = 0
        for topic in topics:
            for p in range(8):
                here = assigned_here(app, topic, p)
                assert here == any(tp.topic == topic and tp.partition == p for tp in actives)
                yes += here
        return yes

    assert agree() == 0
    app.assignor._assignment = ClientAssignment(
        actives={"pp.bids": [0, 3, 5], "pp.results": [1]}, standbys={"pp.posts": [2]}
    )
    assert agree() == 4  # bids 0, 3, 5 and results 1; a standby is not active


def test_every_rule_key_is_applied_so_none_is_refused() -> None:
    """A worker refuses config keys it validates but does not apply (a cap silently ignored
    would cost money); every key of the complete auction is applied now."""
    from pathlib import Path

    import yaml

    from streams.app import create_app
    from streams.settings import parse_settings, unenforced_keys

    raw = yaml.safe_load(Path("config/demo.yaml").read_text())
    raw["buyers"][1]["caps"] = {"leads_per_day": 10}
    raw["buyers"][1]["auto_pause"] = {"window_s": 30}
    raw["flows"]["solar"]["strategy"]["rank_by"] = "score"
    raw["flows"]["solar"]["duplicates"] = {"fields": ["email"]}
    raw["flows"]["solar"]["waves"] = [
        {"tiers": ["premium", "standard", "backup"], "timeout_ms": 500}
    ]
    settings = parse_settings(raw, env={})
    assert unenforced_keys(settings) == []
    app = create_app(settings, "auction")
    agents = set(app.agents)
    assert {"caps", "dedupe", "cap-decisions"} <= {a.rsplit(".", 1)[-1] for a in agents}


class _Msg:
    topic, partition, offset, key, value = "p.posts", 4, 83, b"lead-1", b"order-bytes"


class _Producer:
    def __init__(self, fail: int = 0, error: Exception | None = None) -> None:
        self.sent: list[tuple[object, ...]] = []
        self.fail = fail  # the first ``fail`` sends raise ``error``
        self.error = error or ConnectionError("broker down")

    async def send_and_wait(self, *args: object) -> None:
        if self.fail:
            self.fail -= 1
            raise self.error
        self.sent.append(args)


class _Event:
    def __init__(self, producer: _Producer) -> None:
        self.message = _Msg()
        self.app = type("App", (), {"producer": producer})()


class _Stream:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def ack(self, event: object) -> None:
        self.log.append("ack")


class _Dead:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def guarded(self, event: object, work: object, what: str) -> bool:
        # the real failure policy (DeadLetters.guarded) lets Requeue through, like Cancelled
        from streams.runtime.agents import DeadLetters

        return await DeadLetters.guarded(self, event, work, what)  # type: ignore[arg-type]

    async def send(self, event: object, reason: str) -> None:
        self.sent.append(reason)


async def test_a_requeued_event_is_published_again_then_acked() -> None:
    from streams.runtime.agents import InFlight, Requeue

    log: list[str] = []
    producer, dead = _Producer(), _Dead()
    inflight = InFlight("post", 2, dead)  # type: ignore[arg-type]

    async def work() -> None:
        raise Requeue("a cap decision cannot come during a rebalance")

    await inflight.submit(_Stream(log), _Event(producer), work)  # type: ignore[arg-type]
    await inflight.drain(timeout=1.0)
    # same topic, key, value and partition; acked only after the copy is in Kafka
    assert producer.sent == [("p.posts", b"lead-1", b"order-bytes", 4, None, None)]
    assert log == ["ack"]
    assert dead.sent == []  # not a failure: nothing dead-lettered


async def test_an_event_that_cannot_be_requeued_stays_unacked() -> None:
    from streams.runtime.agents import InFlight, Requeue

    log: list[str] = []
    dead = _Dead()
    inflight = InFlight("post", 2, dead)  # type: ignore[arg-type]

    async def work() -> None:
        raise Requeue("rebalancing")

    # not a transient error: given up at once
    producer = _Producer(fail=1, error=ValueError("record too large"))
    await inflight.submit(_Stream(log), _Event(producer), work)  # type: ignore[arg-type]
    await inflight.drain(timeout=5.0)
    assert log == [] and dead.sent == [] and producer.fail == 0


async def test_a_requeue_is_retried_through_a_broker_hiccup() -> None:
    from streams.runtime.agents import InFlight, Requeue

    log: list[str] = []
    producer, dead = _Producer(fail=1), _Dead()
    inflight = InFlight("post", 2, dead)  # type: ignore[arg-type]

    async def work() -> None:
        raise Requeue("rebalancing")

    await inflight.submit(_Stream(log), _Event(producer), work)  # type: ignore[arg-type]
    await inflight.drain(timeout=5.0)
    assert len(producer.sent) == 1 and log == ["ack"]


def test_an_app_leaves_nothing_in_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    """Faust's default data directory is ``<app id>-data`` in the cwd: a test run or a demo
    used to leave one per app id in the checkout."""
    import yaml

    from streams.app import create_app
    from streams.settings import parse_settings

    settings = parse_settings(yaml.safe_load(Path("config/demo.yaml").read_text()), env={})
    monkeypatch.chdir(tmp_path)
    sink = create_app(settings, "sink").conf.datadir  # created when the app starts
    assert sink.is_absolute() and not sink.is_relative_to(tmp_path)
    worker = create_app(settings, "auction", data_root=tmp_path / "run" / "faust").conf.datadir
    assert worker == tmp_path / "run" / "faust" / settings.kafka.app_id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_the_producers_linger_is_the_configured_one(tmp_path: Path) -> None:
    """``worker.producer_linger_ms`` reaches Faust's producer (in seconds), for every role."""
    import yaml

    from streams.app import create_app
    from streams.settings import parse_settings

    raw = yaml.safe_load(Path("config/demo.yaml").read_text())
    assert (
        create_app(parse_settings(raw, env={}), "auction", data_root=tmp_path).conf.producer_linger
        == 0.002
    )
    raw.setdefault("worker", {})["producer_linger_ms"] = 7
    settings = parse_settings(raw, env={})
    for role in ("auction", "sink", "metrics"):
        assert create_app(settings, role, data_root=tmp_path).conf.producer_linger == 0.007, role


async def test_a_dead_letter_is_retried_through_a_broker_hiccup() -> None:
    import schemas
    from streams.runtime.agents import DeadLetters

    class Topic:
        def __init__(self) -> None:
            self.fail, self.sent = 1, []

        async def send(self, key: bytes, value: bytes) -> None:
            if self.fail:
                self.fail -= 1
                raise ConnectionError("broker down")
            self.sent.append((key, value))

    topic = Topic()
    await DeadLetters(topic, "post").send(_Event(_Producer()), "bad order")  # type: ignore[arg-type]
    [(key, value)] = topic.sent
    rec = schemas.decode_as("DeadLetter", value)
    assert (key, rec["id"], rec["reason"]) == (b"lead-1", "p.posts:4:83", "bad order")


def test_app_wires_every_stage_port_and_refuses_one_offered_twice() -> None:
    """streams.app is where the stages' offers become the Context's ports: with every
    feature on, an auction worker has every port filled before it starts; the sink role none
    of the auction's; a port offered twice is refused at start-up."""
    from dataclasses import fields
    from pathlib import Path

    import pytest
    import yaml

    from streams.app import create_app, wire
    from streams.context import Offers
    from streams.settings import parse_settings

    raw = yaml.safe_load(Path("config/demo.yaml").read_text())
    raw["flows"]["solar"]["strategy"]["rank_by"] = "score"
    settings = parse_settings(raw, env={})
    ctx = create_app(settings, "auction").pingpost_context  # type: ignore[attr-defined]
    for f in fields(Offers):
        assert getattr(ctx, f.name) not in (None, []), f"port {f.name} not wired"
    assert len(ctx.purge_with_auction) == 2  # the post stage's PII and postings tables
    sink = create_app(settings, "sink").pingpost_context  # type: ignore[attr-defined]
    assert all(getattr(sink, f.name) in (None, []) for f in fields(Offers))
    with pytest.raises(RuntimeError, match="port caps offered twice"):
        wire(ctx, Offers(caps=ctx.caps))


def test_every_role_heartbeats_well_within_its_session(tmp_path: Path) -> None:
    """Kafka's rule (a heartbeat at most a third of the session timeout) for every role; and
    an auction worker's post, which waits up to ``FENCE_WAIT_S`` for a fresh proof of
    membership (a clean heartbeat), gets at least two heartbeats' chances in that wait."""
    import yaml

    from streams.app import create_app
    from streams.settings import parse_settings
    from streams.stages.post import FENCE_WAIT_S

    settings = parse_settings(yaml.safe_load(Path("config/demo.yaml").read_text()), env={})
    for role in ("auction", "sink", "metrics"):
        conf = create_app(settings, role, data_root=tmp_path).conf
        assert conf.broker_heartbeat_interval * 3 <= conf.broker_session_timeout, role
    auction = create_app(settings, "auction", data_root=tmp_path).conf
    assert auction.broker_heartbeat_interval * 2 <= FENCE_WAIT_S
