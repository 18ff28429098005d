"""``pingpost replay --advise-timeouts``: per buyer, what each ping timeout would have earned.

For every buyer of the flow and every timeout of a grid (and for the flow's deadline), the
window's auctions are replayed with only that one value changed (:mod:`streams.rules.replay`:
an answer slower than the timeout becomes a timeout), in one pass over the warehouse. Per
option: the change in revenue per lead against the configuration the auctions ran with (a
paired Poisson bootstrap interval), the bids lost, and the ping round's p50/p99 (open → last
answer or timeout): the speed a timeout buys. A longer timeout than a buyer had can only be
judged on the answers seen: its late answers were never recorded (counted as ``censored``),
so a replay never credits a longer wait with revenue.

The proposal per buyer: among the options whose round p99 is no slower than today's, the one
with a significant revenue gain (the highest), else the shortest that loses no revenue
measurably (its interval reaches 0): it speeds the round at no measurable cost.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from streams.rules.replay import Outcome, Recorded, Strategy, replay
from streams.settings import Settings, flow_version
from streams.tools.replay import Scope, VersionBook, acceptance_rates, load_chunks, versions

__all__ = ["Advice", "AdviceResult", "GRID_MS", "Option", "print_advice", "run_advice"]

#: Timeouts tried per buyer (capped by the flow's deadline minus its safety margin).
GRID_MS = (100, 150, 200, 250, 300, 400, 500, 600, 800, 1000)
#: Deadlines tried for the flow.
DEADLINES_MS = (400, 500, 600, 750, 1000, 1500)
#: Round-time histogram: 1 ms bins up to this.
_MAX_MS = 60_000
DEADLINE = "(flow deadline)"


@dataclass
class Option:
    subject: str  # a buyer id, or DEADLINE
    value_ms: int
    current: bool
    per_lead_diff: float = 0.0
    low: float = 0.0
    high: float = 0.0
    bids_lost: int = 0  # bids answered in time today, late under this option
    censored: int = 0  # timeouts today it would have waited longer for
    round_p50: float = 0.0
    round_p99: float = 0.0

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0


@dataclass
class Advice:
    subject: str
    current_ms: int
    options: list[Option]
    proposed_ms: int
    why: str


@dataclass
class AdviceResult:
    flow: str
    auctions: int
    round_p50: float
    round_p99: float
    advice: list[Advice] = field(default_factory=list)
    seconds: float = 0.0
    confidence: float = 0.95
    resamples: int = 200


def _doc_with(doc: Mapping[str, Any], subject: str, value: int) -> dict[str, Any]:
    d = orjson.loads(orjson.dumps(doc))
    if subject == DEADLINE:
        d["flow"]["deadline_ms"] = value
    else:
        d["buyers"][subject]["timeout_ms"] = value
    return d  # type: ignore[no-any-return]


def _quantile(hist: np.ndarray, q: float) -> float:
    total = hist.sum()
    if total == 0:
        return 0.0
    return float(np.searchsorted(np.cumsum(hist), q * total, side="left"))


def run_advice(
    client: Any,
    db: str,
    settings: Settings,
    flow: str,
    scope: Scope | None = None,
    *,
    grid: tuple[int, ...] = GRID_MS,
    deadlines: tuple[int, ...] = DEADLINES_MS,
    seed: int = 0,
    resamples: int = 200,
    confidence: float = 0.95,
    progress: Callable[[int, int], None] | None = None,
) -> AdviceResult:
    t0 = time.perf_counter()
    cfg = settings.flows.get(flow)
    if cfg is None:
        raise ValueError(f"no flow '{flow}' in the configuration ({', '.join(settings.flows)})")
    current_doc = orjson.loads(flow_version(settings, flow).config_json)
    stop = cfg.deadline_ms - cfg.safety_margin_ms
    subjects: list[tuple[str, int, list[int]]] = []
    for b, entry in current_doc["buyers"].items():
        now = int(entry["timeout_ms"])
        values = sorted({v for v in grid if v <= stop} | {now})
        subjects.append((b, now, values))
    subjects.append(
        (
            DEADLINE,
            cfg.deadline_ms,
            sorted({d for d in deadlines if d > cfg.safety_margin_ms} | {cfg.deadline_ms}),
        )
    )
    options = [Option(s, v, v == now) for s, now, values in subjects for v in values]
    stored = versions(client, db)
    scope = scope or Scope()
    rates = acceptance_rates(client, db, settings, scope)
    total, _, chunks = load_chunks(client, db, scope, flows=settings.flows)
    book = VersionBook(stored, settings)
    strategies: dict[tuple[str, str, str, int], Strategy] = {}

    def strategy(rec: Recorded, subject: str, value: int) -> Strategy:
        """The auction's own configuration with ``subject``'s timeout (or the deadline) set
        to ``value``; subject '' is the configuration itself."""
        key = (rec.config_hash, rec.variant, subject, value)
        s = strategies.get(key)
        if s is None:
            found = book.doc_for(rec)
            assert found is not None  # the flow is configured (checked above)
            doc = found[0]
            if subject != DEADLINE and subject not in doc["buyers"]:
                # the baseline (subject ''), or a buyer this version did not have: as it ran
                s = book.strategy(rec)
            else:
                s = Strategy.from_doc(_doc_with(doc, subject, value))
            strategies[key] = s
        return s

    n_opt = len(options)
    boot = np.zeros((resamples, n_opt + 1))  # diffs per option, and the weight total
    hist = np.zeros((n_opt + 1, _MAX_MS + 1))  # round times per option; the last: baseline
    sums = np.zeros(n_opt + 1)  # the window's own sums (point estimates)
    rng = np.random.default_rng(seed)
    done = auctions = 0
    for recs in chunks:
        recs = [r for r in recs if r.flow == flow]
        diffs = np.zeros((len(recs), n_opt + 1))
        rounds = np.zeros((len(recs), n_opt + 1), dtype=np.int64)
        for j, rec in enumerate(recs):
            base = replay(rec, strategy(rec, "", 0), rates.get(flow, {}), seed)
            # A buyer's timeout changes nothing for an auction it was not pinged in, nor
            # for one it answered within that timeout (same answer, same wait): no replay.
            answered = {
                p.buyer_id: (p.latency_ms if p.status in ("bid", "no_bid", "error") else None)
                for p in rec.pings
                if p.pinged
            }
            rounds[j, n_opt] = min(_MAX_MS, int(base.round_ms))
            diffs[j, n_opt] = 1.0
            for i, o in enumerate(options):
                lat = answered.get(o.subject, -1.0) if o.subject != DEADLINE else None
                if o.subject != DEADLINE and (
                    o.subject not in answered or (lat is not None and lat <= o.value_ms)
                ):
                    out: Outcome = base
                else:
                    out = replay(
                        rec, strategy(rec, o.subject, o.value_ms), rates.get(flow, {}), seed
                    )
                diffs[j, i] = out.revenue - base.revenue
                rounds[j, i] = min(_MAX_MS, int(out.round_ms))
                o.bids_lost += max(0, base.bids - out.bids)
                o.censored += out.censored
        sums += diffs.sum(axis=0)
        for i in range(n_opt + 1):
            hist[i] += np.bincount(rounds[:, i], minlength=_MAX_MS + 1)[: _MAX_MS + 1]
        step = max(1, 4_000_000 // max(1, resamples))
        for s0 in range(0, len(recs), step):
            w = rng.poisson(1.0, size=(resamples, min(step, len(recs) - s0)))
            boot += w @ diffs[s0 : s0 + step]
        auctions += len(recs)
        done += len(recs)
        if progress is not None:
            progress(done, total)
    result = AdviceResult(
        flow,
        auctions,
        _quantile(hist[n_opt], 0.5),
        _quantile(hist[n_opt], 0.99),
        confidence=confidence,
        resamples=resamples,
    )
    if auctions:
        a = (1.0 - confidence) / 2.0
        weights = np.maximum(boot[:, n_opt], 1.0)
        for i, o in enumerate(options):
            per = boot[:, i] / weights
            o.low, o.high = float(np.quantile(per, a)), float(np.quantile(per, 1 - a))
            o.per_lead_diff = float(sums[i] / auctions)
            o.round_p50 = _quantile(hist[i], 0.5)
            o.round_p99 = _quantile(hist[i], 0.99)
    for subject, now, _values in subjects:
        opts = [o for o in options if o.subject == subject]
        result.advice.append(_propose(subject, now, opts, result.round_p99))
    result.seconds = time.perf_counter() - t0
    return result


def _propose(subject: str, now: int, opts: list[Option], round_p99: float) -> Advice:
    """A value with a significant revenue gain that keeps the round as fast (the best);
    else a shorter one that speeds the round (p50 or p99) at no significant revenue loss
    (the shortest); else keep today's."""
    today = next((o for o in opts if o.current), None)
    p50 = today.round_p50 if today is not None else 0.0
    fast_enough = [o for o in opts if o.round_p99 <= round_p99 + 1.0]
    gains = [o for o in fast_enough if o.low > 0]
    if gains:
        best = max(gains, key=lambda o: o.per_lead_diff)
        return Advice(
            subject, now, opts, best.value_ms, f"+{best.per_lead_diff:.2f} per lead, significant"
        )
    faster = sorted(
        (
            o
            for o in opts
            if o.value_ms < now
            and o.high >= 0
            and (o.round_p99 < round_p99 - 1.0 or o.round_p50 < p50 - 1.0)
        ),
        key=lambda o: o.value_ms,
    )
    if faster:
        o = faster[0]
        return Advice(
            subject,
            now,
            opts,
            o.value_ms,
            f"no significant revenue loss; round p50/p99 {o.round_p50:.0f}/{o.round_p99:.0f} ms",
        )
    censored = max((o.censored for o in opts), default=0)
    return Advice(
        subject,
        now,
        opts,
        now,
        "keep: no shorter value speeds the round without losing revenue"
        + (f"; a longer one is not judged ({censored:,} timeouts never seen)" if censored else ""),
    )


def print_advice(result: AdviceResult, console: Any | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 120)
    console.print(
        f"Timeout advice, flow {result.flow}: {result.auctions:,} auctions; today's ping round "
        f"p50 {result.round_p50:.0f} ms, p99 {result.round_p99:.0f} ms"
    )
    pct = int(result.confidence * 100)
    for adv in result.advice:
        t = Table(
            title=f"{adv.subject}: today {adv.current_ms} ms → proposed {adv.proposed_ms} ms "
            f"({adv.why})"
        )
        for col in (
            "timeout ms" if adv.subject != DEADLINE else "deadline ms",
            "Δ revenue/lead",
            f"{pct} % interval",
            "chart",
            "bids lost",
            "censored",
            "round p50 / p99 ms",
        ):
            t.add_column(col, justify="left" if col == "chart" else "right")
        span = max((abs(o.per_lead_diff) for o in adv.options), default=0.0) or 1.0
        for o in adv.options:
            bar = "█" * max(0, round(10 * abs(o.per_lead_diff) / span))
            chart = (" " * 10 + "│" + bar) if o.per_lead_diff >= 0 else (bar.rjust(10) + "│")
            mark = " (today)" if o.current else (" ◀" if o.value_ms == adv.proposed_ms else "")
            t.add_row(
                f"{o.value_ms}{mark}",
                f"{o.per_lead_diff:+.2f}",
                f"[{o.low:+.2f}, {o.high:+.2f}]",
                chart,
                f"{o.bids_lost:,}",
                f"{o.censored:,}",
                f"{o.round_p50:.0f} / {o.round_p99:.0f}",
            )
        console.print(t)
    console.print(
        "Censored: timeouts today that the option would have waited longer for — their "
        "answers were never seen, so a longer timeout is credited with nothing. "
        f"{result.seconds:.1f} s."
    )


def proposed_overrides(result: AdviceResult) -> dict[str, Any]:
    """The proposals as a strategy file's keys (for the replay that shows their effect)."""
    out: dict[str, Any] = {}
    buyers = {
        a.subject: {"timeout_ms": a.proposed_ms}
        for a in result.advice
        if a.subject != DEADLINE and a.proposed_ms != a.current_ms
    }
    if buyers:
        out["buyers"] = buyers
    for a in result.advice:
        if a.subject == DEADLINE and a.proposed_ms != a.current_ms:
            out["deadline_ms"] = a.proposed_ms
    return out
