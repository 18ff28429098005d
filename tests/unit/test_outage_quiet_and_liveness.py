"""Issue 10 item 7: repeated client errors throttled, stuck waits on Kafka detected and
bounded, no commit-livelock ERROR after an idle period, failed workers restarted."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from types import SimpleNamespace
from typing import Any

import pytest
from faust.types import TP as FaustTP

from streams.runtime import faust_patches
from streams.runtime.liveness import EXIT_STUCK, StuckCheck, Waits, start_monitor
from streams.runtime.quiet import RepeatThrottle, install
from streams.tools.supervise import Backoff, supervise


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# -- throttling ------------------------------------------------------------------------


def _record(
    msg: str, *args: Any, level: int = logging.ERROR, name: str = "aiokafka.conn"
) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_repeats_are_logged_once_per_interval_with_a_count() -> None:
    clock = Clock()
    f = RepeatThrottle(interval=10.0, clock=clock)
    tmpl = "Unable connect to node with id %s: %s"
    first = _record(tmpl, 1, "refused")
    assert f.filter(first) and first.getMessage() == "Unable connect to node with id 1: refused"
    passed = 0
    for _ in range(500):  # ~50 a second for 10 s, with varying args: one kind
        clock.t += 0.019
        passed += f.filter(_record(tmpl, 1, "refused again"))
    assert passed == 0
    clock.t += 1.0
    nxt = _record(tmpl, 1, "refused")
    assert f.filter(nxt)
    assert nxt.getMessage() == (
        "Unable connect to node with id 1: refused [and 500 more like "
        "this in the last 11 s, not logged]"
    )
    clock.t += 1.0
    assert not f.filter(_record(tmpl, 1, "x"))  # a new interval began with ``nxt``


def test_kinds_levels_and_info_records_are_independent() -> None:
    clock = Clock()
    f = RepeatThrottle(interval=10.0, clock=clock)
    assert f.filter(_record("a %s", 1))
    assert f.filter(_record("b %s", 1))  # another template
    assert f.filter(_record("a %s", 1, name="aiokafka.client"))  # another logger
    assert f.filter(_record("a %s", 1, level=logging.WARNING))  # another level
    for _ in range(3):
        assert f.filter(_record("Discovered coordinator", level=logging.INFO))  # below WARNING
    assert not f.filter(_record("a %s", 2))


def test_install_throttles_every_aiokafka_module_logger(caplog: pytest.LogCaptureFixture) -> None:
    install()
    caplog.set_level(logging.INFO)
    for name in ("aiokafka.conn", "aiokafka.consumer.fetcher", "faust.transport.drivers.aiokafka"):
        for _ in range(100):
            logging.getLogger(name).error("Failed fetch messages from %s: %s", 1, "x")
    assert len(caplog.records) == 3
    logging.getLogger("streams.stages.sink").error("not throttled %s", 1)
    logging.getLogger("streams.stages.sink").error("not throttled %s", 1)
    assert len(caplog.records) == 5


# -- stuck waits ---------------------------------------------------------------------------


def test_a_wait_is_stuck_only_once_the_broker_has_answered_for_the_grace_period() -> None:
    clock = Clock()
    waits = Waits(clock)
    check = StuckCheck(stuck_s=30, grace_s=10)
    up = {"answers": False, "probes": 0}

    def probe() -> bool:
        up["probes"] += 1
        return up["answers"]

    def observe() -> str | None:
        return check.observe(clock(), waits.oldest(), probe)

    with waits.waiting("consumer thread: _fetch_records"):
        clock.t += 5
    assert len(waits) == 0
    with waits.waiting("consumer thread: _commit"):
        clock.t += 9
        assert observe() is None and up["probes"] == 0  # young: the broker is not probed
        for _ in range(60):  # the broker is down: waiting is right
            clock.t += 1
            assert observe() is None
        up["answers"] = True  # it is back: answering from the next observation on
        for _ in range(10):
            clock.t += 1
            assert observe() is None
        clock.t += 1
        verdict = observe()
    assert verdict is not None and "consumer thread: _commit has waited" in verdict
    assert check.observe(clock(), waits.oldest(), probe) is None  # the wait ended
    # A wait that began after the broker came back is stuck only once it is stuck_s old.
    with waits.waiting("offset commit"):
        for _ in range(29):
            clock.t += 1
            assert observe() is None
        clock.t += 1
        assert observe() is not None


def test_the_monitor_thread_acts_on_a_wait_that_never_ends() -> None:
    waits = Waits()
    hit = threading.Event()
    reasons: list[str] = []

    def on_stuck(reason: str) -> None:
        reasons.append(reason)
        hit.set()

    cm = waits.waiting("offset commit")
    cm.__enter__()  # a commit that never returns
    stop = start_monitor(
        "127.0.0.1:1",
        waits,
        StuckCheck(stuck_s=0.05, grace_s=0.05),
        interval=0.01,
        on_stuck=on_stuck,
        probe=lambda: True,
    )
    try:
        assert hit.wait(10), "the monitor did not act"
    finally:
        stop.set()
    assert reasons[0].startswith("offset commit has waited")
    assert EXIT_STUCK == 75


async def test_a_consumer_commit_that_never_returns_gives_up_within_its_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The aiokafka commit hangs (as on the product after a broker restart): the bounded
    ``_commit`` returns False, its offsets left to a later commit, and frees the thread."""
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    faust_patches.apply()
    monkeypatch.setattr(faust_patches, "COMMIT_TIMEOUT_S", 0.2)
    never = asyncio.Event()

    class Aio:
        async def commit(self, offsets: Any) -> None:
            await never.wait()

    tp = FaustTP("pp.results", 0)
    fake = SimpleNamespace(
        _ensure_consumer=lambda: Aio(),
        assignment=lambda: {tp},
        tp_last_committed_at={},
        log=logging.getLogger("t"),
    )
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    ok = await asyncio.wait_for(AIOKafkaConsumerThread._commit(fake, {tp: 5}), 5)
    assert ok is False and loop.time() - t0 < 2


# -- Faust's commit-livelock check -----------------------------------------------------------


class _FakeThread:
    """What ``AIOKafkaConsumerThread.verify_event_path`` reads, with Faust's own methods."""

    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread as _T

    _verify_aiokafka_event_path = _T._verify_aiokafka_event_path
    _log_slow_processing_commit = _T._log_slow_processing_commit
    _log_slow_processing_stream = _T._log_slow_processing_stream
    _log_slow_processing = _T._log_slow_processing
    _make_slow_processing_error = _T._make_slow_processing_error

    def __init__(self, now: float) -> None:
        self.state = SimpleNamespace(highwater=10, position=10, timestamp=now * 1000, paused=False)
        assignment = SimpleNamespace(active=True, state_value=lambda tp: self.state)
        subs = SimpleNamespace(subscription=SimpleNamespace(assignment=assignment))
        self.aio = SimpleNamespace(_fetcher=SimpleNamespace(_subscriptions=subs))
        self.monitor = SimpleNamespace(stream_inbound_time={})
        app = SimpleNamespace(
            monitor=self.monitor,
            topics=SimpleNamespace(acks_enabled_for=lambda t: True),
            conf=SimpleNamespace(
                stream_processing_timeout=30.0, broker_commit_livelock_soft_timeout=30.0
            ),
        )
        self.consumer = SimpleNamespace(app=app, _acked={})
        self.time_started = now - 3600
        self.tp_fetch_request_timeout_secs = 30.0
        self.tp_stream_timeout_secs = 30.0
        self.tp_commit_timeout_secs = 30.0
        self.tp_last_committed_at: dict[Any, float] = {}
        self.log = logging.getLogger("faust.transport.drivers.aiokafka.test")

    def _ensure_consumer(self) -> Any:
        return self.aio


TP = FaustTP("pp.bids", 0)


def _idle_minute_then_one_record(verify: Any, caplog: pytest.LogCaptureFixture) -> list[str]:
    caplog.set_level(logging.INFO)
    now = 5000.0
    th = _FakeThread(now)
    th.tp_last_committed_at[TP] = now - 65  # last commit before an idle minute
    for step in range(24):  # 60 s idle: Faust's check every 2.5 s, nothing waiting
        verify(th, now - 60 + 2.5 * step, TP)
    # A record arrives: fetched (highwater 11) while the stream takes it (position 10).
    th.state.highwater = 11
    th.monitor.stream_inbound_time[TP] = now
    th.state.timestamp = now * 1000
    verify(th, now, TP)
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_faust_logs_a_livelock_error_for_the_first_record_after_an_idle_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The defect, on Faust's own check (what the fix below removes)."""
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    faust_patches.apply()
    orig = AIOKafkaConsumerThread._pingpost_orig_verify_event_path
    errors = _idle_minute_then_one_record(orig, caplog)
    assert any("Has not committed" in e for e in errors), errors


def test_no_livelock_error_for_the_first_record_after_an_idle_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    faust_patches.apply()
    assert _idle_minute_then_one_record(AIOKafkaConsumerThread.verify_event_path, caplog) == []


def test_a_real_commit_livelock_is_still_reported(caplog: pytest.LogCaptureFixture) -> None:
    """Records waiting for longer than the timeout, acked offsets, no commit: an ERROR."""
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    faust_patches.apply()
    verify = AIOKafkaConsumerThread.verify_event_path
    caplog.set_level(logging.INFO)
    now = 5000.0
    th = _FakeThread(now)
    th.state.highwater = 50
    th.consumer._acked[TP] = [11, 12, 13]
    th.tp_last_committed_at[TP] = now - 40
    for step in range(14):  # 35 s of a backlog with acks and no commit
        t = now + 2.5 * step
        th.monitor.stream_inbound_time[TP] = t
        th.state.timestamp = t * 1000
        verify(th, t, TP)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("Has not committed" in e for e in errors), errors


# -- the supervisor ---------------------------------------------------------------------------


def _child(script: str) -> list[str]:
    return [sys.executable, "-c", script]


def test_the_supervisor_restarts_a_worker_that_exits_non_zero(tmp_path: Any) -> None:
    """Runs 1 and 2 fail with status 75 (a stuck client), run 3 ends normally."""
    count = tmp_path / "runs"
    script = (
        f"import pathlib, sys; p = pathlib.Path({str(count)!r}); "
        "n = int(p.read_text()) + 1 if p.exists() else 1; p.write_text(str(n)); "
        "sys.exit(75 if n < 3 else 0)"
    )
    said: list[str] = []
    rc = supervise(
        _child(script),
        "worker --role sink",
        min_uptime=0.0,
        backoff=Backoff(first_s=0.01, max_s=0.02),
        say=said.append,
    )
    assert rc == 0 and count.read_text() == "3"
    assert len(said) == 2 and "exited with status 75" in said[0]
    assert "restarting it in" in said[0] and "(restart 2)" in said[1]


def test_the_supervisor_does_not_restart_a_start_up_failure(tmp_path: Any) -> None:
    said: list[str] = []
    rc = supervise(_child("import sys; sys.exit(2)"), "worker", min_uptime=60.0, say=said.append)
    assert rc == 2 and "start-up failure" in said[0]


def test_backoff_doubles_and_resets_after_a_long_run() -> None:
    b = Backoff(first_s=1, max_s=30, reset_after_s=60)
    assert [b.next(5) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert b.next(61) == 1
