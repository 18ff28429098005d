"""HTTP ingest: ``POST /v1/leads`` (CONTRACT §1).

Token auth (``Authorization: Bearer``), a body size limit, the same validation as the Kafka
path (:func:`streams.leads.validate_lead`), then the lead is published to the leads topic as
Avro single-object encoding with key = lead_id, and ``202 {"lead_id"}`` is returned once the
broker has acknowledged it (acks=all, idempotent producer). Nothing is published for a 4xx.
``?wait=true`` holds the response until the lead's ``AuctionResult`` arrives on the results
topic (read here by a group-less consumer of every partition), or ``ingest.wait_timeout_s``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import time
import uuid
from typing import Any

import orjson
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

import schemas
from streams.admission_feed import Admission
from streams.leads import LeadError, validate_lead
from streams.settings import Settings
from streams.topics import TopicNames

__all__ = ["IngestServer", "run"]

log = logging.getLogger(__name__)


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


class IngestServer:
    def __init__(self, settings: Settings, *, port: int | None = None) -> None:
        self.settings = settings
        self.names = TopicNames.from_settings(settings)
        self.port = settings.ingest.port if port is None else port
        self._tokens = [(p.name, p.token.get_secret_value().encode())
                        for p in settings.ingest.producers]
        self._waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._results_task: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self.accepted = 0
        self._admission = Admission(settings, self.names)

    def _producer_for(self, auth: str | None) -> str | None:
        if not auth or not auth.startswith("Bearer "):
            return None
        given = auth[7:].strip().encode()
        found = None
        for name, token in self._tokens:  # compare with every token: constant time
            if hmac.compare_digest(given, token):
                found = name
        return found

    async def handle_lead(self, request: web.Request) -> web.Response:
        producer = self._producer_for(request.headers.get("Authorization"))
        if producer is None:
            return _json(401, {"error": "missing or unknown producer token", "field": None})
        limit = self.settings.ingest.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return _json(413, {"error": f"body larger than {limit} bytes", "field": None})
        try:
            # The whole body, however it arrives (several TCP segments, chunked); aiohttp
            # stops reading at client_max_size.
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _json(413, {"error": f"body larger than {limit} bytes", "field": None})
        if len(body) > limit:
            return _json(413, {"error": f"body larger than {limit} bytes", "field": None})
        try:
            raw = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _json(400, {"error": "body is not valid JSON", "field": None})
        received = int(time.time() * 1000)
        try:
            lead = validate_lead(self.settings, raw, received_at_ms=received,
                                 source=f"http:{producer}", lead_id=str(uuid.uuid4()))
        except LeadError as exc:
            return _json(400, {"error": exc.message, "field": exc.field})
        retry_after = self._admission.refuse()  # over capacity: 429, never a long queue
        if retry_after is not None:
            return web.Response(status=429, headers={"Retry-After": str(retry_after)},
                                content_type="application/json", body=orjson.dumps({
                                    "error": "pipeline over capacity; retry later",
                                    "field": None}))
        wait = request.query.get("wait", "").lower() in ("1", "true", "yes")
        fut: asyncio.Future[dict[str, Any]] | None = None
        if wait:
            fut = asyncio.get_running_loop().create_future()
            self._waiters[lead.lead_id] = fut
        record = {
            "flow": lead.flow, "lead_id": lead.lead_id,
            "created_at": raw.get("created_at"), "fields": lead.fields,
            "source": lead.source, "received_at_ms": received,
        }
        assert self._producer is not None
        try:
            await self._producer.send_and_wait(self.names.leads, schemas.encode("Lead", record),
                                               key=lead.lead_id.encode())
        except Exception as exc:
            self._waiters.pop(lead.lead_id, None)
            log.error("could not publish lead: %s", exc)
            return _json(503, {"error": "lead could not be queued; retry", "field": None})
        self.accepted += 1
        if fut is None:
            return _json(202, {"lead_id": lead.lead_id})
        try:
            result = await asyncio.wait_for(fut, self.settings.ingest.wait_timeout_s)
        except asyncio.TimeoutError:
            return _json(202, {"lead_id": lead.lead_id, "outcome": "pending", "price": None,
                               "buyers": []})
        finally:
            self._waiters.pop(lead.lead_id, None)
        return _json(200, {"lead_id": lead.lead_id, "outcome": result["outcome"],
                           "price": result["price_total"], "buyers": result["winners"],
                           "reason": result["reason"]})

    async def health(self, request: web.Request) -> web.Response:
        return _json(200, {"status": "ok", "accepted": self.accepted,
                           "admission": self._admission.status()})

    async def _read_results(self) -> None:
        assert self._consumer is not None
        async for msg in self._consumer:
            if not self._waiters:
                continue
            try:
                rec = schemas.decode_as("AuctionResult", msg.value)
            except schemas.SchemaError:
                continue
            fut = self._waiters.get(rec["lead_id"])
            if fut is not None and not fut.done():
                fut.set_result(rec)

    async def start(self) -> None:
        bootstrap = self.settings.kafka.bootstrap
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                          enable_idempotence=True, linger_ms=0)
        await self._producer.start()
        try:
            parts = await asyncio.wait_for(self._producer.partitions_for(self.names.results), 30)
        except Exception as exc:
            await self._producer.stop()
            raise RuntimeError(f"topic {self.names.results} is not available ({exc}): run "
                               "`pingpost topics create` first") from None
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                          enable_auto_commit=False)
        await self._consumer.start()
        tps = [TopicPartition(self.names.results, p) for p in sorted(parts)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        self._results_task = asyncio.create_task(self._read_results())
        await self._admission.start()
        app = web.Application(client_max_size=self.settings.ingest.max_body_bytes + 1)
        app.router.add_post("/v1/leads", self.handle_lead)
        app.router.add_get("/healthz", self.health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.ingest.host, self.port)
        await site.start()
        if self.port == 0:
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._results_task is not None:
            self._results_task.cancel()
            try:
                await self._results_task
            except (asyncio.CancelledError, Exception):
                pass
        await self._admission.stop()
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()


def run(settings: Settings, port: int | None = None) -> None:
    async def main() -> None:
        server = IngestServer(settings, port=port)
        await server.start()
        print(f"ingest listening on http://{settings.ingest.host}:{server.port}/v1/leads",
              flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:  # pragma: no cover - uvloop is a pinned dependency
        asyncio.run(main())
