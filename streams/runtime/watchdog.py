"""The partition watchdog: every 5 s, an assigned partition with records waiting that
delivered none (or committed nothing) for ``STALL_S`` outside a rebalance is reported with
its full state and sought to restart its fetch (``streams.runtime.faust_patches`` point 4).
Faust's own stall detector only logs; a partition silently left unfetched after a rebalance
held its leads until the next one."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import faust

from streams.runtime.agents import timer
from streams.runtime.faust_patches import WATCHDOG_CALL_TIMEOUT_S, guard_of, guarded

__all__ = ["STALL_S", "StallWatch", "Watchdog", "install", "partition_state", "watch_partitions"]

log = logging.getLogger(__name__)


#: A partition with records waiting and none delivered for this long, outside a rebalance,
#: is reported and sought to its next offset (the watchdog below).
STALL_S = 20.0


class StallWatch:
    """Which assigned partitions have records waiting and have delivered none for ``stall_s``
    (pure bookkeeping: the caller observes, this decides)."""

    def __init__(self, stall_s: float = STALL_S) -> None:
        self.stall_s = stall_s
        self.since: dict[Any, tuple[int, float]] = {}  # tp -> (next offset, since when)

    def observe(self, tp: Any, next_offset: int | None, end: int | None, now: float) -> bool:
        """``next_offset``: the next offset the consumer would deliver; ``end``: the
        partition's end offset. True when records wait and nothing moved for ``stall_s``."""
        if next_offset is None or end is None or end <= next_offset:
            self.since.pop(tp, None)
            return False
        prev = self.since.get(tp)
        if prev is None or prev[0] != next_offset:
            self.since[tp] = (next_offset, now)
            return False
        return now - prev[1] >= self.stall_s

    def restart(self, tp: Any, now: float) -> None:
        if tp in self.since:
            self.since[tp] = (self.since[tp][0], now)

    def keep(self, tps: set[Any]) -> None:
        for tp in list(self.since):
            if tp not in tps:
                del self.since[tp]


class Watchdog:
    """The watchdog's state between rounds: deliveries and commits watched per partition,
    and since when rounds have been skipped (a rebalance or recovery that does not end)."""

    def __init__(self, stall_s: float = STALL_S) -> None:
        self.stall_s = stall_s
        self.deliveries = StallWatch(stall_s)
        self.commits = StallWatch(2 * stall_s)
        self.skipping_since: float | None = None
        #: The last end-offsets call, which may outlive the round that made it.
        self.highwaters: asyncio.Future[Any] | None = None


def partition_state(consumer: Any, tp: Any) -> dict[str, Any]:
    """What Faust, the guard and aiokafka know of one partition (for the watchdog's report;
    aiokafka's state is read from another thread: a snapshot, not a transaction)."""
    g = guard_of(consumer)
    active = consumer._active_partitions
    out: dict[str, Any] = {
        "faust_active": active is None or tp in active,
        "faust_paused": tp in consumer._paused_partitions,
        "faust_buffered": tp in consumer._buffered_partitions,
        "read_offset": consumer._read_offset.get(tp),
        "committed": consumer._committed_offset.get(tp),
        "guard_expected": g.expected.get(tp),
        "guard_fenced": tp in g.fenced,
    }
    try:
        aio = consumer._thread._consumer
        st = aio._subscription.subscription.assignment.state_value(tp)
        out.update(
            aiokafka_position=st._position,
            aiokafka_paused=st.paused,
            aiokafka_awaiting_reset=st.awaiting_reset,
            aiokafka_prefetched=tp in aio._fetcher._records,
        )
    except Exception as exc:
        out["aiokafka"] = f"unreadable: {exc!r}"
    return out


async def watch_partitions(app: Any, dog: Watchdog, now: float) -> list[Any]:
    """One round of the partition watchdog: every assigned, non-changelog partition with
    records waiting that has delivered none for ``dog.stall_s`` outside a rebalance is
    reported (an ERROR with its full state) and sought to the next offset it should deliver,
    which restarts its fetch. Faust's own stall detector only logs; a partition silently left
    unfetched after a rebalance held its leads until the next one (docs/known-issues.md).
    Returns the partitions sought."""
    consumer = app.consumer
    if app.rebalancing or getattr(app, "in_recovery", False) or not consumer.flow_active:
        if dog.skipping_since is None:
            dog.skipping_since = now
        elif now - dog.skipping_since >= 3 * dog.stall_s:
            log.error(
                "partition watchdog: no check for %.0f s (rebalancing=%s, in_recovery=%s,"
                " flow_active=%s)",
                now - dog.skipping_since,
                app.rebalancing,
                getattr(app, "in_recovery", False),
                consumer.flow_active,
            )
            dog.skipping_since = now
        return []
    dog.skipping_since = None
    watch, commits = dog.deliveries, dog.commits
    tps = {tp for tp in consumer.assignment() if guarded(tp.topic)}
    watch.keep(tps)
    commits.keep(tps)
    if not tps:
        return []
    # Bounded, and never piled up: the call runs on Faust's consumer thread, whose two
    # workers also serve every fetch, and goes on there when this round stops waiting for
    # it; until it ends, rounds are skipped (a stuck thread is the liveness monitor's job).
    if dog.highwaters is not None and not dog.highwaters.done():
        return []
    dog.highwaters = asyncio.ensure_future(consumer.highwaters(*tps))
    done, _ = await asyncio.wait({dog.highwaters}, timeout=WATCHDOG_CALL_TIMEOUT_S)
    if not done:
        log.warning(
            "partition watchdog: the consumer's end offsets took over %.0f s; "
            "skipping rounds until they come",
            WATCHDOG_CALL_TIMEOUT_S,
        )
        return []
    ends = dog.highwaters.result()
    if app.rebalancing:
        return []
    g = guard_of(consumer)
    healed: list[Any] = []

    async def restart(tp: Any, offset: int) -> None:
        consumer.resume_partitions({tp})
        await asyncio.wait_for(consumer.seek(tp, offset), WATCHDOG_CALL_TIMEOUT_S)
        watch.restart(tp, now)
        healed.append(tp)

    for tp in sorted(tps):
        if tp in consumer._buffered_partitions:
            watch.since.pop(tp, None)  # back-pressure from a full stream buffer: not a stall
            continue
        committed = consumer._committed_offset.get(tp)
        if commits.observe(tp, committed, ends.get(tp), now):
            assert committed is not None
            # Not committed for this long with records after it. An event still in flight
            # explains it (reported only). With none in flight, records were lost between
            # the fetch and the agents: read them again from the committed offset (a
            # redelivery at worst; every stage is idempotent).
            inflight = any(getattr(m, "tp", None) == tp for m in list(consumer._unacked_messages))
            log.error(
                "partition %s: committed offset %d has not moved for %.0f s with %d "
                "record(s) after it, %s. State: %s",
                tp,
                committed,
                commits.stall_s,
                ends[tp] - committed,
                "an event in flight"
                if inflight
                else f"none in flight: seeking it back to {committed}",
                partition_state(consumer, tp),
            )
            commits.restart(tp, now)
            if not inflight:
                await restart(tp, committed)
                continue
        nxt = g.expected.get(tp)
        if nxt is None:
            nxt = committed
        if not watch.observe(tp, nxt, ends.get(tp), now):
            continue
        assert nxt is not None
        log.error(
            "partition %s: %d record(s) waiting (next offset %d, end %d) and none "
            "delivered for %.0f s outside a rebalance; seeking it to %d to restart its "
            "fetch. State: %s",
            tp,
            ends[tp] - nxt,
            nxt,
            ends[tp],
            watch.stall_s,
            nxt,
            partition_state(consumer, tp),
        )
        await restart(tp, nxt)
    return healed


def install(app: faust.App) -> None:
    """Run :func:`watch_partitions` every 5 s in ``app``'s worker."""
    dog = Watchdog()

    @timer(app, 5.0, name="partition-watchdog")
    async def partition_watchdog() -> None:
        try:
            await watch_partitions(app, dog, time.monotonic())
        except Exception:
            log.warning("partition watchdog round failed", exc_info=True)
