"""HTTP ingest: ``POST /v1/leads`` (CONTRACT §1).

Token auth (``Authorization: Bearer``), a body size limit, the same validation as the Kafka
path (:func:`streams.rules.leads.validate_lead`), then the lead is published to the leads topic as
Avro single-object encoding with key = lead_id, and ``202 {"lead_id"}`` is returned once the
broker has acknowledged it (acks=all, idempotent producer). Nothing is published for a 4xx.

Retries are safe (streams/stages/ingest/idempotency.py): a request with an ``Idempotency-Key`` (or its own
``lead_id``) that repeats an earlier one gets the first attempt's ``lead_id`` and outcome and
creates no second lead. Publishing is bounded by ``ingest.publish_timeout_s``: past it the
answer is ``503`` + ``Retry-After`` (the broker is down or slow), and ``/readyz`` answers 503
while the broker cannot be reached. ``?wait=true`` holds the response until the lead's
``AuctionResult`` arrives on the results topic (read here by a group-less consumer of every
partition), or ``ingest.wait_timeout_s``.
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
from aiokafka.errors import KafkaError
from aiokafka.protocol.metadata import MetadataRequest
from aiokafka.structs import TopicPartition

import schemas
from streams.rules.leads import LeadError, validate_lead
from streams.runtime import faust_patches
from streams.runtime.feeds import GROUPLESS_CONSUMER
from streams.settings import Settings
from streams.stages.ingest.admission import Admission
from streams.stages.ingest.idempotency import (
    KEY_HEADER,
    KeyError_,
    LeadMemory,
    Remembered,
    check_key,
    fingerprint,
    lead_id_for_key,
)
from streams.topics import TopicNames

__all__ = ["IngestServer", "run"]

log = logging.getLogger(__name__)

#: The broker probe behind ``/readyz``: how often, and how long one may take.
PROBE_INTERVAL_S = 1.0
PROBE_TIMEOUT_S = 2.0
#: An end-offset fetch of the leads topic this recent answers the probe (seconds).
PROBE_FRESH_S = 1.5
#: The listening socket's accept queue (the kernel caps it at net.core.somaxconn).
LISTEN_BACKLOG = 2048
#: How often the event-loop stall watch wakes up.
LOOP_TICK_S = 0.25


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def _not_json(content_type: str | None) -> str | None:
    """Why a request's Content-Type is not JSON (None: it is). ``application/json`` or
    ``application/<x>+json``, any case, with an optional ``charset`` that must be UTF-8. A
    request without a Content-Type is read as JSON (lenient for minimal clients)."""
    if content_type is None:
        return None
    mime, *params = (p.strip() for p in content_type.split(";"))
    mime = mime.lower()
    if mime != "application/json" and not (
        mime.startswith("application/") and mime.endswith("+json")
    ):
        return f"Content-Type must be application/json, not '{mime[:100]}'"
    for param in params:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip().strip('"').lower() not in (
            "utf-8",
            "utf8",
        ):
            return "JSON must be UTF-8 (charset=utf-8)"
    return None


class IngestServer:
    def __init__(self, settings: Settings, *, port: int | None = None) -> None:
        self.settings = settings
        self.names = TopicNames.from_settings(settings)
        self.port = settings.ingest.port if port is None else port
        self._tokens = [
            (p.name, p.token.get_secret_value().encode()) for p in settings.ingest.producers
        ]
        self._memory = LeadMemory(max_age_s=settings.ingest.idempotency_window_s)
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._results_task: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self.accepted = 0
        self.unavailable = 0
        self.kafka_ok = True
        self.kafka_error: str | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._loop_task: asyncio.Task[None] | None = None
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
        arrived = time.monotonic()
        producer = self._producer_for(request.headers.get("Authorization"))
        if producer is None:
            return _json(401, {"error": "missing or unknown producer token", "field": None})
        if (why := _not_json(request.headers.get("Content-Type"))) is not None:
            return _json(415, {"error": why, "field": None})
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
        read = time.monotonic()  # the request is whole: from here on the time is ingest's
        try:
            raw = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _json(400, {"error": "body is not valid JSON", "field": None})
        key = request.headers.get(KEY_HEADER)
        if key is not None:
            try:
                check_key(key)
            except KeyError_ as exc:
                return _json(400, {"error": f"{KEY_HEADER} {exc}", "field": KEY_HEADER})
        received = int(time.time() * 1000)
        default_id = lead_id_for_key(producer, key) if key is not None else str(uuid.uuid4())
        try:
            lead = validate_lead(
                self.settings,
                raw,
                received_at_ms=received,
                source=f"http:{producer}",
                lead_id=default_id,
            )
        except LeadError as exc:
            return _json(400, {"error": exc.message, "field": exc.field})
        wait = request.query.get("wait", "").lower() in ("1", "true", "yes")
        # One lead per key: a repeat (same Idempotency-Key, or the same producer-supplied
        # lead_id) gets the first attempt's answer and publishes nothing this process knows
        # was published (streams/stages/ingest/idempotency.py).
        retried = key is not None or raw.get("lead_id") is not None
        entry = self._memory.entry(lead.lead_id)
        fp = fingerprint(raw)
        if entry.fingerprint is None:
            entry.fingerprint = fp
        elif retried and entry.fingerprint != fp:
            field = KEY_HEADER if key is not None and raw.get("lead_id") is None else "lead_id"
            return _json(
                422,
                {
                    "error": "a different lead was already sent with this "
                    f"{field} (lead {lead.lead_id})",
                    "field": field,
                },
            )
        headers = {"Idempotent-Replayed": "true"} if entry.published or entry.publishing else {}
        fut: asyncio.Future[dict[str, Any]] | None = None
        if wait and entry.result is None:
            fut = asyncio.get_running_loop().create_future()
            entry.waiters.append(fut)
        if not entry.published:
            if entry.publishing is None:
                # Over capacity: 429, never a long queue. (Only for a lead that would be
                # published now: a repeat of one already on its way is answered as usual.)
                retry_after = self._admission.refuse()
                if retry_after is not None:
                    if fut is not None:
                        entry.waiters.remove(fut)
                    return web.Response(
                        status=429,
                        headers={"Retry-After": str(retry_after)},
                        content_type="application/json",
                        body=orjson.dumps(
                            {
                                "error": "pipeline over capacity; retry later "
                                f"with the same {KEY_HEADER}",
                                "field": None,
                            }
                        ),
                    )
                record = {
                    "flow": lead.flow,
                    "lead_id": lead.lead_id,
                    "created_at": raw.get("created_at"),
                    "fields": lead.fields,
                    "source": lead.source,
                    "received_at_ms": received,
                }
                entry.publishing = asyncio.ensure_future(self._publish(entry, lead.lead_id, record))
                # Its failure is answered (503) by whoever waits; one nobody waits for any
                # more (it outlived the bound) is only logged by aiokafka.
                entry.publishing.add_done_callback(lambda t: t.cancelled() or t.exception())
            try:
                # Bounded: the producer would retry for its whole request timeout (tens of
                # seconds) while the broker is down. The record may still land after we
                # answer 503: a retry with the same key is then dropped by the redact stage.
                await asyncio.wait_for(
                    asyncio.shield(entry.publishing), self.settings.ingest.publish_timeout_s
                )
            except Exception as exc:
                if fut is not None and fut in entry.waiters:
                    entry.waiters.remove(fut)
                self.unavailable += 1
                why = "timed out" if isinstance(exc, asyncio.TimeoutError) else str(exc)
                done = time.monotonic()
                log.warning(
                    "lead %s not published within %.1f s (%s): answered 503 %.1f s "
                    "after the request arrived (%.1f s after its body was read)",
                    lead.lead_id,
                    self.settings.ingest.publish_timeout_s,
                    why,
                    done - arrived,
                    done - read,
                )
                retry = max(1, round(self.settings.ingest.publish_timeout_s))
                return _json(
                    503,
                    {
                        "error": "the lead could not be queued in time; retry with the same "
                        f"{KEY_HEADER} (or lead_id): a repeat never creates a second "
                        "lead",
                        "field": None,
                        "lead_id": lead.lead_id,
                    },
                    headers={"Retry-After": str(retry)},
                )
        if fut is None:
            if wait and entry.result is not None:
                return self._outcome(lead.lead_id, entry.result, headers)
            return _json(202, {"lead_id": lead.lead_id}, headers=headers)
        try:
            result = await asyncio.wait_for(
                asyncio.shield(fut), self.settings.ingest.wait_timeout_s
            )
        except TimeoutError:
            result = {}
        finally:
            if fut in entry.waiters:
                entry.waiters.remove(fut)
        if not result:
            return _json(
                202,
                {"lead_id": lead.lead_id, "outcome": "pending", "price": None, "buyers": []},
                headers=headers,
            )
        return self._outcome(lead.lead_id, result, headers)

    async def _publish(self, entry: Remembered, lead_id: str, record: dict[str, Any]) -> None:
        assert self._producer is not None
        try:
            await self._producer.send_and_wait(
                self.names.leads, schemas.encode("Lead", record), key=lead_id.encode()
            )
            entry.published = True
            self.accepted += 1
        finally:
            entry.publishing = None

    @staticmethod
    def _outcome(lead_id: str, result: dict[str, Any], headers: dict[str, str]) -> web.Response:
        return _json(
            200,
            {
                "lead_id": lead_id,
                "outcome": result["outcome"],
                "price": result["price_total"],
                "buyers": result["winners"],
                "reason": result["reason"],
            },
            headers=headers,
        )

    async def health(self, request: web.Request) -> web.Response:
        """Liveness (always 200 while the process serves) with the broker's state."""
        return _json(
            200,
            {
                "status": "ok",
                "kafka": "ok" if self.kafka_ok else "unreachable",
                "kafka_error": self.kafka_error,
                "accepted": self.accepted,
                "unavailable": self.unavailable,
                "admission": self._admission.status(),
            },
        )

    async def ready(self, request: web.Request) -> web.Response:
        """Readiness: 503 while the broker cannot be reached (leads would get 503 too)."""
        if self.kafka_ok:
            return _json(200, {"status": "ready"})
        return _json(
            503,
            {"status": "kafka unreachable", "error": self.kafka_error},
            headers={"Retry-After": "1"},
        )

    async def _watch_loop(self) -> None:
        """Log when this process's event loop stalls (every answer, 503s included, waits
        for it): at most one line per 10 s, with the longest stall since the last line."""
        loop = asyncio.get_running_loop()
        worst, said = 0.0, loop.time()
        while True:
            before = loop.time()
            await asyncio.sleep(LOOP_TICK_S)
            late = loop.time() - before - LOOP_TICK_S
            worst = max(worst, late)
            if worst >= 1.0 and loop.time() - said >= 10.0:
                log.warning(
                    "ingest's event loop stalled for up to %.1f s in the last 10 s "
                    "(answers were that late)",
                    worst,
                )
                worst, said = 0.0, loop.time()

    async def _leads_topic_answers(self) -> None:
        """One Metadata request for the leads topic alone: raises unless a broker answers it
        and knows the topic. (The metadata of every topic, ~60 of them, decoded in Python each
        second, was a quarter of ingest's CPU at rest; docs/numbers.md.)"""
        assert self._producer is not None
        client = self._producer.client
        node = client.get_random_node()
        if node is None:
            raise KafkaError("no broker known")
        answer = await client.send(
            node, MetadataRequest([self.names.leads], allow_auto_topic_creation=False)
        )
        errors = [t[0] for t in answer.topics if t[0]]
        if not answer.brokers or errors:
            raise KafkaError(f"topic {self.names.leads} not available (error code {errors})")

    async def _probe_kafka(self) -> None:
        """Ask the broker for the leads topic every second (bounded): the readiness answer.
        Admission control's end-offset fetch of the leads topic, answered within the last
        :data:`PROBE_FRESH_S`, answers it as well, with no request of its own (each request
        costs the broker ~1-1.6 ms of CPU on this machine, docs/numbers.md)."""
        while True:
            try:
                if not self._admission.leads_topic_answered_within(PROBE_FRESH_S):
                    await asyncio.wait_for(self._leads_topic_answers(), PROBE_TIMEOUT_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.kafka_ok:
                    log.warning(
                        "Kafka not ready for leads (%s): /readyz answers 503",
                        exc or type(exc).__name__,
                    )
                self.kafka_ok = False
                self.kafka_error = str(exc) or type(exc).__name__
            else:
                if not self.kafka_ok:
                    log.info("Kafka reachable again")
                self.kafka_ok, self.kafka_error = True, None
            await asyncio.sleep(PROBE_INTERVAL_S)

    async def _read_results(self) -> None:
        """Every settled outcome, remembered (a repeat is answered from it) and handed to the
        requests waiting for it."""
        assert self._consumer is not None
        async for msg in self._consumer:
            try:
                rec = schemas.decode_as("AuctionResult", msg.value)
            except schemas.SchemaError:
                continue
            self._memory.settled(rec)

    async def _catch_up(self, tps: list[TopicPartition]) -> None:
        """Read the outcomes up to the results topic's current end before serving, so a
        repeat arriving right after start-up is recognised (bounded: 30 s, then serve)."""
        assert self._consumer is not None
        ends = await self._consumer.end_offsets(tps)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 30.0
        n = 0
        while loop.time() < give_up:
            behind = [tp for tp in tps if await self._consumer.position(tp) < ends[tp]]
            if not behind:
                break
            batch = await self._consumer.getmany(*behind, timeout_ms=500, max_records=5000)
            for msgs in batch.values():
                for msg in msgs:
                    try:
                        self._memory.settled(schemas.decode_as("AuctionResult", msg.value))
                        n += 1
                    except schemas.SchemaError:
                        continue
        else:
            log.warning("outcomes not fully reloaded after 30 s (%d read); serving anyway", n)
        if n:
            log.info(
                "reloaded %d settled outcomes from the last %.0f s",
                n,
                self.settings.ingest.remember_outcomes_s,
            )

    async def start(self) -> None:
        bootstrap = self.settings.kafka.bootstrap
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=0
        )
        await self._producer.start()
        try:
            parts = await asyncio.wait_for(self._producer.partitions_for(self.names.results), 30)
        except Exception as exc:
            await self._producer.stop()
            raise RuntimeError(
                f"topic {self.names.results} is not available ({exc}): run "
                "`pingpost topics create` first"
            ) from None
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, **GROUPLESS_CONSUMER)
        await self._consumer.start()
        tps = [TopicPartition(self.names.results, p) for p in sorted(parts)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        back_ms = int(self.settings.ingest.remember_outcomes_s * 1000)
        if back_ms:
            # Outcomes settled before this process started, so a repeat of a lead another
            # ingest process (or this one before a restart) published is answered from them.
            since = await self._consumer.offsets_for_times(
                {tp: int(time.time() * 1000) - back_ms for tp in tps}
            )
            for tp, found in since.items():
                if found is not None:
                    self._consumer.seek(tp, found.offset)
            await self._catch_up(tps)
        self._results_task = asyncio.create_task(self._read_results())
        await self._admission.start()
        app = web.Application(client_max_size=self.settings.ingest.max_body_bytes + 1)
        app.router.add_post("/v1/leads", self.handle_lead)
        app.router.add_get("/healthz", self.health)
        app.router.add_get("/readyz", self.ready)
        self._probe_task = asyncio.create_task(self._probe_kafka())
        self._loop_task = asyncio.create_task(self._watch_loop())
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        # A deep accept queue: producers retrying in bursts (a broker outage, 429s) open many
        # connections at once, and an overflowing queue costs each one TCP's SYN retries
        # (1 s, 3 s, 7 s …) before ingest even sees it (aiohttp's default is 128).
        site = web.TCPSite(
            self._runner, self.settings.ingest.host, self.port, backlog=LISTEN_BACKLOG
        )
        await site.start()
        if self.port == 0:
            # aiohttp types its private _server as AbstractServer | None; start() made it
            # the asyncio.Server listening on the port asked for.
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        for task in (self._results_task, self._probe_task, self._loop_task):
            if task is not None:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        await self._admission.stop()
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()


def run(settings: Settings, port: int | None = None) -> None:
    # Its consumers (outcomes, admission reports) ask the broker rarely while nothing arrives.
    faust_patches.idle_fetch_wait()

    async def main() -> None:
        server = IngestServer(settings, port=port)
        await server.start()
        print(
            f"ingest listening on http://{settings.ingest.host}:{server.port}/v1/leads", flush=True
        )
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
