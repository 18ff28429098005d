"""The offset guard: what a consumer delivers after seeks, stale batches and real holes."""

from __future__ import annotations

import pytest

from streams.faust_fixes import OffsetGuard, guarded

D, X, R = OffsetGuard.DELIVER, OffsetGuard.DROP, OffsetGuard.RESEEK
TP = ("t.bids", 0)


@pytest.mark.parametrize("seek, offsets, verdicts", [
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
])
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


@pytest.mark.parametrize("topic, want", [
    ("pp.bids", True), ("pp.leads", True), ("pingpost-auctions-changelog", False),
])
def test_changelogs_are_not_guarded(topic: str, want: bool) -> None:
    assert guarded(topic) is want
