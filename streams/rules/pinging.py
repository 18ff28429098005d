"""Who gets a lead's ping and under which id: the ping plan (filters, schedules, pauses,
caps, waves), the ping body of CONTRACT §2, and the PII check for what a buyer sends back."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from typing import Any

from streams.rules import selling as rules
from streams.rules.leads import pii_hash
from streams.rules.scrub import scrub
from streams.settings import BuyerConfig, Settings

__all__ = ["MIN_WAVE_MS", "pii_check", "ping_body", "ping_id_for", "plan_pings"]


#: A wave that would have less than this before the deadline is not pinged at all.
MIN_WAVE_MS = 20


_PING_NS = uuid.UUID("5b0e1f0e-6a52-4f5e-9d51-7d1d0c7c0a11")


def ping_id_for(lead_id: str, buyer_id: str) -> str:
    """Deterministic per (lead, buyer): a replayed ping round reuses the ids, so its outcomes
    replace the first ones instead of adding rows. Opaque to buyers."""
    return str(uuid.uuid5(_PING_NS, f"{lead_id}\x00{buyer_id}"))


def plan_pings(
    settings: Settings,
    flow: str,
    ping_fields: dict[str, Any],
    at_ms: int,
    *,
    paused_until: Callable[[str], int | None] | None = None,
    cap_counters: Callable[[BuyerConfig, int], rules.BuyerCounters | None] | None = None,
    skip_buyers: list[str] | None = None,
) -> tuple[list[BuyerConfig], list[tuple[BuyerConfig, str]]]:
    """Which buyers of the flow get a ping, and why each other one does not (filters on the
    ping fields, the buyer's schedule, an auto-pause, a tier in no wave)."""
    at = at_ms
    targets: list[BuyerConfig] = []
    filtered: list[tuple[BuyerConfig, str]] = []
    waves = settings.flows[flow].waves if flow in settings.flows else None
    for buyer in settings.buyers_for(flow):
        why = rules.eligibility(
            buyer,
            ping_fields,
            at,
            paused_until_ms=paused_until(buyer.id) if paused_until is not None else None,
            counters=cap_counters(buyer, at) if cap_counters is not None and buyer.caps else None,
        )
        if why is None and skip_buyers and buyer.id in skip_buyers:
            why = "already bought this lead (a duplicate within the flow's window)"
        if why is None and rules.wave_of(buyer.tier, waves) is None:
            why = f"tier '{buyer.tier}' is in no wave of flow '{flow}'"
        if why is None:
            targets.append(buyer)
        else:
            filtered.append((buyer, why))
    return targets, filtered


def ping_body(ping_fields: dict[str, Any], flow: str, ping_id: str, tmax_ms: int) -> dict[str, Any]:
    """CONTRACT §2: only the configured ping fields, plus ping_id, flow and tmax_ms."""
    body = dict(ping_fields)
    body.update(ping_id=ping_id, flow=flow, tmax_ms=tmax_ms)
    return body


def pii_check(
    settings: Settings, req: dict[str, Any], pii: Mapping[str, Any] | None = None
) -> Callable[[str], bool]:
    """Whether a token a buyer sent is one of the lead's PII values: by value when the caller
    knows them (the post stage), else by keyed hash against the request's ``pii_hashes``
    (pings never see PII, but a buyer may echo what it knows)."""
    if pii:
        return lambda token: scrub(token, pii) != token
    hashes = req.get("pii_hashes") or {}
    key = settings.privacy.hash_key.get_secret_value().encode()
    return lambda token: any(pii_hash(key, f, token) == h for f, h in hashes.items())
