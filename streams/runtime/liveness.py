"""A worker whose Kafka client is stuck exits non-zero, for its supervisor to restart it.

``faust_patches`` (point 5) records every wait on Kafka a worker makes through Faust — each
call to Faust's consumer thread (fetches, commits, seeks, offset lookups), each offset
commit, each producer flush — in :data:`WAITS`. A wait is *stuck* when it has lasted
``stuck_s`` and the broker has answered a readiness probe (Metadata and FindCoordinator, as
``pingpost kafka start`` checks) for ``grace_s`` in a row: while the broker is down, waiting is
right and restarting would not help; once it is back, a healthy client resumes in a few
seconds. A stuck worker logs what waited and for how long, and exits with
:data:`EXIT_STUCK` at once (a graceful stop would wait on the same stuck client). Nothing is
lost: events are committed only once processed, and every stage is idempotent (as after a
``kill -9``). ``pingpost up`` runs workers under ``pingpost supervise``, which restarts them.

The monitor is a thread, so it also acts when the event loop itself is blocked. It probes
the broker only while a wait is older than ``grace_s``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

__all__ = [
    "EXIT_STUCK",
    "STUCK_S",
    "GRACE_S",
    "Waits",
    "WAITS",
    "StuckCheck",
    "broker_ready",
    "start_monitor",
]

log = logging.getLogger(__name__)

#: Exit status of a worker that gave up on a stuck Kafka client (EX_TEMPFAIL: try again).
EXIT_STUCK = 75
#: A wait on Kafka is stuck after this long...
STUCK_S = 20.0
#: ...once the broker has answered for this long.
GRACE_S = 10.0


class Waits:
    """Waits in progress, each with what it waits for and since when (the registry the
    monitor reads from its own thread; dict operations are atomic under the GIL)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._open: dict[int, tuple[str, float]] = {}
        self._ids = itertools.count()

    @contextlib.contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        token = next(self._ids)
        self._open[token] = (what, self.clock())
        try:
            yield
        finally:
            self._open.pop(token, None)

    def oldest(self) -> tuple[str, float] | None:
        """``(what, since)`` of the longest wait in progress, or None."""
        waits = list(self._open.values())
        return min(waits, key=lambda w: w[1]) if waits else None

    def __len__(self) -> int:
        return len(self._open)


#: This process's waits on Kafka.
WAITS = Waits()


class StuckCheck:
    """The decision, one observation at a time (no I/O: the caller probes the broker)."""

    def __init__(self, stuck_s: float = STUCK_S, grace_s: float = GRACE_S) -> None:
        self.stuck_s = stuck_s
        self.grace_s = grace_s
        self.ready_since: float | None = None

    def needs_probe(self, now: float, oldest: tuple[str, float] | None) -> bool:
        """Whether a wait is old enough (``grace_s``) for the broker to be probed at all:
        from then on, when the broker came back is known by the time the wait is stuck."""
        if oldest is None or now - oldest[1] < min(self.grace_s, self.stuck_s):
            self.ready_since = None
            return False
        return True

    def observe(
        self, now: float, oldest: tuple[str, float] | None, broker_answers: Callable[[], bool]
    ) -> str | None:
        """A description of the stuck wait, or None. ``broker_answers`` is called only while
        a wait is older than ``grace_s``."""
        if not self.needs_probe(now, oldest):
            return None
        assert oldest is not None
        if not broker_answers():
            self.ready_since = None
            return None
        if self.ready_since is None:
            self.ready_since = now
        if now - oldest[1] < self.stuck_s or now - self.ready_since < self.grace_s:
            return None
        what, since = oldest
        return (
            f"{what} has waited {now - since:.0f} s, and the broker has answered for "
            f"{now - self.ready_since:.0f} s"
        )


def broker_ready(bootstrap: str, timeout: float = 2.0) -> bool:
    """Whether any bootstrap server answers Metadata and FindCoordinator."""
    from connectors.kafka_broker import _group_coordinator_ready, _metadata_ready

    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        try:
            p = int(port)
        except ValueError:
            continue
        if _metadata_ready(host, p, timeout) and _group_coordinator_ready(host, p, timeout):
            return True
    return False


def _exit_stuck(reason: str) -> None:
    log.critical(
        "the Kafka client is stuck: %s; exiting with status %d for the supervisor "
        "to restart this worker (processed events are committed, the rest are "
        "read again)",
        reason,
        EXIT_STUCK,
    )
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    os._exit(EXIT_STUCK)


def start_monitor(
    bootstrap: str,
    waits: Waits = WAITS,
    check: StuckCheck | None = None,
    interval: float = 1.0,
    on_stuck: Callable[[str], None] = _exit_stuck,
    probe: Callable[[], bool] | None = None,
) -> threading.Event:
    """Start the monitor thread (a daemon); returns an event that stops it when set."""
    # Environment overrides, for operators and for the tests that wedge a worker on purpose.
    check = check or StuckCheck(
        float(os.environ.get("PINGPOST_STUCK_S", STUCK_S)),
        float(os.environ.get("PINGPOST_STUCK_GRACE_S", GRACE_S)),
    )
    probe = probe or (lambda: broker_ready(bootstrap))
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(interval):
            try:
                verdict = check.observe(waits.clock(), waits.oldest(), probe)
            except Exception:
                log.warning("liveness check failed", exc_info=True)
                continue
            if verdict:
                on_stuck(verdict)
                return

    threading.Thread(target=run, name="pingpost-liveness", daemon=True).start()
    log.info(
        "liveness monitor: a wait on Kafka of %.0f s while the broker answers for "
        "%.0f s ends this worker (status %d)",
        check.stuck_s,
        check.grace_s,
        EXIT_STUCK,
    )
    return stop
