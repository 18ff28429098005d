"""Ingest's admission control reads the end offsets every 200 ms, also while no progress
report comes (streams/stages/ingest/admission.py).

Real broker, the real ``Admission`` feeds, no worker: the progress consumer's fetch then waits
up to point 8's idle wait (2 s), and the broker answers a connection's requests in order. With
one consumer for both feeds the end offsets came every ~1.2-2 s when reports were sparse: the
leads admitted meanwhile counted as waiting and ingest refused 100 leads/s offered down to
11-16 admitted, with the pipeline idle.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
import yaml
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streams.rules import admission as rules
from streams.settings import parse_settings
from streams.stages.ingest.admission import Admission
from streams.topics import TopicNames

pytestmark = pytest.mark.integration

WATCH_S = 3.0


async def _end_offset_fetches(bootstrap: str) -> int:
    raw = yaml.safe_load(Path("config/demo.yaml").read_text())
    raw["kafka"] = {**raw.get("kafka", {}), "bootstrap": bootstrap}
    raw["kafka"]["topic_prefix"] = f"adm{uuid.uuid4().hex[:6]}"
    settings = parse_settings(raw, env={})
    names = TopicNames.from_settings(settings)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(t, num_partitions=p, replication_factor=1)
                for t, p in [
                    (names.leads, 2),
                    (names.dedupe, 2),
                    (names.ping_requests, 2),
                    (names.progress, 1),
                ]
            ]
        )
    finally:
        await admin.close()
    adm = Admission(settings, names)
    calls = 0
    set_ends = adm.estimator.set_ends

    def counting(*args: object, **kwargs: object) -> None:
        nonlocal calls
        calls += 1
        set_ends(*args, **kwargs)  # type: ignore[arg-type]

    adm.estimator.set_ends = counting  # type: ignore[method-assign]
    await adm.start()
    try:
        await asyncio.sleep(1.0)  # the consumers settle into their idle fetch
        calls = 0
        await asyncio.sleep(WATCH_S)  # the span being measured, not a synchronization
        return calls
    finally:
        await adm.stop()


def test_end_offsets_come_every_interval_while_no_report_comes(kafka_bootstrap: str) -> None:
    from streams.runtime import faust_patches

    faust_patches.idle_fetch_wait()  # as in the ingest process
    fetches = asyncio.run(_end_offset_fetches(kafka_bootstrap))
    # One per ENDS_INTERVAL_S plus the fetch's own time: ~12 in 3 s; on a shared connection
    # behind the 2 s idle fetch, 1-2.
    assert fetches >= WATCH_S / rules.ENDS_INTERVAL_S / 2, f"{fetches} end-offset fetches"
