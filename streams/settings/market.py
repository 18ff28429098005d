"""The market: flows (fields, ping fields, strategy, floors, waves, duplicates) and buyers
(endpoints, filters, schedules, caps, auto-pause, response mappings)."""

from __future__ import annotations

import re
from datetime import datetime
from functools import cache
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from streams.settings.base import _Model

__all__ = [
    "WEEKDAYS",
    "AcceptancePrior",
    "AutoPauseConfig",
    "BusinessHours",
    "BuyerCaps",
    "BuyerConfig",
    "BuyerFilters",
    "BuyerSchedule",
    "Day",
    "DuplicatesConfig",
    "ExperimentConfig",
    "FieldFilter",
    "FieldSpec",
    "FieldType",
    "FloorsConfig",
    "FlowConfig",
    "PingField",
    "PostResponseMapping",
    "QualityConfig",
    "QualityRule",
    "RESERVED_FIELDS",
    "ResponseMapping",
    "Scalar",
    "ScoreWeights",
    "StrategyConfig",
    "TimeWindow",
    "VariantConfig",
    "Transform",
    "WaveConfig",
    "parse_hours",
    "with_variant",
    "ping_visible_fields",
]


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
    def _prefix_len(self) -> PingField:
        if self.transform == "prefix" and self.length is None:
            raise ValueError("transform 'prefix' needs 'length'")
        return self


#: A plain configured value compared with a lead field (no coercion: ``true`` is not ``1``).
Scalar = bool | int | float | str


Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


#: Index = ``datetime.weekday()``.
WEEKDAYS: tuple[Day, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@cache  # pure, and read for every bid a business-hours floor judges
def parse_hours(v: str) -> tuple[int, int]:
    """``"HH:MM-HH:MM"`` -> (start, end) in minutes after midnight.

    The start is inclusive, the end exclusive; ``24:00`` is allowed as the end only. An end
    before the start wraps past midnight (``22:00-06:00``). Start == end is an error (use
    ``00:00-24:00`` for the whole day).
    """
    m = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*", v)
    if not m:
        raise ValueError(f"'{v}' is not 'HH:MM-HH:MM'")
    sh, sm, eh, em = (int(g) for g in m.groups())
    if sh > 23 or sm > 59 or em > 59 or eh * 60 + em > 24 * 60:
        raise ValueError(f"'{v}' is not a valid time range (00:00 to 24:00)")
    start, end = sh * 60 + sm, eh * 60 + em
    if start == end:
        raise ValueError(f"'{v}' is an empty window (use 00:00-24:00 for the whole day)")
    return start, end


def _check_timezone(v: str) -> str:
    try:
        ZoneInfo(v)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone '{v}' (use an IANA name such as 'America/New_York')"
        ) from None
    return v


class TimeWindow(_Model):
    """Days and hours in a time zone. ``days`` are the days a window *starts* on, so a
    window wrapping past midnight (``22:00-06:00`` on ``fri``) runs into Saturday morning."""

    timezone: str
    days: Annotated[list[Day], Field(min_length=1)] = list(WEEKDAYS)
    hours: str = "00:00-24:00"

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        return _check_timezone(v)

    @field_validator("days", mode="before")
    @classmethod
    def _days(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [d.strip().lower() if isinstance(d, str) else d for d in v]
        return v

    @field_validator("hours")
    @classmethod
    def _hours(cls, v: str) -> str:
        parse_hours(v)
        return v


class BuyerSchedule(TimeWindow):
    """When a buyer takes pings (outside: a ``filtered`` row, no request)."""


class BusinessHours(TimeWindow):
    """Inside these hours the flow's floor is multiplied by ``premium``."""

    premium: Annotated[float, Field(gt=0)]


class QualityRule(_Model):
    """A lead matching ``field`` (``equals`` one value or ``in`` a list) multiplies the floor."""

    field: str
    equals: Scalar | None = None
    in_: Annotated[list[Scalar], Field(min_length=1)] | None = Field(default=None, alias="in")
    multiplier: Annotated[float, Field(gt=0)]

    @model_validator(mode="after")
    def _one_test(self) -> QualityRule:
        if (self.equals is None) == (self.in_ is None):
            raise ValueError("give exactly one of 'equals' or 'in'")
        return self

    def values(self) -> list[Any]:
        return list(self.in_) if self.in_ is not None else [self.equals]


class QualityConfig(_Model):
    rules: list[QualityRule] = []
    #: The multiplier when no rule matches (matching rules multiply together).
    default: Annotated[float, Field(gt=0)] = 1.0


class FloorsConfig(_Model):
    """Minimum acceptable price: ``base × quality × business-hours premium``; exclusive sales
    at least ``exclusive_min``. Absent: floor 0 and no exclusive minimum."""

    base: Annotated[float, Field(ge=0)] = 0.0
    exclusive_min: Annotated[float, Field(ge=0)] | None = None
    quality: QualityConfig | None = None
    business_hours: BusinessHours | None = None


class ScoreWeights(_Model):
    """``score = price·price/max_price + acceptance·acceptance_rate + payment·payment_speed``."""

    price: Annotated[float, Field(ge=0)] = 0.5
    acceptance: Annotated[float, Field(ge=0)] = 0.3
    payment: Annotated[float, Field(ge=0)] = 0.2

    @model_validator(mode="after")
    def _some(self) -> ScoreWeights:
        if self.price + self.acceptance + self.payment <= 0:
            raise ValueError("at least one of price, acceptance, payment must be positive")
        return self


class AcceptancePrior(_Model):
    """What a buyer with no post history is assumed to accept, and how many posts it weighs."""

    rate: Annotated[float, Field(ge=0, le=1)] = 0.7
    weight: Annotated[float, Field(ge=0)] = 10.0


class WaveConfig(_Model):
    tiers: list[str]
    timeout_ms: Annotated[int, Field(ge=10, le=60_000)]

    @field_validator("tiers")
    @classmethod
    def _tiers(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("a wave must list at least one tier")
        if any(not t for t in v):
            raise ValueError("tier names must not be empty")
        if len(set(v)) != len(v):
            raise ValueError("a tier is listed twice in this wave")
        return v


class DuplicatesConfig(_Model):
    """Leads of the flow whose ``fields`` (compared as hashes) match an earlier lead within
    ``window_s``: ``reject`` at ingest, or ``skip_buyers`` that already bought it."""

    fields: Annotated[list[str], Field(min_length=1)]
    window_s: Annotated[float, Field(gt=0)] = 86_400.0
    action: Literal["reject", "skip_buyers"] = "reject"


class VariantConfig(_Model):
    """One arm of an experiment: its share of the flow's leads and the ``strategy`` and
    ``floors`` keys it overrides (merged key by key into the flow's)."""

    name: str
    share: Annotated[float, Field(gt=0, le=1)]
    strategy: dict[str, Any] = {}
    floors: dict[str, Any] = {}

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", v):
            raise ValueError("use 1-32 letters, digits, '_', '-' or '.'")
        return v


class ExperimentConfig(_Model):
    """A live A/B test of strategies (docs/strategy-lab.md): each lead received between
    ``start`` and ``stop`` goes to one variant, by a stable hash of its id and the
    experiment's name; the first variant is the control the others are compared with."""

    name: str
    variants: Annotated[list[VariantConfig], Field(min_length=2)]
    start: datetime | None = None
    stop: datetime | None = None
    #: Leads per variant before `pingpost experiment` gives a verdict.
    min_leads: Annotated[int, Field(ge=1)] = 1000

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", v):
            raise ValueError("use 1-64 letters, digits, '_', '-' or '.'")
        return v

    @model_validator(mode="after")
    def _variants(self) -> ExperimentConfig:
        names = [v.name for v in self.variants]
        for i, n in enumerate(names):
            if n in names[:i]:
                raise ValueError(f"variants[{i}].name: '{n}' is used twice")
        total = sum(v.share for v in self.variants)
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"variants: the shares add up to {total:g}, not 1")
        for t, label in ((self.start, "start"), (self.stop, "stop")):
            if t is not None and t.tzinfo is None:
                raise ValueError(f"{label}: give a time zone (e.g. 2026-12-06T09:00:00Z)")
        if self.start is not None and self.stop is not None and self.stop <= self.start:
            raise ValueError("stop: must be after start")
        return self


class StrategyConfig(_Model):
    #: ``highest``: best acceptable bid by price wins (exclusive if it asks, else shared to
    #: the top ``shared_max``).
    mode: Literal["highest"] = "highest"
    shared_max: Annotated[int, Field(ge=1, le=50)] = 3
    #: Prices above this are "absurd" and recorded as an error, never a winning bid.
    max_price: Annotated[float, Field(gt=0)] = 10_000.0
    min_price: Annotated[float, Field(ge=0)] = 0.0
    #: ``price``: the best bid is the highest price; ``score``: the highest weighted score.
    rank_by: Literal["price", "score"] = "price"
    weights: ScoreWeights = ScoreWeights()
    acceptance_prior: AcceptancePrior = AcceptancePrior()
    #: Sell every lead of the flow exclusively (to the best bid) / never exclusively.
    exclusive_only: bool = False
    shared_only: bool = False

    @model_validator(mode="after")
    def _prices(self) -> StrategyConfig:
        if self.min_price > self.max_price:
            raise ValueError("min_price is above max_price: nothing could ever sell")
        return self

    @model_validator(mode="after")
    def _modes(self) -> StrategyConfig:
        if self.exclusive_only and self.shared_only:
            raise ValueError("exclusive_only and shared_only are both true: set at most one")
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
    #: A post is never sent with less time than this left in the post window (a buyer
    #: cannot answer in 1 ms; it would take the lead and the answer would be lost).
    min_post_budget_ms: Annotated[int, Field(ge=10)] = 200
    #: How long a post waits for a capped buyer's cap owner (a slot not granted in time is
    #: treated as denied: it never uses up the post window) and for the lead's PII (the
    #: window starts once the PII is there; longer only after a rebalance, while the new
    #: owner reads the lead-pii topic).
    cap_decision_timeout_ms: Annotated[int, Field(ge=10)] = 1000
    pii_wait_ms: Annotated[int, Field(ge=10)] = 10_000
    floors: FloorsConfig = FloorsConfig()
    #: Ping waves by tier; absent = one wave pinging every tier at once.
    waves: list[WaveConfig] | None = None
    duplicates: DuplicatesConfig | None = None
    #: A live A/B test of strategies (docs/strategy-lab.md).
    experiment: ExperimentConfig | None = None

    @model_validator(mode="after")
    def _consistent(self) -> FlowConfig:
        for name in self.required:
            if name not in self.fields:
                raise ValueError(f"required field '{name}' is not declared in 'fields'")
        if self.min_post_budget_ms > self.post_timeout_ms:
            raise ValueError(
                f"min_post_budget_ms ({self.min_post_budget_ms}) is longer than "
                f"post_timeout_ms ({self.post_timeout_ms})"
            )
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
                raise ValueError(
                    f"ping field '{name}' is renamed to '{out}', which another "
                    "ping field already uses"
                )
            sent[out] = name
        if self.safety_margin_ms >= self.deadline_ms:
            raise ValueError("safety_margin_ms must be smaller than deadline_ms")
        return self

    @model_validator(mode="after")
    def _rules(self) -> FlowConfig:
        visible = ping_visible_fields(self)
        q = self.floors.quality
        for i, rule in enumerate(q.rules if q is not None else []):
            key = f"floors.quality.rules[{i}]"
            if rule.field not in visible:
                why = (
                    "a PII field, never visible at auction time"
                    if rule.field in self.pii_fields
                    else "not a ping field of this flow"
                )
                raise ValueError(
                    f"{key}.field: '{rule.field}' is {why}; quality rules see the "
                    f"ping values (ping fields: {', '.join(sorted(visible)) or '-'})"
                )
            _check_values(
                visible[rule.field], rule.values(), f"{key}.{'in' if rule.in_ else 'equals'}"
            )
        if self.waves is not None:
            if not self.waves:
                raise ValueError(
                    "waves: list at least one wave (omit 'waves' to ping every tier at once)"
                )
            first: dict[str, int] = {}
            for i, wave in enumerate(self.waves):
                for tier in wave.tiers:
                    if tier in first:
                        raise ValueError(
                            f"waves[{i}].tiers: tier '{tier}' is already in waves[{first[tier]}]"
                        )
                    first[tier] = i
        if self.duplicates is not None:
            seen: set[str] = set()
            for name in self.duplicates.fields:
                if name not in self.fields:
                    raise ValueError(f"duplicates.fields: '{name}' is not declared in 'fields'")
                if name in seen:
                    raise ValueError(f"duplicates.fields: '{name}' is listed twice")
                seen.add(name)
        return self

    @model_validator(mode="after")
    def _experiment(self) -> FlowConfig:
        """Every variant's flow (this one with its overrides) must be a valid flow."""
        if self.experiment is None:
            return self
        for i, variant in enumerate(self.experiment.variants):
            try:
                with_variant(self, variant)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise ValueError(
                    f"experiment.variants[{i}] ({variant.name}): {where}: {first['msg']}"
                ) from None
        return self


def with_variant(flow: FlowConfig, variant: VariantConfig) -> FlowConfig:
    """``flow`` as ``variant`` runs it: its ``strategy`` and ``floors`` keys merged in, no
    experiment of its own."""
    d = flow.model_dump(by_alias=True)
    d["experiment"] = None
    d["strategy"] = {**d["strategy"], **variant.strategy}
    d["floors"] = {**d["floors"], **variant.floors}
    return FlowConfig.model_validate(d)


#: Names the platform owns in every lead / ping / post body.
RESERVED_FIELDS = frozenset(
    {"flow", "lead_id", "created_at", "ping_id", "post_id", "tmax_ms", "price", "exclusive"}
)


def ping_visible_fields(flow: FlowConfig) -> dict[str, tuple[FieldSpec, Transform]]:
    """The names a ping (and the auction) sees -- after ``rename`` -- with the declared spec
    of the source field and its transform (``zip3`` turns ``90210`` into ``902``)."""
    return {
        spec.rename or name: (flow.fields[name], spec.transform)
        for name, spec in flow.ping_fields.items()
        if name in flow.fields
    }


_PY_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "boolean": (bool,),
    "integer": (int,),
    "number": (int, float),
}


def _check_values(target: tuple[FieldSpec, Transform], values: list[Any], key: str) -> None:
    """Configured comparison values must be able to match the ping value: right type, and a
    member of the field's enum when the value is sent unchanged (catches typos)."""
    spec, transform = target
    want = (str,) if transform in ("zip3", "prefix") else _PY_TYPES[spec.type]
    for v in values:
        if isinstance(v, bool) != (bool in want) or not isinstance(v, want):
            raise ValueError(
                f"{key}: {v!r} can never match a {spec.type} field"
                + (f" after transform {transform}" if transform != "keep" else "")
            )
        if spec.enum is not None and transform == "keep" and v not in spec.enum:
            raise ValueError(f"{key}: {v!r} is not one of the field's values {spec.enum}")


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


class FieldFilter(_Model):
    """A filter on one ping field: ``in`` / ``not_in`` a list, ``eq`` a value, and/or numeric
    ``min`` / ``max`` (inclusive). A lead without the field does not pass."""

    in_: list[Scalar] | None = Field(default=None, alias="in")
    not_in: list[Scalar] | None = None
    eq: Scalar | None = None
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ops(self) -> FieldFilter:
        if all(v is None for v in (self.in_, self.not_in, self.eq, self.min, self.max)):
            raise ValueError("give at least one of 'in', 'not_in', 'eq', 'min', 'max'")
        if self.in_ is not None and self.eq is not None:
            raise ValueError("give 'in' or 'eq', not both")
        if self.in_ is not None and not self.in_:
            raise ValueError("'in' is empty: no lead could ever pass")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}: no lead could ever pass")
        return self


class BuyerFilters(_Model):
    states: list[str] | None = None
    #: Filters on ping fields by their ping name (values as sent: zip is 3 digits).
    fields: dict[str, FieldFilter] = {}


class BuyerCaps(_Model):
    """Counted on accepted posts per calendar hour / day in ``timezone``."""

    leads_per_hour: Annotated[int, Field(ge=0)] | None = None
    leads_per_day: Annotated[int, Field(ge=0)] | None = None
    spend_per_day: Annotated[float, Field(ge=0)] | None = None
    timezone: str = "UTC"

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        return _check_timezone(v)


class AutoPauseConfig(_Model):
    """Pause pinging a buyer whose timeout+error share over the last ``window_s`` exceeds
    ``max_failure_rate`` (once it has at least ``min_pings`` pings there), for ``cool_down_s``."""

    window_s: Annotated[float, Field(gt=0)] = 60.0
    min_pings: Annotated[int, Field(ge=1)] = 20
    max_failure_rate: Annotated[float, Field(ge=0, le=1)] = 0.5
    cool_down_s: Annotated[float, Field(gt=0)] = 120.0


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
    schedule: BuyerSchedule | None = None
    caps: BuyerCaps | None = None
    #: 0 (slow payer) .. 1 (pays at once), used when a flow ranks by score.
    payment_speed: Annotated[float, Field(ge=0, le=1)] = 0.5
    auto_pause: AutoPauseConfig | None = None

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
