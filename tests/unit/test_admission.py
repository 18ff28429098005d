"""streams.rules.admission: the admission estimator, table-tested, and its control loop against a
simulated pipeline (arrivals, a FIFO served at a fixed capacity, reports every 200 ms)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from streams.rules import admission
from streams.rules.admission import Estimator, Report, report_from_record
from streams.runtime.progress import Progress

LEADS = ("p.leads", 0)
PINGS = ("p.ping-requests", 0)


def report(worker: str, at_ms: int, opened: int, **taken: int) -> Report:
    tps = {"leads": LEADS, "pings": PINGS}
    return Report(worker, at_ms, {tps[k]: v for k, v in taken.items()}, opened)


@dataclass
class Feed:
    """One worker taking ``rate`` leads/s from the ping topic with ``backlog`` leads waiting
    behind it; its reports and the end offsets every 200 ms (no transit)."""

    est: Estimator
    t: float = 0.0
    taken: float = 0.0
    #: Reports reach ingest this many report intervals late (the worker's timer, its producer,
    #: ingest's fetch); the end offsets are current.
    lag: int = 0
    _sent: list[Report] = field(default_factory=list)

    def run(self, *, rate: float, backlog: int, seconds: float = 2.0) -> float:
        end = self.t + seconds * 1000
        while self.t < end:
            self.t += 200
            self.taken += rate * 0.2
            opened = int(self.taken)
            taken = 1000 + opened  # offsets grow with what was taken
            self._sent.append(report("w1", int(self.t), opened, pings=taken))
            if len(self._sent) > self.lag:
                self.est.add_report(self._sent[-1 - self.lag], self.t)
            self.est.set_ends({PINGS: taken + 1 + backlog}, self.t)
        return self.t


def feed(est: Estimator, *, rate: float, backlog: int, seconds: float = 2.0) -> float:
    return Feed(est).run(rate=rate, backlog=backlog, seconds=seconds)


# --------------------------------------------------------------------------- the table


def test_no_reports_admits() -> None:
    est = Estimator(1000)
    est.set_ends({PINGS: 10_000}, 0)
    assert est.backlog(0) is None
    assert [est.refuse(0) for _ in range(100)] == [None] * 100


def test_bound_zero_disables() -> None:
    est = Estimator(0)
    t = feed(est, rate=50, backlog=5000)
    assert est.predicted_delay_ms(t) is not None and est.predicted_delay_ms(t) > 1000
    assert est.refuse(t) is None


def test_idle_pipeline_with_one_lead_in_flight_admits_the_next() -> None:
    est = Estimator(1000)
    t = feed(est, rate=1, backlog=1, seconds=10)  # one lead a second, one in flight
    assert est.backlog(t) == 1
    assert not est.status(t)["busy"]
    assert est.capacity() == admission.MIN_CAPACITY
    assert est.refuse(t) is None


@pytest.mark.parametrize(
    ("rate", "backlog", "refused"),
    [
        (50, 10, False),  # (10 + 1) / 50: 0.22 s
        (50, 24, False),  # 0.5 s: the setpoint (half the bound)
        (50, 26, True),  # 0.54 s
        (50, 400, True),  # 8 s
        (5, 2, True),  # a slow pipeline, below the idle floor: 0.6 s
    ],
)
def test_busy_pipeline_refuses_past_the_bound(rate: float, backlog: int, refused: bool) -> None:
    est = Estimator(1000)
    t = feed(est, rate=rate, backlog=backlog)
    assert est.status(t)["busy"]
    assert est.capacity() == pytest.approx(rate, rel=0.1)
    assert (est.refuse(t) is not None) is refused


@pytest.mark.parametrize(
    ("backlog", "retry_after"),
    [(26, 1), (74, 1), (75, 2), (224, 4), (225, 5), (5000, admission.MAX_RETRY_AFTER_S)],
)
def test_retry_after_is_the_time_to_drain_below_the_bound(backlog: int, retry_after: int) -> None:
    est = Estimator(1000)
    t = feed(est, rate=50, backlog=backlog)
    assert est.capacity() == pytest.approx(50)
    assert est.refuse(t) == retry_after


def test_admissions_since_the_last_fetch_count_into_the_backlog() -> None:
    est = Estimator(1000)
    t = feed(est, rate=50, backlog=14)  # room for 10 more under 0.5 s
    answers = [est.refuse(t) for _ in range(20)]
    assert answers[:11] == [None] * 11
    assert all(a is not None for a in answers[11:])


def test_stale_reports_are_ignored() -> None:
    est = Estimator(1000)
    t = feed(est, rate=50, backlog=400)
    assert est.refuse(t) is not None
    later = t + admission.STALE_MS + 1
    est.set_ends({PINGS: 5000}, later)  # end offsets fresh, the only worker silent
    assert est.backlog(later) is None
    assert est.refuse(later) is None


def test_stale_end_offsets_are_ignored() -> None:
    est = Estimator(1000)
    t = feed(est, rate=50, backlog=400)
    later = t + admission.STALE_MS + 1
    est.add_report(report("w1", int(later), 5000, pings=6000), later)  # reports go on
    assert est.backlog(later) is None
    assert est.refuse(later) is None


def test_backlog_sums_stages_and_takes_the_latest_offset_per_partition() -> None:
    est = Estimator(1000)
    # w1 took leads up to 90 and pings up to 40; w2 (after a rebalance) took pings up to 45.
    est.add_report(report("w1", 1000, 10, leads=90, pings=40), 0)
    est.add_report(report("w2", 1000, 10, pings=45), 0)
    est.set_ends({LEADS: 100, PINGS: 50, ("p.dedupe", 0): 7}, 0)
    assert est.backlog(0) == (100 - 90 - 1) + (50 - 45 - 1)  # dedupe: nobody reports it


def test_leads_taken_since_the_report_count_as_served_in_every_topic_they_passed() -> None:
    """A lead passes through the leads, dedupe and ping-requests topics, each taken at once.
    The worker's reports are 150 ms old when the end offsets are fetched: in each topic the
    leads taken since then are not waiting. Nothing waits; subtracting the ping rate once
    (before) left a phantom backlog of two topics' worth (30 leads at 100/s, 310 ms
    predicted: at 25/s, with ~0.24 s old reports, ingest refused at the 500 ms setpoint and
    the capacity estimate locked at what it admitted)."""
    est = Estimator(1000)
    dedupe = ("p.dedupe", 0)
    rate, t = 100.0, 0
    for t in range(0, 2001, 200):  # reports every 200 ms, seen at once
        n = int(rate * t / 1000)
        est.add_report(Report("w1", t, {LEADS: 1000 + n, dedupe: 500 + n, PINGS: 2000 + n}, n), t)
    later = t + 150  # the end offsets, 150 ms after the last report: 15 more leads through
    n = int(rate * later / 1000)
    est.set_ends({LEADS: 1001 + n, dedupe: 501 + n, PINGS: 2001 + n}, later)
    backlog = est.backlog(later)
    assert backlog is not None and backlog < 1, backlog
    assert est.refuse(later) is None


def test_out_of_order_report_is_ignored() -> None:
    est = Estimator(1000)
    est.add_report(report("w1", 2000, 10, pings=40), 0)
    est.add_report(report("w1", 1000, 5, pings=20), 1)
    est.set_ends({PINGS: 50}, 2)
    assert est.backlog(2) == 9


def test_capacity_follows_a_busy_pipeline_down() -> None:
    """A worker lost while busy: the measured rate is the capacity, even below the floor of
    an idle pipeline and below the highest rate seen."""
    est = Estimator(1000)
    f = Feed(est)
    f.run(rate=60, backlog=30)
    assert est.capacity() == pytest.approx(60, rel=0.1)
    t = f.run(rate=2, backlog=30)
    assert est.capacity() < admission.MIN_CAPACITY
    assert est.refuse(t) is not None  # 30 waiting at 3/s: 10 s


def test_a_burst_after_idle_time_keeps_the_capacity_measured_before() -> None:
    """The first second of a burst: the rate over the last second still counts the idle time
    before it, so it is not a measurement of the capacity; the one measured while busy before
    stands."""
    est = Estimator(1000)
    f = Feed(est, lag=2)
    f.run(rate=50, backlog=30)
    f.run(rate=2, backlog=0, seconds=10)
    for _ in range(10):  # 2 s of burst at full speed
        f.run(rate=50, backlog=30, seconds=0.2)
        assert est.capacity() == pytest.approx(50, rel=0.02)


def test_capacity_decays_slowly_when_not_busy() -> None:
    est = Estimator(1000)
    f = Feed(est)
    f.run(rate=60, backlog=30)
    high = est.capacity()
    assert high is not None
    t = f.run(rate=5, backlog=0, seconds=10)
    assert not est.status(t)["busy"]
    assert high * math.exp(-11 / admission.DECAY_S) <= est.capacity() < high
    assert est.refuse(t) is None


def test_report_from_progress_record_round_trip() -> None:
    p = Progress("w9")
    p.took("redact", "p.leads", 2, 41)
    p.took("ping", "p.ping-requests", 2, 7, ping=True)
    p.opened(12.0)
    p.opened(30.0)
    rec = p.record(5_000, {("p.leads", 2), ("p.ping-requests", 2)})
    assert rec is not None
    r = report_from_record(rec)
    assert r.taken == {("p.leads", 2): 41, ("p.ping-requests", 2): 7}
    assert (r.worker, r.at_ms, r.opened, r.delay_count, r.delay_max_ms) == ("w9", 5000, 1, 2, 30)


def test_progress_forgets_revoked_partitions_and_heartbeats_when_idle() -> None:
    p = Progress("w9")
    p.took("redact", "p.leads", 1, 41)
    p.took("redact", "p.leads", 2, 9)
    first = p.record(1_000, {("p.leads", 2)})
    assert first is not None
    assert [(o["partition"], o["offset"]) for o in first["offsets"]] == [(2, 9)]
    assert p.record(1_200, {("p.leads", 2)}) is None  # nothing new
    assert p.record(2_000, {("p.leads", 2)}) is not None  # heartbeat


# --------------------------------------------------------------------------- the control loop


@dataclass
class Sim:
    """A pipeline on a 1 ms clock: leads arrive at ``offered`` per second (Poisson), ingest
    asks the estimator, admitted leads join one FIFO that a worker serves at ``capacity(t)``
    per second (gamma-distributed service times, coefficient of variation ``service_cv``:
    0.5 by default, a CPU-bound stage with some jitter; 1 is exponential); the worker reports
    every 200 ms, ingest fetches end offsets every 200 ms (another phase), each with a few ms
    of transit."""

    bound_ms: float
    offered: float
    capacity: Any  # t_ms -> leads/s
    seconds: float
    seed: int = 3
    service_cv: float = 0.5
    #: (start, end) ms: the broker is down: no report, no end offsets, nothing served, and
    #: what ingest admits is answered 503 (not queued). Reports resume ``reports_resume_ms``
    #: after the end (the workers rejoin and recover first).
    outage: tuple[float, float] | None = None
    reports_resume_ms: float = 0.0
    delays: list[tuple[float, float]] = field(default_factory=list)  # (admitted at, delay)
    refused: int = 0
    unavailable: int = 0
    retry_after: list[int] = field(default_factory=list)

    def run(self) -> Sim:
        rnd = random.Random(self.seed)
        est = Estimator(self.bound_ms)
        end = self.seconds * 1000
        queue: list[float] = []  # admission times of waiting leads (FIFO)
        appended = taken = 0
        next_arrival = rnd.expovariate(self.offered) * 1000
        busy_until = 0.0
        pending: list[tuple[float, Any]] = []  # (deliver at, callable)
        t = 0.0
        while t < end:
            down = self.outage is not None and self.outage[0] <= t < self.outage[1]
            silent = (
                self.outage is not None
                and self.outage[0] <= t < self.outage[1] + self.reports_resume_ms
            )
            if t % 200 == 0 and not silent:  # the worker's report, 4 ms in transit
                rep = Report("w", int(t), {PINGS: taken - 1} if taken else {}, taken)
                pending.append((t + 4, lambda r=rep, at=t + 4: est.add_report(r, at)))
            if t % 200 == 100 and not down:  # end offsets, as of now, 2 ms to arrive
                pending.append((t + 2, lambda e=appended, at=t + 2: est.set_ends({PINGS: e}, at)))
            for item in [p for p in pending if p[0] <= t]:
                item[1]()
                pending.remove(item)
            while next_arrival <= t:
                ra = est.refuse(t)
                if ra is None and down:
                    self.unavailable += 1  # not published: 503
                elif ra is None:
                    queue.append(t)
                    appended += 1
                else:
                    self.refused += 1
                    self.retry_after.append(ra)
                next_arrival += rnd.expovariate(self.offered) * 1000
            if queue and busy_until <= t and not down:  # the worker takes the next lead
                admitted = queue.pop(0)
                self.delays.append((admitted, t - admitted))
                taken += 1
                k = 1 / self.service_cv**2
                busy_until = t + rnd.gammavariate(k, 1 / (k * self.capacity(t))) * 1000
            t += 1
        return self

    def p99(self, after_ms: float = 0.0) -> float:
        ds = sorted(d for at, d in self.delays if at >= after_ms)
        return ds[int(0.99 * (len(ds) - 1))]


def test_at_twice_capacity_admitted_leads_wait_under_the_bound() -> None:
    sim = Sim(bound_ms=1000, offered=120, capacity=lambda t: 60.0, seconds=30).run()
    served = len(sim.delays) / 30
    assert served == pytest.approx(60, rel=0.1)  # the pipeline is kept busy
    assert sim.refused / (sim.refused + len(sim.delays)) == pytest.approx(0.5, abs=0.08)
    assert sim.p99() <= 1000
    assert set(sim.retry_after) <= set(range(1, admission.MAX_RETRY_AFTER_S + 1))


def test_without_admission_the_queue_grows_without_bound() -> None:
    """The same load with admission off: what the test above guards against."""
    sim = Sim(bound_ms=0, offered=120, capacity=lambda t: 60.0, seconds=30).run()
    assert sim.refused == 0
    assert sim.p99() > 10_000


def test_below_capacity_nothing_is_refused() -> None:
    sim = Sim(bound_ms=1000, offered=40, capacity=lambda t: 60.0, seconds=30).run()
    assert sim.refused == 0


def test_capacity_halved_mid_run_delays_recover_under_the_bound() -> None:
    """A worker lost under load: capacity 60 → 30 at 10 s. The backlog admitted for the old
    capacity drains, then admitted leads wait under the bound again."""
    sim = Sim(
        bound_ms=1000, offered=120, capacity=lambda t: 60.0 if t < 10_000 else 30.0, seconds=30
    ).run()
    assert sim.p99(after_ms=13_000) <= 1000
    assert max(d for _, d in sim.delays) <= 2000


def test_exponential_service_stays_under_the_bound() -> None:
    """Service times as variable as they come (exponential): a second of slow service after a
    fast one cannot be predicted; the setpoint's margin absorbs it."""
    sim = Sim(bound_ms=1000, offered=120, capacity=lambda t: 60.0, seconds=30, service_cv=1.0).run()
    assert sim.p99() <= 1000


def test_after_an_outage_the_blind_estimate_admits_at_the_capacity_measured_before() -> None:
    """A broker outage at 2x capacity (the sender's retries keep coming): when the broker
    returns, the workers report again only 3 s later. Meanwhile the estimate is blind; leads
    admitted then at the capacity measured before the outage wait about what any admitted
    lead waits. Admitting all of them (every lead while blind) queued 3 s of double load:
    waits of seconds."""
    sim = Sim(
        bound_ms=1000,
        offered=120,
        capacity=lambda t: 60.0,
        seconds=30,
        outage=(10_000, 15_000),
        reports_resume_ms=3_000,
    ).run()
    assert sim.unavailable > 0  # the outage was one: admitted leads found no broker
    assert sim.p99(after_ms=15_000) <= 1000
    assert max(d for at, d in sim.delays if at >= 15_000) <= 1500


def test_a_blind_estimate_paces_at_the_capacity_and_a_new_process_admits_all() -> None:
    est = Estimator(1000)
    t = feed(est, rate=50, backlog=10)
    assert est.capacity() == pytest.approx(50, rel=0.1)
    later = t + admission.STALE_MS + 1  # nothing heard since: blind
    answers = [est.refuse(later + i * 2) for i in range(1000)]  # 500 leads/s for 2 s
    admitted = answers.count(None)
    # 2 s at ~50/s, plus the bucket: the setpoint's worth (0.5 s of capacity).
    assert 2 * 45 <= admitted <= 2 * 55 + 0.5 * 55 + 1
    assert {a for a in answers if a is not None} == {1}
    assert est.status(later)["blind_rate"] == pytest.approx(50, rel=0.1)
    fresh = Estimator(1000)  # a process that never measured a capacity
    assert [fresh.refuse(i) for i in range(1000)] == [None] * 1000
    assert fresh.status(0)["blind_rate"] is None


def test_a_blind_estimate_after_a_stalled_pipeline_paces_at_the_floor() -> None:
    """Workers that took nothing for the last seconds (stopped, then silent): the measured
    capacity fell towards 0; blind, the floor applies rather than refusing every lead."""
    est = Estimator(1000)
    pipeline = Feed(est)
    pipeline.run(rate=50, backlog=10)
    t = pipeline.run(rate=0, backlog=40)  # leads wait, none is taken
    assert est.capacity() < 5
    later = t + admission.STALE_MS + 1
    assert est.status(later)["blind_rate"] == admission.MIN_CAPACITY
    answers = [est.refuse(later + i * 10) for i in range(100)]  # 100 leads/s for 1 s
    assert admission.MIN_CAPACITY * 0.9 <= answers.count(None) <= admission.MIN_CAPACITY * 1.6


def test_a_silent_workers_partitions_keep_counting_their_backlog() -> None:
    """A worker killed (or moving partitions in a rebalance) stops reporting; the leads on its
    partitions still wait. They count from its last report, so the live workers' capacity
    refuses leads instead of hiding that backlog (before: admitted, then waited minutes)."""
    est = Estimator(1000)
    other = ("p.ping-requests", 1)
    t = 0.0
    for _ in range(10):  # two workers, each on its partition, 25 leads/s each, no backlog
        t += 200
        n = int(t / 40)
        est.add_report(Report("w1", int(t), {PINGS: 1000 + n}, n), t)
        est.add_report(Report("w2", int(t), {other: 1000 + n}, n), t)
        est.set_ends({PINGS: 1001 + n, other: 1001 + n}, t)
    assert est.refuse(t) is None
    stop = n
    for _ in range(25):  # w2 is killed: its partition fills at 25 leads/s for 5 s
        t += 200
        n = int(t / 40)
        est.add_report(Report("w1", int(t), {PINGS: 1000 + n}, n), t)
        est.set_ends({PINGS: 1001 + n, other: 1001 + n}, t)
    assert est.backlog(t) == pytest.approx(n - stop, abs=2)
    assert est.refuse(t) is not None  # 125 leads behind one worker's 25/s: ~5 s


# --------------------------------------------------------------------------- at rest


def test_idle_only_with_nothing_waiting_and_nothing_admitted_since() -> None:
    est = Estimator(1000)
    assert not est.idle()  # nothing known yet
    t = feed(est, rate=1, backlog=0, seconds=3)
    assert est.idle()
    assert est.refuse(t) is None  # a lead admitted: no longer idle until the next fetch
    assert not est.idle()
    t = feed(est, rate=1, backlog=1, seconds=1)  # one waits
    assert not est.idle()
    later = t + admission.STALE_MS + 1
    est.set_ends({PINGS: 5000}, later)  # the worker went silent: no backlog known
    assert not est.idle()


async def test_ingest_fetches_end_offsets_less_often_at_rest_and_at_once_after_a_lead() -> None:
    """At rest ingest fetches the end offsets every ENDS_IDLE_INTERVAL_S, not every
    ENDS_INTERVAL_S; an admitted lead brings the next fetch forward."""
    import asyncio
    import contextlib
    import time
    from pathlib import Path

    import yaml
    from aiokafka.structs import TopicPartition

    from streams.settings import parse_settings
    from streams.stages.ingest.admission import Admission
    from streams.topics import TopicNames

    settings = parse_settings(yaml.safe_load(Path("config/demo.yaml").read_text()), env={})
    adm = Admission(settings, TopicNames.from_settings(settings))
    tp = TopicPartition(*PINGS)
    fetched = asyncio.Event()
    fetches: list[float] = []

    class Ends:
        async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
            # the worker took offset 10 of 11: nothing waits; its report is always fresh
            now = time.monotonic() * 1000
            adm.estimator.add_report(report("w1", int(now), 10, pings=10), now)
            fetches.append(time.monotonic())
            fetched.set()
            return {tp: 11}

    adm._ends_consumer = Ends()  # type: ignore[assignment]
    adm._tps = [tp]
    task = asyncio.create_task(adm._poll_ends())
    try:
        await asyncio.wait_for(fetched.wait(), 5)
        span = 2.5 * admission.ENDS_IDLE_INTERVAL_S
        n0 = len(fetches)
        await asyncio.sleep(span)  # the span being measured, not a synchronization
        at_rest = len(fetches) - n0
        # idle: one fetch per ENDS_IDLE_INTERVAL_S (2-3 here); busy cadence would be ~12
        assert at_rest <= span / admission.ENDS_IDLE_INTERVAL_S + 1, at_rest
        fetched.clear()
        await asyncio.wait_for(fetched.wait(), 5)
        # a lead comes in the idle wait (0.2-1.0 s after a fetch): placed there, not awaited
        await asyncio.sleep(0.4 * admission.ENDS_IDLE_INTERVAL_S)
        admitted_at = time.monotonic()
        assert adm.refuse() is None
        fetched.clear()
        await asyncio.wait_for(fetched.wait(), 5)
        waited = fetches[-1] - admitted_at
        # at once, not at the end of the idle wait (~0.6 s later)
        assert waited < 0.3 * admission.ENDS_IDLE_INTERVAL_S, f"next fetch {waited:.2f} s later"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_ingest_says_when_it_refuses_because_its_estimate_is_blind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An operator reading the log must tell an outage's pacing from an overload."""
    import logging
    from pathlib import Path

    import yaml

    from streams.settings import parse_settings
    from streams.stages.ingest import admission as ingest_admission
    from streams.stages.ingest.admission import Admission
    from streams.topics import TopicNames

    settings = parse_settings(yaml.safe_load(Path("config/demo.yaml").read_text()), env={})
    adm = Admission(settings, TopicNames.from_settings(settings))
    t = feed(adm.estimator, rate=50, backlog=10)
    blind_at = t + admission.STALE_MS + 1
    adm.estimator.refuse = lambda now_ms: Estimator.refuse(adm.estimator, blind_at)  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger=ingest_admission.__name__):
        answers = [adm.refuse() for _ in range(200)]  # 200 leads at one instant
    assert answers.count(None) < 50 and adm.refused == answers.count(1) > 150
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "blind" in said[0] and "over capacity" not in said[0], said
