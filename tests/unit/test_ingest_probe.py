"""Ingest's readiness probe (``/readyz``) asks the broker itself only when admission control's
end-offset fetch of the leads topic has not answered lately: at rest that fetch comes every
second anyway, and each request costs the broker ~1-1.6 ms of CPU (docs/numbers.md)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from streams.settings import load_settings
from streams.stages import ingest
from streams.stages.ingest import IngestServer

REPO = Path(__file__).resolve().parents[2]
SETTINGS = load_settings(REPO / "config" / "demo.yaml")


class Admission:
    def __init__(self, fresh: bool) -> None:
        self.fresh = fresh
        self.asked: list[float] = []

    def leads_topic_answered_within(self, seconds: float) -> bool:
        self.asked.append(seconds)
        return self.fresh


async def probe(server: IngestServer, answers: list[Exception | None], passes: int) -> int:
    """Run the probe loop for ``passes`` passes; the broker's answers in turn (None: it
    answered). Returns how many requests it sent."""
    sent = 0

    async def leads_topic_answers() -> None:
        nonlocal sent
        answer = answers[min(sent, len(answers) - 1)]
        sent += 1
        if answer is not None:
            raise answer

    server._leads_topic_answers = leads_topic_answers  # type: ignore[method-assign]
    slept = 0
    done = asyncio.Event()
    real_sleep = asyncio.sleep

    async def one_pass(_: float) -> None:
        nonlocal slept
        slept += 1
        if slept >= passes:
            done.set()
            await asyncio.Event().wait()  # park: the test cancels the loop
        await real_sleep(0)

    task = asyncio.create_task(server._probe_kafka())
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ingest.asyncio, "sleep", one_pass)
            await asyncio.wait_for(done.wait(), 5)
    finally:
        task.cancel()
    return sent


async def test_a_fresh_end_offset_fetch_answers_the_probe_without_a_request() -> None:
    server = IngestServer(SETTINGS)
    adm = Admission(fresh=True)
    server._admission = adm  # type: ignore[assignment]
    assert await probe(server, [None], passes=5) == 0
    assert server.kafka_ok and adm.asked == [ingest.PROBE_FRESH_S] * 5


async def test_without_a_fresh_fetch_the_probe_asks_and_reports_the_broker_down() -> None:
    server = IngestServer(SETTINGS)
    server._admission = Admission(fresh=False)  # type: ignore[assignment]
    assert await probe(server, [None, TimeoutError()], passes=2) == 2
    assert not server.kafka_ok and server.kafka_error == "TimeoutError"
    # ...and ready again once it answers
    server2 = IngestServer(SETTINGS)
    server2._admission = Admission(fresh=False)  # type: ignore[assignment]
    assert await probe(server2, [OSError("refused"), None], passes=2) == 2
    assert server2.kafka_ok and server2.kafka_error is None
