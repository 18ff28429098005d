"""Producer retries are safe (CONTRACT §1): one lead per Idempotency-Key, on the real broker.

- repeats to one ingest process answer the first attempt's lead id and publish nothing;
- a repeat another ingest process (fresh memory) receives answers the same lead and outcome;
- a repeat that reaches the leads topic anyway (an attempt that timed out at ingest but landed,
  another process) is dropped by the redact stage: one auction, one order, one result;
- while the broker is down ingest answers 503 + Retry-After within its bound, ``/readyz`` says
  so, and the retry after the broker's return gives the same lead id.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import schemas
from connectors.kafka_broker import KafkaBroker, create_topics
from streams.settings import parse_settings
from streams.stages.ingest import IngestServer
from streams.stages.ingest.idempotency import lead_id_for_key
from streams.tools.demo import generate_leads
from streams.topics import topic_specs
from tests.integration.kafka_fixture import start_test_broker
from tests.integration.pipeline import SOLAR_FLOW, TOKEN, Pipeline, wait_for

pytestmark = pytest.mark.integration

BUYERS: dict[str, dict[str, Any]] = {
    "alpha": {
        "tier": "premium",
        "sim": {
            "bid_probability": 1.0,
            "post_reject_rate": 0.0,
            "latency_ms": {"median": 10, "p99": 30},
            "exclusive_share": 0.0,
        },
    },
    "beta": {
        "tier": "standard",
        "sim": {
            "bid_probability": 1.0,
            "post_reject_rate": 0.0,
            "latency_ms": {"median": 10, "p99": 30},
            "exclusive_share": 0.0,
        },
    },
}


@pytest.fixture(scope="module")
def market(
    kafka_bootstrap: str, warehouse_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    p = Pipeline(tmp_path_factory.mktemp("idem"), kafka_bootstrap, warehouse_url, BUYERS)
    try:
        p.start()
        yield p
    finally:
        p.stop()


def _post(
    p: Pipeline,
    lead: dict[str, Any],
    key: str | None,
    *,
    wait: bool = False,
    url: str | None = None,
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return httpx.post(
        url or p.url,
        json=lead,
        headers=headers,
        params={"wait": "true"} if wait else {},
        timeout=30,
    )


def _records_of(p: Pipeline, topic: str, lead_id: str) -> list[Any]:
    return [m for m in asyncio.run(p.read_topic(topic)) if m.key == lead_id.encode()]


def test_repeats_get_the_first_lead_and_publish_nothing(market: Pipeline) -> None:
    lead = generate_leads(1, seed=501)[0]
    first = _post(market, lead, "order-501", wait=True)
    assert first.status_code == 200, first.text
    lead_id = first.json()["lead_id"]
    assert lead_id == lead_id_for_key("tests", "order-501")
    assert "Idempotent-Replayed" not in first.headers

    async def repeat_concurrently() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as c:
            return await asyncio.gather(
                *(
                    c.post(
                        market.url,
                        json=lead,
                        params={"wait": "true"},
                        headers={
                            "Authorization": f"Bearer {TOKEN}",
                            "Idempotency-Key": "order-501",
                        },
                    )
                    for _ in range(5)
                )
            )

    for r in [_post(market, lead, "order-501"), *asyncio.run(repeat_concurrently())]:
        assert r.status_code in (200, 202), r.text
        assert r.json()["lead_id"] == lead_id
        assert r.headers.get("Idempotent-Replayed") == "true"
        if r.status_code == 200:  # ?wait=true: the first attempt's outcome
            assert r.json()["outcome"] == first.json()["outcome"]
    assert len(_records_of(market, market.names.leads, lead_id)) == 1

    # The same key with another lead is refused, naming the header; nothing is published.
    other = {**lead, "zip": "10001"}
    r = _post(market, other, "order-501")
    assert r.status_code == 422 and r.json()["field"] == "Idempotency-Key", r.text
    assert len(_records_of(market, market.names.leads, lead_id)) == 1
    # A bad key is refused with the header named.
    r = _post(market, lead, "has space")
    assert r.status_code == 400 and r.json()["field"] == "Idempotency-Key", r.text


def test_another_ingest_process_answers_a_repeat_from_kafka(market: Pipeline) -> None:
    lead = generate_leads(1, seed=502)[0]
    first = _post(market, lead, "order-502", wait=True)
    assert first.status_code == 200, first.text
    lead_id = first.json()["lead_id"]
    before = len(asyncio.run(market.read_topic(market.names.leads)))

    async def via_second_process() -> httpx.Response:
        server = IngestServer(market.settings, port=0)  # fresh memory, reloads outcomes
        await server.start()
        try:
            async with httpx.AsyncClient(timeout=30) as c:

                async def answer() -> httpx.Response:
                    return await c.post(
                        f"http://127.0.0.1:{server.port}/v1/leads",
                        json=lead,
                        params={"wait": "true"},
                        headers={
                            "Authorization": f"Bearer {TOKEN}",
                            "Idempotency-Key": "order-502",
                        },
                    )

                return await answer()
        finally:
            await server.stop()

    r = asyncio.run(via_second_process())
    assert r.status_code == 200, r.text
    assert r.json()["lead_id"] == lead_id
    assert r.json()["outcome"] == first.json()["outcome"]
    assert r.json()["buyers"] == first.json()["buyers"]
    assert len(asyncio.run(market.read_topic(market.names.leads))) == before


def test_a_repeat_that_reaches_kafka_is_not_auctioned_again(market: Pipeline) -> None:
    lead = generate_leads(1, seed=503)[0]
    first = _post(market, lead, "order-503", wait=True)
    assert first.status_code == 200, first.text
    lead_id = first.json()["lead_id"]
    original = _records_of(market, market.names.leads, lead_id)
    assert len(original) == 1
    # The same record again at a later offset: what a timed-out first attempt landing late,
    # or an ingest process that did not know the key, puts on the topic.
    asyncio.run(market.produce(market.names.leads, original[0].value, key=lead_id.encode()))
    # ...and a fresh lead behind it on every partition's worker, so "settled" means the
    # redact stage has read past the repeat.
    later = asyncio.run(market.post_many(generate_leads(12, seed=504), wait=True))
    market.settled([a["lead_id"] for a in later] + [lead_id])
    assert len(_records_of(market, market.names.leads, lead_id)) == 2
    for topic in (market.names.ping_requests, market.names.posts, market.names.results):
        assert len(_records_of(market, topic, lead_id)) == 1, topic
    rows = market.rows(
        "SELECT count() FROM {db}.auctions FINAL WHERE lead_id = {l:String}", l=lead_id
    )
    assert rows[0][0] == 1
    sales = Counter(
        b
        for r in _records_of(market, market.names.deliveries, lead_id)
        for name, rec in [schemas.decode(r.value)]
        if rec["status"] == "accepted"
        for b in [rec["buyer_id"]]
    )
    assert all(n == 1 for n in sales.values()), sales


def test_broker_outage_answers_503_fast_and_the_retry_is_the_same_lead(tmp_path: Path) -> None:
    broker = start_test_broker(tmp_path / "kafka")
    try:
        settings = parse_settings(
            {
                "kafka": {"bootstrap": broker.bootstrap, "topic_prefix": "out", "partitions": 2},
                "ingest": {
                    "listen": "127.0.0.1:0",
                    "publish_timeout_s": 1.0,
                    "producers": [{"name": "tests", "token": TOKEN}],
                },
                "flows": {"solar": SOLAR_FLOW},
            },
            env={},
        )
        asyncio.run(
            create_topics(
                broker.bootstrap, [(s.name, s.partitions, s.config) for s in topic_specs(settings)]
            )
        )
        asyncio.run(_outage(broker, settings))
    finally:
        broker.stop()


async def _outage(broker: KafkaBroker, settings: Any) -> None:
    server = IngestServer(settings, port=0)
    await server.start()
    base = f"http://127.0.0.1:{server.port}"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    before, during = generate_leads(2, seed=505)
    try:
        async with httpx.AsyncClient(timeout=30) as c:
            r = await c.post(
                f"{base}/v1/leads", json=before, headers={**headers, "Idempotency-Key": "before"}
            )
            assert r.status_code == 202, r.text
            assert (await c.get(f"{base}/readyz")).status_code == 200
            pid = broker.pid()
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not broker.is_running(), 30, "the broker to die")
            started = time.monotonic()
            r = await c.post(
                f"{base}/v1/leads", json=during, headers={**headers, "Idempotency-Key": "during"}
            )
            took = time.monotonic() - started
            assert r.status_code == 503, r.text
            assert took < 3.0, took
            assert int(r.headers["Retry-After"]) >= 1
            lead_id = r.json()["lead_id"]
            assert lead_id == lead_id_for_key("tests", "during")

            async def not_ready() -> bool:
                return (await c.get(f"{base}/readyz")).status_code == 503

            deadline = time.monotonic() + 10
            while not await not_ready():
                assert time.monotonic() < deadline, "/readyz never said the broker was down"
                await asyncio.sleep(0.2)
            KafkaBroker(
                port=broker.port, controller_port=broker.controller_port, data_dir=broker.data_dir
            ).start(wait=True, timeout=90)
            deadline = time.monotonic() + 60
            while True:
                r = await c.post(
                    f"{base}/v1/leads",
                    json=during,
                    headers={**headers, "Idempotency-Key": "during"},
                )
                if r.status_code == 202:
                    break
                assert r.status_code == 503, r.text
                assert time.monotonic() < deadline, "ingest never recovered"
                await asyncio.sleep(0.5)
            assert r.json()["lead_id"] == lead_id
            assert (await c.get(f"{base}/readyz")).status_code == 200
    finally:
        await server.stop()
