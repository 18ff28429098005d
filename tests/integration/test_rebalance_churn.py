"""Workers joining, leaving and crashing while leads stream in: no lead is skipped.

Each of these broke it once (streams/runtime/faust_patches.py, streams/stages/auction.py): a batch fetched
before a rebalance iterated after the seek back to the committed offsets (Faust took the jump
for a hole and committed past records nobody processed); a commit past an event still in
flight (faust-streaming #606), lost when its worker stopped; an auction recorded as closed
without its post order when a worker was killed between the two; a partition left unfetched
after a rebalance. Every lead must settle, once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator

import orjson
import pytest

import schemas
from streams.tools.demo import generate_leads
from tests.integration.pipeline import Pipeline, wait_for, zone_at_noon

pytestmark = pytest.mark.integration

SIM = {
    "bid_probability": 0.9,
    "latency_ms": {"median": 30, "p99": 200},
    "late_share": 0.0,
    "error_rate": 0.0,
    "post_reject_rate": 0.2,
    "post_error_rate": 0.0,
}
BUYERS = {b: {"sim": {**SIM, "exclusive_share": 0.2}} for b in ("a", "b", "c")}
# A capped buyer: its posts wait for a decision from the cap owner, whose agent every
# rebalance pauses. Such a post is requeued rather than holding the rebalance up; the cap
# must hold through the joins, leaves and the crash.
CAP = 120
BUYERS["a"]["caps"] = {"leads_per_hour": CAP, "leads_per_day": CAP, "timezone": zone_at_noon()}
N = 900
# When the killed worker's replacement was started (epoch s): the killed worker's pings all
# reached their buyers before it (it was seen gone first), and the replacement pings nothing
# before it has started and joined the group. (The moment before the kill is no split: the
# worker runs until the signal lands, and CI once saw a buyer stamp a ping it wrote then 8 ms
# after that moment.)
RESTARTED_AT: list[float] = []


@pytest.fixture(scope="module")
def churned(
    kafka_bootstrap: str, warehouse_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Pipeline, list[str]]]:
    # Dynamic membership: every change below is a rebalance (a join, a clean leave, a dead
    # member expiring), the path scale-out and scale-in take. (test_static_membership.py:
    # a crashed worker restarted under its slot's name, without a rebalance.)
    p = Pipeline(
        tmp_path_factory.mktemp("churn"),
        kafka_bootstrap,
        warehouse_url,
        BUYERS,
        worker={"static_membership": False},
    )
    try:
        p.start()
        leads = generate_leads(N, seed=77)
        ids: list[str] = []
        done = threading.Event()

        def push() -> None:
            async def go() -> None:
                for c in range(0, N, 20):
                    ids.extend(a["lead_id"] for a in await p.post_many(leads[c : c + 20]))
                    await asyncio.sleep(0.4)  # pacing the producer, not synchronising a test

            asyncio.run(go())
            done.set()

        pusher = threading.Thread(target=push)
        pusher.start()

        def after(n: int) -> None:  # membership changes happen while leads keep arriving
            wait_for(lambda: len(ids) >= n, 60, f"{n} leads accepted")

        after(N // 8)
        p.stack.spawn("worker2", ["worker", "--role", "auction"])  # join: rebalance + restore
        after(N // 3)
        p.stack.stop("worker2")  # clean leave
        after(N // 2)
        os.kill(p.stack._pid("worker"), signal.SIGKILL)  # crash
        wait_for(lambda: not p.stack.running("worker"), 10, "the killed worker to be gone")
        p.stack.spawn("worker", ["worker", "--role", "auction"])
        RESTARTED_AT.append(time.time())
        after(3 * N // 4)
        p.stack.spawn("worker2", ["worker", "--role", "auction"])
        pusher.join(timeout=120)
        assert done.is_set(), "pushing leads did not finish"
        t0 = time.monotonic()
        p.settled(ids, timeout=180)
        print(f"settled {N} leads {time.monotonic() - t0:.1f}s after the last push")
        yield p, ids
    finally:
        p.stop()


def test_every_lead_is_auctioned_exactly_once(churned: tuple[Pipeline, list[str]]) -> None:
    p, ids = churned
    assert len(set(ids)) == N
    counts = dict(
        p.rows(
            "SELECT lead_id, count() FROM {db}.auctions FINAL "
            "WHERE lead_id IN %(ids)s GROUP BY lead_id",
            ids=ids,
        )
    )
    assert set(counts) == set(ids)
    # Every result event tells the same story for its lead, however often it was redelivered
    # — except that a post which timed out and was accepted after all adds its buyer to the
    # winners (reconciled: streams/stages/post.py): winners only ever grow, and the last result is
    # what the auctions table holds.
    seen: dict[str, set[str]] = {}
    for rec in asyncio.run(p.read_topic(p.names.results)):
        r = schemas.decode_as("AuctionResult", rec.value)
        before = seen.setdefault(r["lead_id"], set(r["winners"]))
        assert before <= set(r["winners"]), (r["lead_id"], before, r["winners"])
        seen[r["lead_id"]] = set(r["winners"])
    winners = dict(
        p.rows("SELECT lead_id, winners FROM {db}.auctions FINAL WHERE lead_id IN %(ids)s", ids=ids)
    )
    assert {k: set(v) for k, v in winners.items()} == seen


def test_the_workers_really_churned(churned: tuple[Pipeline, list[str]]) -> None:
    """The group went through the membership changes of the scenario, each with its
    rebalance: generation 2 (a join), 3 (a clean leave), 4 (the killed worker restarted,
    the dead member expired; the last join usually lands in the same rebalance)."""
    import re

    p, _ = churned
    logs = "".join(
        f.read_text(errors="replace") for f in (p.root / "run" / "logs").glob("worker*.log")
    )
    generations = [int(g) for g in re.findall(r"\(generation (\d+)\)", logs)]
    assert max(generations, default=0) >= 4
    # The safety nets: how often they acted (the guard re-seeks after most rebalances:
    # Faust resumes partitions before seeking them; the watchdog should not need to act).
    print(
        f"guard re-seeks: {logs.count('seeking back to')}, watchdog: "
        f"{logs.count('none delivered for') + logs.count('has not moved for')}"
    )


def test_the_cap_holds_through_the_churn(churned: tuple[Pipeline, list[str]]) -> None:
    p, ids = churned
    rows = p.rows(
        "SELECT lead_id FROM {db}.posts FINAL WHERE status = 'accepted' "
        "AND buyer_id = 'a' AND lead_id IN %(ids)s",
        ids=ids,
    )
    assert len(rows) == len({r[0] for r in rows})  # never the same lead twice
    # Never over the cap, and binding: a third of 900 leads would go to 'a' without it. (A
    # slot can stay held by a lead whose worker was killed or whose post window ran out
    # during a rebalance until the hold expires (120 s): the cap errs on the low side.)
    assert CAP - 5 <= len(rows) <= CAP
    logs = "".join(
        f.read_text(errors="replace") for f in (p.root / "run" / "logs").glob("worker*.log")
    )
    print(f"posts requeued during rebalances: {logs.count('requeued')}")


def test_each_auction_closes_once_and_only_a_round_lost_in_the_crash_is_pinged_again(
    churned: tuple[Pipeline, list[str]],
) -> None:
    """Through the crash and the rebalances: one post order per lead (a re-sent order is
    the same order: same candidates). No buyer received the same ping twice, but for the
    rounds the killed worker had in flight (a round is one record, written when its last
    answer is in: docs/guarantees.md): those were pinged once more after the kill, and
    their auction was decided on the second round's answers (the first's were never
    recorded). None was lost twice."""
    p, ids = churned
    orders: dict[str, set[bytes]] = {}
    for rec in asyncio.run(p.read_topic(p.names.posts)):
        o = schemas.decode_as("PostOrder", rec.value)
        orders.setdefault(o["lead_id"], set()).add(rec.value)
    assert set(orders) == set(ids)
    twice = {lead: len(v) for lead, v in orders.items() if len(v) > 1}
    assert not twice, f"{len(twice)} leads closed more than once: {list(twice.items())[:5]}"
    [restarted_at] = RESTARTED_AT
    repinged: set[str] = set()
    for buyer in BUYERS:
        times: dict[str, list[float]] = {}
        for r in p.received(buyer, "ping"):
            times.setdefault(orjson.loads(r["body"])["ping_id"], []).append(r["received_at"])
        for ping_id, at in times.items():
            if len(at) > 1:
                assert len(at) == 2 and min(at) < restarted_at < max(at), (buyer, ping_id, at)
                repinged.add(ping_id)
    if repinged:
        rows = p.rows(
            "SELECT ping_id, toUnixTimestamp64Milli(sent_at) FROM {db}.pings FINAL "
            "WHERE ping_id IN %(ids)s",
            ids=sorted(repinged),
        )
        assert {r[0] for r in rows} == repinged
        assert all(sent_ms / 1000 > restarted_at for _, sent_ms in rows)
    lost = p.rows(
        "SELECT count() FROM {db}.auctions FINAL WHERE lead_id IN %(ids)s "
        "AND startsWith(reason, 'ping round lost')",
        ids=ids,
    )[0][0]
    assert lost == 0
    print(f"pings sent again for rounds lost in the crash: {len(repinged)}")
