"""A worker killed with SIGKILL mid-stream: nothing is lost and nothing is sold twice.

Two auction workers share the partitions; one is killed -9 while leads are in their ping
rounds and post waterfalls, then started again. Every lead must settle exactly once (one
outcome, even across redelivered result events), every sale must match accepted posts, an
exclusive lead must have exactly one accepting buyer, and no buyer may receive a lead under
two post_ids.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import schemas
from streams.tools.demo import generate_leads
from tests.integration.kafka_fixture import free_port_block
from tests.integration.pipeline import Pipeline, wait_for

pytestmark = pytest.mark.integration

SIM = {
    "bid_probability": 0.9,
    "latency_ms": {"median": 60, "p99": 300},
    "late_share": 0.02,
    "error_rate": 0.02,
    "post_reject_rate": 0.3,
    "post_error_rate": 0.05,
}
BUYERS = {
    "north": {"tier": "premium", "sim": {**SIM, "exclusive_share": 0.5}},
    "south": {"sim": {**SIM, "exclusive_share": 0.2}},
    "east": {"sim": {**SIM, "exclusive_share": 0.0}},
    "west": {"sim": {**SIM, "exclusive_share": 0.0}},
}
N = 300


@pytest.fixture(scope="module")
def crashed(
    kafka_bootstrap: str, warehouse_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Pipeline, list[str]]]:
    # Faust's web servers on: sink, metrics (not run here), worker, worker2 on 4 free ports.
    p = Pipeline(
        tmp_path_factory.mktemp("recovery"),
        kafka_bootstrap,
        warehouse_url,
        BUYERS,
        workers=2,
        web_port=free_port_block(4) + 2,
    )
    try:
        p.start()
        leads = generate_leads(N, seed=303)
        ids: list[str] = []
        done = threading.Event()

        def push() -> None:
            async def go() -> None:
                for chunk in range(0, N, 30):
                    ids.extend(a["lead_id"] for a in await p.post_many(leads[chunk : chunk + 30]))
                    await asyncio.sleep(0.25)  # pacing the producer, not synchronising a test

            asyncio.run(go())
            done.set()

        pusher = threading.Thread(target=push)
        pusher.start()
        victim = p.stack._pid("worker")
        assert victim is not None
        # Kill once the victim has leads in flight: results are flowing and more keep coming.
        wait_for(lambda: len(ids) >= N // 3, 60, "a third of the leads to be accepted")
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: not p.stack.running("worker"), 10, "the killed worker to be gone")
        pusher.join(timeout=120)
        assert done.is_set(), "pushing leads did not finish"
        p.stack.spawn("worker", ["worker", "--role", "auction"])  # the restarted worker
        p.settled(ids, timeout=180)
        yield p, ids
    finally:
        p.stop()


def test_every_lead_settles_with_one_consistent_outcome(
    crashed: tuple[Pipeline, list[str]],
) -> None:
    p, ids = crashed
    assert len(set(ids)) == N
    rows = p.rows(
        "SELECT lead_id, outcome, winners FROM {db}.auctions FINAL WHERE lead_id IN %(ids)s",
        ids=ids,
    )
    assert len(rows) == N
    # Redelivery may re-emit a lead's result; every copy must tell the same story, except
    # that a post which timed out and was accepted after all adds its buyer to the winners
    # (reconciled: streams/stages/post.py): winners only ever grow, and the last result is
    # what the auctions table holds (as in test_rebalance_churn).
    seen: dict[str, set[str]] = {}
    for rec in asyncio.run(p.read_topic(p.names.results)):
        r = schemas.decode_as("AuctionResult", rec.value)
        before = seen.setdefault(r["lead_id"], set(r["winners"]))
        assert before <= set(r["winners"]), (r["lead_id"], before, r["winners"])
        seen[r["lead_id"]] = set(r["winners"])
    assert set(ids) <= set(seen)
    assert {lead: set(w) for lead, _, w in rows} == {lead: seen[lead] for lead in ids}


def test_no_double_sale_after_the_crash(crashed: tuple[Pipeline, list[str]]) -> None:
    p, ids = crashed
    winners = {
        lid: (outcome, sorted(ws))
        for lid, outcome, ws in p.rows(
            "SELECT lead_id, outcome, winners FROM {db}.auctions FINAL WHERE lead_id IN %(ids)s",
            ids=ids,
        )
    }
    accepted: dict[str, set[str]] = defaultdict(set)
    for lid, buyer in p.rows(
        "SELECT lead_id, buyer_id FROM {db}.posts FINAL "
        "WHERE status = 'accepted' AND lead_id IN %(ids)s",
        ids=ids,
    ):
        accepted[lid].add(buyer)
    for lid, (outcome, ws) in winners.items():
        assert sorted(accepted.get(lid, set())) == ws, lid
        if outcome == "sold_exclusive":
            assert len(ws) == 1
        assert len(ws) <= 3
    post_ids: dict[tuple[str, str], set[str]] = defaultdict(set)
    for buyer in BUYERS:
        for req in p.received(buyer, "post"):
            body: dict[str, Any] = req["json"]
            post_ids[(body["lead_id"], buyer)].add(body["post_id"])
            assert req["headers"]["Idempotency-Key"] == body["post_id"]
    assert all(len(v) == 1 for v in post_ids.values())
    # Exclusive leads: no buyer other than the winner was ever told it had bought the lead.
    for lid, (outcome, ws) in winners.items():
        if outcome == "sold_exclusive":
            assert accepted[lid] == set(ws)


def test_each_worker_serves_on_its_own_web_port(crashed: tuple[Pipeline, list[str]]) -> None:
    """``worker.web_port`` reaches the workers ``pingpost up`` starts, one port each (the
    restarted worker got its port back)."""
    p, _ = crashed
    base = p.settings.worker.web_port

    def answers(port: int) -> int | None:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code
        except httpx.ConnectError:
            return None  # the restarted worker may still be starting (it was spawned last)

    for name, port in [("worker", base), ("worker2", base + 1), ("sink", base - 2)]:
        assert p.stack.running(name)
        status = wait_for(lambda port=port: answers(port), 60, f"{name}'s web port {port}")
        assert status == 200, (name, port, status)
