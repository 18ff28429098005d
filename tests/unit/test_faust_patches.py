"""The offset guard: what a consumer delivers after seeks, stale batches and real holes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from streams.runtime.faust_patches import OffsetGuard, apply, contiguous_commit, guarded

D, X, R = OffsetGuard.DELIVER, OffsetGuard.DROP, OffsetGuard.RESEEK
TP = ("t.bids", 0)


@pytest.mark.parametrize(
    "seek, offsets, verdicts",
    [
        # in order after a seek to the committed offset
        (10, [10, 11, 12], [D, D, D]),
        # a stale record from a batch fetched before the seek: re-seek, then in order again
        (10, [13, 10, 11, 12, 13], [R, D, D, D, D]),
        # records below the committed offset (already processed) are dropped
        (10, [8, 9, 10], [X, X, D]),
        # a real hole (compacted/expired): the same jump after the re-seek is let through
        (10, [15, 15, 16], [R, D, D]),
        # a second, different jump re-seeks again
        (10, [15, 17, 17], [R, R, D]),
        # no committed offset: the first record decides (auto.offset.reset)
        (None, [7, 8, 10], [D, D, R]),
        # -1 means no committed offset too
        (-1, [3, 4], [D, D]),
        # duplicates of delivered records are dropped
        (0, [0, 1, 1, 0, 2], [D, D, X, X, D]),
    ],
)
def test_verdicts(seek: int | None, offsets: list[int], verdicts: list[str]) -> None:
    g = OffsetGuard()
    g.sought(TP, seek)
    got = []
    for off in offsets:
        v = g.check(TP, off)
        got.append(v)
        if v == R:
            g.sought(TP, g.expected[TP])  # what the consumer does: seek back to expected
    assert got == verdicts


def test_expected_follows_deliveries_and_seeks() -> None:
    g = OffsetGuard()
    g.sought(TP, 5)
    assert g.check(TP, 5) == D and g.expected[TP] == 6
    g.sought(TP, 3)  # a seek backwards (rebalance to an older commit) re-opens 3..5
    assert g.check(TP, 3) == D and g.check(TP, 4) == D
    g.forget(TP)  # revoked: a batch fetched before that must not be delivered...
    assert g.check(TP, 100) == OffsetGuard.DROP and TP not in g.expected
    g.sought(TP, 7)  # ...until Faust seeks the re-assigned partition to its commit
    assert g.check(TP, 7) == D and g.expected[TP] == 8


def test_a_revoked_partition_sought_without_a_commit_delivers_again() -> None:
    g = OffsetGuard()
    assert g.check(TP, 40) == D  # never revoked: a partition first seen is delivered
    g.forget(TP)
    assert g.check(TP, 41) == OffsetGuard.DROP
    g.sought(TP, None)  # no committed offset: auto.offset.reset decides where it starts
    assert g.check(TP, 0) == D


def test_partitions_are_independent() -> None:
    g = OffsetGuard()
    g.sought(("a", 0), 10)
    g.sought(("a", 1), 20)
    assert g.check(("a", 1), 20) == D
    assert g.check(("a", 0), 20) == R


@pytest.mark.parametrize(
    "topic, want",
    [
        ("pp.bids", True),
        ("pp.leads", True),
        ("pingpost-auctions-changelog", False),
    ],
)
def test_changelogs_are_not_guarded(topic: str, want: bool) -> None:
    assert guarded(topic) is want


# -- point 3: never commit past an event still in flight (faust-streaming #606) ----------


@pytest.mark.parametrize(
    "head, acked, holes, want, acked_after",
    [
        # the committed offset is still in flight: nothing past it may be committed
        (35, [36, 37, 38], [], None, [36, 37, 38]),
        # ...and once it is acked, the whole run is
        (35, [35, 36, 37, 38], [], 39, []),
        # a run stops at the first offset still in flight
        (10, [10, 11, 13, 14], [], 12, [13, 14]),
        # acks below the committed offset (committed already) are forgotten
        (10, [8, 9], [], None, []),
        # a hole (compacted/expired offsets) at the head is passed
        (10, [13, 14], [(10, 12)], 15, []),
        # ...and in the middle; the commit may stop right after it (14 is in flight)
        (10, [10], [(11, 13)], 14, []),
        # no committed offset known: the first run counts
        (None, [3, 4, 6], [], 5, [6]),
    ],
)
def test_contiguous_commit(
    head: int | None,
    acked: list[int],
    holes: list[tuple[int, int]],
    want: int | None,
    acked_after: list[int],
) -> None:
    index = set(acked)
    assert contiguous_commit(acked, index, holes, head) == want
    assert acked == acked_after and index == set(acked_after)
    assert all(h[1] >= (want or 0) for h in holes)


@pytest.fixture
def consumers() -> Iterator[list[Any]]:
    made: list[Any] = []
    yield made
    for c in made:  # the consumer thread's own event loop, never started
        c._thread.thread_loop.close()


def _consumer_with_acks(
    made: list[Any], committed: int, delivered: range
) -> tuple[Any, Any, list[Any]]:
    """A real Faust consumer (not started) holding ``delivered`` records of one partition,
    sought to ``committed`` the way Faust does after an assignment."""
    import faust
    from faust.transport.consumer import Consumer
    from faust.types import TP as FTP

    apply(fetch_max_wait_ms=None)
    app = faust.App("t-offsets", broker="kafka://127.0.0.1:1", store="memory://")
    consumer: Consumer = app.consumer
    made.append(consumer)
    tp = FTP("t.posts", 3)
    app.topics._acking_topics.add(tp.topic)
    consumer._committed_offset[tp] = committed
    consumer.__dict__["_pingpost_guard"] = g = OffsetGuard()
    g.sought_committed(tp, committed)
    messages = []
    for off in delivered:
        assert g.check(tp, off) == D
        m = faust.types.Message(
            topic=tp.topic,
            partition=tp.partition,
            offset=off,
            timestamp=0.0,
            timestamp_type=0,
            headers=[],
            key=b"k",
            value=b"v",
            checksum=None,
            tp=tp,
        )
        consumer.track_message(m)
        messages.append(m)
    return consumer, tp, messages


def test_faust_does_not_commit_past_an_event_in_flight(consumers: list[Any]) -> None:
    """The churn-test failure, replayed on Faust's own bookkeeping: the post order at the
    committed offset 35 is still being processed when 36..40 are acked; Faust (0.11.x) would
    commit 41 and a worker stopping then would never process 35."""
    consumer, tp, msgs = _consumer_with_acks(consumers, 35, range(35, 41))
    for m in msgs[1:]:
        consumer.ack(m)
    assert consumer._filter_committable_offsets({tp}) == {}
    consumer.ack(msgs[0])
    assert consumer._filter_committable_offsets({tp}) == {tp: 41}


def test_faust_commits_from_offset_zero_only_once_it_is_done(consumers: list[Any]) -> None:
    """Faust stores a committed offset of 0 as "none" and then commits any first run."""
    consumer, tp, msgs = _consumer_with_acks(consumers, 0, range(0, 3))
    consumer._committed_offset[tp] = None
    consumer.ack(msgs[2])
    consumer.ack(msgs[1])
    assert consumer._filter_committable_offsets({tp}) == {}
    consumer.ack(msgs[0])
    assert consumer._filter_committable_offsets({tp}) == {tp: 3}


def test_no_commit_for_a_revoked_partition_until_it_is_sought_again(consumers: list[Any]) -> None:
    """The full chaos run's 2 unsettled leads, replayed: post orders 234 and 235 were in flight
    when a rebalance revoked their partition (Faust forgets its committed offset), the orders
    after them finished and acked meanwhile, and the partition came back to the same worker;
    a commit before its seek started the run at the lowest ack (236) and committed 246 — the
    worker was killed 2 s later and nobody ever processed 234 and 235."""
    consumer, tp, msgs = _consumer_with_acks(consumers, 234, range(234, 246))
    g = consumer.__dict__["_pingpost_guard"]
    consumer._committed_offset.pop(tp, None)  # Faust, on the revocation
    g.forget(tp)
    for m in msgs[2:]:  # their tasks end after the revocation
        consumer.ack(m)
    assert consumer._filter_committable_offsets({tp}) == {}
    g.sought_committed(tp, 234)  # assigned again: sought to the committed offset
    consumer._committed_offset[tp] = 234
    assert consumer._filter_committable_offsets({tp}) == {}
    consumer.ack(msgs[0])
    consumer.ack(msgs[1])
    assert consumer._filter_committable_offsets({tp}) == {tp: 246}


# -- the partition watchdog -----------------------------------------------------------------


def test_stall_watch_reports_a_partition_that_stops_delivering_with_records_waiting() -> None:
    from streams.runtime.watchdog import StallWatch

    w = StallWatch(stall_s=20)
    assert not w.observe(TP, 10, 15, now=0)  # first sight
    assert not w.observe(TP, 10, 15, now=19)  # not long enough
    assert w.observe(TP, 10, 15, now=20)  # 20 s, records waiting, nothing delivered
    w.restart(TP, now=20)
    assert not w.observe(TP, 10, 15, now=30)  # sought: a new period starts
    assert not w.observe(TP, 12, 15, now=45)  # it moved
    assert not w.observe(TP, 15, 15, now=90)  # caught up: nothing waits
    assert not w.observe(TP, 15, 16, now=91)  # a new record: a new period
    assert w.observe(TP, 15, 16, now=111)


class _WatchedConsumer:
    def __init__(self, tps: set[Any], ends: dict[Any, int]) -> None:
        self.tps, self.ends = tps, ends
        self.flow_active = True
        self._active_partitions: set[Any] | None = set(tps)
        self._paused_partitions: set[Any] = set()
        self._buffered_partitions: set[Any] = set()
        self._read_offset: dict[Any, int] = {}
        self._committed_offset: dict[Any, int] = {}
        self.resumed: list[Any] = []
        self.sought: list[tuple[Any, int]] = []
        self._unacked_messages: set[Any] = set()
        self.__dict__["_pingpost_guard"] = OffsetGuard()

    def assignment(self) -> set[Any]:
        return set(self.tps)

    async def highwaters(self, *tps: Any) -> dict[Any, int]:
        return {tp: self.ends[tp] for tp in tps}

    def resume_partitions(self, tps: set[Any]) -> None:
        self.resumed.extend(tps)

    async def seek(self, tp: Any, offset: int) -> None:
        self.sought.append((tp, offset))
        self.__dict__["_pingpost_guard"].sought(tp, offset)


async def test_the_watchdog_seeks_only_a_stalled_partition_outside_a_rebalance() -> None:
    from faust.types import TP as FTP

    from streams.runtime.watchdog import Watchdog, watch_partitions

    stuck, moving, full = FTP("p.leads", 4), FTP("p.leads", 1), FTP("p.bids", 2)
    changelog = FTP("p-auctions-changelog", 4)
    c = _WatchedConsumer(
        {stuck, moving, full, changelog}, {stuck: 136, moving: 90, full: 500, changelog: 300}
    )
    g = c.__dict__["_pingpost_guard"]
    c._committed_offset[stuck] = 111  # nothing delivered since its seek
    g.sought(moving, 80)
    g.sought(full, 100)
    c._buffered_partitions.add(full)  # its stream buffer is full: back-pressure
    app = type("App", (), {"consumer": c, "rebalancing": False, "in_recovery": False})()
    w = Watchdog(stall_s=20)
    assert await watch_partitions(app, w, now=0) == []
    g.check(moving, 80)  # one partition keeps delivering
    app.rebalancing = True
    assert await watch_partitions(app, w, now=25) == []
    app.rebalancing = False
    assert await watch_partitions(app, w, now=25) == [stuck]
    assert c.sought == [(stuck, 111)] and c.resumed == [stuck]
    assert g.expected[stuck] == 111
    assert await watch_partitions(app, w, now=30) == []  # a new period after the seek


async def test_the_watchdog_rereads_a_partition_whose_commit_stalls_with_nothing_in_flight() -> (
    None
):
    """Everything up to the end went through the fetch, nothing is in flight, and the commit
    does not move: records were lost on the way to the agents; read them again."""
    from faust.types import TP as FTP

    from streams.runtime.watchdog import Watchdog, watch_partitions

    lost, busy = FTP("p.leads", 2), FTP("p.posts", 2)
    c = _WatchedConsumer({lost, busy}, {lost: 160, busy: 90})
    g = c.__dict__["_pingpost_guard"]
    for tp, committed, delivered in ((lost, 78, 160), (busy, 80, 90)):
        c._committed_offset[tp] = committed
        g.sought(tp, delivered)  # the guard saw everything up to the end
    c._unacked_messages.add(type("Msg", (), {"tp": busy})())  # a post still in flight
    app = type("App", (), {"consumer": c, "rebalancing": False, "in_recovery": False})()
    w = Watchdog(stall_s=20)
    assert await watch_partitions(app, w, now=0) == []
    assert await watch_partitions(app, w, now=39) == []
    assert await watch_partitions(app, w, now=40) == [lost]
    assert c.sought == [(lost, 78)] and g.expected[lost] == 78


async def test_the_consumer_thread_never_reads_no_active_partition_as_all() -> None:
    """aiokafka drains every partition for an empty (falsy) set, and Faust then drops the
    records of partitions it does not consider active: the thread reads Faust's live set
    through a view that is never falsy, and follows its changes."""
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    apply(fetch_max_wait_ms=None)
    seen: list[Any] = []

    async def fetch(
        _consumer: object, active: Any, timeout: float = 0, max_records: int | None = None
    ) -> dict[str, int]:
        seen.append(active)
        return {"records": 1}

    thread = object.__new__(AIOKafkaConsumerThread)
    thread.__dict__.update(
        _ensure_consumer=lambda: type("C", (), {"_max_poll_records": 5})(),
        call_thread=lambda fn, *a, **kw: fn(*a, **kw),
        _fetch_records=fetch,
    )
    live = {("p.leads", 2)}
    assert await thread.getmany(live, 1.0) == {"records": 1}
    [view] = seen
    assert ("p.leads", 2) in view and ("p.leads", 3) not in view
    live.clear()  # Faust pauses everything (a rebalance)...
    assert view and ("p.leads", 2) not in view  # ...the fetcher sees none, not all
    live.add(("p.leads", 3))  # ...and a resume is seen at once
    assert ("p.leads", 3) in view


def test_each_role_gets_its_fetch_wait_and_fetch_min_bytes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Point 9, wired by create_app: the worker consumer of each role gets its fetch wait
    and fetch_min_bytes (Faust passes neither)."""
    from faust.transport.drivers import aiokafka as driver

    from streams.app import create_app
    from streams.settings import parse_settings

    cls = driver.AIOKafkaConsumerThread

    def faust_creates(self: Any, transport: Any) -> SimpleNamespace:
        return SimpleNamespace(_fetch_max_wait_ms=1500, _fetch_min_bytes=1)

    monkeypatch.setattr(cls, "_create_worker_consumer", faust_creates)
    monkeypatch.setattr(cls, "_pingpost_original_create", faust_creates, raising=False)
    monkeypatch.setattr(cls, "_pingpost_fetch_wait_ms", None, raising=False)
    raw = yaml.safe_load(Path("config/demo.yaml").read_text())
    raw.setdefault("worker", {}).update(
        batch_fetch_min_bytes=65536, batch_fetch_wait_ms=300, fetch_min_bytes=3000
    )
    settings = parse_settings(raw, env={})
    for role, want in [("sink", (300, 65536)), ("metrics", (300, 65536)), ("auction", (10, 3000))]:
        create_app(settings, role, web_port=0, data_root=tmp_path)  # type: ignore[arg-type]
        consumer = cls._create_worker_consumer(None, None)  # type: ignore[arg-type]
        assert (consumer._fetch_max_wait_ms, consumer._fetch_min_bytes) == want, role


async def test_the_livelock_check_visits_every_partition_without_a_task_per_partition() -> None:
    """Point 11: Faust's livelock check slept through mode's ``Service.sleep(0)`` per assigned
    partition, a task created and cancelled each time (~130 partitions every 2.5 s in an
    auction worker). Patched, it checks every partition, creates no task, and still lets other
    tasks run while it goes through many partitions."""
    import asyncio

    from faust.transport.consumer import Consumer
    from mode import Service

    from streams.runtime.faust_patches import LIVELOCK_YIELD_EVERY

    apply(fetch_max_wait_ms=None)
    tps = [("p.leads", n) for n in range(130)]
    checked: list[tuple[str, int]] = []
    ran_between: list[int] = []
    service = Service()  # upstream's check sleeps through a mode service's sleep(0)
    consumer = SimpleNamespace(
        sleep=service.sleep,
        assignment=lambda: tps,
        verify_event_path=lambda now, tp: checked.append(tp),
        should_stop=False,
    )

    checking = True

    async def ticker() -> None:  # another task of the loop: when does it get a turn?
        while checking:
            ran_between.append(len(checked))
            await asyncio.sleep(0)

    loop = asyncio.get_running_loop()
    created: list[object] = []
    factory = loop.get_task_factory()

    def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Future[Any]:
        created.append(coro)
        return asyncio.Task(coro, loop=loop, **kw)

    other = asyncio.ensure_future(ticker())
    loop.set_task_factory(counting)
    try:
        await Consumer.verify_all_partitions_active(consumer)
    finally:
        loop.set_task_factory(factory)
        checking = False
    await other
    assert checked == tps
    assert not created  # upstream: one task per partition (130 here)
    # The other task got turns during the check (not only after it), one at least every
    # LIVELOCK_YIELD_EVERY partitions: 0, 32, 64, 96, 128 of the 130.
    turns = [n for n in ran_between if n < len(tps)]
    assert len(turns) >= 4, turns
    assert all(b - a <= LIVELOCK_YIELD_EVERY for a, b in zip(turns, turns[1:], strict=False))
