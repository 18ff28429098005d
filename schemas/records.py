"""The events as typed dicts, generated from the ``.avsc`` files by ``python -m schemas.typed``:
do not edit; regenerate after a schema change (tests/unit/test_schemas.py checks it)."""

from __future__ import annotations

from typing import NotRequired, TypedDict

__all__ = [
    "Alert",
    "AuctionClose",
    "AuctionOpen",
    "AuctionResult",
    "Bid",
    "Candidate",
    "CapDecision",
    "CapRequest",
    "CapState",
    "Conditions",
    "DeadLetter",
    "Delivery",
    "FlowVersion",
    "Lead",
    "LeadPii",
    "PingRequest",
    "PingRound",
    "PingedBuyer",
    "PostOrder",
    "Progress",
    "StageOffset",
]


class Conditions(TypedDict):
    """Conditions a buyer attached to its bid (CONTRACT §2)."""

    max_age_minutes: NotRequired[None | float]
    states: NotRequired[None | list[str]]
    require_consent: NotRequired[bool]
    exclusive_required: NotRequired[bool]


class Lead(TypedDict):
    """A lead as published by a producer to the leads topic (CONTRACT §1). Flow-specific fields go in `fields`; key = lead_id."""

    flow: str
    lead_id: NotRequired[None | str]
    created_at: NotRequired[None | str]
    fields: NotRequired[dict[str, None | bool | int | float | str]]
    source: NotRequired[None | str]
    received_at_ms: NotRequired[None | int]


class PingRequest(TypedDict):
    """An accepted, redacted lead: the ping view only (no PII field, no PII value). Key = lead_id."""

    lead_id: str
    flow: str
    source: str
    received_at_ms: int
    created_at_ms: int
    ping_fields: dict[str, None | bool | int | float | str]
    pii_hashes: NotRequired[dict[str, str]]
    identity: NotRequired[None | str]
    skip_buyers: NotRequired[list[str]]


class LeadPii(TypedDict):
    """The PII part of an accepted lead, read only by the post stage. Key = lead_id. Lives in the lead-pii topic (compacted, short retention) and nowhere else."""

    lead_id: str
    flow: str
    fields: dict[str, None | bool | int | float | str]
    expires_at_ms: int


class PingedBuyer(TypedDict):
    """PingedBuyer"""

    buyer_id: str
    tier: str
    ping_id: str


class AuctionOpen(TypedDict):
    """A ping round started: who was pinged and when the auction must close. Recorded in the auctions table before any ping is sent; on the bids topic inside its PingRound (key = lead_id)."""

    lead_id: str
    flow: str
    source: str
    received_at_ms: int
    created_at_ms: int
    opened_at_ms: int
    deadline_at_ms: int
    ping_fields: dict[str, None | bool | int | float | str]
    pinged: list[PingedBuyer]
    skip_buyers: NotRequired[list[str]]
    attempt: NotRequired[int]


class Bid(TypedDict):
    """The outcome of one buyer ping: a bid, a no-bid, or a failure with its reason. On the bids topic (key = lead_id) inside its round's PingRound, or alone for the post waterfall's backup waves. One per ping_id (ping_id is deterministic per lead and buyer, so a replayed ping has the same id)."""

    lead_id: str
    flow: str
    ping_id: str
    buyer_id: str
    tier: str
    status: str
    sent_at_ms: int
    answered_at_ms: int
    latency_ms: float
    price: NotRequired[None | float]
    exclusive: NotRequired[bool]
    buyer_ref: NotRequired[None | str]
    conditions: Conditions
    reason: NotRequired[str]
    http_status: NotRequired[None | int]
    wave: NotRequired[int]
    timeout_ms: NotRequired[None | float]


class AuctionClose(TypedDict):
    """Close marker, sent by the deadline timer (or the recovery sweep) into the lead's partition of the bids topic. Closing is idempotent: a second marker does nothing."""

    lead_id: str
    reason: str
    at_ms: int


class PingRound(TypedDict):
    """A finished ping round as one record: its open marker and every pinged (or filtered) buyer's outcome. On the bids topic, key = lead_id; written when the round's last answer is in (or its time is up)."""

    lead_id: str
    open: AuctionOpen
    answers: list[Bid]


class Candidate(TypedDict):
    """Candidate"""

    buyer_id: str
    tier: str
    ping_id: str
    price: float
    exclusive: bool
    conditions: Conditions
    answered_at_ms: int


class PostOrder(TypedDict):
    """Winner event: the closed auction's ranked, acceptable bids, emitted to the post topic (key = lead_id). The post stage walks it as a waterfall."""

    lead_id: str
    flow: str
    source: str
    mode: str
    slots: int
    candidates: list[Candidate]
    ping_fields: dict[str, None | bool | int | float | str]
    received_at_ms: int
    created_at_ms: int
    opened_at_ms: int
    deadline_at_ms: int
    closed_at_ms: int
    close_reason: str
    close_lag_ms: float
    pinged: int
    bids: int
    skip_buyers: NotRequired[list[str]]
    config_hash: NotRequired[str]
    variant: NotRequired[str]


class Delivery(TypedDict):
    """One post attempt to one buyer and its answer. Key = lead_id. post_id is deterministic per lead and buyer (the Idempotency-Key); attempt_id per try."""

    attempt_id: str
    post_id: str
    lead_id: str
    flow: str
    buyer_id: str
    tier: str
    ping_id: str
    price: float
    exclusive: bool
    status: str
    latency_ms: float
    reason: NotRequired[str]
    http_status: NotRequired[None | int]
    sent_at_ms: int
    attempt: int


class AuctionResult(TypedDict):
    """The settled outcome of a lead's auction, after the post waterfall. Key = lead_id. One per lead."""

    lead_id: str
    flow: str
    source: str
    outcome: str
    winners: list[str]
    prices: list[float]
    price_total: float
    reason: NotRequired[str]
    received_at_ms: int
    opened_at_ms: int
    deadline_at_ms: int
    closed_at_ms: int
    settled_at_ms: int
    close_reason: str
    close_lag_ms: float
    pinged: int
    bids: int
    post_attempts: int
    config_hash: NotRequired[str]
    variant: NotRequired[str]


class DeadLetter(TypedDict):
    """A record a stage could not process, with the reason. Nothing is dropped silently: invalid leads and undecodable events land here."""

    id: str
    stage: str
    topic: str
    partition: int
    offset: int
    key: NotRequired[None | bytes]
    payload: bytes
    reason: str
    field: NotRequired[None | str]
    at_ms: int
    payload_redacted: NotRequired[bool]
    payload_length: NotRequired[None | int]
    payload_hmac: NotRequired[None | str]
    pii_hashes: NotRequired[dict[str, str]]


class Alert(TypedDict):
    """An alert state change (firing or resolved) of one rule for one subject, emitted once per transition by the metrics role. On the alerts topic (compacted), key = '<rule>|<subject>': the topic keeps the last state of every alert. alert_id = rule|subject|at_ms|state is deterministic: a transition recomputed after a restart has the same id (and the same `alerts` row)."""

    alert_id: str
    rule: str
    metric: str
    scope: str
    subject: str
    state: str
    value: NotRequired[None | float]
    threshold: float
    comparison: str
    samples: int
    window_s: float
    at_ms: int
    message: NotRequired[str]


class CapRequest(TypedDict):
    """A post stage's request to the owner of a buyer's cap counters (key = buyer_id, so one worker owns each buyer): reserve a slot before posting, commit it on an accepted (or ambiguous) post, release it otherwise."""

    request_id: str
    kind: str
    buyer_id: str
    lead_id: str
    price: float
    at_ms: int
    expires_at_ms: NotRequired[None | int]


class CapDecision(TypedDict):
    """The cap owner's answer to a reserve request (key = lead_id, back to the worker posting the lead)."""

    request_id: str
    buyer_id: str
    lead_id: str
    granted: bool
    reason: NotRequired[str]


class CapState(TypedDict):
    """A buyer's cap counters after each change (key = buyer_id, compacted topic): counted accepted posts plus outstanding reservations in the current hour and day of the caps' time zone. Every worker reads it to skip capped buyers before pinging."""

    buyer_id: str
    hour: str
    day: str
    leads_hour: int
    leads_day: int
    spend_day: float
    at_ms: int


class StageOffset(TypedDict):
    """StageOffset"""

    stage: str
    topic: str
    partition: int
    offset: int


class Progress(TypedDict):
    """An auction worker's progress report (admission control, streams/admission.py), published every ~200 ms to the one-partition progress topic, key = worker id: the offset of the last record each pre-ping stage has taken per assigned partition, the ping requests taken so far, and the receipt → ping round open delays since the previous report."""

    worker: str
    at_ms: int
    offsets: list[StageOffset]
    opened: int
    delay_count: int
    delay_p50_ms: float
    delay_p99_ms: float
    delay_max_ms: float


class FlowVersion(TypedDict):
    """One version of a flow's selling configuration, published by each auction worker at start on the compacted flow-versions topic (key = hash). Auctions record the hash; a replay reads the configuration in force from here. Buyer URLs and headers are never part of it."""

    hash: str
    flow: str
    config_json: str
    at_ms: int
