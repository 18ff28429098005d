"""The metrics stage's class in memory (streams/stages/metrics.py ``MetricsStage``): recording
senders for the alerts and dead-letter topics, a fake webhook sender, start-up reads that
return what the test says (alert states, replay targets), a clock the test moves. No broker,
no Faust worker: the test calls the agent's body, the evaluation and auto-pause timers and
the /metrics page itself.

What is checked: ping outcomes fill the windows and a rule over its threshold for its
duration fires one alert (one record, one webhook) and resolves once the buyer recovers; a
buyer whose failure share passes its auto-pause threshold is paused, then resumed after its
cool-down, and only once caught up; /metrics shows the windows; counted events stay unacked
until no evaluation reads them (the restart checkpoint); evaluation waits for the replay.

Redelivery, as far as the code guarantees it: a restarted stage, seeded from the alerts topic
and fed the same history again, never emits a transition twice; the auto-pause tracker counts
a redelivered ping (same ``ping_id``) once. (The windows themselves do not deduplicate: a
duplicate within one run would count twice, and nothing here claims otherwise.)
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Iterable
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

import schemas
from connectors.webhook import WebhookDelivery
from streams.rules.buyer_stats import PAUSE_RULE
from streams.settings import Settings, parse_settings
from streams.stages.metrics import MetricsStage
from tests.unit.stages.fakes import REPO, RecordingTopic, event
from tests.unit.test_schemas import RECORDS

RAW = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
T0 = 1_767_808_800_000  # a multiple of the 10 s window
W = 10_000
ALERTS_TOPIC = "pingpost.alerts"
SLOW_RULE = {
    "name": "slow_buyer",
    "metric": "avg_response_ms",
    "scope": "buyer",
    "comparison": ">",
    "threshold": 600,
    "resolve_threshold": 500,
    "window": "20s",
    "for": "10s",  # two breaching evaluations in a row; two recovered ones to resolve
    "min_samples": 5,
    "message": "contact buyer",
    "webhook": {
        "url": "https://hooks.example.test/T0k3n",
        "headers": {"Authorization": "Bearer s3cret"},
    },
}


def metrics_settings() -> Settings:
    raw = copy.deepcopy(RAW)
    raw["metrics"] = {
        "window_s": 10,
        "grace_s": 2,
        "export_window_s": 60,
        "listen": "127.0.0.1:0",
    }
    raw["alerts"] = [SLOW_RULE]
    # voltmarket (demo): auto_pause {window_s: 60, min_pings: 20, max_failure_rate: 0.5,
    # cool_down_s: 120}; the other buyers have none.
    return parse_settings(raw, env={})


class Clock:
    def __init__(self, at_ms: int) -> None:
        self.at_ms = at_ms

    def now_ms(self) -> int:
        return self.at_ms

    def monotonic(self) -> float:
        return self.at_ms / 1000.0


class Feed:
    """The agent's stream: ``noack()`` is itself, ``events()`` yields what was put since the
    last read, ``acked`` lists the acked events."""

    def __init__(self) -> None:
        self.pending: list[Any] = []
        self.acked: list[Any] = []

    def noack(self) -> Feed:
        return self

    async def events(self) -> AsyncIterator[Any]:
        while self.pending:
            yield self.pending.pop(0)

    async def ack(self, ev: Any) -> None:
        self.acked.append(ev)


class FakeWebhooks:
    """The webhook sender's factory and the sender: records the failure hook it was given
    and every delivery submitted."""

    def __init__(self) -> None:
        self.hooks: list[Any] = []
        self.submitted: list[WebhookDelivery] = []

    def __call__(self, on_failure: Any) -> FakeWebhooks:
        self.hooks.append(on_failure)
        return self

    def submit(self, delivery: WebhookDelivery) -> None:
        self.submitted.append(delivery)


class Harness:
    """A ``MetricsStage`` with fakes at every seam, and what it wrote."""

    def __init__(
        self,
        alert_states: Iterable[dict[str, Any]] = (),
        targets: dict[Any, int] | None = None,
        resumed: Iterable[Any] = (),
    ) -> None:
        self.clock = Clock(T0)
        self.alerts, self.dead = RecordingTopic(ALERTS_TOPIC), RecordingTopic("deadletter")
        self.webhooks = FakeWebhooks()
        self.closers: list[Any] = []
        self.feed = Feed()
        self.offset = 0
        self.reads: list[tuple[Any, ...]] = []
        states, resumed = list(alert_states), set(resumed)

        async def read_alert_states(bootstrap: str, topic: str) -> list[dict[str, Any]]:
            self.reads.append(("alert states", topic))
            return states

        async def replay_targets(
            bootstrap: str, group: str, topics: list[str]
        ) -> tuple[dict[Any, int], set[Any]]:
            self.reads.append(("targets", group, tuple(topics)))
            return dict(targets or {}), resumed

        self.stage = MetricsStage(
            metrics_settings(),
            alerts=self.alerts,
            deadletter=self.dead,
            alerts_topic=ALERTS_TOPIC,
            source_topics=["bids", "deliveries", "results"],
            group="pingpost-metrics",
            webhooks=self.webhooks,
            closers=self.closers,
            read_alert_states=read_alert_states,
            replay_targets=replay_targets,
            now_ms=self.clock.now_ms,
            monotonic=self.clock.monotonic,
        )

    def bid(
        self,
        buyer: str,
        at_ms: int,
        latency_ms: float = 50.0,
        status: str = "bid",
        price: float | None = 45.5,
        ping_id: str | None = None,
    ) -> Any:
        rec = {
            **RECORDS["Bid"],
            "buyer_id": buyer,
            "ping_id": ping_id or f"p-{buyer}-{at_ms}",
            "status": status,
            "sent_at_ms": at_ms - int(latency_ms),
            "answered_at_ms": at_ms,
            "latency_ms": latency_ms,
            "price": price if status == "bid" else None,
        }
        return self.message(schemas.encode("Bid", rec))

    def message(self, value: bytes) -> Any:
        ev = event(value, "bids", 0, self.offset)
        self.offset += 1
        return ev

    async def consume(self, events: Iterable[Any]) -> None:
        """The agent reads ``events`` (it returns when they are all read)."""
        self.feed.pending.extend(events)
        await self.stage.consume(self.feed)

    async def evaluate_at(self, at_ms: int) -> None:
        self.clock.at_ms = at_ms
        await self.stage.evaluate()

    def alert_records(self) -> list[dict[str, Any]]:
        decoded = self.alerts.records()
        assert all(name == "Alert" for name, _ in decoded)
        return [rec for _, rec in decoded]

    async def prometheus(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The /metrics page as ``{(sample name, sorted labels): value}``."""
        response = await self.stage.metrics_page(None)  # type: ignore[arg-type]
        assert response.body is not None
        text = bytes(response.body).decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


def slow_then_fast(h: Harness) -> tuple[list[Any], list[Any]]:
    """sunrise: 10 pings a window at 900 ms over [T0, T0+30s), then at 50 ms over
    [T0+30s, T0+60s)."""
    slow = [h.bid("sunrise", T0 + i * 1000 + 1, latency_ms=900.0) for i in range(30)]
    fast = [h.bid("sunrise", T0 + 30_000 + i * 1000 + 1, latency_ms=50.0) for i in range(30)]
    return slow, fast


def test_a_slow_buyer_fires_one_alert_with_its_webhook_and_resolves_when_fast_again() -> None:
    h = Harness()

    async def go() -> None:
        await h.stage.restore()
        assert h.reads == [
            ("alert states", ALERTS_TOPIC),
            ("targets", "pingpost-metrics", ("bids", "deliveries", "results")),
        ]
        await h.evaluate_at(T0 + 2_000)  # caught up (nothing to replay): evaluates from T0
        assert h.stage.status["caught_up"] and h.stage.status["evaluated_until"] == T0
        slow, fast = slow_then_fast(h)
        await h.consume(slow[:10])
        await h.evaluate_at(T0 + 12_000)  # one breaching evaluation: not for long enough
        assert h.alerts.sent == []
        await h.consume(slow[10:])
        await h.evaluate_at(T0 + 32_000)  # second in a row at T0+20s: fires; T0+30s: firing

        (firing,) = h.alert_records()
        assert firing["alert_id"] == f"slow_buyer|buyer:sunrise|{T0 + 20_000}|firing"
        assert (firing["rule"], firing["subject"], firing["state"]) == (
            "slow_buyer",
            "buyer:sunrise",
            "firing",
        )
        assert (firing["value"], firing["samples"], firing["at_ms"]) == (900.0, 20, T0 + 20_000)
        assert h.alerts.sent[0][0] == b"slow_buyer|buyer:sunrise"
        (hook,) = h.webhooks.submitted
        assert (hook.rule, hook.alert_id) == ("slow_buyer", firing["alert_id"])
        assert hook.url == "https://hooks.example.test/T0k3n"
        assert hook.headers == {"Authorization": "Bearer s3cret"}
        assert hook.payload == {**firing, "at": "2026-01-07T18:00:20.000+00:00"}
        prom = await h.prometheus()
        assert (
            prom[("pingpost_alert_firing", (("rule", "slow_buyer"), ("subject", "buyer:sunrise")))]
            == 1.0
        )

        await h.consume(fast)
        # T0+40s: 10 slow + 10 fast, mean 475 ms, past 500: recovering; T0+50s: resolved.
        await h.evaluate_at(T0 + 62_000)
        firing_again, resolved = h.alert_records()
        assert firing_again == firing
        assert resolved["alert_id"] == f"slow_buyer|buyer:sunrise|{T0 + 50_000}|resolved"
        assert (resolved["value"], resolved["samples"]) == (50.0, 20)
        assert [d.alert_id for d in h.webhooks.submitted] == [
            firing["alert_id"],
            resolved["alert_id"],
        ]
        await h.evaluate_at(T0 + 92_000)  # healthy: nothing more
        assert len(h.alerts.sent) == 2
        prom = await h.prometheus()
        transitions = "pingpost_alert_transitions_total"
        assert prom[(transitions, (("rule", "slow_buyer"), ("state", "firing")))] == 1.0
        assert prom[(transitions, (("rule", "slow_buyer"), ("state", "resolved")))] == 1.0
        assert not any(name == "pingpost_alert_firing" for name, _ in prom)

        # A webhook that failed every attempt is dead-lettered with its reason.
        (on_failure,) = set(h.webhooks.hooks)
        await on_failure(hook, "HTTP 500")
        ((name, dead),) = h.dead.records()
        assert name == "DeadLetter"
        assert dead["id"] == f"{firing['alert_id']}:webhook"
        assert (dead["stage"], dead["topic"], dead["reason"]) == (
            "alerts",
            ALERTS_TOPIC,
            "rule slow_buyer: HTTP 500",
        )
        prom = await h.prometheus()
        assert prom[("pingpost_alert_webhook_failures_total", (("rule", "slow_buyer"),))] == 1.0

    asyncio.run(go())


def test_a_restarted_stage_replaying_the_same_history_never_emits_twice() -> None:
    first = Harness()

    async def run_first() -> None:
        await first.stage.restore()
        await first.evaluate_at(T0 + 2_000)
        slow, _ = slow_then_fast(first)
        await first.consume(slow)
        await first.evaluate_at(T0 + 32_000)

    asyncio.run(run_first())
    (firing,) = first.alert_records()

    # Restarted at T0+32s: the alerts topic holds the firing transition; the group resumes
    # the partition at its commit point and is redelivered the same events.
    again = Harness(alert_states=[firing], targets={("bids", 0): 29}, resumed=[("bids", 0)])

    async def run_again() -> None:
        await again.stage.restore()
        assert [r for r, _, _ in again.stage.engine.firing()] == ["slow_buyer"]
        slow, fast = slow_then_fast(again)
        await again.consume(slow)
        await again.evaluate_at(T0 + 32_000)
        assert again.stage.status["caught_up"]
        assert again.alerts.sent == [] and again.webhooks.submitted == []
        prom = await again.prometheus()
        key = ("pingpost_alert_firing", (("rule", "slow_buyer"), ("subject", "buyer:sunrise")))
        assert prom[key] == 1.0  # still firing across the restart
        await again.consume(fast)
        await again.evaluate_at(T0 + 62_000)

    asyncio.run(run_again())
    (resolved,) = again.alert_records()
    assert resolved["alert_id"] == f"slow_buyer|buyer:sunrise|{T0 + 50_000}|resolved"


def test_evaluation_waits_until_the_replay_reaches_the_end_offsets_seen_at_start() -> None:
    h = Harness(targets={("bids", 0): 29})

    async def go() -> None:
        await h.stage.restore()
        slow, _ = slow_then_fast(h)
        await h.consume(slow[:20])
        await h.evaluate_at(T0 + 32_000)
        assert not h.stage.status["caught_up"] and h.stage.status["evaluated_until"] is None
        await h.consume(slow[20:])  # offset 29 read
        await h.evaluate_at(T0 + 32_500)
        assert h.stage.status["caught_up"]
        assert [r["state"] for r in h.alert_records()] == []  # evaluates from T0+30s on

    asyncio.run(go())


def test_counted_events_stay_unacked_until_no_evaluation_reads_them() -> None:
    h = Harness()
    # horizon: the rule's window (20 s) + its longest streak (2 x 10 s) + 3 windows = 70 s
    assert h.stage.horizon_ms == 70_000

    async def go() -> None:
        await h.stage.restore()
        await h.evaluate_at(T0 + 2_000)
        slow, _ = slow_then_fast(h)
        junk = h.message(b"junk")
        skipped = h.message(
            schemas.encode("Delivery", {**RECORDS["Delivery"], "status": "skipped"})
        )
        await h.consume([*slow, junk, skipped])
        assert h.feed.acked == [junk, skipped]  # not counted: acked at once
        await h.evaluate_at(T0 + 82_000)  # cutoff T0+10s-70s: nothing yet
        assert h.feed.acked == [junk, skipped]
        await h.evaluate_at(T0 + 92_000)  # cutoff (T0+80s + 10s) - 70s = T0+20s
        assert h.feed.acked == [junk, skipped, *slow[:20]]
        await h.evaluate_at(T0 + 102_000)  # cutoff T0+30s
        assert h.feed.acked == [junk, skipped, *slow]

    asyncio.run(go())


def test_a_buyer_failing_past_its_threshold_is_paused_then_resumed_once_caught_up() -> None:
    h = Harness()

    async def go() -> None:
        await h.stage.restore()
        # voltmarket: 22 pings, 12 timed out or failed (55 % > 50 %); sunrise (no auto-pause)
        # fails every ping.
        events = [
            h.bid("voltmarket", T0 + i * 1000, status="timeout" if i % 2 else "error")
            for i in range(12)
        ]
        events += [h.bid("voltmarket", T0 + 12_000 + i * 1000) for i in range(10)]
        events += [h.bid("sunrise", T0 + i * 1000, status="timeout") for i in range(30)]
        await h.consume(events)
        h.clock.at_ms = T0 + 30_000
        await h.stage.auto_pause()
        assert h.alerts.sent == []  # not caught up yet: never decides on partial data
        await h.evaluate_at(T0 + 30_000)
        await h.stage.auto_pause()
        (paused,) = h.alert_records()
        assert h.alerts.sent[0][0] == f"{PAUSE_RULE}|buyer:voltmarket".encode()
        assert paused["alert_id"] == f"{PAUSE_RULE}|buyer:voltmarket|{T0 + 30_000}|firing"
        assert (paused["rule"], paused["subject"], paused["state"]) == (
            PAUSE_RULE,
            "buyer:voltmarket",
            "firing",
        )
        assert paused["samples"] == 22 and abs(paused["value"] - 12 / 22) < 1e-9
        assert h.stage.pauses.paused("voltmarket") == T0 + 30_000 + 120_000
        assert h.stage.pauses.paused("sunrise") is None

        h.clock.at_ms = T0 + 60_000
        await h.stage.auto_pause()  # still in its cool-down: nothing new
        assert len(h.alerts.sent) == 1
        h.clock.at_ms = T0 + 150_000
        await h.stage.auto_pause()
        _, resumed = h.alert_records()
        assert resumed["alert_id"] == f"{PAUSE_RULE}|buyer:voltmarket|{T0 + 150_000}|resolved"
        assert h.stage.pauses.paused("voltmarket") is None
        prom = await h.prometheus()
        transitions = "pingpost_alert_transitions_total"
        assert prom[(transitions, (("rule", PAUSE_RULE), ("state", "firing")))] == 1.0
        assert prom[(transitions, (("rule", PAUSE_RULE), ("state", "resolved")))] == 1.0

    asyncio.run(go())


def test_a_redelivered_ping_counts_once_towards_a_pause() -> None:
    h = Harness()

    async def go() -> None:
        await h.stage.restore()
        await h.evaluate_at(T0 + 2_000)
        # 20 pings, 10 timed out: 50 %, not above the threshold.
        failures = [h.bid("voltmarket", T0 + i * 1000, status="timeout") for i in range(10)]
        answers = [h.bid("voltmarket", T0 + 10_000 + i * 1000) for i in range(10)]
        await h.consume([*failures, *answers])
        # The failures again (same ping ids, later offsets): 20 of 30 if counted twice.
        await h.consume([h.message(ev.value) for ev in failures])
        h.clock.at_ms = T0 + 30_000
        await h.stage.auto_pause()
        assert h.alerts.sent == []
        assert h.stage.pauses.paused("voltmarket") is None

    asyncio.run(go())


def test_prometheus_page_shows_the_export_window_per_buyer_and_flow() -> None:
    h = Harness()

    async def go() -> None:
        await h.stage.restore()
        events = [
            h.bid("sunrise", T0 + 1_000, latency_ms=100.0, price=40.0),
            h.bid("sunrise", T0 + 2_000, latency_ms=100.0, price=60.0),
            h.bid("sunrise", T0 + 3_000, latency_ms=200.0, status="no_bid"),
            h.bid("sunrise", T0 + 4_000, latency_ms=500.0, status="timeout"),
            h.message(
                schemas.encode(
                    "AuctionResult", {**RECORDS["AuctionResult"], "settled_at_ms": T0 + 5_000}
                )
            ),
        ]
        await h.consume(events)
        h.clock.at_ms = T0 + 12_000  # the window [T0, T0+10s) is closed
        prom = await h.prometheus()
        buyer = (("id", "sunrise"), ("scope", "buyer"))
        flow = (("id", "solar"), ("scope", "flow"))
        expected = {
            "pingpost_pings": 4.0,
            "pingpost_bid_rate": 0.5,
            "pingpost_response_rate": 0.75,
            "pingpost_timeout_rate": 0.25,
            "pingpost_error_rate": 0.0,
            "pingpost_avg_bid": 50.0,
            "pingpost_response_time_avg_ms": 225.0,
        }
        for name, value in expected.items():
            assert prom[(name, buyer)] == value, name
            assert prom[(name, flow)] == value, name
        assert ("pingpost_leads", buyer) not in prom  # flows only
        assert prom[("pingpost_leads", flow)] == 1.0
        assert prom[("pingpost_sell_rate", flow)] == 1.0
        assert prom[("pingpost_revenue", flow)] == 71.0
        p50 = (
            "pingpost_response_time_ms",
            (("id", "sunrise"), ("quantile", "0.5"), ("scope", "buyer")),
        )
        assert prom[p50] == 100.0  # the 75-100 ms bucket holds the rank
        assert prom[("pingpost_metrics_events_total", (("event", "Bid"),))] == 4.0
        assert prom[("pingpost_metrics_events_total", (("event", "AuctionResult"),))] == 1.0
        assert prom[("pingpost_metrics_caught_up", ())] == 0.0
        await h.evaluate_at(T0 + 12_000)
        prom = await h.prometheus()
        assert prom[("pingpost_metrics_caught_up", ())] == 1.0
        assert prom[("pingpost_metrics_evaluated_until_seconds", ())] == (T0 + 10_000) / 1000
        h.clock.at_ms = T0 + 80_000  # the events' window left the 60 s export window
        prom = await h.prometheus()
        assert ("pingpost_pings", buyer) not in prom

    asyncio.run(go())


def test_ping_rounds_count_as_their_answers_and_a_re_pinged_round_is_counted() -> None:
    h = Harness()

    def answer(at_ms: int, status: str, price: float | None) -> dict[str, Any]:
        return {
            **RECORDS["Bid"],
            "ping_id": f"p-{at_ms}",
            "status": status,
            "sent_at_ms": at_ms - 100,
            "answered_at_ms": at_ms,
            "latency_ms": 100.0,
            "price": price,
        }

    def ping_round(attempt: int, *answers: dict[str, Any]) -> Any:
        rec = {
            "lead_id": "l",
            "open": {**RECORDS["AuctionOpen"], "attempt": attempt},
            "answers": list(answers),
        }
        return h.message(schemas.encode("PingRound", rec))

    async def go() -> None:
        await h.stage.restore()
        await h.consume(
            [
                ping_round(1, answer(T0 + 1_000, "bid", 40.0), answer(T0 + 2_000, "no_bid", None)),
                ping_round(2, answer(T0 + 3_000, "bid", 60.0), answer(T0 + 4_000, "timeout", None)),
            ]
        )
        h.clock.at_ms = T0 + 12_000
        prom = await h.prometheus()
        flow = (("id", "solar"), ("scope", "flow"))
        assert prom[("pingpost_pings", flow)] == 4.0
        assert prom[("pingpost_bid_rate", flow)] == 0.5
        assert prom[("pingpost_avg_bid", flow)] == 50.0
        assert prom[("pingpost_rounds_repinged_total", ())] == 1.0
        assert prom[("pingpost_metrics_events_total", (("event", "PingRound"),))] == 2.0

    asyncio.run(go())
