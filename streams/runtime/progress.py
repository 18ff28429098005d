"""Progress reports of the auction role, for ingest's admission control (streams/rules/admission.py).

The pre-ping stages (redact, dedupe, ping) mark each record they take; the ping stage also
records each round's receipt → open delay. Every :data:`~streams.rules.admission.REPORT_INTERVAL_S`
the worker publishes one ``Progress`` record (key = worker id) to the one-partition progress
topic: per assigned partition the offset of the last record taken, the ping requests taken so
far, and the delays since the last report. With nothing new it still reports once a second,
so ingest can tell an idle worker from a dead one.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from typing import Any

from streams.context import Context
from streams.rules.admission import REPORT_INTERVAL_S

__all__ = ["Progress", "tracker"]

log = logging.getLogger(__name__)

#: With nothing new, a report at least this often (ms): a heartbeat.
IDLE_REPORT_MS = 1000


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Progress:
    def __init__(self, worker: str) -> None:
        self.worker = worker
        self._taken: dict[tuple[str, int], tuple[str, int]] = {}  # tp -> (stage, offset)
        self._opened = 0
        self._delays: list[float] = []
        self._dirty = True
        self._sent_at = 0

    def took(
        self, stage: str, topic: str, partition: int, offset: int, *, ping: bool = False
    ) -> None:
        """``stage`` took the record at ``offset``; ``ping``: a ping request (counted)."""
        self._taken[(topic, partition)] = (stage, offset)
        if ping:
            self._opened += 1
        self._dirty = True

    def opened(self, delay_ms: float) -> None:
        """A ping round opened ``delay_ms`` after its lead was received."""
        self._delays.append(delay_ms)

    def record(self, at_ms: int, assigned: set[tuple[str, int]] | None) -> dict[str, Any] | None:
        """The ``Progress`` record to publish now, or None (nothing new, heartbeat not due).
        Partitions no longer ``assigned`` are forgotten: if one comes back, its old offset
        would count records the next owner already took as waiting."""
        if assigned is not None:
            gone = [tp for tp in self._taken if tp not in assigned]
            for tp in gone:
                del self._taken[tp]
            self._dirty = self._dirty or bool(gone)
        if not self._dirty and not self._delays and at_ms - self._sent_at < IDLE_REPORT_MS:
            return None
        delays, self._delays = sorted(self._delays), []
        self._dirty, self._sent_at = False, at_ms
        return {
            "worker": self.worker,
            "at_ms": at_ms,
            "offsets": [
                {"stage": stage, "topic": tp[0], "partition": tp[1], "offset": off}
                for tp, (stage, off) in sorted(self._taken.items())
            ],
            "opened": self._opened,
            "delay_count": len(delays),
            "delay_p50_ms": float(_quantile(delays, 0.5)) if delays else 0.0,
            "delay_p99_ms": float(_quantile(delays, 0.99)) if delays else 0.0,
            "delay_max_ms": float(delays[-1]) if delays else 0.0,
        }


def tracker(ctx: Context) -> Progress:
    """This worker's :class:`Progress` (the ``progress`` port); the first call also starts
    its reports."""
    if isinstance(ctx.progress, Progress):
        return ctx.progress
    import schemas
    from streams.runtime.agents import now_ms, timer

    progress = ctx.progress = Progress(
        f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    )
    topic, app = ctx.topic("progress"), ctx.app

    @timer(app, REPORT_INTERVAL_S, name="progress-report")
    async def report() -> None:
        try:
            assigned = {(tp.topic, tp.partition) for tp in app.consumer.assignment()}
        except Exception:
            assigned = None
        rec = progress.record(now_ms(), assigned)
        if rec is None:
            return
        try:
            await topic.send(key=progress.worker.encode(), value=schemas.encode("Progress", rec))
        except Exception as exc:
            log.debug("progress report not sent: %s", exc)

    return progress
