"""Configuration of streaming metrics and alert rules (the ``metrics`` and ``alerts`` keys).

Kept apart from ``streams/settings/__init__.py`` (which only references these models) so the metrics
role owns its configuration. Like the rest of the configuration, every error names the key:
``alerts[1].window: 45s is not a multiple of metrics.window_s (10s)``.

Durations are seconds (``30``, ``2.5``) or strings with a unit (``500ms``, ``30s``, ``5m``,
``1h``).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

__all__ = [
    "METRICS",
    "AlertRule",
    "MetricsConfig",
    "WebhookConfig",
    "check_alert_refs",
    "parse_duration",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: Every metric a rule (and /metrics) knows, with the count that must reach a rule's
#: ``min_samples`` in its window before the rule may fire (an idle buyer never fires).
METRICS: dict[str, str] = {
    "pings": "pings",  # pings sent (not counting `filtered`)
    "bid_rate": "pings",  # bids / pings
    "response_rate": "pings",  # (bids + no-bids) / pings
    "timeout_rate": "pings",
    "error_rate": "pings",
    "avg_bid": "bids",  # average price of bids
    "avg_response_ms": "pings",  # mean latency of every ping sent
    "response_p50_ms": "pings",  # from a fixed-bucket histogram (see metrics.py)
    "response_p95_ms": "pings",
    "response_p99_ms": "pings",
    "posts": "posts",  # post attempts (not `skipped`)
    "accept_rate": "posts",  # accepted / posts
    "revenue": "pings",  # buyer: accepted post prices; flow: sold price_total
    "revenue_per_ping": "pings",
    "leads": "leads",  # flow only: settled auctions
    "sell_rate": "leads",  # flow only: sold / settled
}

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(v: Any) -> float:
    """Seconds from ``30``, ``2.5``, ``"500ms"``, ``"30s"``, ``"5m"``, ``"1h"``."""
    if isinstance(v, bool):
        raise ValueError(f"{v!r} is not a duration")
    if isinstance(v, (int, float)):
        seconds = float(v)
    elif isinstance(v, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*", v)
        if not m:
            raise ValueError(f"'{v}' is not a duration (e.g. 30, 30s, 500ms, 5m, 1h)")
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    else:
        raise ValueError(f"{v!r} is not a duration")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{v!r} is not a duration")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


class MetricsConfig(_Model):
    """The metrics role: windows, where /metrics listens, webhook delivery."""

    #: Base tumbling window (whole seconds). Metrics are aggregated per buyer and per flow in
    #: windows of this size; a rule's ``window`` is a whole number of them.
    window_s: Annotated[int, Field(ge=1, le=3600)] = 10
    #: A window is evaluated this long after it ends, so late events (a bid answered at the
    #: deadline, a post retried) are counted in it.
    grace_s: Annotated[float, Field(ge=0, le=600)] = 2.0
    #: /metrics shows each metric over the last this-many seconds (a multiple of window_s).
    export_window_s: Annotated[int, Field(ge=1)] = 60
    #: host:port of the Prometheus endpoint (port 0: off).
    listen: str = "127.0.0.1:9464"
    #: Webhook delivery: per-request timeout, attempts, first backoff (doubling, capped 30 s).
    webhook_timeout_s: Annotated[float, Field(gt=0, le=120)] = 5.0
    webhook_attempts: Annotated[int, Field(ge=1, le=20)] = 5
    webhook_backoff_s: Annotated[float, Field(gt=0, le=60)] = 0.5

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"'{v}' is not host:port")
        return v

    @model_validator(mode="after")
    def _export(self) -> MetricsConfig:
        if self.export_window_s % self.window_s:
            raise ValueError(
                f"export_window_s: {self.export_window_s}s is not a multiple of "
                f"window_s ({self.window_s}s)"
            )
        return self

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0]

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class WebhookConfig(_Model):
    """POST the transition as JSON here (retried with backoff; never blocks the pipeline).
    The URL and headers are secrets (a chat webhook URL is a credential): never logged."""

    url: SecretStr
    headers: dict[str, SecretStr] = {}

    @field_validator("url")
    @classmethod
    def _url(cls, v: SecretStr) -> SecretStr:
        if not re.match(r"^https?://[^/\s]+", v.get_secret_value()):
            raise ValueError("must be an http:// or https:// URL")
        return v


def _webhook(v: Any) -> Any:
    return {"url": v} if isinstance(v, str) else v


Comparison = Literal["<", "<=", ">", ">="]


class AlertRule(_Model):
    """One alert rule: fire when ``metric`` of a subject (each buyer or flow, or one given by
    ``id``) compared to ``threshold`` holds over ``window`` for ``for``; resolve when it is
    past ``resolve_threshold`` (hysteresis) for ``resolve_for``."""

    name: str
    metric: str
    scope: Literal["buyer", "flow"]
    #: One buyer id / flow name; absent: every buyer / flow.
    id: str | None = None
    comparison: Comparison
    threshold: float
    #: Where the alert resolves (default: the threshold). For ``<`` it must be ≥ threshold,
    #: for ``>`` ≤ threshold: the gap is the hysteresis band.
    resolve_threshold: float | None = None
    #: The span the metric is computed over (a multiple of metrics.window_s; default: one).
    window: Duration | None = None
    #: How long the condition must hold before firing (0: at the first evaluation).
    for_: Duration = Field(default=0.0, alias="for")
    #: How long it must be resolved before resolving (default: ``for``).
    resolve_for: Duration | None = None
    #: A window with fewer samples (pings; bids for avg_bid; posts for accept_rate; settled
    #: leads for sell_rate) has no data: it never fires, and counts toward resolving.
    min_samples: Annotated[int, Field(ge=1)] = 20
    #: What the operator should do; carried in every transition.
    message: str = ""
    #: Every transition is logged and sent to the alerts topic (→ the `alerts` table);
    #: optionally also POSTed here.
    webhook: Annotated[WebhookConfig | None, BeforeValidator(_webhook)] = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", v):
            raise ValueError("must be 1-64 letters, digits, '.', '_' or '-'")
        return v

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if v not in METRICS:
            raise ValueError(f"unknown metric '{v}' (one of: {', '.join(METRICS)})")
        return v

    @field_validator("threshold", "resolve_threshold")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> AlertRule:
        if self.metric in ("leads", "sell_rate") and self.scope != "flow":
            raise ValueError(f"metric '{self.metric}' exists for flows only (scope: flow)")
        r = self.resolve_threshold
        if r is not None:
            if self.comparison in ("<", "<=") and r < self.threshold:
                raise ValueError(
                    f"resolve_threshold {r} is below threshold {self.threshold}: "
                    "for a '<' rule it must be at or above it"
                )
            if self.comparison in (">", ">=") and r > self.threshold:
                raise ValueError(
                    f"resolve_threshold {r} is above threshold {self.threshold}: "
                    "for a '>' rule it must be at or below it"
                )
        return self

    @property
    def resolve_at(self) -> float:
        return self.threshold if self.resolve_threshold is None else self.resolve_threshold

    @property
    def resolve_after(self) -> float:
        return self.for_ if self.resolve_for is None else self.resolve_for


def check_alert_refs(
    alerts: list[AlertRule], metrics: MetricsConfig, buyer_ids: set[str], flows: set[str]
) -> None:
    """Cross-checks against the rest of the file; raises ValueError naming the key."""
    seen: set[str] = set()
    w = metrics.window_s
    for i, rule in enumerate(alerts):
        key = f"alerts[{i}]"
        if rule.name in seen:
            raise ValueError(f"{key}.name: duplicate rule name '{rule.name}'")
        seen.add(rule.name)
        if rule.id is not None:
            known = buyer_ids if rule.scope == "buyer" else flows
            if rule.id not in known:
                raise ValueError(f"{key}.id: no {rule.scope} '{rule.id}'")
        for attr, label in (("window", "window"), ("for_", "for"), ("resolve_for", "resolve_for")):
            v = getattr(rule, attr)
            if v is None:
                continue
            steps = v / w
            if abs(steps - round(steps)) > 1e-9 or (attr == "window" and round(steps) < 1):
                raise ValueError(
                    f"{key}.{label}: {v:g}s is not a multiple of metrics.window_s ({w}s)"
                )
