"""Replay: re-decide a recorded auction under another strategy, with the live rule code.

A recorded auction (:class:`Recorded`: the lead's ping view, every ping's outcome with its
answer time, the posts and their answers) is decided again by :func:`replay` under a flow
configuration — the one in force when it ran (its version), or a candidate with some strategy
keys overridden. What it reuses from the live path: :func:`~streams.rules.auction.acceptable`
and :func:`~streams.rules.auction.decide` (floors, conditions, ranking, modes),
:func:`~streams.rules.posting.next_batch` (the waterfall) and the wave rule of
:mod:`streams.rules.selling`.

What is counterfactual, and how (each use is counted on the :class:`Outcome`):

- **Timeouts** come from the recorded answer times: an answer that took longer than the
  time the candidate would give that ping (the buyer's timeout, cut by its wave's and by the
  deadline minus the safety margin, from the ping's recorded offset into the round) becomes a
  timeout. A ping that timed out for real stays a timeout even if the candidate would wait
  longer: its answer was never seen (``censored``).
- **Waves**: the candidate's waves are walked in order, a later wave only if the earlier ones
  produced no acceptable bid, as live. A buyer the candidate pings but the live round did not
  (its wave was not needed then) has no recorded answer: it counts as no bid (``unobserved``).
- **Posts**: a buyer posted for real answers as it did (accepted also when the acceptance
  came after the post timed out and was reconciled). A buyer that was not posted is modelled:
  it accepts with its observed acceptance rate for the flow (``model_posts``), drawn from a
  hash of the lead and buyer, so a replay is deterministic.
- Not modelled: caps (a cap-skipped buyer is posted by the replay, through the model), the
  post window's clock, auto-pause. Ranking by score uses the window's observed acceptance
  rates, not the ones the live auction had at the time (``model_ranking``).

An outcome with none of these (:attr:`Outcome.exact`) rests on recorded answers only; replaying
the live configuration then reproduces the recorded outcome exactly (tests prove it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from streams.rules import selling
from streams.rules.auction import acceptable, decide
from streams.rules.pinging import MIN_WAVE_MS
from streams.rules.posting import next_batch
from streams.settings import FlowConfig

__all__ = [
    "BuyerEntry",
    "Outcome",
    "PingRec",
    "Recorded",
    "Strategy",
    "apply_overrides",
    "draw",
    "replay",
    "variant_doc",
    "OVERRIDABLE",
]

#: The flow keys ``--strategy FILE`` may override (``strategy.*`` and ``floors.*`` by key).
OVERRIDABLE = ("strategy", "floors", "waves", "deadline_ms", "safety_margin_ms", "buyers")

#: Recorded ping statuses that mean the buyer was pinged and answered (or failed).
_ANSWERED = ("bid", "no_bid", "error")


@dataclass(frozen=True)
class PingRec:
    buyer_id: str
    tier: str
    status: str  # bid | no_bid | timeout | error | filtered
    price: float | None
    exclusive: bool
    conditions: Mapping[str, Any]
    sent_at_ms: int
    answered_at_ms: int
    latency_ms: float
    timeout_ms: float | None
    reason: str = ""

    @property
    def pinged(self) -> bool:
        """Whether the live round sent this ping (a ``filtered`` row was never sent)."""
        return self.status != "filtered"

    @property
    def not_pinged_for_waves(self) -> bool:
        """A buyer the live round skipped only because of its waves (needed or timed)."""
        return self.status == "filtered" and self.reason.startswith("not pinged")


@dataclass(frozen=True)
class Recorded:
    lead_id: str
    flow: str
    ping_fields: Mapping[str, Any]
    created_at_ms: int
    opened_at_ms: int
    deadline_at_ms: int
    closed_at_ms: int
    pings: Sequence[PingRec]
    #: buyer -> final post answer: accepted | rejected | failed | timeout
    posts: Mapping[str, str]
    outcome: str  # sold_exclusive | sold_shared | unsold
    winners: Sequence[str]
    price_total: float
    #: winner -> the price it paid
    prices: Mapping[str, float] = field(default_factory=dict)
    config_hash: str = ""
    variant: str = ""


@dataclass(frozen=True)
class BuyerEntry:
    """What a flow version keeps of a buyer (streams/settings/version.py)."""

    tier: str
    timeout_ms: float
    payment_speed: float = 0.5


@dataclass(frozen=True)
class Strategy:
    """A flow configuration to replay under: the flow and its buyers' entries."""

    flow: FlowConfig
    buyers: Mapping[str, BuyerEntry]

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Strategy:
        """From a version document (``{"flow": ..., "buyers": {...}}``)."""
        buyers = {
            b: BuyerEntry(
                tier=str(e.get("tier", "standard")),
                timeout_ms=float(e.get("timeout_ms", 500)),
                payment_speed=float(e.get("payment_speed", 0.5)),
            )
            for b, e in (doc.get("buyers") or {}).items()
        }
        return cls(FlowConfig.model_validate(doc["flow"]), buyers)


def apply_overrides(doc: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A version document with ``overrides`` applied: ``strategy`` and ``floors`` merged key
    by key, ``waves``, ``deadline_ms`` and ``safety_margin_ms`` replaced, ``buyers`` merged
    per buyer (``{id: {timeout_ms: ...}}``). Unknown keys: ValueError naming them."""
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(
            f"cannot override {', '.join(unknown)}: a strategy file may set "
            f"{', '.join(OVERRIDABLE)}"
        )
    flow = dict(doc["flow"])
    buyers = {b: dict(e) for b, e in (doc.get("buyers") or {}).items()}
    for key, value in overrides.items():
        if key in ("strategy", "floors"):
            if not isinstance(value, Mapping):
                raise ValueError(f"{key}: expected a mapping of keys to override")
            flow[key] = {**(flow.get(key) or {}), **value}
        elif key == "buyers":
            if not isinstance(value, Mapping):
                raise ValueError("buyers: expected {buyer_id: {timeout_ms: ...}}")
            for b, e in value.items():
                if b not in buyers:
                    raise ValueError(f"buyers.{b}: not a buyer of this flow")
                if not isinstance(e, Mapping) or set(e) - {"timeout_ms"}:
                    raise ValueError(f"buyers.{b}: only timeout_ms may be overridden")
                buyers[b].update(e)
        else:
            flow[key] = value
    return {"flow": flow, "buyers": buyers}


def variant_doc(doc: Mapping[str, Any], variant: str) -> dict[str, Any]:
    """A version document as experiment ``variant`` ran it: the variant's ``strategy`` and
    ``floors`` merged in, no experiment (the document itself for '' or an unknown variant)."""
    exp = doc["flow"].get("experiment") or {}
    for v in exp.get("variants") or []:
        if v["name"] == variant:
            flow = dict(doc["flow"])
            flow["experiment"] = None
            flow["strategy"] = {**(flow.get("strategy") or {}), **(v.get("strategy") or {})}
            flow["floors"] = {**(flow.get("floors") or {}), **(v.get("floors") or {})}
            return {**doc, "flow": flow}
    return dict(doc)


def draw(seed: int, lead_id: str, buyer_id: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, lead, buyer): the modelled post answers."""
    h = hashlib.blake2b(f"{seed}\x00{lead_id}\x00{buyer_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


@dataclass
class Outcome:
    outcome: str  # sold_exclusive | sold_shared | unsold
    winners: list[str]
    prices: list[float]
    pings: int  # pings the replayed round sends
    posts: int  # posts the replayed waterfall sends (its depth)
    model_posts: int = 0  # of them, answered by the acceptance model
    unobserved: int = 0  # pings the replay sends that the live round did not
    censored: int = 0  # timeouts the candidate would have waited longer for
    model_ranking: bool = False
    model_revenue: float = 0.0  # revenue from modelled acceptances
    #: ping round: from open until its last answer or timeout (the last wave it pinged)
    round_ms: float = 0.0
    bids: int = 0  # bids the replay received in time
    spend: dict[str, float] = field(default_factory=dict)

    @property
    def revenue(self) -> float:
        return round(sum(self.prices), 2)

    @property
    def exact(self) -> bool:
        """Decided from recorded answers alone."""
        return not (self.model_posts or self.unobserved or self.censored or self.model_ranking)


def _as_bid(p: PingRec, status: str) -> dict[str, Any]:
    return {
        "buyer_id": p.buyer_id,
        "tier": p.tier,
        "ping_id": p.buyer_id,
        "status": status,
        "price": p.price,
        "exclusive": p.exclusive,
        "conditions": dict(p.conditions),
        "answered_at_ms": p.answered_at_ms,
    }


def _tier(p: PingRec, strat: Strategy) -> str:
    e = strat.buyers.get(p.buyer_id)
    return e.tier if e is not None else p.tier


def _answer(
    p: PingRec,
    strat: Strategy,
    allowed_ms: float,
    out: Outcome,
) -> dict[str, Any] | None:
    """The ping's answer when the candidate gives it ``allowed_ms`` (a Bid-like dict), or
    None for a buyer filtered for a reason the strategy does not change (filters, caps...)."""
    if not p.pinged:
        if p.not_pinged_for_waves:
            out.unobserved += 1
            out.pings += 1
            return _as_bid(p, "no_bid")
        return None
    out.pings += 1
    if p.status == "timeout":
        if p.timeout_ms is not None and allowed_ms > p.timeout_ms:
            out.censored += 1
        return _as_bid(p, "timeout")
    if p.status in _ANSWERED and p.latency_ms > allowed_ms:
        return _as_bid(p, "timeout")
    if p.status == "bid":
        out.bids += 1
    return _as_bid(p, p.status)


def _allowed(p: PingRec, strat: Strategy, cap_ms: float) -> float:
    """The buyer's timeout under ``strat``, cut to ``cap_ms``."""
    entry = strat.buyers.get(p.buyer_id)
    if entry is not None:
        own = entry.timeout_ms
    else:  # a buyer the version does not list: the time it was given for real
        own = p.timeout_ms if p.timeout_ms is not None else cap_ms
    return min(float(own), cap_ms)


def _round(rec: Recorded, strat: Strategy, out: Outcome) -> tuple[list[dict[str, Any]], list[int]]:
    """The answers the candidate's ping round collects, and the waves it did not need (their
    buyers are the waterfall's backup). Each wave starts when the previous one's last answer
    (or timeout) came, as live; ``MIN_WAVE_MS`` before the deadline no wave starts."""
    flow = strat.flow
    stop = float(flow.deadline_ms - flow.safety_margin_ms)
    sent = [p.sent_at_ms - rec.opened_at_ms for p in rec.pings if p.pinged]
    start = float(max(0, min(sent))) if sent else 0.0
    if not flow.waves:
        answers, took = [], 0.0
        for p in rec.pings:
            allowed = _allowed(p, strat, stop - start)
            a = _answer(p, strat, allowed, out)
            if a is not None:
                answers.append(a)
                took = max(took, _took(p, a, allowed))
        out.round_ms = start + took
        return answers, []
    answers = []
    for i, wave in enumerate(flow.waves):
        members = [p for p in rec.pings if selling.wave_of(_tier(p, strat), flow.waves) == i]
        if not members:
            continue
        if stop - start < MIN_WAVE_MS:
            break  # no time left for this wave (nor any later one): not pinged
        cap = min(float(wave.timeout_ms), stop - start)
        got, took = [], 0.0
        for p in members:
            allowed = _allowed(p, strat, cap)
            a = _answer(p, strat, allowed, out)
            if a is None:
                continue
            got.append(a)
            took = max(took, _took(p, a, allowed))
        answers.extend(got)
        out.round_ms = start + took
        if any(_acceptable(a, rec, strat) for a in got):
            return answers, list(range(i + 1, len(flow.waves)))
        start += took
    return answers, []


def _took(p: PingRec, a: Mapping[str, Any], allowed: float) -> float:
    """How long the round waited for this ping: its answer time, or all it was allowed."""
    if not p.pinged:
        return 0.0  # never sent for real: its time is not known (counted as unobserved)
    return allowed if a["status"] == "timeout" else min(p.latency_ms, allowed)


def _acceptable(a: Mapping[str, Any], rec: Recorded, strat: Strategy) -> bool:
    return acceptable(
        a,
        rec.ping_fields,
        strat.flow.strategy,
        rec.created_at_ms,
        rec.closed_at_ms,
        flow=strat.flow,
    )[0]


def _waterfall(
    rec: Recorded,
    strat: Strategy,
    answers: list[dict[str, Any]],
    acceptance: Mapping[str, float],
    seed: int,
    out: Outcome,
    tried: set[str],
) -> bool:
    """Decide and post, as the post stage walks its waterfall; True when the lead is done
    (sold, or a post timed out: its slot stays taken, so no backup wave follows).
    ``tried`` carries over to the backup waves."""
    s = strat.flow.strategy
    payment = {b: e.payment_speed for b, e in strat.buyers.items()}
    decision = decide(
        answers,
        rec.ping_fields,
        s,
        rec.created_at_ms,
        rec.closed_at_ms,
        flow=strat.flow,
        acceptance=acceptance,
        payment=payment,
    )
    if s.rank_by == "score" and len(decision.candidates) > 1:
        out.model_ranking = True
    order = {
        "candidates": decision.candidates,
        "ping_fields": rec.ping_fields,
        "created_at_ms": rec.created_at_ms,
    }
    prices = {c["buyer_id"]: c["price"] for c in decision.candidates}
    sold: list[str] = []
    held: list[str] = []  # timed-out posts: ambiguous, their slots stay taken
    mode: str | None = None
    while True:
        batch_mode, batch, _ = next_batch(
            order,
            tried,
            sold + held,
            mode,
            s.shared_max,
            rec.closed_at_ms,
            exclusive_only=s.exclusive_only,
        )
        if not batch:
            break
        if not sold:
            mode = batch_mode
        for c in batch:
            buyer = c["buyer_id"]
            tried.add(buyer)
            out.posts += 1
            answer = rec.posts.get(buyer)
            if answer is None:
                out.model_posts += 1
                answer = (
                    "accepted"
                    if draw(seed, rec.lead_id, buyer) < acceptance.get(buyer, 0.0)
                    else "rejected"
                )
                if answer == "accepted":
                    out.model_revenue += prices[buyer]
            if answer == "accepted":
                sold.append(buyer)
                out.winners.append(buyer)
                out.prices.append(prices[buyer])
                out.spend[buyer] = out.spend.get(buyer, 0.0) + prices[buyer]
            elif answer == "timeout":
                held.append(buyer)
    if sold:
        out.outcome = "sold_exclusive" if mode == "exclusive" else "sold_shared"
    return bool(sold or held)


def replay(
    rec: Recorded, strat: Strategy, acceptance: Mapping[str, float], seed: int = 0
) -> Outcome:
    """``rec`` decided again under ``strat``; ``acceptance``: each buyer's post acceptance
    rate for the flow (the model for buyers not posted for real, and the ranking's input)."""
    out = Outcome("unsold", [], [], 0, 0)
    answers, backup_waves = _round(rec, strat, out)
    tried: set[str] = set()
    if _waterfall(rec, strat, answers, acceptance, seed, out, tried):
        return out
    # Every bidder said no: the waves the round did not need are the backup buyers, one
    # wave at a time (as the post stage does), each ping given its buyer's and its wave's
    # timeout (no auction deadline any more).
    flow = strat.flow
    for i in backup_waves:
        assert flow.waves is not None
        wave = flow.waves[i]
        got = []
        for p in rec.pings:
            if selling.wave_of(_tier(p, strat), flow.waves) != i:
                continue
            a = _answer(p, strat, _allowed(p, strat, float(wave.timeout_ms)), out)
            if a is not None:
                got.append(a)
        if _waterfall(rec, strat, got, acceptance, seed, out, tried):
            return out
    return out
