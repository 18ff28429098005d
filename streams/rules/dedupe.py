"""Duplicate leads, the pure part (issue 3, rule 8): a lead's identity (a keyed HMAC of the
flow and the normalised values of its ``duplicates.fields``, never the values) and the
decision for a lead given what its identity's table entry holds. The dedupe stage
(``streams.stages.dedupe``) owns the table and applies these."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from streams.rules.leads import pii_hash
from streams.settings import DuplicatesConfig, Settings

__all__ = ["decide", "identity_of", "window_label"]


def identity_of(
    settings: Settings, flow: str, fields: dict[str, Any], pii_hashes: dict[str, str]
) -> str | None:
    """The lead's identity for duplicate checks, or None (flow without duplicates, or an
    identity field missing: such a lead cannot be matched)."""
    cfg = settings.flows[flow].duplicates
    if cfg is None:
        return None
    key = settings.privacy.hash_key.get_secret_value().encode()
    parts = []
    for name in cfg.fields:
        h = pii_hashes.get(name)
        if h is None:
            v = fields.get(name)
            if v is None or str(v).strip() == "":
                return None
            h = pii_hash(key, name, v)
        parts.append(f"{name}={h}")
    return hmac.new(key, f"{flow}|{'|'.join(parts)}".encode(), hashlib.sha256).hexdigest()


def window_label(seconds: float) -> str:
    if seconds % 86400 == 0:
        return (
            f"{int(seconds // 86400 * 24)}h" if seconds < 7 * 86400 else f"{int(seconds // 86400)}d"
        )
    if seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds % 60 == 0:
        return f"{int(seconds // 60)} min"
    return f"{seconds:g} s"


def decide(
    entry: dict[str, Any] | None,
    lead_id: str,
    at_ms: int,
    cfg: DuplicatesConfig,
    sold: dict[str, list[str]],
) -> tuple[str, dict[str, Any], str, list[str]]:
    """One lead against its identity's entry: ``(verdict, new_entry, reason, skip_buyers)``.

    ``verdict``: ``pass`` (auction it; ``skip_buyers`` lists buyers not to ping) or ``reject``.
    ``entry``: ``{"leads": [[lead_id, at_ms], ...]}`` — this identity's leads inside the window,
    oldest first. ``sold``: lead_id → winners, for settled leads.
    """
    window_ms = int(cfg.window_s * 1000)
    leads = [x for x in (entry or {}).get("leads", []) if at_ms - x[1] <= window_ms]
    if any(x[0] == lead_id for x in leads):
        return "pass", {"leads": leads}, "", _bought(leads, lead_id, sold)  # redelivered
    # Processing order decides, not the timestamps: every lead already recorded for this
    # identity (inside the window) came first.
    earlier = leads
    if not earlier:
        return "pass", {"leads": leads + [[lead_id, at_ms]]}, "", []
    first = earlier[0][0]
    same = ", ".join(cfg.fields)
    why = f"duplicate of lead {first} (same {same}) within {window_label(cfg.window_s)}"
    if cfg.action == "reject":
        return "reject", {"leads": leads}, why, []
    unsettled = [x[0] for x in earlier if x[0] not in sold]
    if unsettled:
        return (
            "reject",
            {"leads": leads},
            (f"duplicate of lead {unsettled[0]} (same {same}), which is still being sold"),
            [],
        )
    return "pass", {"leads": leads + [[lead_id, at_ms]]}, "", _bought(leads, lead_id, sold)


def _bought(leads: list[list[Any]], lead_id: str, sold: dict[str, list[str]]) -> list[str]:
    out: list[str] = []
    for other, _ in leads:
        if other != lead_id:
            out += [b for b in sold.get(other, []) if b not in out]
    return out
