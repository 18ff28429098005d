"""The collector's pauses, timed through ``gc.callbacks`` (streams.runtime.gcwatch)."""

from __future__ import annotations

import gc

from streams.runtime.gcwatch import GcWatch


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_each_collection_is_timed_by_generation_and_a_take_starts_a_new_window() -> None:
    clock = Clock()
    w = GcWatch(clock)
    for gen, took in [(0, 0.001), (2, 0.150), (2, 0.090), (1, 0.004)]:
        w("start", {"generation": gen})
        clock.t += took
        w("stop", {"generation": gen, "collected": 3})
    clock.t += 10.0 - 0.245
    got = w.take()
    n, longest = got.full()
    assert n == 2 and abs(longest - 0.150) < 1e-9
    assert abs(got.total_s - 0.245) < 1e-9
    assert abs(got.seconds - 10.0) < 1e-9
    assert "2 full collection(s) in the last 10 s, longest pause 150 ms" in got.describe()
    assert "2.5 % of the time in gc" in got.describe()
    assert w.take().by_gen == {}


def test_a_stop_without_its_start_is_ignored() -> None:
    w = GcWatch(Clock())
    w("stop", {"generation": 2, "collected": 0})  # installed in the middle of a collection
    assert w.take().full() == (0, 0.0)


def test_installed_it_sees_the_real_collector() -> None:
    w = GcWatch().install()
    try:
        gc.collect()
    finally:
        w.uninstall()
    assert w not in gc.callbacks
    n, longest = w.take().full()
    assert n >= 1 and longest > 0.0
