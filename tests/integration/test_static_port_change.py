"""A static member restarted on another web port takes its partitions back and sells
(streams/runtime/faust_patches.py, point 12).

The group keeps a static member's assignment for its session (10 s) after the member dies,
and hands it back when the member rejoins under its name. Faust's assignment names the
worker's URL (``http://host:web_port``); restarted on another port, the worker used to die
inside aiokafka's coordinator routine on Faust's URL check and sit there, up and assigned
nothing, for good (found when ``bench/rest_side_by_side.py`` swapped a tree's ports between
rounds on a broker that had kept the group).
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from streams.tools.demo import generate_leads
from tests.integration.kafka_fixture import free_ports
from tests.integration.pipeline import Pipeline, joins, wait_for

pytestmark = pytest.mark.integration

SIM = {
    "bid_probability": 1.0,
    "latency_ms": {"median": 20, "p99": 60},
    "late_share": 0.0,
    "error_rate": 0.0,
    "post_reject_rate": 0.0,
}
BUYERS = {"north": {"sim": SIM}, "south": {"sim": SIM}}


def test_a_static_member_restarted_on_another_web_port_takes_its_partitions_back(
    kafka_bootstrap: str, warehouse_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    first_port, second_port = free_ports(2)
    p = Pipeline(
        tmp_path_factory.mktemp("static-port"),
        kafka_bootstrap,
        warehouse_url,
        BUYERS,
        web_port=first_port,
    )
    log = p.root / "run" / "logs" / "worker.log"
    try:
        p.start()
        answers = asyncio.run(p.post_many(generate_leads(5, seed=1301), wait=True))
        p.settled([a["lead_id"] for a in answers])
        generation = max(g for _, g in joins(log))
        mark = log.stat().st_size
        victim = p.stack._pid("worker")
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: not p.stack.running("worker"), 10, "the killed worker to be gone")
        # As its supervisor would, but on another port (an operator's edit of web_port).
        p.stack.spawn("worker", ["worker", "--role", "auction", "--web-port", str(second_port)])
        wait_for(lambda: joins(log, mark), 60, "the restarted worker to join its group")
        # The group handed its assignment back (no rebalance): the case being tested.
        assert [g for _, g in joins(log, mark)] == [generation], joins(log, mark)
        answers = asyncio.run(p.post_many(generate_leads(5, seed=1302), wait=True))
        p.settled([a["lead_id"] for a in answers], timeout=60)
        text = log.read_bytes()[mark:].decode(errors="replace")
        assert "Unexpected error in coordinator routine" not in text
        assert "names its previous URL" in text
    finally:
        p.stop()
