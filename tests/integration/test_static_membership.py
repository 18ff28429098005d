"""A crashed worker restarted under its slot's name takes its partitions back without a
rebalance (Kafka static membership, ``worker.static_membership``).

Two auction workers share the partitions; one is killed -9 while leads flow and restarted at
once, as its supervisor does. With dynamic membership the restart is a new member: the group
waits for the dead one to expire (the 10 s session timeout), then stops every worker for a
rebalance. As a static member it rejoins the generation it left; the other worker is never
revoked, and every lead still settles exactly once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from streams.tools.demo import generate_leads
from tests.integration.pipeline import Pipeline, joins, wait_for

pytestmark = pytest.mark.integration

SIM = {
    "bid_probability": 0.9,
    "latency_ms": {"median": 40, "p99": 200},
    "late_share": 0.0,
    "error_rate": 0.0,
    "post_reject_rate": 0.2,
    "post_error_rate": 0.0,
}
BUYERS = {"north": {"sim": SIM}, "south": {"sim": SIM}, "east": {"sim": SIM}}
N = 240


@pytest.fixture(scope="module")
def restarted(
    kafka_bootstrap: str, warehouse_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Pipeline, list[str], dict[str, object]]]:
    p = Pipeline(
        tmp_path_factory.mktemp("static"), kafka_bootstrap, warehouse_url, BUYERS, workers=2
    )
    logs = p.root / "run" / "logs"
    seen: dict[str, object] = {}
    try:
        p.start()
        leads = generate_leads(N, seed=404)
        ids: list[str] = []
        done = threading.Event()

        def push() -> None:
            async def go() -> None:
                for chunk in range(0, N, 20):
                    ids.extend(a["lead_id"] for a in await p.post_many(leads[chunk : chunk + 20]))
                    await asyncio.sleep(0.5)  # pacing the producer, not synchronising a test

            asyncio.run(go())
            done.set()

        pusher = threading.Thread(target=push)
        pusher.start()
        wait_for(lambda: len(ids) >= N // 4, 60, "a quarter of the leads to be accepted")
        seen["before"] = max(g for _, g in joins(logs / "worker.log") + joins(logs / "worker2.log"))
        mark = {name: (logs / f"{name}.log").stat().st_size for name in ("worker", "worker2")}
        victim = p.stack._pid("worker")
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: not p.stack.running("worker"), 10, "the killed worker to be gone")
        t_kill = time.monotonic()
        p.stack.spawn("worker", ["worker", "--role", "auction"])  # as its supervisor would
        wait_for(
            lambda: joins(logs / "worker.log", mark["worker"]),
            60,
            "the restarted worker to join its group",
        )
        seen["rejoin_s"] = time.monotonic() - t_kill
        seen["restarted"] = joins(logs / "worker.log", mark["worker"])
        pusher.join(timeout=120)
        assert done.is_set(), "pushing leads did not finish"
        p.settled(ids, timeout=120)
        seen["survivor"] = joins(logs / "worker2.log", mark["worker2"])
        yield p, ids, seen
    finally:
        p.stop()


def test_the_restart_rejoins_without_a_rebalance(
    restarted: tuple[Pipeline, list[str], dict[str, object]],
) -> None:
    _, _, seen = restarted
    print(
        f"generation {seen['before']}; restarted worker joined {seen['rejoin_s']:.1f} s "
        f"after the kill: {seen['restarted']}"
    )
    # The restarted worker joined the generation that was current before the kill ...
    assert [g for _, g in seen["restarted"]] == [seen["before"]]  # type: ignore[union-attr]
    # ... and the surviving worker never rejoined: it was not stopped for a rebalance.
    assert seen["survivor"] == []


def test_every_lead_settles_once(restarted: tuple[Pipeline, list[str], dict[str, object]]) -> None:
    p, ids, _ = restarted
    assert len(set(ids)) == N
    counts = dict(
        p.rows(
            "SELECT lead_id, count() FROM {db}.auctions FINAL "
            "WHERE lead_id IN %(ids)s GROUP BY lead_id",
            ids=ids,
        )
    )
    assert set(counts) == set(ids) and set(counts.values()) == {1}
    sold = p.rows(
        "SELECT lead_id, buyer_id, count() FROM {db}.posts FINAL "
        "WHERE status = 'accepted' AND lead_id IN %(ids)s "
        "GROUP BY lead_id, buyer_id HAVING count() > 1",
        ids=ids,
    )
    assert sold == []
