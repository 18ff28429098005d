"""Loading the configuration: ``${VAR}`` references resolved from the environment, the
whole file validated into :class:`Settings`, every error naming its key path."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ValidationError,
    model_validator,
)

from streams.settings.base import DEFAULT_CONFIG_ENV, ConfigError, _Model
from streams.settings.infra import (
    ClickHouseConfig,
    IngestConfig,
    KafkaConfig,
    PrivacyConfig,
    WarehouseConfig,
    WorkerConfig,
)
from streams.settings.market import BuyerConfig, FlowConfig, _check_values, ping_visible_fields
from streams.settings.metrics import AlertRule, MetricsConfig, check_alert_refs
from streams.settings.simulator import SimulatorConfig

__all__ = ["Settings", "load_settings", "parse_settings", "unenforced_keys"]


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
    #: Streaming metrics and alert rules: models in streams/settings/metrics.py.
    metrics: MetricsConfig = MetricsConfig()
    alerts: list[AlertRule] = []

    @model_validator(mode="after")
    def _alerts(self) -> Settings:
        check_alert_refs(self.alerts, self.metrics, {b.id for b in self.buyers}, set(self.flows))
        return self

    @model_validator(mode="after")
    def _cross(self) -> Settings:
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

    @model_validator(mode="after")
    def _buyer_filters(self) -> Settings:
        for i, b in enumerate(self.buyers):
            for name, flt in b.filters.fields.items():
                key = f"buyers[{i}].filters.fields.{name}"
                for flow_name in b.flows:
                    flow = self.flows.get(flow_name)
                    if flow is None:
                        continue  # reported by _cross
                    visible = ping_visible_fields(flow)
                    if name not in visible:
                        raise ValueError(
                            f"{key}: '{name}' is not a ping field of flow "
                            f"'{flow_name}'; filters see the ping values"
                        )
                    if flt.in_ is not None:
                        _check_values(visible[name], list(flt.in_), f"{key}.in")
                    if flt.not_in is not None:
                        _check_values(visible[name], list(flt.not_in), f"{key}.not_in")
                    if flt.eq is not None:
                        _check_values(visible[name], [flt.eq], f"{key}.eq")
                    spec, transform = visible[name]
                    if (flt.min is not None or flt.max is not None) and (
                        spec.type not in ("integer", "number") or transform != "keep"
                    ):
                        raise ValueError(
                            f"{key}: min/max need a number field sent unchanged "
                            f"(in flow '{flow_name}' it is a {spec.type}"
                            f"{', transform ' + transform if transform != 'keep' else ''})"
                        )
        return self

    def buyer(self, buyer_id: str) -> BuyerConfig:
        for b in self.buyers:
            if b.id == buyer_id:
                return b
        raise KeyError(buyer_id)

    def buyers_for(self, flow: str) -> list[BuyerConfig]:
        return [b for b in self.buyers if flow in b.flows]


#: Keys of the complete auction (issue 3) whose rules exist (streams/rules/selling.py) but are not yet
#: applied by the stages. A worker refuses to start with any of them set: a cap or a floor
#: that is silently ignored would cost real money.
_NOT_YET_ENFORCED_FLOW: tuple[str, ...] = ()


_NOT_YET_ENFORCED_STRATEGY: tuple[str, ...] = ()


_NOT_YET_ENFORCED_BUYER: tuple[str, ...] = ()


def unenforced_keys(settings: Settings) -> list[str]:
    """Config keys set in the file that this version validates but does not apply yet."""
    out = []
    for name, flow in settings.flows.items():
        out += [f"flows.{name}.{k}" for k in _NOT_YET_ENFORCED_FLOW if k in flow.model_fields_set]
        out += [
            f"flows.{name}.strategy.{k}"
            for k in _NOT_YET_ENFORCED_STRATEGY
            if k in flow.strategy.model_fields_set
        ]
    for i, b in enumerate(settings.buyers):
        out += [f"buyers[{i}].{k}" for k in _NOT_YET_ENFORCED_BUYER if k in b.model_fields_set]
    return out


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


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
