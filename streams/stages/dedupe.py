"""Duplicate leads (issue 3, rule 8).

A flow with ``duplicates: {fields: [email, phone], window_s, action}`` gives each lead an
*identity*: a keyed HMAC of the flow and the normalised values of those fields (never the
values). Two leads with the same identity within ``window_s`` are the same person asking
twice.

**One owner per identity.** Leads are keyed by lead_id, so two duplicates can land on
different partitions and workers. For such flows the redact stage sends the ping request to
the ``dedupe`` topic keyed by the identity instead of straight to ``ping-requests``; the
worker owning that partition decides, one lead at a time, from a changelogged table of
identities. So two identical leads submitted at the same instant are ordered: the first one
wins, the second is a duplicate. Flows without ``duplicates`` take no extra hop.

- ``action: reject`` — a duplicate is not auctioned: it settles at once as ``unsold`` with the
  reason ``duplicate of lead <id> (same email, phone) within 24h`` (the ``auctions`` row, and
  the ``?wait=true`` answer, say so).
- ``action: skip_buyers`` — a duplicate is auctioned, but buyers that bought one of the
  earlier leads of that identity are not pinged (``filtered``, ``already bought this lead``).
  Who bought comes from the settled results, which every worker follows. A duplicate whose
  earlier lead is still being sold is rejected (its buyers are not known yet, and selling it
  now could sell the person twice to the same buyer).

A redelivered lead (same lead_id) is never a duplicate of itself.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from functools import partial
from typing import TYPE_CHECKING, Any

import schemas
from streams.rules.dedupe import decide
from streams.runtime.agents import DeadLetters, now_ms
from streams.settings import DuplicatesConfig, flow_versions

if TYPE_CHECKING:
    from streams.context import Context, ProgressPort

__all__ = ["DedupeStage", "register"]

log = logging.getLogger(__name__)

#: A topic's ``send(key=..., value=...)``.
Send = Callable[..., Awaitable[Any]]


class DedupeStage:
    """The dedupe stage's state and handlers: one owner decides, per identity, whether a lead
    is a duplicate.

    ``flows`` are the duplicate checks by flow; ``table`` is the ``identities`` table;
    ``send_request`` and ``send_result`` send to the ``ping-requests`` and ``results``
    topics; ``sold`` (settled lead -> winners) is fed by :meth:`on_result`."""

    def __init__(
        self,
        flows: Mapping[str, DuplicatesConfig],
        *,
        table: MutableMapping[str, Any],
        send_request: Send,
        send_result: Send,
        dead: DeadLetters,
        progress: ProgressPort,
        versions: Mapping[str, str] | None = None,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.flows = flows
        #: flow -> its configuration version's hash, recorded on a duplicate's result.
        self.versions = dict(versions or {})
        self.table = table
        self._send_request = send_request
        self._send_result = send_result
        self.dead = dead
        self.progress = progress
        self._clock = clock
        self.longest_ms = int(max(c.window_s for c in flows.values()) * 1000)
        self.sold: dict[
            str, list[str]
        ] = {}  # settled lead -> winners (every worker, all partitions)
        self.sold_at: list[tuple[int, str]] = []

    async def handle(self, req: dict[str, Any]) -> None:
        requests_send, table = self._send_request, self.table
        cfg = self.flows.get(req["flow"])
        identity = req.get("identity")
        if cfg is None or identity is None:
            await requests_send(
                key=req["lead_id"].encode(), value=schemas.encode("PingRequest", req)
            )
            return
        verdict, entry, why, skip = decide(
            table.get(identity), req["lead_id"], req["received_at_ms"], cfg, self.sold
        )
        table[identity] = entry
        if verdict == "pass":
            await requests_send(
                key=req["lead_id"].encode(),
                value=schemas.encode("PingRequest", {**req, "skip_buyers": skip}),
            )
            return
        at = self._clock()
        await self._send_result(
            key=req["lead_id"].encode(),
            value=schemas.encode(
                "AuctionResult",
                {
                    "lead_id": req["lead_id"],
                    "flow": req["flow"],
                    "source": req["source"],
                    "outcome": "unsold",
                    "winners": [],
                    "prices": [],
                    "price_total": 0.0,
                    "reason": why,
                    "received_at_ms": req["received_at_ms"],
                    "opened_at_ms": at,
                    "deadline_at_ms": at,
                    "closed_at_ms": at,
                    "settled_at_ms": at,
                    "close_reason": "duplicate",
                    "close_lag_ms": 0.0,
                    "pinged": 0,
                    "bids": 0,
                    "post_attempts": 0,
                    "config_hash": self.versions.get(req["flow"], ""),
                    "variant": "",
                },
            ),
        )

    async def agent(self, stream: Any) -> None:
        dead, progress = self.dead, self.progress
        async for event in stream.events():
            msg = event.message
            progress.took("dedupe", msg.topic, msg.partition, msg.offset)
            try:
                req = schemas.decode_as("PingRequest", event.value)
            except schemas.SchemaError as exc:
                await dead.send(event, f"undecodable ping request: {exc}")
                continue
            await dead.guarded(event, partial(self.handle, req), "dedupe")

    async def purge(self) -> None:
        """Forget identities whose leads all left the window (local partitions only)."""
        table, longest_ms, sold, sold_at = self.table, self.longest_ms, self.sold, self.sold_at
        now = self._clock()
        for identity, entry in list(table.items()):
            if entry is None or all(now - x[1] > longest_ms for x in entry.get("leads", [])):
                table.pop(identity, None)
        while sold_at and now - sold_at[0][0] > longest_ms:
            sold.pop(sold_at.pop(0)[1], None)

    def on_result(self, value: bytes) -> None:
        try:
            r = schemas.decode_as("AuctionResult", value)
        except schemas.SchemaError:
            return
        if r["flow"] in self.flows and r["lead_id"] not in self.sold:
            self.sold[r["lead_id"]] = list(r["winners"])
            self.sold_at.append((r["settled_at_ms"], r["lead_id"]))


def register(ctx: Context) -> None:
    """The dedupe agent (dedupe topic → identities table → ping-requests or a result) and the
    sold-leads feed, in every auction worker when any flow checks duplicates."""
    settings = ctx.settings
    flows = {n: f.duplicates for n, f in settings.flows.items() if f.duplicates is not None}
    if not flows:
        return
    from streams.runtime.agents import timer
    from streams.runtime.feeds import follow
    from streams.runtime.progress import tracker

    app = ctx.app
    requests, results = ctx.topic("ping_requests"), ctx.topic("results")
    dead = DeadLetters(ctx.topic("deadletter"), "dedupe")
    progress = tracker(ctx)
    table = app.Table(
        "identities",
        default=None,
        partitions=settings.kafka.partitions,
        key_type=str,
        value_type=None,
    )
    stage = DedupeStage(
        flows,
        table=table,
        send_request=requests.send,
        send_result=results.send,
        dead=dead,
        progress=progress,
        versions={n: v.hash for n, v in flow_versions(settings).items()},
    )

    @app.agent(ctx.topic("dedupe"), name="dedupe", concurrency=1)
    async def dedupe_agent(stream: Any) -> None:
        await stage.agent(stream)

    @timer(app, 60.0, name="dedupe-purge")
    async def purge() -> None:
        """Forget identities whose leads all left the window (local partitions only)."""
        await stage.purge()

    follow(ctx, ctx.names.results, now_ms() - stage.longest_ms, stage.on_result, lambda: None)
