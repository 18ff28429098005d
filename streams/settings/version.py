"""The version of a flow's selling configuration: what a replay needs to re-decide its auctions.

Every auction records the hash of the version in force when it closed (``config_hash``); each
auction worker publishes the versions of its flows at start (``FlowVersion`` on the compacted
flow-versions topic, sunk into ``flow_versions``). A version holds the flow's whole
configuration and, per buyer of the flow, what the selling rules read: tier, timeouts, payment
speed and caps. Never a buyer's URLs or headers (they may carry credentials).
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from streams.settings.loader import Settings
from streams.settings.market import BuyerConfig, FlowConfig

__all__ = ["FlowVersion", "flow_version", "flow_versions", "version_doc"]

#: What a buyer's entry in a version keeps (the rest is connection detail, or secret).
BUYER_KEYS = ("tier", "timeout_ms", "post_timeout_ms", "payment_speed", "caps")


class FlowVersion:
    """One flow's configuration version: ``hash`` (16 hex digits) and its canonical JSON."""

    __slots__ = ("config_json", "flow", "hash")

    def __init__(self, flow: str, config_json: str) -> None:
        self.flow = flow
        self.config_json = config_json
        self.hash = hashlib.sha256(config_json.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"FlowVersion({self.flow!r}, {self.hash})"


def _buyer(b: BuyerConfig) -> dict[str, Any]:
    dumped = b.model_dump(mode="json", by_alias=True, include=set(BUYER_KEYS))
    return {k: dumped.get(k) for k in BUYER_KEYS}


def version_doc(flow: FlowConfig, buyers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The document a version hashes: the flow's configuration and its buyers' entries."""
    return {"flow": flow.model_dump(mode="json", by_alias=True), "buyers": buyers}


def flow_version(settings: Settings, name: str) -> FlowVersion:
    """The version of flow ``name`` in ``settings`` (KeyError: no such flow)."""
    flow = settings.flows[name]
    buyers = {b.id: _buyer(b) for b in settings.buyers if name in b.flows}
    text = orjson.dumps(version_doc(flow, buyers), option=orjson.OPT_SORT_KEYS).decode()
    return FlowVersion(name, text)


def flow_versions(settings: Settings) -> dict[str, FlowVersion]:
    """Every configured flow's version, by flow name."""
    return {name: flow_version(settings, name) for name in settings.flows}
