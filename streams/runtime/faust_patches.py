"""Corrections to faust-streaming's consumer, applied once per process by ``create_app``.

1. **Fetch wait.** Faust hard-codes the worker consumer's ``fetch_max_wait_ms=1500``. aiokafka
   leaves out of a fetch every partition that still has unconsumed records and the broker
   holds that fetch up to this long, so an event landing on such a partition (a bid, a close
   marker) waited hundreds of ms: measured close lag p50 375 ms. A short wait costs an idle
   fetch every few ms on loopback and brings the close lag to a few ms.

2. **No record skipped across a rebalance (the offset guard).** After a rebalance Faust seeks
   every partition back to its committed offset ``C``, but a batch fetched *before* the seek
   can still be iterated after it (faust-streaming #216/#221). Its first record has an offset
   ``> C + 1``; Faust takes the difference for a legitimate hole (compaction, transaction
   markers), marks ``C+1 … offset-1`` as processed (``Consumer._add_gap``) and commits past
   them; the refetched records below the stale one are then dropped as already read. Measured
   before this fix: 1 lead of 1,500 never auctioned while workers joined, left and were killed,
   with gaps logged on every stage's topic after each rebalance.

   The guard tracks, per partition, the next offset this consumer must deliver: set from every
   seek (the committed offsets Faust seeks to, or an explicit ``seek``), advanced by every
   record delivered. A record below it was already delivered (or committed) and is dropped; a
   record *above* it is stale or follows a real hole, so the guard drops it and seeks the
   partition back to the expected offset: a stale record is then fetched again in order, while
   a real hole (compacted or expired records) shows the same jump again after the seek and is
   let through. A revoked partition is fenced until it is sought again: records of a batch
   fetched before the revocation are not delivered in between. Changelog topics (compacted,
   read by table recovery) are not guarded.

3. **No commit past an event still in flight** (faust-streaming #606, open; PR #707). Faust
   commits the first run of consecutive acked offsets, and its check that this run starts at
   the committed offset is off by one: with ``C`` committed (the next offset to process), ``C``
   still in flight and ``C+1…`` acked, it commits past ``C``. Agents that ack out of order (the
   ping and post stages run each event in its own task, ``streams/runtime/agents.py``) hit this in
   steady state; if the worker then stops or crashes before ``C`` finishes, ``C`` is never
   processed. Measured before this fix: 2 of 6 churn-test runs left 1 lead of 900 with a post
   order and no result (committed past while in flight when a worker was stopped or killed).
   The commit now advances only through offsets acked — or known not to exist: a hole the
   guard confirmed (point 2) is recorded as one — contiguously from the committed offset (or
   from the first offset delivered when the group has no commit yet); a partition revoked and
   not sought since gets no commit (Faust forgets its committed offset on the revocation:
   acks of tasks ending then started the run past orders still in flight, and a full chaos
   run left 2 leads of 3,000 without an outcome).

4. **The consumer thread never reads "no active partition" as "all of them"** (see
   ``_view_active_partitions``), and a watchdog reports and restarts a partition that
   stops delivering or committing outside a rebalance (``streams.runtime.watchdog``).

5. **No wait on Kafka without a bound** (issue 10 item 7). aiokafka's ``commit()`` retries
   retriable errors for ever (``GroupCoordinator.commit_offsets`` and
   ``ensure_coordinator_known`` loop until the coordinator answers), and Faust runs it on its
   consumer thread, whose method queue has two workers that also serve every fetch: a commit
   that never returns holds a worker for good, and two held calls stop the fetches too. On
   the product, 1 broker ``kill -9`` + restart in 3 left the sink's commit hanging: nothing
   more reached ClickHouse until a manual restart. The commit now gives up after
   ``COMMIT_TIMEOUT_S`` (a later commit covers its offsets, as for a commit refused after a
   rebalance); every consumer-thread call, Faust commit and producer flush in progress is
   recorded in ``streams.runtime.liveness.WAITS``, whose monitor makes a ``pingpost worker`` exit
   non-zero (for its supervisor to restart it) when one outlasts its bound while the broker
   answers.

6. **No commit-livelock ERROR when nothing is wrong.** Faust's livelock check
   (``AIOKafkaConsumerThread.verify_event_path``, every 2.5 s) reads "records waiting" from one
   snapshot (aiokafka's highwater above its position, which holds for a moment whenever
   records arrive) and measures "has not committed" from the partition's last commit, which
   on an idle partition is as old as the idle period. So the first records after an idle
   minute could log "Has not committed ... (last commit N s ago)" or "Stream has not started
   processing" with nothing stalled. Records now count as waiting only once the backlog
   has lasted the stream timeout, and the commit clock runs only while acked offsets wait
   for a commit.

7. **A worker knows when its group membership is confirmed** (the fence of
   ``streams.runtime.agents.member_confirmed``). Faust's view of "my partitions" changes only when
   this consumer rejoins; a worker cut off from the group coordinator (its consumer thread
   stuck after a broker outage, its heartbeats failing) keeps that view after the group has
   moved its partitions to another worker, and kept acting on them: in the short chaos run a
   worker whose consumer was stuck closed 4 auctions 0.3 s after the new owner had read the
   auctions changelog, which closed them again (two post orders per lead). aiokafka's
   coordinator now records when it last had proof of membership: when a heartbeat that got
   ``NoError`` was sent (the coordinator's session clock restarted no earlier than that),
   or when a join completed. No upstream issue: Kafka's own answer is transactional
   fencing, which Faust offers only as its exactly-once mode.

8. **A short fetch wait only while it buys latency** (issue 12: the stack at rest). Point 1's
   short wait matters only while some partition is left out of the fetch: one whose records
   wait in aiokafka's buffer, or one paused. When every assigned partition is in the fetch, the
   broker answers it as soon as any of them gets a record (``fetch_min_bytes=1``), however long
   the wait. So a fetch that leaves nothing out now waits ``IDLE_FETCH_MAX_WAIT_MS``: at rest a
   consumer asks the broker twice a second instead of a hundred times, and the first record
   after the rest is answered as fast as before. Records buffered for a partition the consumer
   does not read now (Faust's paused partitions: a table's own changelog after recovery) do
   not count: they would keep every fetch short for good. Applies to every aiokafka consumer of
   the process (the feeds too); a configured wait above the idle one is kept.

9. **Batched fetches where latency is not the point** (issue 12: CPU per lead). Faust gives no
   way to set the worker consumer's ``fetch_min_bytes`` (1: the broker answers a fetch as soon
   as one record waits), so a consumer reads a handful of records per fetch and pays the
   fetch's fixed cost for each: a Faust agent that only counts its records costs ~360 µs of
   CPU per record at 1,000 records/s, ~105 µs when the broker answers once 32 KiB wait
   (``bench/record_cost.py``, measured interleaved). ``apply(fetch_min_bytes=N)`` sets it on
   the worker consumer; the sink and metrics roles take ``worker.batch_fetch_min_bytes`` and
   wait at most ``worker.batch_fetch_wait_ms`` for it (point 8's long idle wait does not apply
   to a consumer waiting for bytes: it would be how late its records are read at low traffic).
   The auction role takes ``worker.fetch_min_bytes`` (default 1: every record at once) with its
   10 ms wait. Once a batched fetch comes back empty (no traffic for the batch
   wait), the next ones are point 8's idle fetch (``fetch_min_bytes=1``, the idle wait) until
   records flow again: at rest such a consumer asks the broker every 2 s, not every 500 ms,
   and the first record after the rest is read as soon as it lands.

10. **A partition nobody reads holds no other back** (issue 12: the first leads after a start).
   aiokafka sends no fetch to a broker while one of its partitions' buffered records wait to be
   taken, for up to its prefetch backoff (100 ms). After recovery Faust stops taking the
   tables' changelog partitions (it removes them from the partitions it reads) but aiokafka
   still fetches each of them until it holds one batch of it, which is never taken. So the
   first record a worker wrote to each changelog partition held all of the worker's topics
   back for 100 ms: after a start, 3 of the first 5 leads took 115-177 ms from receipt to ping
   open instead of ~15 ms (traced: ``lead_ids-changelog:5`` fetched, no fetch for 105 ms, then
   the lead's ping request). Records of a partition the consumer does not read now (point 8's
   rule) get no backoff, unless Faust's flow control holds that partition back (its stream's
   buffer is full): it is read again soon, so aiokafka's rule stands there (a first version
   without that exception sustained 68-72 leads/s at 200/s offered against 81 before, but the
   next pair's "before" alone spanned 73-103: within the noise, and the exception is the
   cautious choice). Applies with point 8, to every aiokafka consumer of the process.

11. **The livelock check yields without a task per partition** (issue 12: the stack at rest).
   Faust's livelock check (every 2.5 s) lets other tasks run between partitions with mode's
   ``Service.sleep(0)``, which waits for the service's stop event with no time
   (``asyncio.wait_for``): a task created, cancelled and waited for, per assigned partition
   (~130 in an auction worker). It now yields to the loop (``asyncio.sleep(0)``) once every
   :data:`LIVELOCK_YIELD_EVERY` partitions. Counted at rest in an auction worker (coroutine
   resumptions over 20 s): ``asyncio.wait_for`` 101 a second before, 42 after. Faust's other
   ``sleep(0)`` (once per pass of its consumer's drain loop) is left as it is: making it a
   plain yield too looked slower under load in one interleaved pair (not pursued).

12. **A static member restarted on another web port takes its partitions back.** Faust's
   assignor checks that an assignment names this worker's URL (``http://host:web_port``), as
   when the group leader computed it from this member's subscription. A static member
   (``worker.static_membership``) that rejoins a group still holding it gets its previous
   assignment back from the broker, with no rebalance: that is the point of static
   membership. But if its web port changed since (an operator's edit, or a restart within
   the session timeout of a broker that kept the group), the assignment names the old URL,
   Faust's check raised ``AssertionError`` in aiokafka's coordinator routine, the routine
   died, and the worker stayed up with no partition, for good (its supervisor restarts only
   a process that exits; found by ``bench/rest_side_by_side.py``, which swaps its trees'
   ports between rounds). The partitions are right; only the URL is old, and pingpost does
   not use Faust's web router, which alone reads it. The check now lets that case through
   with a warning (the next rebalance brings the new URL); any other mismatch still raises.

13. **The fetch routine wakes once a second, not five times, with nothing to do** (issue 12:
   the stack at rest). aiokafka's fetch routine re-examines every assigned partition each
   ``consumer_timeout_ms`` (200 ms) even when nothing happened. Everything it must react to
   already wakes it: a fetch's answer, records taken or a seek (``_wait_consume_future``), a
   rebalance (the old assignment's ``unassign_future``), a paused partition resumed, a
   metadata refresh it asked for, a buffered partition's backoff (its own timeout). Faust
   gives no way to set that timer, so every consumer of the process now passes at most every
   :data:`FETCH_ROUTINE_PASS_S` when idle (the feeds and ingest's readers already did).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any

__all__ = [
    "COMMIT_TIMEOUT_S",
    "DELETE_WHEN",
    "PatchVersionError",
    "WATCHDOG_CALL_TIMEOUT_S",
    "IDLE_FETCH_MAX_WAIT_MS",
    "FETCH_ROUTINE_PASS_S",
    "LIVELOCK_YIELD_EVERY",
    "WORKER_FETCH_MAX_WAIT_MS",
    "WRITTEN_FOR",
    "OffsetGuard",
    "apply",
    "check_versions",
    "contiguous_commit",
    "fetch_params",
    "idle_fetch_wait",
    "guard_of",
    "guarded",
]

log = logging.getLogger(__name__)

#: The exact versions these patches were written and tested against (pyproject pins them).
#: Any other version may have moved what they replace: ``apply`` refuses it.
WRITTEN_FOR = {"faust-streaming": "0.15.3", "aiokafka": "0.14.0", "mode-streaming": "0.7.1"}

#: When each patch can go: the upstream issue or PR whose release makes it unnecessary.
DELETE_WHEN = {
    1: "faust-streaming makes the worker consumer's fetch_max_wait_ms configurable "
    "(hard-coded 1500 in faust/transport/drivers/aiokafka.py; no upstream issue yet)",
    2: "faust-streaming #216 / #221 fixed (a batch fetched before a rebalance iterated after "
    "the seek to the committed offsets)",
    3: "faust-streaming #606 fixed (PR #707 merged and released)",
    4: "faust-streaming reads an empty active-partition set as 'none' (no upstream issue yet)",
    5: "aiokafka bounds commit_offsets / ensure_coordinator_known (no upstream issue yet)",
    6: "faust-streaming's verify_event_path stops measuring idle time as 'not committed' "
    "(no upstream issue yet)",
    7: "Faust offers group fencing outside exactly-once mode (no upstream issue)",
    8: "aiokafka sizes the fetch wait by what the fetch leaves out (no upstream issue yet)",
    9: "faust-streaming makes the worker consumer's fetch_min_bytes configurable "
    "(not passed in faust/transport/drivers/aiokafka.py; no upstream issue yet)",
    10: "faust-streaming pauses a table's changelog partitions in aiokafka after recovery, or "
    "aiokafka backs off only for partitions the consumer reads (no upstream issue yet)",
    11: "faust-streaming's verify_all_partitions_active stops sleeping through mode's "
    "Service.sleep(0) per partition (no upstream issue yet)",
    12: "faust-streaming's PartitionAssignor.on_assignment accepts a static member's own "
    "assignment made for its previous URL (no upstream issue yet)",
    13: "faust-streaming passes consumer_timeout_ms to the worker consumer, or aiokafka's "
    "fetch routine stops polling when nothing can have changed (no upstream issue yet)",
}


class PatchVersionError(RuntimeError):
    """The installed faust-streaming / aiokafka / mode-streaming are not the versions the
    patches were written for."""


def check_versions() -> None:
    """Raise :class:`PatchVersionError` unless the installed versions are ``WRITTEN_FOR``."""
    wrong = []
    for dist, want in WRITTEN_FOR.items():
        try:
            have = version(dist)
        except PackageNotFoundError:
            have = "not installed"
        if have != want:
            wrong.append(f"{dist} {have} (written for {want})")
    if wrong:
        raise PatchVersionError(
            "streams/runtime/faust_patches.py replaces private methods of faust-streaming, "
            "aiokafka and mode-streaming, and refuses to patch other versions than it was "
            "written for: " + ", ".join(wrong) + ". Install the versions pinned in "
            "pyproject.toml, or re-check every patch against the new ones "
            "(tests/unit/test_faust_patches_guard.py snapshots what they touch) and update "
            "WRITTEN_FOR."
        )


#: The worker consumer's fetch wait (see point 1).
WORKER_FETCH_MAX_WAIT_MS = 10

#: The fetch wait when no partition is left out of the fetch (see point 8); Kafka's default.
IDLE_FETCH_MAX_WAIT_MS = 2000

#: The longest an idle fetch routine sleeps between passes (see point 13; aiokafka's: 0.2).
FETCH_ROUTINE_PASS_S = 1.0


def apply(
    fetch_max_wait_ms: int | None = WORKER_FETCH_MAX_WAIT_MS, fetch_min_bytes: int = 1
) -> None:
    """Apply the fixes; ``fetch_max_wait_ms=None`` keeps Faust's fetch wait (roles that are
    not latency-critical: an idle fetch every 10 ms costs CPU the auctions need);
    ``fetch_min_bytes`` is the worker consumer's (point 9). Refuses
    (:class:`PatchVersionError`) on versions other than ``WRITTEN_FOR``."""
    check_versions()
    if fetch_max_wait_ms is not None:
        _shorten_worker_fetch_wait(fetch_max_wait_ms, fetch_min_bytes)
    _guard_offsets()
    _view_active_partitions()
    _bound_waits()
    _quiet_livelock_check()
    _track_membership()
    _cheap_livelock_yields()
    _static_member_new_url()
    idle_fetch_wait()


def _static_member_new_url() -> None:
    """Point 12."""
    from faust.assignor.client_assignment import ClientMetadata
    from faust.assignor.partition_assignor import PartitionAssignor

    if getattr(PartitionAssignor, "_pingpost_new_url", False):
        return
    original = PartitionAssignor.on_assignment

    def on_assignment(self: Any, assignment: Any) -> None:
        try:
            original(self, assignment)
        except AssertionError:
            # Faust's last check failed only if the partitions match (it checks them first,
            # after taking the assignment's state) and the URL does not.
            url = ClientMetadata.loads(self._decompress(assignment.user_data)).url
            ours = sorted(self._assignment.kafka_protocol_assignment(self._table_manager))
            if url == str(self._url) or sorted(assignment.assignment) != ours:
                raise
            log.warning(
                "this worker's group assignment names its previous URL %s, not %s: a static "
                "member restarted on another web port takes its partitions back as they were "
                "(the next rebalance brings the new URL)",
                url,
                self._url,
            )

    # Faust's method replaced at run time, and our marker on its class: deliberate.
    PartitionAssignor.on_assignment = on_assignment  # type: ignore[method-assign]
    PartitionAssignor._pingpost_new_url = True


#: The livelock check yields to the loop once per this many partitions (see point 11).
LIVELOCK_YIELD_EVERY = 32


def _cheap_livelock_yields() -> None:
    """Point 11."""
    from time import monotonic

    from faust.transport.consumer import Consumer

    if getattr(Consumer, "_pingpost_cheap_yields", False):
        return

    async def verify_all_partitions_active(self: Any) -> None:
        now = monotonic()
        for i, tp in enumerate(self.assignment()):
            if i % LIVELOCK_YIELD_EVERY == 0:
                await asyncio.sleep(0)
            if self.should_stop:
                return
            self.verify_event_path(now, tp)

    # Faust's method replaced at run time, and our marker on its class: deliberate.
    Consumer.verify_all_partitions_active = verify_all_partitions_active  # type: ignore[method-assign]
    Consumer._pingpost_cheap_yields = True  # type: ignore[attr-defined]


def fetch_params(
    configured_wait_ms: int,
    configured_min_bytes: int,
    waiting_to_be_read: bool,
    any_paused: bool,
    last_fetch_empty: bool = True,
) -> tuple[int, int]:
    """Points 8 and 9: ``(fetch_max_wait_ms, fetch_min_bytes)`` of the next fetch.
    ``waiting_to_be_read``: records of a partition the consumer reads are buffered (that
    partition is left out of the fetch); ``last_fetch_empty``: the previous fetch brought no
    record. A batching consumer (``configured_min_bytes > 1``) keeps its configuration while
    records flow; at rest it fetches like any other consumer at rest."""
    if waiting_to_be_read or any_paused:
        return configured_wait_ms, configured_min_bytes
    if configured_min_bytes > 1 and not last_fetch_empty:
        return configured_wait_ms, configured_min_bytes
    return max(configured_wait_ms, IDLE_FETCH_MAX_WAIT_MS), 1


def idle_fetch_wait() -> None:
    """Points 8, 10 and 13 alone, for a process with aiokafka consumers and no Faust app
    (ingest)."""
    from aiokafka.consumer.fetcher import Fetcher

    check_versions()
    if getattr(Fetcher, "_pingpost_idle_wait", False):
        return
    orig_actions = Fetcher._get_actions_per_node
    orig_fetched = Fetcher.fetched_records
    orig_proc = Fetcher._proc_fetch_request

    async def _proc_fetch_request(self: Any, assignment: Any, node_id: Any, request: Any) -> Any:
        # aiokafka returns True when the fetch added records (or an error to raise).
        got = await orig_proc(self, assignment, node_id, request)
        self._pingpost_last_fetch_empty = not got
        return got

    async def fetched_records(
        self: Any, partitions: Any, timeout: float = 0, max_records: int | None = None
    ) -> Any:
        # What the consumer reads now (Faust's active partitions; empty = all). Records of a
        # partition it does not read (a table's own changelog after recovery, a stream whose
        # buffer is full) stay buffered for a long time and do not make the fetch short.
        self._pingpost_reading = frozenset(partitions) if partitions else None
        return await orig_fetched(self, partitions, timeout, max_records)

    def _get_actions_per_node(self: Any, assignment: Any) -> Any:
        configured = getattr(self, "_pingpost_configured", None)
        if configured is None:
            configured = self._pingpost_configured = (
                self._fetch_max_wait_ms,
                self._fetch_min_bytes,
            )
            # Point 13: the routine's timeout when no buffered partition backs off.
            self._fetcher_timeout = max(self._fetcher_timeout, FETCH_ROUTINE_PASS_S)
        reading = getattr(self, "_pingpost_reading", None)
        if reading is None:
            waiting = bool(self._records)
        else:
            # Point 10: records (or an error) of a partition nobody reads now do not hold
            # the broker's other partitions back. aiokafka sends no fetch to a broker while
            # a buffered partition's backoff runs (100 ms), waiting for the consumer to take
            # it; a table's changelog record fetched after recovery is never taken. A
            # partition Faust's flow control holds back (its stream's buffer is full) keeps
            # the backoff: it is read again soon, and fetching meanwhile only costs CPU.
            # (One pass serves both points.)
            waiting = False
            held_back = getattr(self, "_pingpost_flow_held", ())
            for tp, held in self._records.items():
                if tp in reading:
                    waiting = True
                elif tp not in held_back and getattr(held, "_backoff", None):
                    held._backoff = 0
        paused = any(assignment.state_value(tp).paused for tp in assignment.tps)
        last_empty = getattr(self, "_pingpost_last_fetch_empty", True)
        wait_ms, min_bytes = configured
        self._fetch_max_wait_ms, self._fetch_min_bytes = fetch_params(
            wait_ms, min_bytes, waiting, paused, last_empty
        )
        return orig_actions(self, assignment)

    # aiokafka's methods replaced at run time, and our marker on its class: deliberate.
    Fetcher._get_actions_per_node = _get_actions_per_node
    Fetcher.fetched_records = fetched_records
    Fetcher._proc_fetch_request = _proc_fetch_request
    Fetcher._pingpost_idle_wait = True


def _track_membership() -> None:
    """Point 7: ``GroupCoordinator._pingpost_member_at`` is the monotonic time of the last
    proof of membership (a ``NoError`` heartbeat's send time, a completed join)."""
    import time

    from aiokafka.consumer.group_coordinator import GroupCoordinator

    if getattr(GroupCoordinator, "_pingpost_membership", False):
        return
    do_heartbeat = GroupCoordinator._do_heartbeat
    on_join_complete = GroupCoordinator._on_join_complete

    async def _do_heartbeat(self: Any) -> bool:
        sent = time.monotonic()
        ok: bool = await do_heartbeat(self)
        # True is also the answer to "rebalance in progress" (which requests a rejoin): not a
        # proof that this member keeps its partitions.
        if ok and not self._rejoin_needed_fut.done():
            self._pingpost_member_at = sent
        return ok

    async def _on_join_complete(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        result = await on_join_complete(self, *args, **kwargs)
        self._pingpost_member_at = started
        return result

    # aiokafka ships no types: GroupCoordinator is Any to the checker.
    GroupCoordinator._do_heartbeat = _do_heartbeat
    GroupCoordinator._on_join_complete = _on_join_complete
    GroupCoordinator._pingpost_membership = True


#: A consumer offset commit gives up after this long (see point 5).
COMMIT_TIMEOUT_S = 10.0
#: The partition watchdog's calls to the consumer give up after this long.
WATCHDOG_CALL_TIMEOUT_S = 15.0


def _bound_waits() -> None:
    """Point 5: the commit bounded on the consumer thread (where it runs, so cancelling it
    frees the thread's worker); consumer-thread calls, commits and producer flushes tracked
    for the liveness monitor."""
    from faust.transport import consumer as cmod
    from faust.transport.drivers import aiokafka as driver

    from streams.runtime.liveness import WAITS

    cls = driver.AIOKafkaConsumerThread
    if getattr(cls, "_pingpost_bounded", False):
        return
    orig_commit, orig_call = cls._commit, cls.call_thread
    orig_faust_commit, orig_flush = cmod.Consumer.commit, driver.Producer.flush

    async def _commit(self: Any, offsets: Any) -> bool:
        try:
            return await asyncio.wait_for(orig_commit(self, offsets), COMMIT_TIMEOUT_S)
        except TimeoutError:
            log.warning(
                "offset commit of %d partition(s) did not complete in %.0f s (broker "
                "unreachable?); a later commit covers these offsets",
                len(offsets),
                COMMIT_TIMEOUT_S,
            )
            return False

    async def call_thread(self: Any, fun: Any, *args: Any, **kwargs: Any) -> Any:
        with WAITS.waiting(f"consumer thread: {getattr(fun, '__name__', fun)}"):
            return await orig_call(self, fun, *args, **kwargs)

    async def commit(self: Any, *args: Any, **kwargs: Any) -> bool:
        with WAITS.waiting("offset commit"):
            return await orig_faust_commit(self, *args, **kwargs)

    async def flush(self: Any) -> None:
        with WAITS.waiting("producer flush"):
            await orig_flush(self)

    # Faust's methods replaced at run time, and our marker on its class: deliberate.
    cls._commit = _commit  # type: ignore[method-assign]
    cls.call_thread = call_thread  # type: ignore[method-assign]
    cmod.Consumer.commit = commit  # type: ignore[method-assign]
    driver.Producer.flush = flush  # type: ignore[method-assign]
    cls._pingpost_bounded = True  # type: ignore[attr-defined]


def _quiet_livelock_check() -> None:
    """Point 6."""
    from aiokafka.structs import TopicPartition
    from faust.transport.drivers import aiokafka as driver

    cls = driver.AIOKafkaConsumerThread
    if getattr(cls, "_pingpost_quiet_livelock", False):
        return
    orig = cls.verify_event_path
    # Our attribute on Faust's class: the original check (tests call it).
    cls._pingpost_orig_verify_event_path = orig  # type: ignore[attr-defined]

    def verify_event_path(self: Any, now: float, tp: Any) -> None:
        if not self.consumer._acked.get(tp):
            # Nothing acked waits for a commit: a commit cannot be late.
            self.tp_last_committed_at[tp] = now
        since = self.__dict__.setdefault("_pingpost_backlog_since", {})
        try:
            st = (
                self._ensure_consumer()._fetcher._subscriptions.subscription.assignment.state_value(
                    TopicPartition(tp.topic, tp.partition)
                )
            )
            backlog = (
                st is not None
                and st.highwater is not None
                and st.position is not None
                and st.highwater > st.position
            )
        except Exception:
            backlog = False
        if backlog:
            first = since.setdefault(tp, now)
            if now - first < min(self.tp_stream_timeout_secs, self.tp_commit_timeout_secs):
                # Records that arrived a moment ago: not a stall (yet). The fetch checks
                # still run.
                self._verify_aiokafka_event_path(now, tp)
                return None
        else:
            since.pop(tp, None)
        return orig(self, now, tp)

    # Faust's methods replaced at run time, and our marker on its class: deliberate.
    cls.verify_event_path = verify_event_path  # type: ignore[method-assign]
    cls._pingpost_quiet_livelock = True  # type: ignore[attr-defined]


class ActiveView:
    """Faust's live set of active partitions as the consumer thread's fetcher reads it:
    membership follows the set (a partition resumed while a fetch waits is served at once),
    but an empty set means no partition, where aiokafka reads an empty (falsy) set as every
    partition."""

    __slots__ = ("live",)

    def __init__(self, live: Any) -> None:
        self.live = live

    def __bool__(self) -> bool:
        return True

    def __contains__(self, tp: Any) -> bool:
        return tp in self.live

    def __iter__(self) -> Any:
        return iter(list(self.live))


def _view_active_partitions() -> None:
    """Point 4: Faust hands its live set of active partitions to the consumer thread, which
    reads it later while the main thread pauses and resumes partitions. aiokafka returns the
    records of *every* partition when that set is empty at that moment, and Faust then drops
    those of the partitions it does not consider active, after aiokafka advanced their
    position: they are not delivered until the next seek. Suspected for the churn test's
    stalled partitions (docs/known-issues.md). The thread now reads the set through
    :class:`ActiveView`. (A copy taken when Faust asks also removed the stale records the
    offset guard re-seeks, which come from Faust resuming partitions before it seeks them;
    but a partition resumed meanwhile then waited for the running fetch's 1 s timeout: the
    churn test's tail grew from ~3 s to ~6 s.)"""
    from faust.transport.drivers import aiokafka as driver

    cls = driver.AIOKafkaConsumerThread
    if getattr(cls, "_pingpost_active_view", False):
        return
    orig = cls.getmany

    async def getmany(self: Any, active_partitions: Any, timeout: float) -> Any:
        if active_partitions is not None:
            active_partitions = ActiveView(active_partitions)
        # Point 10: the partitions Faust's flow control holds back (a live set; the fetcher
        # only tests membership in it).
        fetcher = getattr(self._ensure_consumer(), "_fetcher", None)
        if fetcher is not None:
            fetcher._pingpost_flow_held = self.consumer._buffered_partitions
        return await orig(self, active_partitions, timeout)

    # Faust's method replaced at run time, and our marker on its class: deliberate.
    cls.getmany = getmany  # type: ignore[method-assign]
    cls._pingpost_active_view = True  # type: ignore[attr-defined]


def _shorten_worker_fetch_wait(ms: int, min_bytes: int = 1) -> None:
    from faust.transport.drivers import aiokafka as driver

    cls = driver.AIOKafkaConsumerThread
    if getattr(cls, "_pingpost_fetch_wait_ms", None) == (ms, min_bytes):
        return
    original = getattr(cls, "_pingpost_original_create", cls._create_worker_consumer)

    def _create_worker_consumer(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        # Both read by consumer.start() when it builds the Fetcher.
        consumer._fetch_max_wait_ms = ms
        consumer._fetch_min_bytes = min_bytes
        log.info("worker consumer fetch_max_wait_ms=%d fetch_min_bytes=%d", ms, min_bytes)
        return consumer

    # Faust's method replaced at run time, and our attributes on its class: deliberate.
    cls._pingpost_original_create = original  # type: ignore[attr-defined]
    cls._create_worker_consumer = _create_worker_consumer  # type: ignore[method-assign]
    cls._pingpost_fetch_wait_ms = (ms, min_bytes)  # type: ignore[attr-defined]


def guarded(topic: str) -> bool:
    """Whether the offset guard applies to ``topic`` (everything but table changelogs)."""
    return not topic.endswith("-changelog")


class OffsetGuard:
    """Per-partition expected next offset; pure bookkeeping (unit-tested on its own)."""

    DELIVER, DROP, RESEEK = "deliver", "drop", "reseek"

    def __init__(self) -> None:
        self.expected: dict[Any, int] = {}
        #: (expected, seen) of the last jump that made us re-seek, per partition.
        self.jumps: dict[Any, tuple[int, int]] = {}
        #: Revoked partitions: nothing is delivered from them until they are sought again.
        self.fenced: set[Any] = set()
        #: Fenced partitions whose first dropped record was logged; and those reported as
        #: fenced after the rebalance was over (a missed seek).
        self.fence_logged: set[Any] = set()
        self.fence_alarmed: set[Any] = set()
        #: Where the partition's commits start when Faust does not know its committed
        #: offset (none yet, or 0, which Faust stores as none): the committed offset it was
        #: sought to, else the first offset delivered after that seek (point 3).
        self.base: dict[Any, int] = {}
        #: Holes let through (compacted or expired offsets) as ``[first, last]`` ranges, per
        #: partition: offsets the commit may pass without an ack (point 3).
        self.holes: dict[Any, list[tuple[int, int]]] = {}

    def sought(self, tp: Any, offset: int | None) -> None:
        self.fenced.discard(tp)
        self.fence_logged.discard(tp)
        self.fence_alarmed.discard(tp)
        if offset is None or offset < 0:
            self.expected.pop(tp, None)  # no committed offset: auto.offset.reset decides
        else:
            self.expected[tp] = offset

    def sought_committed(self, tp: Any, offset: int | None) -> None:
        """Faust sought the partition to its committed offset (``None``: there is none)."""
        self.sought(tp, offset)
        if offset is None or offset < 0:
            self.base.pop(tp, None)  # the first record delivered decides
        else:
            self.base[tp] = offset

    def forget(self, tp: Any) -> None:
        """The partition was revoked. Until the next seek (Faust seeks every partition it is
        assigned to its committed offset), records still arriving from it belong to a batch
        fetched before the revocation: delivering them would let Faust take the jump to
        them for a hole and commit past unprocessed records, or set an expected offset that
        makes the refetched records look already delivered."""
        self.expected.pop(tp, None)
        self.jumps.pop(tp, None)
        self.base.pop(tp, None)
        self.holes.pop(tp, None)
        self.fenced.add(tp)

    def check(self, tp: Any, offset: int) -> str:
        if tp in self.fenced:
            return self.DROP
        exp = self.expected.get(tp)
        if exp is not None and offset < exp:
            return self.DROP
        if exp is not None and offset > exp:
            if self.jumps.get(tp) != (exp, offset):
                self.jumps[tp] = (exp, offset)
                return self.RESEEK
            log.warning(
                "partition %s: offsets %d..%d do not exist (compacted or expired); "
                "continuing at %d",
                tp,
                exp,
                offset - 1,
                offset,
            )
            self.holes.setdefault(tp, []).append((exp, offset - 1))
        if exp is None:
            self.base.setdefault(tp, offset)
        self.jumps.pop(tp, None)
        self.expected[tp] = offset + 1
        return self.DELIVER


def guard_of(consumer: Any) -> OffsetGuard:
    """The consumer's offset guard (created on first use)."""
    g: OffsetGuard | None = consumer.__dict__.get("_pingpost_guard")
    if g is None:
        g = consumer.__dict__["_pingpost_guard"] = OffsetGuard()
    return g


def _guard_offsets() -> None:
    from faust.transport import consumer as cmod

    base, delegate = cmod.Consumer, cmod.ThreadDelegateConsumer
    if getattr(base, "_pingpost_guarded", False):
        return

    guard = guard_of

    orig_new_offset = base._new_offset

    def _new_offset(self: Any, tp: Any) -> int | None:
        if not guarded(tp.topic):
            return orig_new_offset(self, tp)
        g = guard(self)
        # Faust's own gap bookkeeping marks the first record *after* a hole as done too, in
        # flight or not; the guard sees every hole of a guarded topic: its ranges are used.
        self._gap.pop(tp, None)
        if tp in g.fenced:
            # Revoked and not sought since: Faust forgot its committed offset, and acks of
            # tasks ending now (events delivered before the revocation) would start the run
            # at the lowest of them, past events still in flight. Committed after the seek.
            return None
        head = self._committed_offset[tp]
        if head is None:
            head = g.base.get(tp)
        return contiguous_commit(
            self._acked[tp], self._acked_index[tp], g.holes.setdefault(tp, []), head
        )

    orig_getmany = base.getmany
    orig_seek = base.seek
    orig_seek_to_committed = delegate.seek_to_committed
    orig_revoked = base.on_partitions_revoked

    async def getmany(self: Any, timeout: float) -> AsyncIterator[tuple[Any, Any]]:
        g = guard(self)
        reseeking: set[Any] = set()
        async for tp, message in orig_getmany(self, timeout):
            if not guarded(tp.topic):
                yield tp, message
                continue
            if tp in reseeking:
                continue  # the rest of a stale batch: fetched again after the seek
            verdict = g.check(tp, message.offset)
            if verdict == OffsetGuard.DELIVER:
                yield tp, message
            elif verdict == OffsetGuard.DROP and tp in g.fenced:
                if tp not in g.fence_logged:
                    g.fence_logged.add(tp)
                    log.info(
                        "partition %s: revoked and not sought since; dropping offset %d "
                        "(a batch fetched before the revocation)",
                        tp,
                        message.offset,
                    )
                elif (
                    tp not in g.fence_alarmed
                    and not self.app.rebalancing
                    and tp in self.assignment()
                ):
                    # Every rebalance ends with a seek of each assigned partition to its
                    # committed offset: this one was missed, and its records are not
                    # processed until the next rebalance. A suspect for the open "partition
                    # left unfetched" issue (docs/known-issues.md): made loud if it happens.
                    g.fence_alarmed.add(tp)
                    log.error(
                        "partition %s is assigned and the rebalance is over, but it was "
                        "never sought to its committed offset: its records (offset %d) "
                        "are not processed; restart this worker",
                        tp,
                        message.offset,
                    )
            elif verdict == OffsetGuard.RESEEK:
                exp = g.expected[tp]
                log.warning(
                    "partition %s: got offset %d, expected %d (a batch fetched before "
                    "a rebalance); seeking back to %d",
                    tp,
                    message.offset,
                    exp,
                    exp,
                )
                reseeking.add(tp)
                await self.seek(tp, exp)

    async def seek(self: Any, partition: Any, offset: int) -> None:
        await orig_seek(self, partition, offset)
        guard(self).sought(partition, offset)

    async def seek_to_committed(self: Any) -> Any:
        offsets = await orig_seek_to_committed(self)
        g = guard(self)
        for tp, offset in offsets.items():
            g.sought_committed(tp, offset)
        return offsets

    async def on_partitions_revoked(self: Any, revoked: Any) -> None:
        g = guard(self)
        for tp in revoked:
            g.forget(tp)
        await orig_revoked(self, revoked)

    # Faust's methods replaced at run time, and our marker on its class: deliberate.
    base.getmany = getmany  # type: ignore[method-assign]
    base._new_offset = _new_offset  # type: ignore[method-assign]
    base.seek = seek  # type: ignore[method-assign]
    delegate.seek_to_committed = seek_to_committed  # type: ignore[method-assign]
    base.on_partitions_revoked = on_partitions_revoked  # type: ignore[method-assign]
    base._pingpost_guarded = True  # type: ignore[attr-defined]


def contiguous_commit(
    acked: list[int], acked_index: set[int], holes: list[tuple[int, int]], head: int | None
) -> int | None:
    """The offset to commit for a partition (point 3), or None: the end of the run of acked
    offsets — and of ``holes``, ``[first, last]`` ranges known not to exist — that starts
    at ``head``, the committed offset (None: unknown, the lowest acked offset or hole starts
    the run, as in Faust). What is committed is removed from ``acked``, ``acked_index`` and
    ``holes``; acks below ``head`` (committed already) are dropped."""
    if not acked:
        return None
    acked.sort()
    start = head if head is not None else min([acked[0], *(h[0] for h in holes)])
    done = set(acked)
    end = start
    while True:
        if end in done:
            end += 1
            continue
        hole = next((h for h in holes if h[0] <= end <= h[1]), None)
        if hole is None:
            break
        end = hole[1] + 1
    # Everything below ``end`` is either committed now or was committed before.
    gone = [o for o in acked if o < end]
    if gone:
        acked[:] = acked[len(gone) :]
        acked_index.difference_update(gone)
    holes[:] = [h for h in holes if h[1] >= end]
    return end if end > start else None
