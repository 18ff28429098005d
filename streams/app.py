"""The Faust app factory.

``create_app(settings, role)`` builds a fresh ``faust.App`` (never a module-level one: tests
build one per worker process) and registers the stages of its role explicitly:

- ``auction`` role (consumer group ``<app_id>``): redact → ping → auction → post.
- ``sink`` role (consumer group ``<app_id>-sink``): every event into ClickHouse. A separate
  group so a slow or absent warehouse never stalls an auction.
- ``metrics`` role (consumer group ``<app_id>-metrics``, one worker): windowed metrics per
  buyer and flow, alert rules, Prometheus ``/metrics`` — without depending on the warehouse.
"""

from __future__ import annotations

import gc
import logging
import os
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import faust
import mode

from streams.context import Context, Offers
from streams.runtime import faust_patches, watchdog
from streams.runtime.agents import KeyPartitioner
from streams.runtime.gcwatch import GcWatch
from streams.settings import ConfigError, Settings, unenforced_keys
from streams.topics import TopicNames, topic_specs

__all__ = ["create_app", "faust_settings", "wire"]

Role = Literal["auction", "sink", "metrics"]

log = logging.getLogger(__name__)

#: Every this many s, a worker logs the collector's pauses when one lasted at least
#: GC_PAUSE_LOG_S (streams.runtime.gcwatch).
GC_REPORT_S = 10.0
GC_PAUSE_LOG_S = 0.02


def wire(ctx: Context, offers: Offers) -> None:
    """Put what a stage offers into the Context's ports (``streams.context``). A port offered
    twice is a wiring error, raised at start-up."""
    for f in fields(Offers):
        value = getattr(offers, f.name)
        if f.name == "purge_with_auction":
            ctx.purge_with_auction.extend(value)
        elif value is not None:
            if getattr(ctx, f.name) is not None:
                raise RuntimeError(f"port {f.name} offered twice")
            setattr(ctx, f.name, value)


def _resources_service(ctx: Context) -> type[mode.Service]:
    class Resources(mode.Service):
        """Closes the stages' long-lived clients when the worker stops; freezes the start-up
        heap once the worker is ready; logs the collector's long pauses."""

        _gc: GcWatch | None = None

        async def on_started(self) -> None:
            # Faust starts user services once table recovery completed, just before "Ready".
            # Everything allocated so far (imports, config, clients, restored tables) lives as
            # long as the process: move it out of the cyclic GC's reach, so the full
            # collections that start-up allocation triggers no longer walk ~10^5 objects in
            # the middle of the first auctions (a 15-20 ms pause each, more under load).
            if os.environ.get("PINGPOST_GC_FREEZE", "1") == "1":
                gc.collect()
                gc.freeze()
                log.info("froze %d start-up objects out of the cyclic GC", gc.get_freeze_count())
            self._gc = GcWatch().install()

        @mode.Service.timer(GC_REPORT_S)
        async def _gc_report(self) -> None:
            # A line only when the collector stopped the worker long enough to matter.
            if self._gc is None:
                return
            w = self._gc.take()
            if w.longest_s >= GC_PAUSE_LOG_S:
                log.info(w.describe())

        async def on_stop(self) -> None:
            if self._gc is not None:
                self._gc.uninstall()
            await ctx.close()

    return Resources


#: The sink and metrics roles' consumer group heartbeat (the auction role's: 1 s).
BATCH_ROLE_HEARTBEAT_S = 3.0


def faust_settings(partitions: int, producer_linger_ms: float) -> dict[str, Any]:
    """The Faust settings every pingpost worker runs with, whatever its role (``bench/skeleton.py``
    measures Faust with them too)."""
    return {
        "store": "memory://",
        "autodiscover": False,
        "processing_guarantee": "at_least_once",
        "topic_partitions": partitions,
        "topic_replication_factor": 1,
        "producer_acks": -1,
        # A few ms of linger batches the many small events of a lead (rounds, table changelog)
        # into one produce request: far fewer syscalls on the hot path for that much per hop.
        "producer_linger": producer_linger_ms / 1000,
        # Kafka's default partitioning, with each key's hash computed once (agents.py).
        "producer_partitioner": KeyPartitioner(),
        "consumer_auto_offset_reset": "earliest",
        "table_standby_replicas": 0,
        # The auction agent is latency-critical; flag anything blocking the loop.
        "blocking_timeout": None,
        "stream_recovery_delay": 0.0,
        "broker_commit_every": 1000,
        # A crashed worker's partitions move after this long (Faust's default is 60 s).
        "broker_session_timeout": 10.0,
        "broker_heartbeat_interval": 1.0,
        "broker_commit_interval": 1.0,
    }


def create_app(
    settings: Settings,
    role: Role = "auction",
    *,
    web_port: int | None = None,
    data_root: Path | None = None,
    instance_id: str | None = None,
) -> faust.App:
    """``data_root``: where Faust's data directory goes (``<data_root>/<app id>``); by default
    under the system's temporary directory, so that nothing is left in the caller's working
    directory (tables are in memory and rebuilt from their changelogs: nothing there must
    persist). ``instance_id``: the worker's static member name in its consumer group (Kafka's
    ``group.instance.id``; ``worker.static_membership``), unique among the running workers of
    the role; None joins as a dynamic member."""
    if role == "auction" and (pending := unenforced_keys(settings)):
        raise ConfigError(
            "these keys are validated but not applied by this version yet; "
            "remove them rather than rely on them:\n  " + "\n  ".join(pending)
        )
    # Auctions need every hop in a few ms; the sink and metrics roles batch and window: they
    # fetch in batches (worker.batch_fetch_*), which costs a fraction of the CPU per record.
    w = settings.worker
    if role == "auction":
        faust_patches.apply(faust_patches.WORKER_FETCH_MAX_WAIT_MS, w.fetch_min_bytes)
    else:
        faust_patches.apply(w.batch_fetch_wait_ms, w.batch_fetch_min_bytes)
    k = settings.kafka
    app_id = k.app_id if role == "auction" else f"{k.app_id}-{role}"
    port = settings.worker.web_port if web_port is None else web_port
    datadir = (data_root or Path(tempfile.gettempdir()) / "pingpost-faust") / app_id
    datadir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(datadir, 0o700)  # owner only, like everything a worker keeps
    # Faust's own stall detector (every 2.5 s) logs an ERROR when an assigned partition with a
    # backlog sees no fetch, no processing or no commit for this long; its default (5 min)
    # hides a stuck partition of an auction worker for far too long (docs/known-issues.md).
    # The metrics role keeps events unacked on purpose: default there.
    per_role: dict[str, Any] = (
        {"stream_processing_timeout": 30.0, "broker_commit_livelock_soft_timeout": 30.0}
        if role == "auction"
        # The sink and metrics groups heartbeat every 3 s rather than every second (the
        # session timeout, 10 s, is unchanged: a crashed worker's partitions move as soon).
        # They join a rebalance up to 3 s later; nothing of theirs waits on a heartbeat, and
        # at rest it is two requests a second fewer for the broker. The auction role keeps
        # 1 s: a poster's proof of membership is its last clean heartbeat (post.py's fence).
        else {"broker_heartbeat_interval": BATCH_ROLE_HEARTBEAT_S}
    )
    app = faust.App(
        app_id,
        datadir=str(datadir),
        broker=f"kafka://{k.bootstrap}",
        web_enabled=port != 0,
        web_port=port or 6066,
        web_host="127.0.0.1",
        # A static member restarted under its old name takes its partitions back without a
        # rebalance; the surviving workers never stop (worker.static_membership).
        consumer_group_instance_id=instance_id,
        # The metrics role holds its events unacked on purpose (the uncommitted offsets are
        # its restart checkpoint, streams/stages/metrics.py): stopping must not wait for them.
        stream_wait_empty=role != "metrics",
        **{**faust_settings(k.partitions, settings.worker.producer_linger_ms), **per_role},
    )
    ctx = Context(settings, app, TopicNames.from_settings(settings))
    for spec in topic_specs(settings):
        ctx.topics[spec.name] = app.topic(
            spec.name,
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
            partitions=spec.partitions,
            internal=False,
        )
    if role == "auction":
        from streams.stages import auction, buyer_feeds, caps, dedupe, ping, post, redact

        # Every port is wired here, before the app starts: a stage reads the ports of
        # others when it handles an event, never at registration.
        redact.register(ctx)
        dedupe.register(ctx)
        wire(ctx, ping.register(ctx))
        wire(ctx, auction.register(ctx))
        wire(ctx, post.register(ctx))
        wire(ctx, buyer_feeds.register(ctx))
        wire(ctx, caps.register(ctx))
    elif role == "sink":
        from streams.stages import sink

        sink.register(ctx)
    elif role == "metrics":
        from streams.stages import metrics

        metrics.register(ctx)
    else:
        raise ValueError(f"unknown role {role!r}")
    if role in ("auction", "sink"):
        watchdog.install(app)
    app.service(_resources_service(ctx))
    app.pingpost_context = ctx  # type: ignore[attr-defined]  # ours, read by DeadLetters
    return app
