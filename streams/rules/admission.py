"""Admission control: predict a new lead's queue delay, refuse it past a bound (no I/O).

The delay that overload adds is the wait between ingest accepting a lead and its ping round
opening: the lead sits in the leads topic (redact), maybe the dedupe topic, then the
ping-requests topic. Reacting to the *observed* delay overshoots: by the time the oldest
waiting lead has waited the bound, the leads admitted meanwhile wait about ``λ/μ`` times that
(twice at 2x capacity). So this predicts instead, Little's law style:

    queue delay of a lead admitted now ≈ (Q + 1) / μ

- ``Q``, the backlog: leads accepted but not yet taken by the ping stage. Every auction worker
  reports, every ~200 ms, the offset of the last record each pre-ping stage has taken per
  assigned partition (``Progress`` on the progress topic, :mod:`streams.runtime.progress`); ingest
  fetches the end offsets of those topics every ~200 ms. ``Q = Σ (end − taken − 1)``: each
  waiting lead is in exactly one of those topics, so it is counted once. The workers' offsets
  are older than the end offsets, so what each took since its report is subtracted, per
  partition, at the rate its reports show for that partition: a lead passes through two or
  three of these topics, and subtracting only its ping stage's rate once counted every lead
  taken since the last report once more per topic it had already left (λ × the report's
  age per extra topic: ~2-5 leads at 25 leads/s); between two fetches the backlog drains at
  the measured rate and grows by the leads this ingest process admitted. The ``+ 1`` is the lead's own turn: a stage that
  serves leads one at a time (or a few) frees its next slot ~1/μ later on average, which
  matters only for a slow pipeline.
- ``μ``, the capacity: leads the ping stage takes per second, summed over workers, measured
  over the last second. The instantaneous rate is *not* the capacity at low load (an idle
  pipeline takes one lead per second because it is offered one), so ``μ`` is estimated:
  while the pipeline is **busy** (leads waited throughout the last second) the measured
  rate is the capacity, and the estimate follows it (both ways: a worker lost, a slower
  machine); otherwise the estimate is the highest recent rate, decaying slowly (it may have
  been measured under other conditions), and never below :data:`MIN_CAPACITY` — so a pipeline
  with one lead in flight never refuses the next.

A lead is refused when the predicted delay passes :data:`SETPOINT` × the bound: the actual wait
scatters around the prediction, and it is the p99 of the actual wait that must stay under the
bound. Throughput does not suffer: a queue of half a second of work keeps every worker busy.

Reports older than :data:`STALE_MS` (by ingest's clock: worker clocks may differ) do not
measure the rate; a partition no fresh report covers (its worker died, a rebalance is moving
it) still counts its backlog from the last offset a worker reported for it (for as long as
that worker is remembered: ten times ``STALE_MS``).
With no fresh report at all (no worker running, or all of them restarting), no rate measured
yet (the first second of an ingest process), or end offsets that could not be fetched for as
long, there is nothing to predict from: the estimate is *blind*. Before any capacity was
measured (start-up) every lead is admitted. After, leads are admitted at most at the capacity
last estimated (a bucket of the setpoint's worth of leads, refilled at that rate; the rest get
``429``, Retry-After 1 s): an outage's retries, all arriving when the broker returns, would
otherwise enter at once while the reports are still stale. In the outage itself the publish
bound answers ``503`` for what is admitted.

``Retry-After`` is the time the backlog needs to drain to the setpoint, in whole seconds,
between 1 and :data:`MAX_RETRY_AFTER_S`.

Several ingest processes each compute the same ``Q`` and ``μ`` from the shared reports and end
offsets; each adds only its own admissions since the last fetch, so the overshoot between two
fetches grows with the number of ingest processes (a fetch every 200 ms keeps it small).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Estimator",
    "Report",
    "report_from_record",
    "REPORT_INTERVAL_S",
    "ENDS_IDLE_INTERVAL_S",
    "ENDS_INTERVAL_S",
    "STALE_MS",
    "RATE_WINDOW_MS",
    "MIN_CAPACITY",
    "DECAY_S",
    "SETPOINT",
    "MAX_RETRY_AFTER_S",
]

#: Topic-partition as ``(topic, partition)``.
TP = tuple[str, int]

#: How often workers report and ingest fetches end offsets.
REPORT_INTERVAL_S = 0.2
ENDS_INTERVAL_S = 0.2
#: How often ingest fetches end offsets while the pipeline is idle (nothing waiting at the
#: last fetch, nothing admitted since): an admitted lead brings the next fetch forward at once.
ENDS_IDLE_INTERVAL_S = 1.0
#: A report (or an end-offset fetch) older than this is ignored.
STALE_MS = 3000.0
#: The service rate is measured over this long; "busy" means busy throughout it.
RATE_WINDOW_MS = 1000.0
#: Capacity assumed (leads/s) at least while the pipeline is not busy: the estimate's floor.
MIN_CAPACITY = 20.0
#: Time constant of the slow decay of the highest recent rate while not busy.
DECAY_S = 600.0
#: Admission aims at this share of the bound: a lead's actual wait varies around the
#: prediction (service times, rate changes between two measurements), and the bound is the
#: one its p99 must not pass.
SETPOINT = 0.5
#: "Busy" needs at least this many leads waiting throughout the window (a single record is
#: too little to tell a busy pipeline from one lead between two stages).
BUSY_MIN_BACKLOG = 2
#: Weight of a new measurement while busy (per end-offset fetch, ~5 a second): a lower rate
#: is believed at once, a higher one slowly (a lucky second must not admit a backlog that the
#: next, slower one cannot serve in time).
GAIN_DOWN = 0.5
GAIN_UP = 0.1
MAX_RETRY_AFTER_S = 10


@dataclass(frozen=True)
class Report:
    """One worker's progress report (the ``Progress`` event)."""

    worker: str
    at_ms: int  # the worker's clock
    #: (topic, partition) -> offset of the last record a pre-ping stage took there.
    taken: Mapping[TP, int]
    #: Ping requests the worker's ping stage has taken since it started.
    opened: int
    #: Receipt → open delays since the previous report: count, p50, p99, max (ms).
    delay_count: int = 0
    delay_p50_ms: float = 0.0
    delay_p99_ms: float = 0.0
    delay_max_ms: float = 0.0


def report_from_record(rec: Mapping[str, Any]) -> Report:
    """A decoded ``Progress`` record as a :class:`Report`."""
    return Report(
        worker=rec["worker"],
        at_ms=rec["at_ms"],
        taken={(o["topic"], o["partition"]): o["offset"] for o in rec["offsets"]},
        opened=rec["opened"],
        delay_count=rec["delay_count"],
        delay_p50_ms=rec["delay_p50_ms"],
        delay_p99_ms=rec["delay_p99_ms"],
        delay_max_ms=rec["delay_max_ms"],
    )


def _retry_after(wait_s: float) -> int:
    """A 429's Retry-After for a wait of ``wait_s``: whole seconds, 1 to MAX_RETRY_AFTER_S."""
    return int(min(MAX_RETRY_AFTER_S, max(1, math.ceil(wait_s))))


@dataclass
class _Worker:
    seen_ms: float  # ingest's clock
    last: Report
    #: (worker at_ms, opened, taken) of recent reports, oldest first.
    history: deque[tuple[int, int, Mapping[TP, int]]] = field(default_factory=deque)

    def _base(self, window_ms: float) -> tuple[int, int, Mapping[TP, int]] | None:
        """The newest report at least ``window_ms`` older than the last (or the oldest, if
        they span at least half of it); None: too little history."""
        if len(self.history) < 2:
            return None
        at = self.history[-1][0]
        base = None
        for h in self.history:
            if at - h[0] >= window_ms:
                base = h
        if base is None and at - self.history[0][0] >= window_ms / 2:
            base = self.history[0]
        return base

    def rate(self, window_ms: float) -> float | None:
        """Leads taken per second over about the last ``window_ms`` of this worker's
        reports; None until they span at least half of it."""
        base = self._base(window_ms)
        at, opened, _ = self.history[-1]
        if base is None or opened < base[1]:
            return None
        return (opened - base[1]) * 1000.0 / (at - base[0])

    def partition_rates(self, window_ms: float) -> dict[TP, float]:
        """Records taken per second from each partition over the same span as :meth:`rate`
        (partitions this worker reported at both ends of it, offsets moving forward)."""
        base = self._base(window_ms)
        if base is None:
            return {}
        at, _, taken = self.history[-1]
        return {
            tp: (off - base[2][tp]) * 1000.0 / (at - base[0])
            for tp, off in taken.items()
            if tp in base[2] and off >= base[2][tp]
        }


class Estimator:
    """Backlog, capacity and predicted queue delay from progress reports and end offsets.

    Every method takes ``now_ms`` from one monotonic clock of the caller (ingest's)."""

    def __init__(
        self,
        bound_ms: float,
        *,
        stale_ms: float = STALE_MS,
        rate_window_ms: float = RATE_WINDOW_MS,
        min_capacity: float = MIN_CAPACITY,
        decay_s: float = DECAY_S,
        setpoint: float = SETPOINT,
    ) -> None:
        self.bound_ms = bound_ms
        self.target_ms = bound_ms * setpoint
        self.stale_ms = stale_ms
        self.rate_window_ms = rate_window_ms
        self.min_capacity = min_capacity
        self.decay_s = decay_s
        self._workers: dict[str, _Worker] = {}
        self._backlog: float | None = None  # at the last end-offset fetch
        self._ends_at: float | None = None
        self._local = 0  # leads this process admitted since then
        self._q_history: deque[tuple[float, float]] = deque()
        self._mu: float | None = None
        self._busy = False
        self._rate: float | None = None
        self._tick_at: float | None = None
        #: Pacing while blind (``_refuse_blind``): tokens left, and when they were counted
        #: (None: the last decision had an estimate).
        self._blind_tokens = 0.0
        self._blind_at: float | None = None

    # -- inputs ----------------------------------------------------------------------------
    def add_report(self, report: Report, now_ms: float) -> None:
        w = self._workers.get(report.worker)
        if w is None:
            w = self._workers[report.worker] = _Worker(now_ms, report)
        elif report.at_ms <= w.last.at_ms:
            return  # out of order or a replay
        w.seen_ms, w.last = now_ms, report
        w.history.append((report.at_ms, report.opened, report.taken))
        while len(w.history) > 2 and report.at_ms - w.history[1][0] >= 2 * self.rate_window_ms:
            w.history.popleft()

    def set_ends(self, ends: Mapping[TP, int], now_ms: float) -> None:
        """End offsets just fetched: recompute the backlog and update the capacity."""
        for name in [
            n for n, w in self._workers.items() if now_ms - w.seen_ms > 10 * self.stale_ms
        ]:
            del self._workers[name]  # long gone: forget it
        fresh = self._fresh(now_ms)
        self._local = 0
        self._ends_at = now_ms
        if not fresh:
            self._backlog = None
            self._q_history.clear()
            self._busy, self._rate = False, None
            self._tick_at = now_ms
            return
        taken: dict[TP, int] = {}
        # What the reporting worker took from the partition since its report (its rate
        # there times the report's age): not waiting any more.
        served: dict[TP, float] = {}
        rates = [(w, w.rate(self.rate_window_ms)) for w in fresh]
        for w, lead_rate in rates:
            age_s = (now_ms - w.seen_ms) / 1000.0
            tp_rates = w.partition_rates(self.rate_window_ms)
            for tp, off in w.last.taken.items():
                if off > taken.get(tp, -1):
                    taken[tp] = off
                    # A partition new to its reports: the worker's lead rate.
                    served[tp] = tp_rates.get(tp, lead_rate or 0.0) * age_s
        # A partition no fresh report covers (its worker was killed and is restarting, or a
        # rebalance is moving it) still holds its leads: they count from the last offset
        # any worker reported for it. Left out, a worker killed every 12 s hid its
        # partitions' backlog and ingest admitted leads that then waited minutes (hour-long
        # chaos run, on a loaded machine).
        orphaned: dict[TP, int] = {}
        for w in self._workers.values():
            if w in fresh:
                continue
            for tp, off in w.last.taken.items():
                if tp not in taken and off > orphaned.get(tp, -1):
                    orphaned[tp] = off
        taken.update(orphaned)
        known = [r for _, r in rates if r is not None]
        self._rate = sum(known) if known else None
        self._backlog = sum(
            max(0.0, ends[tp] - off - 1 - served.get(tp, 0.0))
            for tp, off in taken.items()
            if tp in ends
        )
        # Busy: leads waited at every fetch over the whole span the rates were measured on
        # (a report interval more than the window: a worker's rate spans at least the window,
        # ending at its last report). A rate measured across the start of a burst would
        # count idle time as slowness.
        cover = self.rate_window_ms + 1000.0 * REPORT_INTERVAL_S
        self._q_history.append((now_ms, self._backlog))
        while len(self._q_history) > 1 and now_ms - self._q_history[1][0] >= cover:
            self._q_history.popleft()
        self._busy = (
            now_ms - self._q_history[0][0] >= cover
            and min(n for _, n in self._q_history) >= BUSY_MIN_BACKLOG
        )
        if self._rate is not None:
            if self._mu is None:
                self._mu = self._rate
            elif self._busy:
                gain = GAIN_DOWN if self._rate < self._mu else GAIN_UP
                self._mu += gain * (self._rate - self._mu)
            else:
                dt = (now_ms - (self._tick_at or now_ms)) / 1000.0
                self._mu = max(self._rate, self._mu * math.exp(-dt / self.decay_s))
        self._tick_at = now_ms

    # -- outputs ---------------------------------------------------------------------------
    def idle(self) -> bool:
        """Nothing was waiting for its ping round at the last end-offset fetch and nothing was
        admitted since: the end offsets may be fetched less often (``ENDS_IDLE_INTERVAL_S``).
        False while the estimate has no backlog at all (starting, or no fresh report)."""
        return self._backlog is not None and self._backlog < 1.0 and self._local == 0

    def _fresh(self, now_ms: float) -> list[_Worker]:
        return [w for w in self._workers.values() if now_ms - w.seen_ms <= self.stale_ms]

    def capacity(self) -> float | None:
        """Leads/s the pipeline is estimated to take; None before any rate was measured. The
        floor applies only when not busy: a busy pipeline's measured rate is its capacity,
        even a low one."""
        if self._mu is None:
            return None
        return self._mu if self._busy else max(self._mu, self.min_capacity)

    def backlog(self, now_ms: float) -> float | None:
        """Leads waiting for their ping round now (None: nothing to predict from): the last
        fetch's backlog, less what was served since (at the measured rate, for at most two
        fetch intervals), plus what this process admitted since."""
        if (
            self._backlog is None
            or self._ends_at is None
            or now_ms - self._ends_at > self.stale_ms
            or not self._fresh(now_ms)
        ):
            return None
        since_s = min(now_ms - self._ends_at, 2000.0 * ENDS_INTERVAL_S) / 1000.0
        return max(0.0, self._backlog - (self._rate or 0.0) * since_s) + self._local

    def predicted_delay_ms(self, now_ms: float) -> float | None:
        """How long a lead admitted now would wait for its ping round (None: unknown)."""
        q = self.backlog(now_ms)
        mu = self.capacity()
        if q is None or mu is None:
            return None
        return math.inf if mu <= 0 else 1000.0 * (q + 1) / mu

    def refuse(self, now_ms: float) -> int | None:
        """None: admit the lead (and count it into the backlog); else refuse it, with the
        Retry-After in seconds: the time the backlog needs to drain to the setpoint."""
        if self.bound_ms <= 0:
            return None
        delay = self.predicted_delay_ms(now_ms)
        if delay is None:
            return self._refuse_blind(now_ms)
        self._blind_at = None
        if delay <= self.target_ms:
            self._local += 1
            return None
        return _retry_after((delay - self.target_ms) / 1000.0)

    def _blind_rate(self) -> float | None:
        """Leads/s admitted while blind; None: every lead (no capacity measured yet). Whether
        the pipeline is busy is not known then, so the floor applies: a rate measured near 0
        as the workers stopped must not refuse every lead until they report again."""
        return None if self._mu is None else max(self._mu, self.min_capacity)

    def _refuse_blind(self, now_ms: float) -> int | None:
        """No estimate now (no fresh report or end offsets: the broker or the workers are
        coming back from an outage). Before any capacity was measured (this process is
        starting): admit. After: admit at most at that capacity, from a bucket holding the
        setpoint's worth of leads. The retries that piled up during an outage then enter at
        the rate the pipeline took before, not all at once while the estimate is still
        stale (short chaos run: ~400 leads admitted within seconds of the broker's return,
        the last settling 17 s after the last push; docs/numbers.md)."""
        mu = self._blind_rate()
        if mu is None:
            return None
        size = max(1.0, mu * self.target_ms / 1000.0)
        if self._blind_at is None:
            self._blind_tokens = size
        else:
            refill = mu * max(0.0, now_ms - self._blind_at) / 1000.0
            self._blind_tokens = min(size, self._blind_tokens + refill)
        self._blind_at = now_ms
        if self._blind_tokens >= 1.0:
            self._blind_tokens -= 1.0
            return None
        return _retry_after((1.0 - self._blind_tokens) / mu)

    def status(self, now_ms: float) -> dict[str, Any]:
        """What the estimate is made of, for ``/healthz`` and the log."""
        fresh = self._fresh(now_ms)
        delay = self.predicted_delay_ms(now_ms)
        q = self.backlog(now_ms)
        mu = self.capacity()
        return {
            "bound_ms": self.bound_ms,
            "workers": len(fresh),
            "backlog": None if q is None else round(q),
            "rate": None if self._rate is None else round(self._rate, 1),
            "capacity": None if mu is None else round(mu, 1),
            "busy": self._busy,
            # Blind: no estimate; leads admitted at most at this rate (None: not blind).
            "blind_rate": None
            if delay is not None or (r := self._blind_rate()) is None
            else round(r, 1),
            "predicted_delay_ms": None
            if delay is None
            else (round(delay, 1) if math.isfinite(delay) else "inf"),
            "reported_delay_p99_ms": max(
                (w.last.delay_p99_ms for w in fresh if w.last.delay_count), default=None
            ),
        }
