"""The base of every configuration model: frozen, no unknown key; and the error every
configuration problem raises."""

from __future__ import annotations

from pydantic import (
    BaseModel,
    ConfigDict,
)

__all__ = ["DEFAULT_CONFIG_ENV", "ConfigError"]


DEFAULT_CONFIG_ENV = "PINGPOST_CONFIG"


class ConfigError(ValueError):
    """The configuration file is invalid; the message names the key and the problem."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _split_hostport(v: str) -> tuple[str, int]:
    host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"'{v}' is not host:port")
    return host, int(port)
