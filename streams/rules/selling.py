"""The selling rules of a flow as pure functions: eligibility, floors, scoring, winner
selection, waves, auto-pause.

No I/O and no clock: every function that depends on the time takes it (an aware ``datetime``
or epoch milliseconds), and every counter or rate it needs is passed in, so each rule is
table-tested on its own and the stages (ping, auction, post) only wire them in.

Time windows (buyer schedules, business hours) are wall-clock times in their own time zone
(zoneinfo, so DST is handled by the zone): start inclusive, end exclusive, and a window whose
end is before its start wraps past midnight and belongs to the day it starts on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from streams.settings import (
    WEEKDAYS,
    AcceptancePrior,
    BuyerCaps,
    BuyerConfig,
    FieldFilter,
    FlowConfig,
    ScoreWeights,
    TimeWindow,
    WaveConfig,
    parse_hours,
)

__all__ = [
    "BuyerCounters",
    "Floor",
    "FAILED_PING_STATUSES",
    "PING_STATUSES",
    "acceptance_rate",
    "below_floor_reason",
    "cap_allows",
    "cap_periods",
    "caps_reason",
    "choose_mode",
    "eligibility",
    "field_filter_reason",
    "floor_breakdown",
    "floor_for",
    "in_window",
    "pause_decision",
    "pause_until_ms",
    "rank",
    "schedule_reason",
    "score",
    "scores",
    "wants_exclusive",
    "wave_number",
    "wave_of",
]

#: Float slack when comparing money: 0.1 + 0.2 must fit under a 0.3 budget.
_EPS = 1e-9

#: Ping outcomes that count as pings for auto-pause (``filtered`` was never sent).
PING_STATUSES = frozenset({"bid", "no_bid", "timeout", "error"})
FAILED_PING_STATUSES = frozenset({"timeout", "error"})


# --------------------------------------------------------------------------- time


def _aware(at: datetime | int) -> datetime:
    """An aware datetime from an aware datetime or epoch milliseconds."""
    if isinstance(at, bool):
        raise TypeError("at must be an aware datetime or epoch milliseconds, not bool")
    if isinstance(at, int):
        return datetime.fromtimestamp(at / 1000.0, tz=UTC)
    if not isinstance(at, datetime):
        raise TypeError(f"at must be an aware datetime or epoch milliseconds, not {type(at)}")
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("at must be timezone-aware (a naive datetime has no instant)")
    return at


def _epoch_ms(at: datetime | int) -> int:
    if isinstance(at, int) and not isinstance(at, bool):
        return at
    return int(round(_aware(at).timestamp() * 1000))


def _iso(ms: int) -> str:
    try:
        dt = datetime.fromtimestamp(ms / 1000.0, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return f"epoch ms {ms}"  # "forever" sentinels must not crash a reason
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z"


def in_window(window: TimeWindow, at: datetime | int) -> bool:
    """Whether ``at`` falls inside the window's days/hours in its time zone.

    Start inclusive, end exclusive. A wrapping window (``22:00-06:00``) is attributed to the
    day it starts on: ``fri 22:00-06:00`` covers Saturday 03:00 but not Friday 03:00.
    """
    local = _aware(at).astimezone(ZoneInfo(window.timezone))
    start, end = parse_hours(window.hours)
    # Seconds after local midnight (wall clock: on a DST day the zone moves the clock, not us).
    t = local.hour * 3600 + local.minute * 60 + local.second + local.microsecond / 1e6
    s, e = start * 60, end * 60
    day = local.weekday()
    if s < e:
        return s <= t < e and WEEKDAYS[day] in window.days
    if t >= s:
        return WEEKDAYS[day] in window.days
    if t < e:
        return WEEKDAYS[(day - 1) % 7] in window.days
    return False


def _local_label(window: TimeWindow, at: datetime | int) -> str:
    local = _aware(at).astimezone(ZoneInfo(window.timezone))
    return f"{WEEKDAYS[local.weekday()].capitalize()} {local:%H:%M} {window.timezone}"


def schedule_reason(buyer: BuyerConfig, at: datetime | int) -> str | None:
    """Why the buyer is outside its schedule at ``at`` (None: inside, or no schedule)."""
    sch = buyer.schedule
    if sch is None or in_window(sch, at):
        return None
    return f"outside schedule ({_local_label(sch, at)}; schedule {','.join(sch.days)} {sch.hours})"


# --------------------------------------------------------------------------- filters


def _fmt(v: Any) -> str:
    if v is None:
        return "(missing)"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return _num(v)
    return str(v)


def _num(x: float) -> str:
    """40.0 -> '40', 1.2 -> '1.2' (factors in reasons)."""
    out = f"{x:.6f}".rstrip("0").rstrip(".")
    return out if out not in ("", "-0") else "0"


def _list(vs: Sequence[Any]) -> str:
    return "[" + ", ".join(_fmt(v) for v in vs) + "]"


def _same(a: Any, b: Any) -> bool:
    """Equality without bool/number crossover (``True`` is not ``1``)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def _member(v: Any, values: Sequence[Any]) -> bool:
    return any(_same(v, x) for x in values)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def field_filter_reason(name: str, flt: FieldFilter, value: Any) -> str | None:
    """Why a lead's ``name`` value fails the filter (None: it passes). Missing fails."""
    if value is None:
        return f"{name} missing (buyer filters on it)"
    if flt.eq is not None and not _same(value, flt.eq):
        return f"{name} {_fmt(value)} is not {_fmt(flt.eq)}"
    if flt.in_ is not None and not _member(value, flt.in_):
        return f"{name} {_fmt(value)} not in filter {_list(flt.in_)}"
    if flt.not_in is not None and _member(value, flt.not_in):
        return f"{name} {_fmt(value)} is excluded by filter {_list(flt.not_in)}"
    if flt.min is not None or flt.max is not None:
        if not _is_number(value):
            return f"{name} {_fmt(value)} is not a number"
        if flt.min is not None and value < flt.min:
            return f"{name} {_fmt(value)} below filter min {_num(flt.min)}"
        if flt.max is not None and value > flt.max:
            return f"{name} {_fmt(value)} above filter max {_num(flt.max)}"
    return None


def _filters_reason(buyer: BuyerConfig, lead_fields: Mapping[str, Any]) -> str | None:
    states = buyer.filters.states
    if states is not None and lead_fields.get("state") not in states:
        return f"state {_fmt(lead_fields.get('state'))} not in filter {_list(states)}"
    for name, flt in buyer.filters.fields.items():
        why = field_filter_reason(name, flt, lead_fields.get(name))
        if why is not None:
            return why
    return None


# --------------------------------------------------------------------------- caps


@dataclass(frozen=True)
class BuyerCounters:
    """A buyer's accepted posts in the current cap periods (see :func:`cap_periods`)."""

    leads_hour: int = 0
    leads_day: int = 0
    spend_day: float = 0.0


def cap_periods(caps: BuyerCaps, at: datetime | int) -> tuple[str, str]:
    """The (hour, day) period keys counters are kept under, in the caps' time zone.

    Calendar hours and days. The hour key carries the UTC offset, so the hour repeated when
    DST ends is two periods (``2024-11-03T01-07:00`` and ``2024-11-03T01-08:00``).
    """
    local = _aware(at).astimezone(ZoneInfo(caps.timezone))
    off = local.strftime("%z")
    return f"{local:%Y-%m-%dT%H}{off[:3]}:{off[3:]}", f"{local:%Y-%m-%d}"


def caps_reason(caps: BuyerCaps | None, counters: BuyerCounters | None) -> str | None:
    """Before the ping: why the buyer is not under its caps (None: it is).

    A cap is reached when the count equals it (leads_per_day 10 with 10 counted: no ping);
    spend is reached when nothing is left (spend_day >= spend_per_day).
    """
    if caps is None:
        return None
    c = counters or BuyerCounters()
    if caps.leads_per_hour is not None and c.leads_hour >= caps.leads_per_hour:
        return f"cap leads_per_hour {caps.leads_per_hour} reached"
    if caps.leads_per_day is not None and c.leads_day >= caps.leads_per_day:
        return f"cap leads_per_day {caps.leads_per_day} reached"
    if caps.spend_per_day is not None and c.spend_day >= caps.spend_per_day - _EPS:
        return f"cap spend_per_day {caps.spend_per_day:.2f} reached (spent {c.spend_day:.2f})"
    return None


def cap_allows(caps: BuyerCaps | None, counters: BuyerCounters | None, price: float) -> str | None:
    """Reserve-before-post: why one more lead at ``price`` would exceed a cap (None: fits).

    ``leads + 1 <= cap`` and ``spend_day + price <= spend_per_day``.
    """
    if caps is None:
        return None
    c = counters or BuyerCounters()
    if caps.leads_per_hour is not None and c.leads_hour + 1 > caps.leads_per_hour:
        return f"cap leads_per_hour {caps.leads_per_hour} reached"
    if caps.leads_per_day is not None and c.leads_day + 1 > caps.leads_per_day:
        return f"cap leads_per_day {caps.leads_per_day} reached"
    if caps.spend_per_day is not None and c.spend_day + price > caps.spend_per_day + _EPS:
        return (
            f"cap spend_per_day {caps.spend_per_day:.2f} would be exceeded "
            f"(spent {c.spend_day:.2f} + price {price:.2f})"
        )
    return None


# --------------------------------------------------------------------------- eligibility


def eligibility(
    buyer: BuyerConfig,
    lead_fields: Mapping[str, Any],
    at: datetime | int,
    *,
    paused_until_ms: int | None = None,
    counters: BuyerCounters | None = None,
    flow: str | None = None,
) -> str | None:
    """Whether to ping ``buyer`` for a lead: None if eligible, else the reason.

    ``lead_fields`` are the ping fields (what the ping stage holds). Checked in this order:
    serves the flow (when ``flow`` is given), filters (states, then each field filter),
    schedule, pause (``at < paused_until_ms``), caps (``counters`` None = nothing counted).
    """
    if flow is not None and flow not in buyer.flows:
        return f"buyer does not serve flow {flow}"
    why = _filters_reason(buyer, lead_fields)
    if why is not None:
        return why
    why = schedule_reason(buyer, at)
    if why is not None:
        return why
    if paused_until_ms is not None and _epoch_ms(at) < paused_until_ms:
        return f"paused until {_iso(paused_until_ms)}"
    return caps_reason(buyer.caps, counters)


# --------------------------------------------------------------------------- floors


@dataclass(frozen=True)
class Floor:
    """A floor and how it was made: ``value = max(base × quality × premium, exclusive_min)``
    (``exclusive_min`` only for exclusive sales)."""

    base: float
    quality: float
    premium: float  # 1.0 outside business hours or without them
    exclusive_min: float | None  # set only for exclusive sales with a configured minimum
    value: float

    def explain(self) -> str:
        parts = [f"base {_num(self.base)}"]
        if self.quality != 1.0:
            parts.append(f"quality {_num(self.quality)}")
        if self.premium != 1.0:
            parts.append(f"business hours {_num(self.premium)}")
        return " × ".join(parts)


def _quality(flow: FlowConfig, lead_fields: Mapping[str, Any]) -> float:
    q = flow.floors.quality
    if q is None:
        return 1.0
    matched = [r.multiplier for r in q.rules if _member(lead_fields.get(r.field), r.values())]
    if not matched:
        return q.default
    return math.prod(matched)


def floor_breakdown(
    flow: FlowConfig, lead_fields: Mapping[str, Any], at: datetime | int, *, exclusive: bool
) -> Floor:
    """The floor for this lead at ``at`` with its parts (see :func:`floor_for`)."""
    f = flow.floors
    quality = _quality(flow, lead_fields)
    bh = f.business_hours
    premium = bh.premium if bh is not None and in_window(bh, at) else 1.0
    value = round(f.base * quality * premium, 6)
    exmin = f.exclusive_min if exclusive else None
    if exmin is not None:
        value = max(value, exmin)
    return Floor(f.base, quality, premium, exmin, value)


def floor_for(
    flow: FlowConfig, lead_fields: Mapping[str, Any], at: datetime | int, *, exclusive: bool
) -> float:
    """Minimum acceptable price: ``base × quality × premium`` (quality: the product of the
    matching quality rules' multipliers, or ``quality.default`` if none matches; premium inside
    business hours), and for exclusive sales at least ``exclusive_min``. No floors: 0."""
    return floor_breakdown(flow, lead_fields, at, exclusive=exclusive).value


def below_floor_reason(
    flow: FlowConfig,
    price: float,
    lead_fields: Mapping[str, Any],
    at: datetime | int,
    *,
    exclusive: bool,
) -> str | None:
    """Why ``price`` is below the applicable floor (None: it is not)."""
    fl = floor_breakdown(flow, lead_fields, at, exclusive=exclusive)
    if price + _EPS >= fl.value:
        return None
    plain = round(fl.base * fl.quality * fl.premium, 6)
    if fl.exclusive_min is not None and fl.exclusive_min > plain:
        return f"exclusive price {price:.2f} below exclusive minimum {fl.exclusive_min:.2f}"
    kind = "exclusive price" if exclusive else "price"
    return f"{kind} {price:.2f} below floor {fl.value:.2f} ({fl.explain()})"


# --------------------------------------------------------------------------- scoring


def acceptance_rate(
    accepted: int, posted: int, prior_rate: float = 0.7, prior_weight: float = 10
) -> float:
    """A buyer's post acceptance rate with a Bayesian prior: a new buyer starts at
    ``prior_rate`` and its own record takes over as posts accumulate
    (``(accepted + rate·weight) / (posted + weight)``)."""
    if accepted < 0 or posted < 0 or accepted > posted:
        raise ValueError(f"need 0 <= accepted <= posted, got {accepted}/{posted}")
    if not 0 <= prior_rate <= 1 or prior_weight < 0:
        raise ValueError("prior_rate must be in [0, 1] and prior_weight >= 0")
    if posted + prior_weight == 0:
        return prior_rate
    return (accepted + prior_rate * prior_weight) / (posted + prior_weight)


def _weights(w: ScoreWeights | Mapping[str, float]) -> tuple[float, float, float]:
    if isinstance(w, ScoreWeights):
        return w.price, w.acceptance, w.payment
    return (
        float(w.get("price", 0.0)),
        float(w.get("acceptance", 0.0)),
        float(w.get("payment", 0.0)),
    )


def _unit(x: float) -> float:
    return min(1.0, max(0.0, float(x)))


def score(
    price: float,
    max_price_in_auction: float,
    acceptance_rate: float,
    payment_speed: float,
    weights: ScoreWeights | Mapping[str, float],
) -> float:
    """``w_price·price/max + w_accept·acceptance_rate + w_pay·payment_speed``.

    The price is normalised by the auction's highest acceptable price (so the top bid has 1.0
    and every term lies in [0, 1]: the weights then mean what they say).
    """
    wp, wa, wy = _weights(weights)
    norm = _unit(price / max_price_in_auction) if max_price_in_auction > 0 else 0.0
    return wp * norm + wa * _unit(acceptance_rate) + wy * _unit(payment_speed)


def scores(
    candidates: Sequence[Mapping[str, Any]],
    *,
    weights: ScoreWeights | Mapping[str, float],
    acceptance: Mapping[str, float],
    payment: Mapping[str, float],
    default_acceptance: float | None = None,
    default_payment: float = 0.5,
) -> dict[str, float]:
    """Each candidate's score (by buyer_id), prices normalised by the candidates' maximum.

    A buyer missing from ``acceptance`` gets ``default_acceptance`` (default: the prior,
    0.7); missing from ``payment``: ``default_payment`` (the config default, 0.5).
    """
    if default_acceptance is None:
        default_acceptance = AcceptancePrior().rate
    top = max((float(c["price"]) for c in candidates), default=0.0)
    return {
        c["buyer_id"]: round(
            score(
                float(c["price"]),
                top,
                acceptance.get(c["buyer_id"], default_acceptance),
                payment.get(c["buyer_id"], default_payment),
                weights,
            ),
            9,
        )
        for c in candidates
    }


def rank(
    candidates: list[dict[str, Any]],
    *,
    rank_by: str,
    weights: ScoreWeights | Mapping[str, float],
    acceptance: Mapping[str, float],
    payment: Mapping[str, float],
    default_acceptance: float | None = None,
    default_payment: float = 0.5,
) -> list[dict[str, Any]]:
    """Candidates best first, deterministically.

    ``price``: price desc, then earlier ``answered_at_ms``, then buyer_id (no score: a tie
    never depends on acceptance history or payment speed).
    ``score``: score desc, then earlier ``answered_at_ms``, then buyer_id.
    Returns the same dicts (not copies, not mutated: they stay valid ``Candidate`` records);
    use :func:`scores` for the scores themselves.
    """
    if rank_by not in ("price", "score"):
        raise ValueError(f"rank_by must be 'price' or 'score', not {rank_by!r}")
    if rank_by == "price":
        return sorted(
            candidates, key=lambda c: (-float(c["price"]), c["answered_at_ms"], c["buyer_id"])
        )
    sc = scores(
        candidates,
        weights=weights,
        acceptance=acceptance,
        payment=payment,
        default_acceptance=default_acceptance,
        default_payment=default_payment,
    )

    def key(c: dict[str, Any]) -> tuple[Any, ...]:
        return (-sc[c["buyer_id"]], c["answered_at_ms"], c["buyer_id"])

    return sorted(candidates, key=key)


def wants_exclusive(c: Mapping[str, Any]) -> bool:
    """A bid asks for exclusivity (``exclusive`` or the ``exclusive_required`` condition)."""
    return bool(c.get("exclusive") or (c.get("conditions") or {}).get("exclusive_required"))


def choose_mode(
    ranked: Sequence[Mapping[str, Any]], *, exclusive_only: bool, shared_only: bool
) -> str:
    """How the lead is sold: ``exclusive``, ``shared`` or ``none``.

    - default: exclusive if the best bid asks for exclusivity, else shared;
    - ``exclusive_only``: exclusive to the best bid, whatever it asked;
    - ``shared_only``: shared among the bids that do not ask for exclusivity (those are
      never honoured), ``none`` if every bid asks for it.
    """
    if exclusive_only and shared_only:
        raise ValueError("exclusive_only and shared_only cannot both be set")
    if not ranked:
        return "none"
    if exclusive_only:
        return "exclusive"
    if shared_only:
        return "shared" if any(not wants_exclusive(c) for c in ranked) else "none"
    return "exclusive" if wants_exclusive(ranked[0]) else "shared"


# --------------------------------------------------------------------------- waves


def wave_of(tier: str, waves: Sequence[WaveConfig] | None) -> int | None:
    """The index of the wave that pings ``tier``; without waves every tier is in wave 0;
    a tier that no wave lists is never pinged (None)."""
    if waves is None:
        return 0
    for i, wave in enumerate(waves):
        if tier in wave.tiers:
            return i
    return None


def wave_number(tier: str, waves: Sequence[WaveConfig] | None) -> int:
    """The wave a ping of ``tier`` belongs to as recorded (``Bid.wave``): 1 for the first;
    0 when the flow has no waves, or no wave lists the tier."""
    if not waves:
        return 0
    i = wave_of(tier, waves)
    return 0 if i is None else i + 1


# --------------------------------------------------------------------------- auto-pause


def pause_decision(
    outcomes: Sequence[tuple[int, str]],
    now_ms: int,
    *,
    window_s: float,
    min_pings: int,
    max_failure_rate: float,
) -> bool:
    """Whether to pause a buyer now, from its recent ping outcomes ``(at_ms, status)``.

    The window is ``(now - window_s, now]``. Pings are bid/no_bid/timeout/error (a
    ``filtered`` row was never sent); failures are timeout/error. Pause when the window holds
    at least ``min_pings`` pings and the failure share is strictly above
    ``max_failure_rate``.
    """
    since = now_ms - window_s * 1000.0
    pings = failed = 0
    for at_ms, status in outcomes:
        if not since < at_ms <= now_ms or status not in PING_STATUSES:
            continue
        pings += 1
        if status in FAILED_PING_STATUSES:
            failed += 1
    return pings >= min_pings and pings > 0 and failed / pings > max_failure_rate


def pause_until_ms(now_ms: int, cool_down_s: float) -> int:
    """When a pause decided at ``now_ms`` ends (the buyer resumes by itself)."""
    return now_ms + int(round(cool_down_s * 1000))
