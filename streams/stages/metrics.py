"""Metrics stage: windowed metrics per buyer and per flow, alert rules, Prometheus /metrics.

Runs as its own role (``pingpost worker --role metrics``) and consumer group
(``<app_id>-metrics``), reading the bids, deliveries and results topics. It is a **single
owner**, like the sink: one worker holds every partition, so a buyer's pings — spread over all
lead-keyed partitions — meet in one in-process :class:`WindowedMetrics` without a repartition
topic. (A Faust table keyed by buyer would be updated from every partition and its changelog
written to whichever partition the event came from; recovery would replay those partitions in
any order and keep a stale value. Faust's own window closing has the traps of FIELD-NOTES.)
The load is small: a few counters per event.

Restarts. The offsets are the checkpoint: an event is acked (so Faust may commit past it) only
once it is older than everything an evaluation still needs — the longest rule window plus the
longest for/resolve streak, plus a window. A restarted worker is redelivered exactly that
history, rebuilds the same windows, waits until it has caught up with the end offsets it saw
at start, and only then evaluates. The alert state comes from the compacted alerts topic (the
last transition of every rule and subject): evaluation never goes back before a recorded
transition, so nothing is emitted twice, and a firing alert stays firing across the restart.

Windows are evaluated ``grace_s`` after they end (late answers count). Each transition goes to
the log, the alerts topic (→ the `alerts` table through the sink) and, if the rule has one, a
webhook (queued, retried, never blocking; a final failure is dead-lettered with the reason).

The stage's state and handlers are one class, :class:`MetricsStage`, whose dependencies are
explicit (the settings, the topics it sends to, the webhook sender's factory, the start-up
reads from Kafka, the clock); ``register`` builds it from the ``Context`` and binds Faust's
agent, tasks and timers to its methods. Unit tests build it with fakes (tests/unit/stages).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from aiohttp import web

import schemas
from streams.context import Context
from streams.rules.alerts import AlertEngine, Transition, subject_key
from streams.rules.buyer_stats import PAUSE_RULE, PauseTracker, pause_alert
from streams.rules.windows import WindowedMetrics, metric_value
from streams.runtime.agents import now_ms, retry_transient, task, timer
from streams.settings import Settings
from streams.settings.metrics import METRICS

if TYPE_CHECKING:
    from connectors.webhook import FailureHook, WebhookDelivery

__all__ = ["MetricsCollector", "MetricsStage", "PROM_METRICS", "Sends", "Submits", "register"]

log = logging.getLogger(__name__)

#: How long to wait for the replay to reach the end offsets seen at start before evaluating
#: anyway (a second metrics worker holding some partitions would otherwise stall alerts).
CATCH_UP_TIMEOUT_S = 60.0
#: One attempt at the start-up reads (alert states, replay targets) gives up after this long.
STARTUP_TIMEOUT_S = 120.0

#: Prometheus name and help of each exported metric (gauges over ``export_window_s``).
PROM_METRICS: dict[str, tuple[str, str]] = {
    "pings": ("pingpost_pings", "pings sent (not filtered) in the export window"),
    "bid_rate": ("pingpost_bid_rate", "bids / pings"),
    "response_rate": ("pingpost_response_rate", "(bids + no-bids) / pings"),
    "timeout_rate": ("pingpost_timeout_rate", "timed-out pings / pings"),
    "error_rate": ("pingpost_error_rate", "failed pings (errors) / pings"),
    "avg_bid": ("pingpost_avg_bid", "average bid price"),
    "avg_response_ms": ("pingpost_response_time_avg_ms", "mean ping response time (ms)"),
    "posts": ("pingpost_posts", "post attempts in the export window"),
    "accept_rate": ("pingpost_accept_rate", "accepted posts / post attempts"),
    "revenue": ("pingpost_revenue", "revenue in the export window"),
    "revenue_per_ping": ("pingpost_revenue_per_ping", "revenue / pings"),
    "leads": ("pingpost_leads", "settled auctions in the export window (flows)"),
    "sell_rate": ("pingpost_sell_rate", "sold / settled leads (flows)"),
}
#: What an experiment variant exports (``scope="variant"``, ``id="<flow>/<variant>"``).
VARIANT_METRICS = ("leads", "sell_rate", "revenue")
_QUANTILES = {"0.5": "response_p50_ms", "0.95": "response_p95_ms", "0.99": "response_p99_ms"}


class MetricsCollector:
    """A prometheus-client collector reading the windows at scrape time (in the event loop:
    /metrics is served by aiohttp on the worker's loop, so no lock is needed)."""

    def __init__(
        self,
        store: WindowedMetrics,
        engine: AlertEngine,
        export_ms: int,
        grace_ms: int,
        status: dict[str, Any],
        now_ms: Callable[[], int] = now_ms,
    ) -> None:
        self.store, self.engine = store, engine
        self.export_ms, self.grace_ms = export_ms, grace_ms
        self.status = status
        self.now_ms = now_ms

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        w = self.store.window_ms
        end = (self.now_ms() - self.grace_ms) // w * w  # last closed window
        labels = ["scope", "id"]
        fams = {
            m: GaugeMetricFamily(name, f"{doc} (last {self.export_ms // 1000}s)", labels=labels)
            for m, (name, doc) in PROM_METRICS.items()
        }
        q = GaugeMetricFamily(
            "pingpost_response_time_ms",
            "ping response time quantiles from a fixed-bucket histogram (ms)",
            labels=[*labels, "quantile"],
        )
        for subject in sorted(self.store.subjects(end, self.export_ms)):
            agg = self.store.aggregate(subject, end, self.export_ms)
            for metric, fam in fams.items():
                if subject[0] == "buyer" and metric in ("leads", "sell_rate"):
                    continue
                if subject[0] == "variant" and metric not in VARIANT_METRICS:
                    continue  # a variant has no pings or posts of its own here
                value = metric_value(agg, metric)
                if value is not None:
                    fam.add_metric(list(subject), value)
            for quant, metric in _QUANTILES.items():
                value = metric_value(agg, metric)
                if value is not None:
                    q.add_metric([*subject, quant], value)
        yield from fams.values()
        yield q
        firing = GaugeMetricFamily(
            "pingpost_alert_firing", "1 while an alert is firing", labels=["rule", "subject"]
        )
        for rule, subject, _ in self.engine.firing():
            firing.add_metric([rule, subject_key(subject)], 1.0)
        yield firing
        yield GaugeMetricFamily(
            "pingpost_metrics_evaluated_until_seconds",
            "end of the last window the alert rules evaluated (epoch s)",
            value=(self.status.get("evaluated_until") or 0) / 1000,
        )
        yield GaugeMetricFamily(
            "pingpost_metrics_caught_up",
            "1 once the replay after start reached the end offsets",
            value=1.0 if self.status.get("caught_up") else 0.0,
        )


async def _replay_targets(
    bootstrap: str, group: str, topics: list[str]
) -> tuple[dict[Any, int], set[Any]]:
    """Per partition, the last offset this worker must read before evaluating (the end
    offset now, where the group's position is behind it), and the partitions it resumes
    from a committed offset (their events before it were acked: their history is partial)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False
    )
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await consumer.start()
    await admin.start()
    try:
        tps = []
        for topic in topics:
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                await consumer._client.force_metadata_update()
                parts = consumer.partitions_for_topic(topic) or set()
            tps += [TopicPartition(topic, p) for p in parts]
        ends = await consumer.end_offsets(tps)
        begins = await consumer.beginning_offsets(tps)
        committed = await admin.list_consumer_group_offsets(group)
        out, resumed = {}, set()
        for tp in tps:
            key = (tp.topic, tp.partition)
            start = begins[tp]
            if tp in committed and committed[tp].offset >= 0:
                start = committed[tp].offset
                resumed.add(key)
            if ends[tp] > start:
                out[key] = ends[tp] - 1
        return out, resumed
    finally:
        await admin.close()
        await consumer.stop()


async def _read_alert_states(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    """Every Alert record in the (compacted) alerts topic."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await c.start()
    try:
        tps = [TopicPartition(topic, p) for p in (c.partitions_for_topic(topic) or {0})]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        ends = await c.end_offsets(tps)
        out = []
        remaining = {tp for tp in tps if ends[tp] > 0}
        while remaining:
            batch = await c.getmany(*remaining, timeout_ms=1000)
            for msgs in batch.values():
                for m in msgs:
                    try:
                        out.append(schemas.decode_as("Alert", m.value))
                    except schemas.SchemaError as exc:
                        log.error("unreadable record in %s at %s: %s", topic, m.offset, exc)
            remaining = {tp for tp in remaining if await c.position(tp) < ends[tp]}
        return out
    finally:
        await c.stop()


class Sends(Protocol):
    """Where the stage sends records: a topic (``send`` returns what Faust's does, an
    awaitable of the delivery's future)."""

    def send(self, *, key: bytes, value: bytes) -> Awaitable[Any]: ...


class Submits(Protocol):
    """The alert webhooks' sender (``connectors.webhook.WebhookSender``): queues a delivery."""

    def submit(self, delivery: WebhookDelivery) -> None: ...


class MetricsStage:
    """The metrics stage's state (the windows, the alert engine, the auto-pause tracker, the
    events held unacked, the start-up status, the Prometheus registry) and its handlers.

    ``alerts`` and ``deadletter`` are the topics it sends to; ``alerts_topic`` the alerts
    topic's name (read back at start-up, named in a webhook's dead letter); ``source_topics``
    the topics the agent reads and ``group`` its consumer group (the replay targets).
    ``webhooks(on_failure)`` returns the alert webhooks' sender, created on first use with
    ``on_failure`` as its failure hook; ``closers`` gets what must run when the worker stops
    (the /metrics server). ``read_alert_states(bootstrap, topic)`` and
    ``replay_targets(bootstrap, group, topics)`` are the start-up reads from Kafka.
    ``now_ms`` (epoch ms) and ``monotonic`` (seconds) are the clock."""

    def __init__(
        self,
        settings: Settings,
        *,
        alerts: Sends,
        deadletter: Sends,
        alerts_topic: str,
        source_topics: list[str],
        group: str,
        webhooks: Callable[[FailureHook], Submits],
        closers: list[Any],
        read_alert_states: Callable[
            [str, str], Awaitable[list[dict[str, Any]]]
        ] = _read_alert_states,
        replay_targets: Callable[
            [str, str, list[str]], Awaitable[tuple[dict[Any, int], set[Any]]]
        ] = _replay_targets,
        now_ms: Callable[[], int] = now_ms,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.alerts_topic = alerts
        self.deadletter = deadletter
        self.alerts_topic_name = alerts_topic
        self.source_topics = source_topics
        self.group = group
        self.make_webhooks = webhooks
        self.closers = closers
        self.read_alert_states = read_alert_states
        self.replay_targets = replay_targets
        self.now_ms = now_ms
        self.monotonic = monotonic

        mc = self.mc = settings.metrics
        self.store = WindowedMetrics(mc.window_s)
        self.engine = AlertEngine(settings.alerts, mc.window_s)
        w = self.w = self.store.window_ms
        self.grace_ms = int(mc.grace_s * 1000)
        # Events stay unacked until older than what any evaluation still reads.
        self.horizon_ms = self.engine.max_span_ms() + self.engine.max_streak_ms() + 3 * w
        self.keep_ms = max(self.horizon_ms, mc.export_window_s * 1000 + w)
        self.held: dict[tuple[str, int], deque[tuple[int, Any]]] = {}
        self.seen: dict[tuple[str, int], int] = {}
        self.status: dict[str, Any] = {
            "caught_up": False,
            "evaluated_until": None,
            "targets": None,
            "first_event_ms": {},
            "started": self.monotonic(),
        }
        #: The agent's manual-ack stream, once the agent runs (its held events are acked there).
        self.stream: Any = None

        from prometheus_client import CollectorRegistry, Counter

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(
            MetricsCollector(
                self.store,
                self.engine,
                mc.export_window_s * 1000,
                self.grace_ms,
                self.status,
                now_ms=self.now_ms,
            )
        )
        self.transitions = Counter(
            "pingpost_alert_transitions",
            "alert transitions emitted",
            ["rule", "state"],
            registry=self.registry,
        )
        self.webhook_failures = Counter(
            "pingpost_alert_webhook_failures",
            "alert webhooks that failed every attempt",
            ["rule"],
            registry=self.registry,
        )
        self.repinged = Counter(
            "pingpost_rounds_repinged",
            "ping rounds lost with their worker and pinged again (docs/operations.md)",
            registry=self.registry,
        )
        self.events = Counter(
            "pingpost_metrics_events",
            "events counted by the metrics role",
            ["event"],
            registry=self.registry,
        )
        self.pause_cfgs = {b.id: b.auto_pause for b in settings.buyers if b.auto_pause is not None}
        self.pauses = PauseTracker(self.pause_cfgs)

    async def on_webhook_failure(self, d: Any, reason: str) -> None:
        self.webhook_failures.labels(d.rule).inc()
        record = {
            "id": f"{d.alert_id}:webhook",
            "stage": "alerts",
            "topic": self.alerts_topic_name,
            "partition": 0,
            "offset": -1,
            "key": d.alert_id.encode(),
            "payload": orjson.dumps(d.payload),
            "reason": f"rule {d.rule}: {reason}",
            "field": None,
            "at_ms": self.now_ms(),
        }
        try:
            await self.deadletter.send(
                key=d.alert_id.encode(), value=schemas.encode("DeadLetter", record)
            )
        except Exception:
            log.exception("could not record the webhook failure of %s", d.alert_id)

    def webhooks(self) -> Submits:
        return self.make_webhooks(self.on_webhook_failure)

    async def emit(self, t: Transition) -> None:
        record = t.record(self.mc.window_s)
        key = f"{t.rule.name}|{subject_key(t.subject)}".encode()
        value = schemas.encode("Alert", record)

        async def send() -> None:
            fut = await self.alerts_topic.send(key=key, value=value)
            await fut  # on Kafka before the transition counts as emitted

        await retry_transient(send, "alert")
        self.transitions.labels(t.rule.name, t.state).inc()
        (log.warning if t.state == "firing" else log.info)(
            "ALERT %s %s %s: %s",
            t.state.upper(),
            t.rule.name,
            subject_key(t.subject),
            record["message"],
        )
        if t.rule.webhook is not None:
            from connectors.webhook import WebhookDelivery

            wh = t.rule.webhook
            payload = {**record, "at": _iso(t.at_ms)}
            self.webhooks().submit(
                WebhookDelivery(
                    t.rule.name,
                    t.alert_id,
                    wh.url.get_secret_value(),
                    {k: v.get_secret_value() for k, v in wh.headers.items()},
                    payload,
                )
            )

    async def consume(self, stream: Any) -> None:
        """The body of the ``metrics`` agent: count each event; hold the counted ones unacked
        (the restart checkpoint, module docstring) until :meth:`ack_older_than` acks them."""
        manual = stream.noack()
        self.stream = manual
        status, seen, held = self.status, self.seen, self.held
        async for event in manual.events():
            msg = event.message
            tp = (msg.topic, msg.partition)
            seen[tp] = msg.offset
            t = None
            try:
                name, rec = schemas.decode(event.value)
                if name == "PingRound" and rec["open"]["attempt"] > 1:
                    self.repinged.inc()
                if self.pause_cfgs and name in ("Bid", "PingRound"):
                    for answer in rec["answers"] if name == "PingRound" else (rec,):
                        self.pauses.add(
                            answer["buyer_id"],
                            answer["ping_id"],
                            answer["status"],
                            answer["answered_at_ms"],
                        )
                t = self.store.add(name, rec)
                if t is not None:
                    self.events.labels(name).inc()
            except Exception as exc:  # a bad record must not stop the metrics
                log.error(
                    "metrics cannot count %s:%s:%s (skipped): %s",
                    msg.topic,
                    msg.partition,
                    msg.offset,
                    exc,
                )
            if t is None:
                await manual.ack(event)
                continue
            if not status["caught_up"] and tp not in status["first_event_ms"]:
                status["first_event_ms"][tp] = t
            held.setdefault(tp, deque()).append((t, event))

    def caught_up(self) -> bool:
        targets = self.status["targets"]
        if targets is None:
            return False
        if all(self.seen.get(tp, -1) >= end for tp, end in targets.items()):
            return True
        if self.monotonic() - self.status["started"] > CATCH_UP_TIMEOUT_S:
            log.warning(
                "metrics replay did not reach the end offsets within %.0fs (is a "
                "second metrics worker running?); evaluating anyway",
                CATCH_UP_TIMEOUT_S,
            )
            return True
        return False

    async def start_up(self) -> None:
        """Once: the last alert states (alerts topic) and the replay targets (end offsets)."""
        engine, status = self.engine, self.status
        bootstrap = self.settings.kafka.bootstrap
        known = {r.name for r in engine.rules}
        for rec in await self.read_alert_states(bootstrap, self.alerts_topic_name):
            if rec["rule"] == PAUSE_RULE:
                self.pauses.seed(rec["subject"].split(":", 1)[-1], rec["state"], rec["at_ms"])
                continue
            if rec["rule"] not in known:
                continue
            kind, _, ident = rec["subject"].partition(":")
            engine.seed(rec["rule"], (kind, ident), rec["state"], rec["at_ms"])
        firing = engine.firing()
        if firing:
            log.info(
                "restored %d firing alert(s): %s",
                len(firing),
                ", ".join(f"{r} {subject_key(s)}" for r, s, _ in firing),
            )
        status["targets"], status["resumed"] = await self.replay_targets(
            bootstrap, self.group, self.source_topics
        )
        status["started"] = self.monotonic()

    async def ack_older_than(self, cutoff: int) -> None:
        if self.stream is None:
            return
        for queue in self.held.values():
            while queue and queue[0][0] < cutoff:
                _, event = queue.popleft()
                await self.stream.ack(event)

    async def restore(self) -> None:
        """The start-up task: :meth:`start_up`, retried until Kafka answers."""
        delay = 0.5
        while True:
            try:
                # Bounded: reading the alerts topic loops until it reaches the end offsets,
                # which a broker outage in the middle would postpone for ever.
                await asyncio.wait_for(self.start_up(), STARTUP_TIMEOUT_S)
                return
            except Exception as exc:  # Kafka not reachable yet: the timer waits for this
                log.warning("metrics start-up failed (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def evaluate(self) -> None:
        """The evaluation timer: ack what no evaluation reads any more, then evaluate the
        alert rules at the end of every window closed since the last evaluation."""
        status, store, engine = self.status, self.store, self.engine
        w, horizon_ms = self.w, self.horizon_ms
        if status["targets"] is None:
            return  # restore() has not finished: nothing may be evaluated yet
        closed_end = (self.now_ms() - self.grace_ms) // w * w
        until = status["evaluated_until"]
        await self.ack_older_than((closed_end if until is None else until + w) - horizon_ms)
        if not status["caught_up"]:
            if not self.caught_up():
                return
            status["caught_up"] = True
            # The first evaluation needs a whole rule window of complete data. A restarted
            # worker resumes each partition at its commit point, whose first event is at or
            # after the ack cutoff in force before the restart: windows before the earliest
            # of those are partial. (2 windows of margin: commits trail acks, events arrive
            # out of order.) A new group reads from the beginning: nothing is partial.
            first = closed_end
            replayed = [
                t
                for tp, t in status["first_event_ms"].items()
                if tp in status["targets"] and tp in status["resumed"]
            ]
            if replayed:
                first = max(
                    store.start_of(min(replayed)) + 2 * w + engine.max_span_ms(),
                    closed_end - horizon_ms + engine.max_span_ms() + w,
                )
            status["evaluated_until"] = until = first - w
            log.info("metrics caught up; evaluating windows from %s", _iso(until + w))
        end = until + w
        while end <= closed_end:
            snap = engine.snapshot()
            try:
                for t in engine.evaluate(store, end):
                    await self.emit(t)
            except Exception:
                engine.restore(snap)  # not emitted: evaluate this window again next tick
                log.exception("could not emit the alerts of window %s", _iso(end))
                break
            status["evaluated_until"] = end
            end += w
        store.expire(status["evaluated_until"] - self.keep_ms)

    async def auto_pause(self) -> None:
        """Pause/resume buyers (issue 3, rule 10): once caught up, so a replay after a restart
        never decides on partial data; each transition on the alerts topic before it counts."""
        pause_cfgs, pauses = self.pause_cfgs, self.pauses
        if not pause_cfgs or not self.status["caught_up"]:
            return
        for t in pauses.evaluate(self.now_ms()):
            rec = pause_alert(t, pause_cfgs[t.buyer_id])

            async def send(rec: dict[str, Any] = rec) -> None:
                fut = await self.alerts_topic.send(
                    key=f"{PAUSE_RULE}|{rec['subject']}".encode(),
                    value=schemas.encode("Alert", rec),
                )
                await fut

            try:
                await retry_transient(send, "auto-pause")
            except Exception:
                log.exception("could not record the %s transition of %s", t.state, t.buyer_id)
                # undo: decided again next tick
                if t.state == "paused":
                    pauses.paused_until.pop(t.buyer_id, None)
                else:
                    pauses.paused_until[t.buyer_id] = t.at_ms
                continue
            self.transitions.labels(PAUSE_RULE, rec["state"]).inc()
            log.warning("%s", rec["message"])

    async def serve_metrics(self) -> None:
        """The /metrics (and /healthz) server, unless ``metrics.listen``'s port is 0."""
        mc = self.mc
        if mc.port == 0:
            return
        web_app = web.Application()
        web_app.router.add_get("/metrics", self.metrics_page)
        web_app.router.add_get("/healthz", self.health)
        runner = web.AppRunner(web_app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, mc.host, mc.port).start()
        self.closers.append(runner.cleanup)
        log.info("Prometheus metrics on http://%s:%d/metrics", mc.host, mc.port)

    async def metrics_page(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def health(self, request: web.Request) -> web.Response:
        status = self.status
        return web.json_response(
            {"caught_up": status["caught_up"], "evaluated_until_ms": status["evaluated_until"]}
        )


def register(ctx: Context) -> None:
    """Build the stage from ``ctx`` and bind Faust's agent, tasks and timers to its methods."""
    app, settings = ctx.app, ctx.settings
    mc = settings.metrics
    n = ctx.names
    source_topics = [n.bids, n.deliveries, n.results]
    source = app.topic(
        *source_topics,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.kafka.partitions,
    )

    def webhooks(on_failure: FailureHook) -> Any:
        sender = ctx.webhooks
        if sender is None:
            from connectors.webhook import WebhookSender

            sender = ctx.webhooks = WebhookSender(
                timeout_s=mc.webhook_timeout_s,
                attempts=mc.webhook_attempts,
                backoff_s=mc.webhook_backoff_s,
                on_failure=on_failure,
            )

            async def close() -> None:
                await sender.drain(timeout=5.0)
                await sender.aclose()

            ctx.closers.append(close)
        return sender

    stage = MetricsStage(
        settings,
        alerts=ctx.topic("alerts"),
        deadletter=ctx.topic("deadletter"),
        alerts_topic=n.alerts,
        source_topics=source_topics,
        group=app.conf.id,
        webhooks=webhooks,
        closers=ctx.closers,
    )

    @app.agent(source, name="metrics", concurrency=1)
    async def metrics_agent(stream: Any) -> None:
        await stage.consume(stream)

    @task(app)
    async def restore() -> None:
        await stage.restore()

    @timer(app, min(1.0, mc.window_s / 4), name="metrics-evaluate")
    async def evaluate() -> None:
        await stage.evaluate()

    @timer(app, 0.5, name="auto-pause")
    async def auto_pause() -> None:
        """Pause/resume buyers (issue 3, rule 10): once caught up, so a replay after a restart
        never decides on partial data; each transition on the alerts topic before it counts."""
        await stage.auto_pause()

    @task(app)
    async def serve_metrics() -> None:
        await stage.serve_metrics()


def _iso(ms: int) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")


assert set(PROM_METRICS) | set(_QUANTILES.values()) == set(METRICS)
