"""Buyer statistics the auction applies: observed post acceptance (ranking by score) and
auto-pause.

Auto-pause is decided by the metrics worker (``rules.buyer_stats.PauseTracker``, fed by every ping outcome
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

import logging
from typing import TYPE_CHECKING, Any

import schemas
from streams.context import Offers
from streams.rules.buyer_stats import PAUSE_RULE, AcceptanceCounter
from streams.runtime.agents import now_ms
from streams.runtime.feeds import follow
from streams.settings import AutoPauseConfig, Settings

if TYPE_CHECKING:
    from streams.context import Context

__all__ = ["PauseView", "ranks_by_score", "register"]

log = logging.getLogger(__name__)


def ranks_by_score(settings: Settings) -> bool:
    """Whether any flow, or any variant of a flow's experiment, ranks bids by score (then
    the auction needs the buyers' observed acceptance rates)."""
    for f in settings.flows.values():
        variants = f.experiment.variants if f.experiment is not None else []
        if f.strategy.rank_by == "score" or any(
            v.strategy.get("rank_by") == "score" for v in variants
        ):
            return True
    return False


def register(ctx: Context) -> Offers:
    """Start the acceptance feed if any flow (or experiment variant) ranks by score, and the
    pause feed if any buyer has ``auto_pause``."""
    settings = ctx.settings
    offers = Offers()
    if ranks_by_score(settings):
        counter = AcceptanceCounter()
        offers.acceptance = counter

        def on_delivery(value: bytes) -> None:
            try:
                d = schemas.decode_as("Delivery", value)
            except schemas.SchemaError:
                return  # the post stage dead-letters what it cannot read
            counter.add(d["attempt_id"], d["buyer_id"], d["status"], d["sent_at_ms"])

        follow(
            ctx,
            ctx.names.deliveries,
            now_ms() - counter.window_ms,
            on_delivery,
            lambda: counter.expire(now_ms()),
        )

    configs = {b.id: b.auto_pause for b in settings.buyers if b.auto_pause is not None}
    if configs:
        view = PauseView(configs)

        def on_alert(value: bytes) -> None:
            try:
                view.update(schemas.decode_as("Alert", value))
            except schemas.SchemaError:
                pass

        # The metrics worker decides pauses (it already follows every ping outcome); the
        # auction workers only follow its decisions: a few records, off the hot path.
        follow(ctx, ctx.names.alerts, 0, on_alert, lambda: None)
        offers.pauses = view
    return offers


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
