"""What the stages of a worker share: the app, the settings, every topic once, and the few
things one stage offers another — as typed ports, not a dictionary of strings.

Stages never import each other; whatever one needs from another goes through a port here:
the offering stage's ``register`` returns what it offers as :class:`Offers`, and
``streams.app.create_app`` — the one place that knows every stage — wires each offer into
its port before the first event is handled (``streams.app.wire``); the using stage reads the
port when it handles an event. A port left None is a stage not running in this role (no
capped buyer, no auto-pause...), and the user copes with it. The ``progress`` port is the
runtime's (``streams.runtime.progress.tracker``), not a stage's.

=====================  ==========================  =====================================
port                   offered by                  used by
=====================  ==========================  =====================================
``auctions_table``     auction                     ping (already open? no second round)
``apply_round``        auction                     ping (the hand-off of a finished round)
``mark_open``          auction                     ping (the open marker, before any ping)
``reping``             ping                        auction (a lost round pinged again)
``ping_now``           ping                        redact (the hand-off of a ping request)
``postings_table``     post                        auction (a closed lead's progress)
``purge_with_auction`` post                        auction (purged with the auction entry)
``caps``               caps                        post (reserve, commit, release)
``cap_counters``       caps                        ping plan (filter a buyer at its cap)
``pauses``             buyer_feeds                 ping plan (filter a paused buyer)
``acceptance``         buyer_feeds                 auction, post (ranking by score)
``progress``           runtime.progress            redact, dedupe, ping (admission)
=====================  ==========================  =====================================
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import faust
from faust.types import TableT

from streams.settings import BuyerCaps, FlowConfig, Settings
from streams.topics import TopicNames

if TYPE_CHECKING:
    from connectors.buyers import BuyerClient
    from connectors.webhook import WebhookSender
    from streams.rules.buyer_stats import AcceptanceCounter
    from streams.rules.selling import BuyerCounters

__all__ = [
    "CapCounters",
    "CapReservations",
    "Context",
    "Offers",
    "PauseLookup",
    "PingNow",
    "ProgressPort",
    "Round",
    "ranking_inputs",
]

#: A finished ping round's records, ``(schema name, record)``: its ``PingRound`` (records
#: written before rounds were one record: ``AuctionOpen`` first, then each ``Bid``).
Round = list[tuple[str, Mapping[str, Any]]]

#: The ping stage's hand-off: ``(ping request, its Kafka ack) -> started``. The redact stage
#: gives it each request it wrote (not yet acknowledged); True: pinged from here, once Kafka
#: has the request (the record still arrives through its topic, and pings nobody twice).
PingNow = Callable[[dict[str, Any], Awaitable[Any]], Awaitable[bool]]


class PauseLookup(Protocol):
    """Auto-pause decisions: until when (epoch ms) a buyer is paused, or None."""

    def paused(self, buyer_id: str) -> int | None: ...


class CapCounters(Protocol):
    """The last published cap counters of a buyer (lagging the owner by a few ms)."""

    def counters(self, buyer_id: str, caps: BuyerCaps, at_ms: int) -> BuyerCounters: ...


class CapReservations(Protocol):
    """A buyer's cap owner, asked before a post and told its outcome."""

    async def reserve(
        self,
        buyer_id: str,
        lead_id: str,
        price: float,
        *,
        rebalancing: Callable[[], bool] | None = None,
        timeout_s: float | None = None,
    ) -> tuple[bool, str]: ...

    async def commit(self, buyer_id: str, lead_id: str, price: float) -> None: ...

    async def release(self, buyer_id: str, lead_id: str) -> None: ...


class ProgressPort(Protocol):
    """Admission control's view of the stages before the ping (``runtime.progress``)."""

    def took(
        self, stage: str, topic: str, partition: int, offset: int, *, ping: bool = False
    ) -> None: ...

    def opened(self, delay_ms: float) -> None: ...


log = logging.getLogger(__name__)


@dataclass
class Offers:
    """What one stage's ``register`` offers the others: the ports of :class:`Context` it
    fills (None: not offered). ``streams.app.wire`` puts them in place."""

    auctions_table: TableT[Any, Any] | None = None
    apply_round: Callable[[Round], Awaitable[bool]] | None = None
    mark_open: Callable[[dict[str, Any]], Awaitable[bool]] | None = None
    reping: Callable[[dict[str, Any], int], None] | None = None
    ping_now: PingNow | None = None
    postings_table: TableT[Any, Any] | None = None
    purge_with_auction: list[TableT[Any, Any]] = field(default_factory=list)
    caps: CapReservations | None = None
    cap_counters: CapCounters | None = None
    pauses: PauseLookup | None = None
    acceptance: AcceptanceCounter | None = None


@dataclass
class Context:
    """What every stage's ``register`` gets: the app, settings, and every topic once."""

    settings: Settings
    app: faust.App
    names: TopicNames
    topics: dict[str, Any] = field(default_factory=dict)

    # The ports (module docstring): wired by streams.app from the stages' Offers.
    auctions_table: TableT[Any, Any] | None = None
    apply_round: Callable[[Round], Awaitable[bool]] | None = None
    mark_open: Callable[[dict[str, Any]], Awaitable[bool]] | None = None
    reping: Callable[[dict[str, Any], int], None] | None = None
    ping_now: PingNow | None = None
    postings_table: TableT[Any, Any] | None = None
    purge_with_auction: list[TableT[Any, Any]] = field(default_factory=list)
    caps: CapReservations | None = None
    cap_counters: CapCounters | None = None
    pauses: PauseLookup | None = None
    acceptance: AcceptanceCounter | None = None
    progress: ProgressPort | None = None

    # Shared clients and caches, created on first use.
    buyers: BuyerClient | None = None
    webhooks: WebhookSender | None = None
    payment_speeds: dict[str, float] | None = None
    #: The subscriptions of the worker's shared feed consumer (streams.runtime.feeds.follow).
    feeds: list[Any] | None = None

    #: Async callables run when the worker stops (drain in-flight work, close clients).
    closers: list[Any] = field(default_factory=list)

    def topic(self, attr: str) -> Any:
        return self.topics[getattr(self.names, attr)]

    def buyer_client(self) -> BuyerClient:
        """The one buyer client of this worker (one aiohttp session, one keep-alive pool for
        pings and posts), created on first use inside the running loop."""
        if self.buyers is None:
            from connectors.buyers import BuyerClient

            self.buyers = BuyerClient()
            self.closers.insert(0, self.buyers.aclose)  # closers run in reverse: closed last
        return self.buyers

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
    counter = ctx.acceptance
    prior = flow.strategy.acceptance_prior
    payment = ctx.payment_speeds
    if payment is None:
        payment = ctx.payment_speeds = {b.id: b.payment_speed for b in ctx.settings.buyers}
    acceptance = (
        counter.rates(prior.rate, prior.weight)
        if counter is not None and flow.strategy.rank_by == "score"
        else None
    )
    return {"acceptance": acceptance, "payment": payment}
