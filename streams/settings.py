"""pingpost configuration: one YAML file, validated at start-up.

The file is read once at the edge (CLI), ``${VAR}`` / ``${VAR:-default}`` references are
resolved from the environment, and the result is a frozen, typed :class:`Settings`. Every
validation error names the key path (``buyers[2].ping_url``) and the problem, so an operator
can fix the file without reading code. Secrets (buyer headers, producer tokens, the ClickHouse
password) are ``SecretStr``: they never print, and never reach logs, topics or ClickHouse.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "BuyerConfig",
    "ConfigError",
    "FieldSpec",
    "FlowConfig",
    "PingField",
    "Settings",
    "SimBuyerConfig",
    "load_settings",
    "parse_settings",
]

DEFAULT_CONFIG_ENV = "PINGPOST_CONFIG"


class ConfigError(ValueError):
    """The configuration file is invalid; the message names the key and the problem."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    #: How long a closed auction stays in the auction table to reject late/redelivered bids.
    closed_retention_s: Annotated[float, Field(gt=0)] = 600.0


FieldType = Literal["string", "boolean", "integer", "number"]


class FieldSpec(_Model):
    type: FieldType = "string"
    enum: list[Any] | None = None
    pattern: str | None = None
    min: float | None = None
    max: float | None = None
    max_length: Annotated[int, Field(ge=1)] = 256

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from exc
        return v


Transform = Literal["keep", "zip3", "prefix", "lower", "upper"]


class PingField(_Model):
    """A lead field sent in pings, after its transform (``zip3``: first three digits)."""

    transform: Transform = "keep"
    #: For ``prefix``: how many characters to keep.
    length: Annotated[int, Field(ge=1)] | None = None
    #: Name in the ping body (defaults to the lead field's name).
    rename: str | None = None

    @model_validator(mode="after")
    def _prefix_len(self) -> "PingField":
        if self.transform == "prefix" and self.length is None:
            raise ValueError("transform 'prefix' needs 'length'")
        return self


class StrategyConfig(_Model):
    #: ``highest``: best acceptable bid by price wins (exclusive if it asks, else shared to
    #: the top ``shared_max``).
    mode: Literal["highest"] = "highest"
    shared_max: Annotated[int, Field(ge=1, le=50)] = 3
    #: Prices above this are "absurd" and recorded as an error, never a winning bid.
    max_price: Annotated[float, Field(gt=0)] = 10_000.0
    min_price: Annotated[float, Field(ge=0)] = 0.0

    @model_validator(mode="after")
    def _prices(self) -> "StrategyConfig":
        if self.min_price > self.max_price:
            raise ValueError("min_price is above max_price: nothing could ever sell")
        return self


class FlowConfig(_Model):
    fields: dict[str, FieldSpec]
    required: list[str] = []
    ping_fields: dict[str, PingField]
    pii_fields: list[str]
    #: Overall ping deadline, measured from the start of the ping round.
    deadline_ms: Annotated[int, Field(ge=50, le=60_000)] = 750
    #: Platform overhead + network buffer subtracted from the deadline before pinging
    #: (Prebid Server's practice), so answers reach the auction before it closes.
    safety_margin_ms: Annotated[int, Field(ge=0)] = 50
    strategy: StrategyConfig = StrategyConfig()
    #: How long the post stage may keep trying the waterfall for one lead.
    post_timeout_ms: Annotated[int, Field(ge=100)] = 5000

    @model_validator(mode="after")
    def _consistent(self) -> "FlowConfig":
        for name in self.required:
            if name not in self.fields:
                raise ValueError(f"required field '{name}' is not declared in 'fields'")
        for name in self.ping_fields:
            if name not in self.fields:
                raise ValueError(f"ping field '{name}' is not declared in 'fields'")
            if name in self.pii_fields:
                raise ValueError(f"field '{name}' is both a ping field and a PII field")
        for name in self.pii_fields:
            if name not in self.fields:
                raise ValueError(f"PII field '{name}' is not declared in 'fields'")
        for name in self.fields:
            if name in RESERVED_FIELDS:
                raise ValueError(f"field name '{name}' is reserved")
        sent: dict[str, str] = {}
        for name, spec in self.ping_fields.items():
            out = spec.rename or name
            if out in RESERVED_FIELDS:
                raise ValueError(f"ping field '{name}' is renamed to the reserved name '{out}'")
            if out in self.pii_fields:
                raise ValueError(f"ping field '{name}' is renamed to the PII field '{out}'")
            if out in sent or (out != name and out in self.ping_fields):
                raise ValueError(f"ping field '{name}' is renamed to '{out}', which another "
                                 "ping field already uses")
            sent[out] = name
        if self.safety_margin_ms >= self.deadline_ms:
            raise ValueError("safety_margin_ms must be smaller than deadline_ms")
        return self


#: Names the platform owns in every lead / ping / post body.
RESERVED_FIELDS = frozenset(
    {"flow", "lead_id", "created_at", "ping_id", "post_id", "tmax_ms", "price", "exclusive"}
)


class ResponseMapping(_Model):
    """Where a buyer's ping response keeps each value (dotted paths into the JSON)."""

    bid: str = "bid"
    price: str = "price"
    exclusive: str = "exclusive"
    buyer_id: str = "buyer_id"
    conditions: str = "conditions"


class PostResponseMapping(_Model):
    accepted: str = "accepted"
    status: str = "status"
    reason: str = "reason"


class BuyerFilters(_Model):
    states: list[str] | None = None


class BuyerConfig(_Model):
    id: str
    flows: list[str]
    tier: str = "standard"
    ping_url: str
    post_url: str
    timeout_ms: Annotated[int, Field(ge=10, le=60_000)] = 500
    post_timeout_ms: Annotated[int, Field(ge=10, le=120_000)] = 3000
    headers: dict[str, SecretStr] = {}
    filters: BuyerFilters = BuyerFilters()
    response: ResponseMapping = ResponseMapping()
    post_response: PostResponseMapping = PostResponseMapping()

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", v):
            raise ValueError("must be 1-64 letters, digits, '.', '_' or '-'")
        return v

    @field_validator("ping_url", "post_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("must be an http:// or https:// URL")
        return v


class Dist(_Model):
    """A lognormal-ish distribution given by median and p99 (simulator)."""

    median: Annotated[float, Field(ge=0)]
    p99: Annotated[float, Field(ge=0)]


class SimBuyerConfig(_Model):
    """One simulated buyer of the demo market (``pingpost buyers simulate``)."""

    #: 0 picks a free port (tests).
    port: Annotated[int, Field(ge=0, le=65535)]
    bid_probability: Annotated[float, Field(ge=0, le=1)] = 0.7
    price: Dist = Dist(median=40, p99=90)
    exclusive_share: Annotated[float, Field(ge=0, le=1)] = 0.2
    latency_ms: Dist = Dist(median=60, p99=400)
    #: Share of pings answered after the buyer's timeout (the late tail).
    late_share: Annotated[float, Field(ge=0, le=1)] = 0.02
    error_rate: Annotated[float, Field(ge=0, le=1)] = 0.01
    post_reject_rate: Annotated[float, Field(ge=0, le=1)] = 0.1
    post_error_rate: Annotated[float, Field(ge=0, le=1)] = 0.0
    #: Misbehaviour for tests: garbage answers.
    mode: Literal["normal", "non_json", "http_500", "negative_price", "string_price", "slow"] = (
        "normal"
    )


class SimulatorConfig(_Model):
    seed: int = 42
    host: str = "127.0.0.1"
    buyers: dict[str, SimBuyerConfig] = {}


class PrivacyConfig(_Model):
    #: Key of the HMAC-SHA256 used to hash PII values (duplicate checks, analytics joins).
    #: A plain hash of a phone number is reversible by brute force; a keyed one is not.
    hash_key: SecretStr = SecretStr("pingpost-dev-hash-key")
    #: How long the post stage keeps a lead's PII if the lead is never settled.
    pii_ttl_s: Annotated[float, Field(gt=0)] = 3600.0


class Settings(_Model):
    kafka: KafkaConfig = KafkaConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    clickhouse: ClickHouseConfig = ClickHouseConfig()
    warehouse: WarehouseConfig = WarehouseConfig()
    ingest: IngestConfig = IngestConfig()
    worker: WorkerConfig = WorkerConfig()
    flows: dict[str, FlowConfig]
    buyers: list[BuyerConfig] = []
    simulator: SimulatorConfig = SimulatorConfig()
    alerts: list[dict[str, Any]] = []

    @model_validator(mode="after")
    def _cross(self) -> "Settings":
        seen: set[str] = set()
        for i, b in enumerate(self.buyers):
            if b.id in seen:
                raise ValueError(f"buyers[{i}].id: duplicate buyer id '{b.id}'")
            seen.add(b.id)
            for f in b.flows:
                if f not in self.flows:
                    raise ValueError(f"buyers[{i}].flows: unknown flow '{f}'")
        for name in self.simulator.buyers:
            if name not in seen:
                raise ValueError(f"simulator.buyers.{name}: no buyer with this id")
        return self

    def buyer(self, buyer_id: str) -> BuyerConfig:
        for b in self.buyers:
            if b.id == buyer_id:
                return b
        raise KeyError(buyer_id)

    def buyers_for(self, flow: str) -> list[BuyerConfig]:
        return [b for b in self.buyers if flow in b.flows]


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _split_hostport(v: str) -> tuple[str, int]:
    host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"'{v}' is not host:port")
    return host, int(port)


def _interpolate(node: Any, path: str, env: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: _interpolate(v, f"{path}.{k}" if path else str(k), env) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{path}[{i}]", env) for i, v in enumerate(node)]
    if isinstance(node, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(f"{path}: environment variable ${{{name}}} is not set")

        return _ENV_REF.sub(sub, node)
    return node


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def parse_settings(raw: Any, env: dict[str, str] | None = None) -> Settings:
    """Validate a parsed YAML document; raise :class:`ConfigError` naming every bad key."""
    if not isinstance(raw, dict):
        raise ConfigError("(top level): the configuration must be a mapping")
    data = _interpolate(raw, "", dict(os.environ) if env is None else env)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{_loc(tuple(err['loc']))}: {msg}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Load the YAML file at ``path`` (or ``$PINGPOST_CONFIG``)."""
    p = path or os.environ.get(DEFAULT_CONFIG_ENV)
    if not p:
        raise ConfigError(f"no configuration: pass --config or set {DEFAULT_CONFIG_ENV}")
    file = Path(p)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {file}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from None
    try:
        return parse_settings(raw)
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from None
