"""A whole pingpost pipeline for integration tests, on the session's real Kafka and warehouse.

Each pipeline gets its own topic prefix, Faust app id, ClickHouse database, run dir and
ports, and runs every component as the real CLI process (simulated buyers, auction
worker(s), sink worker, ingest) — the same processes the demo runs.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import clickhouse_connect
import httpx
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from streams.settings import Settings, parse_settings
from streams.tools.stack import Stack
from streams.topics import TopicNames
from tests.integration.kafka_fixture import free_ports

TOKEN = "test-producer-token-123"

SOLAR_FLOW: dict[str, Any] = yaml.safe_load(Path("config/demo.yaml").read_text())["flows"]["solar"]


JOINED = re.compile(r"\[(\d+)\] \[INFO\] Joined group '[^']+' \(generation (\d+)\)")


def joins(log: Path, since: int = 0) -> list[tuple[int, int]]:
    """(pid, generation) of every 'Joined group' line after byte ``since`` of a worker's log."""
    with log.open("rb") as f:
        f.seek(since)
        text = f.read().decode(errors="replace")
    return [(int(pid), int(gen)) for pid, gen in JOINED.findall(text)]


def zone_at_noon(now: datetime | None = None) -> str:
    """An ``Etc/GMT±N`` zone where it is about noon now, for a test's daily caps: their day
    does not roll over while the test runs, as UTC's midnight can during a CI run."""
    offset = 12 - (now or datetime.now(UTC)).hour  # local = UTC + offset, -11..12
    # POSIX spelling: Etc/GMT-5 is five hours ahead of UTC.
    return f"Etc/GMT{-offset:+d}" if offset else "Etc/GMT"


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``predicate`` until truthy (returns its value) or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class Pipeline:
    def __init__(
        self,
        root: Path,
        kafka_bootstrap: str,
        warehouse_url: str,
        buyers: dict[str, dict[str, Any]],
        *,
        flow: dict[str, Any] | None = None,
        workers: int = 1,
        metrics: dict[str, Any] | None = None,
        alerts: list[dict[str, Any]] | None = None,
        web_port: int = 0,
        worker: dict[str, Any] | None = None,
        overrides: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """``overrides``: keys merged into a config section, e.g. ``{"worker": {...}}``."""
        self.name = "t" + uuid.uuid4().hex[:8]
        ports = free_ports(len(buyers) + 2)
        self.ingest_port = ports[0]
        self.metrics_port = ports.pop()
        #: The metrics role runs only when the test configures it (saves CPU elsewhere).
        self.with_metrics = metrics is not None
        buyer_cfgs, sims = [], {}
        for (bid, spec), port in zip(buyers.items(), ports[1:]):
            spec = dict(spec)
            sim = spec.pop("sim", {})
            buyer_cfgs.append(
                {
                    "id": bid,
                    "flows": ["solar"],
                    "ping_url": f"http://127.0.0.1:{port}/ping",
                    "post_url": f"http://127.0.0.1:{port}/post",
                    **spec,
                }
            )
            sims[bid] = {"port": port, **sim}
        self.raw: dict[str, Any] = {
            "kafka": {
                "bootstrap": kafka_bootstrap,
                "topic_prefix": self.name,
                "partitions": 6,
                "app_id": self.name,
            },
            "clickhouse": {
                "url": warehouse_url,
                "database": self.name,
                "batch_rows": 500,
                "batch_seconds": 0.3,
            },
            "ingest": {
                "listen": f"127.0.0.1:{self.ingest_port}",
                "max_body_bytes": 4096,
                "producers": [{"name": "tests", "token": TOKEN}],
                "wait_timeout_s": 20,
            },
            "worker": {"web_port": web_port, **(worker or {})},
            "flows": {"solar": flow or SOLAR_FLOW},
            "buyers": buyer_cfgs,
            "simulator": {"seed": 11, "buyers": sims},
            "metrics": {**(metrics or {}), "listen": f"127.0.0.1:{self.metrics_port}"},
            "alerts": alerts or [],
        }
        for section, values in (overrides or {}).items():
            self.raw[section] = {**self.raw.get(section, {}), **values}
        self.settings: Settings = parse_settings(self.raw, env={})
        self.names = TopicNames.from_settings(self.settings)
        self.root = root / self.name
        self.root.mkdir(parents=True)
        self.config_path = self.root / "pingpost.yaml"
        self.config_path.write_text(yaml.safe_dump(self.raw))
        self.stack = Stack(self.settings, self.config_path, self.root / "run", say=lambda m: None)
        self.workers = workers
        self.url = f"http://127.0.0.1:{self.ingest_port}/v1/leads"
        self.db = self.name
        self.ch = clickhouse_connect.get_client(  # sessionless, as pingpost's own clients
            host="127.0.0.1",
            port=int(warehouse_url.rsplit(":", 1)[1]),
            autogenerate_session_id=False,
        )

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> Pipeline:
        self.stack.up(
            embedded_warehouse=False,
            start_kafka=False,
            workers=self.workers,
            with_metrics=self.with_metrics,
        )
        return self

    def stop(self) -> None:
        self.stack.down(stop_kafka=False)
        self.ch.close()

    def logs(self) -> str:
        out = []
        for f in sorted((self.root / "run" / "logs").glob("*.log")):
            out.append(
                f"=== {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-40:])
            )
        return "\n".join(out)

    # -- ingest ----------------------------------------------------------------------
    def post(
        self,
        body: Any,
        *,
        wait: bool = False,
        token: str | None = TOKEN,
        raw: bytes | None = None,
        content_type: str | None = None,
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if content_type is not None:
            headers["Content-Type"] = content_type
        params = {"wait": "true"} if wait else {}
        if raw is not None:
            return httpx.post(self.url, content=raw, headers=headers, params=params, timeout=30)
        return httpx.post(self.url, json=body, headers=headers, params=params, timeout=30)

    async def post_many(
        self, leads: list[dict[str, Any]], *, wait: bool = False, concurrency: int = 20
    ) -> list[dict[str, Any]]:
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(timeout=60) as client:

            async def one(lead: dict[str, Any]) -> dict[str, Any]:
                async with sem:
                    for _ in range(60):  # a 429 (over capacity) is retried, as producers do
                        r = await client.post(
                            self.url,
                            json=lead,
                            params={"wait": "true"} if wait else {},
                            headers={"Authorization": f"Bearer {TOKEN}"},
                        )
                        if r.status_code != 429:
                            break
                        await asyncio.sleep(float(r.headers["Retry-After"]))
                    assert r.status_code in (200, 202), r.text
                    return r.json()  # type: ignore[no-any-return]

            return await asyncio.gather(*(one(x) for x in leads))

    # -- simulated buyers --------------------------------------------------------------
    def sim(self, buyer_id: str) -> str:
        return f"http://127.0.0.1:{self.settings.simulator.buyers[buyer_id].port}"

    def received(self, buyer_id: str, kind: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.sim(buyer_id)}/__sim/received", params={"kind": kind}, timeout=30)
        r.raise_for_status()
        return r.json()  # type: ignore[no-any-return]

    # -- warehouse -------------------------------------------------------------------
    def rows(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        return list(self.ch.query(sql.replace("{db}", self.db), parameters=params).result_rows)

    def settled(self, lead_ids: list[str], timeout: float = 90) -> None:
        """Wait until every lead has its auction row and the rows of its lead, pings and
        posts: the sink reads those from other topics than the result, so they may land in a
        later insert than the ``auctions`` row (a test that read ``pings`` just after the
        auction rows appeared once found 5 of 24 leads' pings not stored yet). A result
        counts the buyers its first round pinged and the posts it made; their rows are at
        least that many (buyers filtered out and backup waves add rows), except for a round
        lost with its worker (nobody's answer recorded), and posts counted but never
        answered (the lead settled on an internal error, or without its PII). A duplicate
        (dedupe's result) has no lead row."""
        short: list[str] = []

        def complete() -> bool:
            results = self.rows(
                "SELECT lead_id, if(close_reason = 'round_lost', 0, pinged), "
                "if(startsWith(reason, 'internal error') OR startsWith(reason, 'PII unavailable'),"
                " 0, post_attempts), close_reason != 'duplicate' "
                "FROM {db}.auctions FINAL WHERE lead_id IN %(ids)s",
                ids=lead_ids,
            )
            if len(results) != len(lead_ids):
                short[:] = [f"{len(results)} of {len(lead_ids)} auctions stored"]
                return False
            stored = {
                table: dict(
                    self.rows(
                        f"SELECT lead_id, count() FROM {{db}}.{table} FINAL "
                        "WHERE lead_id IN %(ids)s GROUP BY lead_id",
                        ids=lead_ids,
                    )
                )
                for table in ("leads", "pings", "posts")
            }
            short[:] = [
                f"{lead}: {stored['leads'].get(lead, 0)} lead rows, "
                f"{stored['pings'].get(lead, 0)} ping rows of {pinged} pinged, "
                f"{stored['posts'].get(lead, 0)} post rows of {posts} posts"
                for lead, pinged, posts, has_lead in results
                if stored["pings"].get(lead, 0) < pinged
                or stored["posts"].get(lead, 0) < posts
                or stored["leads"].get(lead, 0) < has_lead
            ]
            return not short

        try:
            wait_for(complete, timeout, f"{len(lead_ids)} settled auctions, leads, pings and posts")
        except AssertionError as exc:
            detail = "\n".join(short[:20])
            raise AssertionError(
                f"{exc}\n{detail}\n{self.trace_missing(lead_ids)}\n{self.logs()}"
            ) from None

    def trace_missing(self, lead_ids: list[str]) -> str:
        """For leads without a settled auction: how far each got, topic by topic."""
        import schemas

        done = {
            r[0]
            for r in self.rows(
                "SELECT lead_id FROM {db}.auctions FINAL WHERE lead_id IN %(ids)s", ids=lead_ids
            )
        }
        missing = [x for x in lead_ids if x not in done]
        n = self.names
        seen: dict[str, list[str]] = {x: [] for x in missing}
        for topic in (n.leads, n.ping_requests, n.bids, n.posts, n.deliveries, n.results):
            for rec in asyncio.run(self.read_topic(topic)):
                try:
                    name, value = schemas.decode(rec.value)
                except Exception:
                    continue
                lead = value.get("lead_id") if isinstance(value, dict) else None
                if lead in seen:
                    seen[lead].append(f"{topic.split('.')[-1]}:{rec.partition}:{rec.offset} {name}")
        lines = [f"{len(missing)} of {len(lead_ids)} leads unsettled:"]
        lines += [
            f"  {lead}: {', '.join(stages) or 'nowhere'}"
            for lead, stages in list(seen.items())[:20]
        ]
        furthest: dict[str, int] = {}
        for stages in seen.values():
            key = stages[-1].split(" ")[0].rsplit(":", 1)[0] if stages else "nowhere"
            furthest[key] = furthest.get(key, 0) + 1
        lines.append(f"  furthest stage (topic:partition -> leads): {furthest}")
        lines.append(f"  group offsets (committed / end): {asyncio.run(self.group_offsets())}")
        return "\n".join(lines)

    async def group_offsets(self) -> dict[str, str]:
        """The auction workers' committed offset and the end offset of every partition of the
        lead-keyed input topics (a stuck partition shows committed < end)."""
        c = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka.bootstrap,
            group_id=self.settings.kafka.app_id,
            enable_auto_commit=False,
        )
        await c.start()
        try:
            await c._client.force_metadata_update()
            n, out = self.names, {}
            for topic in (n.leads, n.ping_requests, n.bids, n.posts):
                tps = [
                    TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or ())
                ]
                ends = await c.end_offsets(tps)
                for tp in tps:
                    out[f"{topic.split('.')[-1]}:{tp.partition}"] = (
                        f"{await c.committed(tp)}/{ends[tp]}"
                    )
            return out
        finally:
            await c.stop()

    # -- kafka -----------------------------------------------------------------------
    async def read_topic(self, topic: str) -> list[Any]:
        """Every record currently in ``topic`` (from the beginning to the end offsets)."""
        c = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka.bootstrap, group_id=None, enable_auto_commit=False
        )
        await c.start()
        try:
            parts = c.partitions_for_topic(topic) or set()
            if not parts:
                await c._client.force_metadata_update()
                parts = c.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in parts]
            c.assign(tps)
            await c.seek_to_beginning(*tps)
            ends = await c.end_offsets(tps)
            out: list[Any] = []
            remaining = {tp for tp in tps if ends[tp] > 0}
            while remaining:
                batch = await c.getmany(*remaining, timeout_ms=1000)
                for msgs in batch.values():
                    out.extend(msgs)
                remaining = {tp for tp in remaining if await c.position(tp) < ends[tp]}
            return out
        finally:
            await c.stop()

    async def end_offsets(self, topic: str) -> int:
        return len(await self.read_topic(topic))

    async def produce(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        p = AIOKafkaProducer(bootstrap_servers=self.settings.kafka.bootstrap, acks="all")
        await p.start()
        try:
            await p.send_and_wait(topic, value, key=key)
        finally:
            await p.stop()
