"""Buyer statistics the auction applies: observed post acceptance (ranking by score) and
auto-pause.

Auto-pause is decided by the metrics worker (:class:`PauseTracker`, fed by every ping outcome
it already counts) and recorded as ``auto_pause`` alerts; every auction worker follows those
few records (:class:`PauseView`) and filters paused buyers before the ping.

Acceptance: each buyer's observed post acceptance rate, streamed from the deliveries topic.

Ranking by score (``strategy.rank_by: score``) weighs a bid by its buyer's acceptance rate.
Deliveries are keyed by lead, so any one worker owns only some of each buyer's posts; every
auction worker therefore reads *all* partitions of the deliveries topic with its own
group-less consumer (no offsets committed, nothing to rebalance) and keeps the counts of the
last ``WINDOW_S`` in memory. At start it replays that window (``offsets_for_times``), so a
restarted worker ranks like the others within seconds. Every worker sees the same events, so
the rates agree up to a few ms of lag; a new buyer starts at the flow's prior
(``strategy.acceptance_prior``) and its own record takes over as posts accumulate.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import mode
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

import schemas
from streams import rules
from streams.runtime import now_ms
from streams.settings import AutoPauseConfig

__all__ = ["AcceptanceCounter", "PAUSE_RULE", "PauseTracker", "PauseView", "Transition",
           "WINDOW_S", "follow_topic", "pause_alert", "ranking_inputs", "register"]

log = logging.getLogger(__name__)

#: How far back acceptance is counted (a buyer's recent behaviour, not its history).
WINDOW_S = 24 * 3600.0

#: Post answers that count as "posted"; ``skipped`` was never sent.
POSTED = frozenset({"accepted", "rejected", "error", "timeout"})


class AcceptanceCounter:
    """Accepted / posted per buyer over a sliding window, counting each attempt once."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_ms = int(window_s * 1000)
        self._seen: dict[str, tuple[str, bool]] = {}  # attempt_id -> (buyer, accepted)
        self._order: deque[tuple[int, str]] = deque()  # (at_ms, attempt_id), oldest first
        self.accepted: dict[str, int] = {}
        self.posted: dict[str, int] = {}

    def add(self, attempt_id: str, buyer_id: str, status: str, at_ms: int) -> None:
        if status not in POSTED or attempt_id in self._seen:
            return  # not a post answer, or a redelivered one
        ok = status == "accepted"
        self._seen[attempt_id] = (buyer_id, ok)
        self._order.append((at_ms, attempt_id))
        self.posted[buyer_id] = self.posted.get(buyer_id, 0) + 1
        if ok:
            self.accepted[buyer_id] = self.accepted.get(buyer_id, 0) + 1

    def expire(self, now: int) -> None:
        while self._order and self._order[0][0] <= now - self.window_ms:
            _, attempt_id = self._order.popleft()
            buyer, ok = self._seen.pop(attempt_id)
            self.posted[buyer] -= 1
            if ok:
                self.accepted[buyer] -= 1

    def rates(self, prior_rate: float, prior_weight: float) -> dict[str, float]:
        return {b: rules.acceptance_rate(self.accepted.get(b, 0), n, prior_rate, prior_weight)
                for b, n in self.posted.items()}


@dataclass(frozen=True)
class Transition:
    buyer_id: str
    state: str  # paused | resumed
    at_ms: int
    failure_rate: float
    pings: int
    until_ms: int | None


class PauseTracker:
    """Auto-pause (issue 3, rule 10): a buyer whose timeout+error share over its sliding
    window passes its threshold is paused for its cool-down, then resumes by itself. After a
    resume only outcomes from then on count, so old failures cannot pause it again at once."""

    def __init__(self, configs: dict[str, AutoPauseConfig]) -> None:
        self.configs = configs
        self._outcomes: dict[str, deque[tuple[int, str, str]]] = {b: deque() for b in configs}
        self._seen: set[str] = set()
        self.paused_until: dict[str, int] = {}
        self._since: dict[str, int] = {}

    def add(self, buyer_id: str, ping_id: str, status: str, at_ms: int) -> None:
        if buyer_id not in self.configs or status not in rules.PING_STATUSES:
            return
        if ping_id in self._seen:
            return  # redelivered
        self._seen.add(ping_id)
        self._outcomes[buyer_id].append((at_ms, ping_id, status))

    def _window(self, buyer_id: str, now: int) -> list[tuple[int, str]]:
        cfg, q = self.configs[buyer_id], self._outcomes[buyer_id]
        oldest = now - int(cfg.window_s * 1000)
        while q and q[0][0] <= oldest:
            self._seen.discard(q.popleft()[1])
        since = self._since.get(buyer_id, 0)
        return [(at, st) for at, _, st in q if at >= since]

    def evaluate(self, now: int) -> list[Transition]:
        out = []
        for buyer_id, cfg in self.configs.items():
            until = self.paused_until.get(buyer_id)
            window = self._window(buyer_id, now)
            if until is not None:
                if now >= until:
                    del self.paused_until[buyer_id]
                    self._since[buyer_id] = now
                    out.append(Transition(buyer_id, "resumed", now, 0.0, 0, None))
                continue
            if rules.pause_decision(window, now, window_s=cfg.window_s,
                                    min_pings=cfg.min_pings,
                                    max_failure_rate=cfg.max_failure_rate):
                failed = sum(1 for _, st in window if st in rules.FAILED_PING_STATUSES)
                until = rules.pause_until_ms(now, cfg.cool_down_s)
                self.paused_until[buyer_id] = until
                out.append(Transition(buyer_id, "paused", now, failed / len(window),
                                      len(window), until))
        return out

    def paused(self, buyer_id: str) -> int | None:
        """Until when ``buyer_id`` is paused (epoch ms), or None."""
        return self.paused_until.get(buyer_id)

    def seed(self, buyer_id: str, state: str, at_ms: int) -> None:
        """Restore the last recorded transition (after a restart): only outcomes after it
        count, and a pause still runs its cool-down (a resume is due if it ended meanwhile)."""
        cfg = self.configs.get(buyer_id)
        if cfg is None or at_ms < self._since.get(buyer_id, -1):
            return
        self._since[buyer_id] = at_ms
        if state == "firing":
            self.paused_until[buyer_id] = rules.pause_until_ms(at_ms, cfg.cool_down_s)
        else:
            self.paused_until.pop(buyer_id, None)


def follow_topic(settings: Any, topic: str, since_ms: int,
          on_record: Callable[[bytes], None], on_batch: Callable[[], Any]) -> type[mode.Service]:
    """A service reading every partition of ``topic`` from ``since_ms`` with a group-less
    consumer (nothing committed, nothing to rebalance), calling ``on_record`` per value and
    ``on_batch`` after each poll (also when idle)."""

    class Feed(mode.Service):
        async def on_start(self) -> None:
            self._consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap,
                                              group_id=None, enable_auto_commit=False,
                                              fetch_max_wait_ms=100)
            await self._consumer.start()
            parts = self._consumer.partitions_for_topic(topic)
            if not parts:
                await self._consumer._client.force_metadata_update()  # noqa: SLF001
                parts = self._consumer.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            self._consumer.assign(tps)
            starts = await self._consumer.offsets_for_times({tp: since_ms for tp in tps})
            for tp in tps:
                if starts.get(tp) is not None:
                    self._consumer.seek(tp, starts[tp].offset)
                else:
                    await self._consumer.seek_to_end(tp)
            log.info("feed: reading %s from %d s ago", topic, (now_ms() - since_ms) // 1000)

        async def on_stop(self) -> None:
            await self._consumer.stop()

        @mode.Service.task
        async def _read(self) -> None:
            while not self.should_stop:
                try:
                    batch = await self._consumer.getmany(timeout_ms=250, max_records=2000)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a feed must never take the worker down
                    log.warning("feed %s: %s; retrying", topic, exc)
                    await asyncio.sleep(1.0)
                    continue
                for records in batch.values():
                    for rec in records:
                        on_record(rec.value)
                res = on_batch()
                if asyncio.iscoroutine(res):
                    await res

    return Feed


def ranking_inputs(ctx: Any, flow: Any) -> dict[str, Any]:
    """``decide``'s ``acceptance`` and ``payment`` for ``flow`` in this worker: observed
    acceptance rates (None when the flow does not rank by score) and configured payment
    speeds."""
    counter, prior = ctx.resources.get("acceptance"), flow.strategy.acceptance_prior
    payment = ctx.resources.get("payment_speeds")
    if payment is None:
        payment = ctx.resources["payment_speeds"] = {b.id: b.payment_speed
                                                     for b in ctx.settings.buyers}
    scored = counter is not None and flow.strategy.rank_by == "score"
    return {"acceptance": counter.rates(prior.rate, prior.weight) if scored else None,
            "payment": payment}


def register(ctx: Any) -> None:
    """Start the acceptance feed if any flow ranks by score, and the pause feed if any buyer
    has ``auto_pause``."""
    settings = ctx.settings
    if any(f.strategy.rank_by == "score" for f in settings.flows.values()):
        counter = AcceptanceCounter()
        ctx.resources["acceptance"] = counter

        def on_delivery(value: bytes) -> None:
            try:
                d = schemas.decode_as("Delivery", value)
            except schemas.SchemaError:
                return  # the post stage dead-letters what it cannot read
            counter.add(d["attempt_id"], d["buyer_id"], d["status"], d["sent_at_ms"])

        ctx.app.service(follow_topic(settings, ctx.names.deliveries, now_ms() - counter.window_ms,
                              on_delivery, lambda: counter.expire(now_ms())))

    configs = {b.id: b.auto_pause for b in settings.buyers if b.auto_pause is not None}
    if configs:
        view = PauseView(configs)
        ctx.resources["pauses"] = view

        def on_alert(value: bytes) -> None:
            try:
                view.update(schemas.decode_as("Alert", value))
            except schemas.SchemaError:
                pass

        # The metrics worker decides pauses (it already follows every ping outcome); the
        # auction workers only follow its decisions: a few records, off the hot path.
        ctx.app.service(follow_topic(settings, ctx.names.alerts, 0, on_alert, lambda: None))


class PauseView:
    """The auction workers' view of auto-pause decisions (``auto_pause`` alerts)."""

    def __init__(self, configs: dict[str, AutoPauseConfig]) -> None:
        self.configs = configs
        self.paused_until: dict[str, int] = {}
        self._last: dict[str, int] = {}

    def update(self, rec: dict[str, Any]) -> None:
        if rec["rule"] != PAUSE_RULE or not rec["subject"].startswith("buyer:"):
            return
        buyer = rec["subject"].split(":", 1)[1]
        cfg = self.configs.get(buyer)
        if cfg is None or rec["at_ms"] < self._last.get(buyer, -1):
            return
        self._last[buyer] = rec["at_ms"]
        if rec["state"] == "firing":
            self.paused_until[buyer] = rec["at_ms"] + int(cfg.cool_down_s * 1000)
        else:
            self.paused_until.pop(buyer, None)

    def paused(self, buyer_id: str) -> int | None:
        return self.paused_until.get(buyer_id)


#: The rule name auto-pause transitions are recorded under (alerts topic and table).
PAUSE_RULE = "auto_pause"


def pause_alert(t: Transition, cfg: AutoPauseConfig) -> dict[str, Any]:
    """The ``Alert`` record of a pause transition (firing = paused, resolved = resumed)."""
    state = "firing" if t.state == "paused" else "resolved"
    subject = f"buyer:{t.buyer_id}"
    msg = (f"buyer {t.buyer_id} paused: {t.failure_rate:.0%} of {t.pings} pings timed out or "
           f"failed; resumes at {rules._iso(t.until_ms)}"  # noqa: SLF001
           if t.state == "paused" else f"buyer {t.buyer_id} resumed after its cool-down")
    return {"alert_id": f"{PAUSE_RULE}|{subject}|{t.at_ms}|{state}", "rule": PAUSE_RULE,
            "metric": "failure_rate", "scope": "buyer", "subject": subject, "state": state,
            "value": t.failure_rate if t.state == "paused" else None,
            "threshold": cfg.max_failure_rate, "comparison": ">", "samples": t.pings,
            "window_s": cfg.window_s, "at_ms": t.at_ms, "message": msg}
