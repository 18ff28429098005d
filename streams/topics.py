"""Every Kafka topic pingpost uses, declared once: name, events it carries, partitions, config.

Topics are created explicitly (``pingpost topics create`` / start-up), never by broker
auto-create. All lead-keyed topics share one partition count so Faust co-partitions them: the
auction table, the PII table and the post table of a lead live on the same worker.
Event values are Avro single-object encoded (``schemas``); keys are the lead_id as UTF-8.
The Faust tables' changelog topics declared here hold Faust's JSON instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from streams.settings import Settings

__all__ = ["TABLES", "TopicSpec", "topic_specs", "TopicNames", "changelog_topic"]

#: Faust tables of the auction role. Their changelog topics are created here, before any
#: worker starts: if Faust creates them itself at start-up, a worker can write to a table
#: before its metadata knows the new topic and fails with PartitionsMismatch ("changelog
#: has 0 partitions") — seen on a cold start.
TABLES = ("auctions", "pii", "postings", "caps", "identities", "lead_ids")


def changelog_topic(app_id: str, table: str) -> str:
    return f"{app_id}-{table}-changelog"


DAY_MS = 24 * 3600 * 1000
HOUR_MS = 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    name: str
    events: tuple[str, ...]
    partitions: int
    config: dict[str, str] = field(default_factory=dict)
    doc: str = ""


@dataclass(frozen=True)
class TopicNames:
    leads: str
    ping_requests: str
    lead_pii: str
    bids: str
    posts: str
    deliveries: str
    results: str
    deadletter: str
    alerts: str
    caps: str
    cap_decisions: str
    cap_state: str
    dedupe: str
    progress: str
    flow_versions: str

    @classmethod
    def from_settings(cls, settings: Settings) -> TopicNames:
        p = settings.kafka.topic_prefix
        return cls(
            leads=f"{p}.leads",
            ping_requests=f"{p}.ping-requests",
            lead_pii=f"{p}.lead-pii",
            bids=f"{p}.bids",
            posts=f"{p}.posts",
            deliveries=f"{p}.deliveries",
            results=f"{p}.results",
            deadletter=f"{p}.deadletter",
            alerts=f"{p}.alerts",
            caps=f"{p}.caps",
            cap_decisions=f"{p}.cap-decisions",
            cap_state=f"{p}.cap-state",
            dedupe=f"{p}.dedupe",
            progress=f"{p}.progress",
            flow_versions=f"{p}.flow-versions",
        )


def topic_specs(settings: Settings) -> list[TopicSpec]:
    n = TopicNames.from_settings(settings)
    parts = settings.kafka.partitions
    week = {"retention.ms": str(7 * DAY_MS)}
    # Topics holding raw PII are deleted segment by segment: hour-long segments, so nothing
    # outlives its retention by more than an hour (Kafka's default segment is 7 days).
    hour_segments = {"segment.ms": str(HOUR_MS)}
    leads_ms = int(settings.privacy.leads_retention_hours * HOUR_MS)
    return [
        TopicSpec(
            n.leads,
            ("Lead",),
            parts,
            {"retention.ms": str(leads_ms), **hour_segments},
            "leads in, from producers and HTTP ingest; PII-bearing (whole leads), kept "
            "privacy.leads_retention_hours",
        ),
        TopicSpec(n.ping_requests, ("PingRequest",), parts, week, "accepted leads, ping view only"),
        # PII: compacted, one day at most (the post stage's table forgets it once settled).
        TopicSpec(
            n.lead_pii,
            ("LeadPii",),
            parts,
            {"cleanup.policy": "compact,delete", "retention.ms": str(DAY_MS), **hour_segments},
            "PII of accepted leads; read only by the post stage",
        ),
        TopicSpec(
            n.bids,
            ("PingRound", "Bid", "AuctionClose", "AuctionOpen"),
            parts,
            week,
            "ping rounds (one record each: open marker and every outcome), backup-wave pings, "
            "close markers",
        ),
        TopicSpec(n.posts, ("PostOrder",), parts, week, "winner events: ranked bids to post"),
        TopicSpec(n.deliveries, ("Delivery",), parts, week, "post attempts and answers"),
        TopicSpec(n.results, ("AuctionResult",), parts, week, "settled outcome per lead"),
        TopicSpec(
            n.deadletter,
            ("DeadLetter",),
            parts,
            {"retention.ms": str(30 * DAY_MS)},
            "records a stage could not process, with the reason",
        ),
        # Compacted: it keeps the last state of every (rule, subject), which the metrics role
        # reads at start-up so a restart never re-emits a transition (streams/rules/alerts.py).
        TopicSpec(
            n.alerts,
            ("Alert",),
            1,
            {"cleanup.policy": "compact"},
            "alert state changes, key = <rule>|<subject>",
        ),
        TopicSpec(
            n.dedupe,
            ("PingRequest",),
            parts,
            week,
            "ping requests of flows with duplicate checks, key = identity hash (one owner "
            "per person)",
        ),
        TopicSpec(
            n.caps,
            ("CapRequest",),
            parts,
            week,
            "cap reservations, commits and releases, key = buyer_id (one owner per buyer)",
        ),
        TopicSpec(
            n.cap_decisions,
            ("CapDecision",),
            parts,
            week,
            "the cap owner's answers to reservations, key = lead_id",
        ),
        TopicSpec(
            n.cap_state,
            ("CapState",),
            parts,
            {"cleanup.policy": "compact"},
            "each buyer's cap counters after every change, key = buyer_id",
        ),
        # Admission control: workers' progress every ~200 ms; only the last seconds matter.
        TopicSpec(
            n.progress,
            ("Progress",),
            1,
            {"retention.ms": str(600_000), "segment.ms": str(600_000)},
            "auction workers' progress reports for ingest's admission control, key = worker id",
        ),
        # Replay (docs/strategy-lab.md): each version of a flow's selling configuration, once.
        TopicSpec(
            n.flow_versions,
            ("FlowVersion",),
            1,
            {"cleanup.policy": "compact"},
            "versions of each flow's selling configuration, key = hash (auctions record it)",
        ),
        *(
            TopicSpec(
                changelog_topic(settings.kafka.app_id, t),
                (),
                parts,
                # The PII table's changelog holds PII: compacted and also deleted after a
                # day, in hour-long segments so deletion is not held back by a big segment.
                {"cleanup.policy": "compact,delete", "retention.ms": str(DAY_MS), **hour_segments}
                if t == "pii"
                else {"cleanup.policy": "compact"},
                f"changelog of the Faust table '{t}'",
            )
            for t in TABLES
        ),
    ]
