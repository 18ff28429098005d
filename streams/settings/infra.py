"""The infrastructure: Kafka, ClickHouse (or the embedded warehouse), ingest and its producers,
the workers, privacy."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import (
    Field,
    SecretStr,
    field_validator,
)

from streams.settings.base import _Model, _split_hostport

__all__ = [
    "ClickHouseConfig",
    "IngestConfig",
    "KafkaConfig",
    "PrivacyConfig",
    "ProducerToken",
    "WarehouseConfig",
    "WorkerConfig",
]


class KafkaConfig(_Model):
    bootstrap: str = "127.0.0.1:9092"
    topic_prefix: str = "pingpost"
    #: Partitions of every lead-keyed topic. All lead-keyed topics share this count so
    #: Faust co-partitions them (the auction, PII and post tables live side by side).
    partitions: Annotated[int, Field(ge=1, le=1024)] = 6
    app_id: str = "pingpost"

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", v):
            raise ValueError("may hold only letters, digits, '.', '_' and '-'")
        return v


class ClickHouseConfig(_Model):
    url: str = "http://127.0.0.1:8123"
    database: str = "pingpost"
    username: str = "default"
    password: SecretStr = SecretStr("")
    #: Sink batching: flush a table's buffer at this many rows or after this many seconds.
    batch_rows: Annotated[int, Field(ge=1)] = 5000
    batch_seconds: Annotated[float, Field(gt=0)] = 1.0

    @field_validator("database")
    @classmethod
    def _db(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
            raise ValueError("must be a plain identifier")
        return v


class WarehouseConfig(_Model):
    """The embedded warehouse (chDB behind ClickHouse's HTTP interface)."""

    data_dir: str = ".run/warehouse"
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8123
    pool_size: Annotated[int, Field(ge=1, le=64)] = 4
    #: The pool grows to this many sessions when all are busy (requests running at once
    #: outside clients' named sessions): an analyst's slow queries never hold the sink up.
    max_pool_size: Annotated[int, Field(ge=1, le=256)] = 32


class ProducerToken(_Model):
    name: str
    token: SecretStr

    @field_validator("token")
    @classmethod
    def _non_empty(cls, v: SecretStr) -> SecretStr:
        if len(v.get_secret_value()) < 8:
            raise ValueError("token must be at least 8 characters")
        return v


class IngestConfig(_Model):
    listen: str = "127.0.0.1:8080"
    producers: list[ProducerToken] = []
    max_body_bytes: Annotated[int, Field(ge=256)] = 64 * 1024
    #: How long ``?wait=true`` holds the request for the auction outcome.
    wait_timeout_s: Annotated[float, Field(gt=0)] = 15.0
    #: How long publishing a lead may take before ingest answers ``503`` + ``Retry-After``
    #: (a retry with the same ``Idempotency-Key`` is safe: the lead may still land).
    publish_timeout_s: Annotated[float, Field(gt=0, le=30)] = 2.0
    #: How long a repeat of an ``Idempotency-Key`` (or of a producer-supplied ``lead_id``)
    #: is recognised: the redact stage drops a lead id seen within this window.
    idempotency_window_s: Annotated[float, Field(ge=60)] = 86_400.0
    #: How far back an ingest process reloads settled outcomes from the results topic at
    #: start-up, to answer repeats without publishing (0: from start-up on only).
    remember_outcomes_s: Annotated[float, Field(ge=0)] = 900.0
    #: Admission control (streams/rules/admission.py): a lead whose predicted queue delay (accepted
    #: → ping round open) would pass this bound is refused with 429 + Retry-After; 0: off.
    max_queue_delay_ms: Annotated[int, Field(ge=0, le=600_000)] = 1000

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        _split_hostport(v)
        return v

    @property
    def host(self) -> str:
        return _split_hostport(self.listen)[0]

    @property
    def port(self) -> int:
        return _split_hostport(self.listen)[1]


class WorkerConfig(_Model):
    #: Leads whose ping round or post waterfall may be in flight at once per worker.
    max_inflight: Annotated[int, Field(ge=1)] = 1000
    #: Faust's web port (0 disables; several workers on one host need distinct ports).
    web_port: Annotated[int, Field(ge=0, le=65535)] = 6066
    #: Kafka static membership for the workers `pingpost up` supervises: each joins its group
    #: under a stable name (its slot: ``worker``, ``worker2``, ``sink``...), so a worker that
    #: crashed and was restarted gets its partitions back at once, without a rebalance and
    #: without waiting for the group to expire the dead member. A worker stopped on purpose
    #: leaves its partitions idle for the session timeout (10 s) unless it comes back.
    static_membership: bool = True
    #: How long a capped buyer's reservation lives when nobody commits or releases it (its
    #: worker crashed): at least this, and longer than two of the buyer's post timeouts.
    cap_hold_s: Annotated[float, Field(ge=1)] = 120.0
    #: How long a closed auction stays in the auction table to reject late/redelivered bids.
    closed_retention_s: Annotated[float, Field(gt=0)] = 600.0
    #: The sink and metrics workers fetch in batches: the broker answers their fetch once
    #: this many bytes wait, or after ``batch_fetch_wait_ms``. Fewer, larger fetches cost far
    #: less CPU per record (faust_patches point 9); 1 reads every record at once. The
    #: auction workers always read at once.
    batch_fetch_min_bytes: Annotated[int, Field(ge=1, le=4 * 1024 * 1024)] = 32 * 1024
    #: The longest a sink or metrics fetch waits for those bytes: how late the warehouse
    #: and the metrics may be at low traffic.
    batch_fetch_wait_ms: Annotated[int, Field(ge=10, le=5000)] = 500
    #: The auction workers' fetch: the broker answers it once this many bytes wait, or after
    #: 10 ms. While records flow, a fetch per record costs more than the records (the fixed
    #: cost of a request, twice: the worker's and the broker's); 1 reads every record at
    #: once. At rest, and for the first record after it, a fetch is answered at once anyway
    #: (faust_patches points 8 and 9). Each Kafka hop of a lead may wait up to 10 ms for it.
    fetch_min_bytes: Annotated[int, Field(ge=1, le=1024 * 1024)] = 1
    #: How long a worker's producer holds a record for others to the same broker: a lead's
    #: small events (table changelogs, rounds, orders) then share one produce request. Each
    #: Kafka hop of a lead may wait this long.
    producer_linger_ms: Annotated[float, Field(ge=0, le=100)] = 2.0


class PrivacyConfig(_Model):
    #: Key of the HMAC-SHA256 used to hash PII values (duplicate checks, analytics joins).
    #: A plain hash of a phone number is reversible by brute force; a keyed one is not.
    hash_key: SecretStr = SecretStr("pingpost-dev-hash-key")
    #: How long the post stage keeps a lead's PII if the lead is never settled.
    pii_ttl_s: Annotated[float, Field(gt=0)] = 3600.0
    #: Retention of the leads topic, which holds every lead whole, PII included (the redact
    #: stage reads it within seconds). A lead not redacted by then — every auction worker
    #: down for longer — is lost, so keep it above the longest outage you plan to ride out.
    leads_retention_hours: Annotated[float, Field(ge=1, le=24 * 30)] = 24.0
