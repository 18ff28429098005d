"""Live A/B experiments: which variant a lead belongs to, and the flow it is sold under.

Assignment is a pure function of the experiment's name, the lead id and the lead's receipt
time (for the experiment's start/stop), so every stage — the ping round's waves, the auction's
decision, the post waterfall — and a replay compute the same variant without passing it
around. A variant overrides only ``strategy`` and ``floors`` (the keys the decisions read), so
the guarantees the stages keep (an exclusive lead sold once, caps, PII) are the same code for
every variant.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from streams.settings import ExperimentConfig, FlowConfig, with_variant

__all__ = ["assign", "bucket", "flow_for", "variant_flow"]

#: (id of the flow, variant) -> (the flow, kept alive so its id is not reused; its variant).
_FLOWS: dict[tuple[int, str], tuple[FlowConfig, FlowConfig]] = {}


def bucket(experiment: str, lead_id: str) -> float:
    """A uniform number in [0, 1) fixed by the experiment's name and the lead id."""
    h = hashlib.blake2b(f"{experiment}\x00{lead_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


def assign(exp: ExperimentConfig | None, lead_id: str, received_at_ms: int) -> str:
    """The variant of the lead received at ``received_at_ms``; '' when the flow runs no
    experiment then."""
    if exp is None:
        return ""
    if exp.start is not None or exp.stop is not None:
        at = datetime.fromtimestamp(received_at_ms / 1000.0, tz=UTC)
        if (exp.start is not None and at < exp.start) or (exp.stop is not None and at >= exp.stop):
            return ""
    x = bucket(exp.name, lead_id)
    edge = 0.0
    for v in exp.variants:
        edge += v.share
        if x < edge:
            return v.name
    return exp.variants[-1].name  # shares add up to 1 up to rounding


def variant_flow(flow: FlowConfig, variant: str) -> FlowConfig:
    """``flow`` as ``variant`` sells (the flow itself for '' or a variant it does not
    declare); built once per flow and variant."""
    if not variant or flow.experiment is None:
        return flow
    key = (id(flow), variant)
    hit = _FLOWS.get(key)
    if hit is not None and hit[0] is flow:
        return hit[1]
    for v in flow.experiment.variants:
        if v.name == variant:
            built = with_variant(flow, v)
            _FLOWS[key] = (flow, built)
            return built
    return flow


def flow_for(flow: FlowConfig, lead_id: str, received_at_ms: int) -> tuple[str, FlowConfig]:
    """The lead's variant and the flow it is sold under."""
    variant = assign(flow.experiment, lead_id, received_at_ms)
    return variant, variant_flow(flow, variant)
