"""What the stages of a worker share: the app, the settings, every topic once, and the few
things one stage offers another.

Stages never import each other; whatever one needs from another goes through here, wired
once by ``streams.app.create_app``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import faust

from streams.settings import FlowConfig, Settings
from streams.topics import TopicNames

if TYPE_CHECKING:
    from streams.rules.buyer_stats import AcceptanceCounter

__all__ = ["Context", "ranking_inputs"]

log = logging.getLogger(__name__)


@dataclass
class Context:
    """What every stage's ``register`` gets: the app, settings, and every topic once."""

    settings: Settings
    app: faust.App
    names: TopicNames
    topics: dict[str, Any] = field(default_factory=dict)
    #: Shared resources created at worker start (buyer client, ClickHouse client).
    resources: dict[str, Any] = field(default_factory=dict)

    #: Async callables run when the worker stops (drain in-flight work, close clients).
    closers: list[Any] = field(default_factory=list)

    def topic(self, attr: str) -> Any:
        return self.topics[getattr(self.names, attr)]

    def buyer_client(self) -> Any:
        """The one buyer client of this worker (one aiohttp session, one keep-alive pool for
        pings and posts), created on first use inside the running loop."""
        client = self.resources.get("buyer_client")
        if client is None:
            from connectors.buyers import BuyerClient

            client = self.resources["buyer_client"] = BuyerClient()
            self.closers.insert(0, client.aclose)  # closers run in reverse: closed last
        return client

    async def close(self) -> None:
        for closer in reversed(self.closers):
            try:
                await closer()
            except Exception:
                log.exception("error while closing %r", closer)
        self.closers.clear()


def ranking_inputs(ctx: Context, flow: FlowConfig) -> dict[str, Any]:
    """``decide``'s ``acceptance`` and ``payment`` for ``flow`` in this worker: observed
    acceptance rates (None when the flow does not rank by score) and configured payment
    speeds."""
    counter: AcceptanceCounter | None = ctx.resources.get("acceptance")
    prior = flow.strategy.acceptance_prior
    payment = ctx.resources.get("payment_speeds")
    if payment is None:
        payment = ctx.resources["payment_speeds"] = {
            b.id: b.payment_speed for b in ctx.settings.buyers
        }
    acceptance = (
        counter.rates(prior.rate, prior.weight)
        if counter is not None and flow.strategy.rank_by == "score"
        else None
    )
    return {"acceptance": acceptance, "payment": payment}
