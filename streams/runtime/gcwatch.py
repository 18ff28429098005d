"""How long the cyclic garbage collector stops the worker.

A full (generation 2) collection walks every tracked object of the process: its pause grows
with the heap (the tables' live entries), and while it runs no lead is pinged, no bid read,
no post answered. :class:`GcWatch` times every collection through ``gc.callbacks``;
:meth:`GcWatch.take` returns what happened since the previous call, which the worker logs
when a pause was long enough to matter to an auction (``docs/operations.md``)."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["GcWatch", "GcWindow"]


@dataclass
class GcWindow:
    """Collections since the previous :meth:`GcWatch.take`, by generation."""

    seconds: float
    #: generation -> [collections, total pause s, longest pause s]
    by_gen: dict[int, list[float]] = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        return sum(v[1] for v in self.by_gen.values())

    @property
    def longest_s(self) -> float:
        return max((v[2] for v in self.by_gen.values()), default=0.0)

    def full(self) -> tuple[int, float]:
        """(full collections, longest of them, s)."""
        v = self.by_gen.get(2)
        return (int(v[0]), v[2]) if v else (0, 0.0)

    def describe(self) -> str:
        n, longest = self.full()
        share = 100.0 * self.total_s / self.seconds if self.seconds > 0 else 0.0
        return (
            f"gc: {n} full collection(s) in the last {self.seconds:.0f} s, longest pause "
            f"{1000 * self.longest_s:.0f} ms (full: {1000 * longest:.0f} ms); "
            f"{share:.1f} % of the time in gc"
        )


class GcWatch:
    """Times the collector's pauses (``install`` / ``uninstall`` its ``gc.callbacks`` hook)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._started: float | None = None
        self._since = clock()
        self._by_gen: dict[int, list[float]] = {}

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = self._clock()
            return
        if self._started is None:
            return
        took = self._clock() - self._started
        self._started = None
        s = self._by_gen.setdefault(int(info.get("generation", 0)), [0, 0.0, 0.0])
        s[0] += 1
        s[1] += took
        s[2] = max(s[2], took)

    def install(self) -> GcWatch:
        if self not in gc.callbacks:
            gc.callbacks.append(self)
        return self

    def uninstall(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)

    def take(self) -> GcWindow:
        now = self._clock()
        w = GcWindow(now - self._since, self._by_gen)
        self._since, self._by_gen = now, {}
        return w
