"""``pingpost replay``: recorded auctions decided again under another strategy.

A batch job over the warehouse. The window's auctions are read in chunks (by a hash of the
lead id, ~``CHUNK`` auctions each: three queries per chunk, never one per lead, so memory is
bounded at any window size), each auction is replayed twice with the same pure rule code as
the live auction (:mod:`streams.rules.replay`): under the configuration version it ran with
(the baseline) and under that version with the ``--strategy`` file's keys overridden (the
candidate). Per-auction figures feed running sums and a Poisson bootstrap (``B`` resamples,
weights drawn per chunk), so the confidence intervals of the differences need no second pass.
"""

from __future__ import annotations

import math
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import numpy as np
import orjson

from streams.rules import selling
from streams.rules.replay import (
    Outcome,
    PingRec,
    Recorded,
    Strategy,
    apply_overrides,
    replay,
    variant_doc,
)
from streams.settings import FlowConfig, Settings, flow_version
from streams.tools.report import ch_time

__all__ = [
    "Rates",
    "VersionBook",
    "Scope",
    "lead_set",
    "Arm",
    "Comparison",
    "ReplayResult",
    "load_chunks",
    "run_replay",
    "typed_ping_fields",
]

#: Auctions per chunk (three queries each).
CHUNK = 20_000
#: Bootstrap resamples, and the Poisson weights drawn at once (resamples × auctions).
BOOTSTRAP = 400
_WEIGHTS_AT_ONCE = 4_000_000


def typed_ping_fields(flow: FlowConfig, stored: Mapping[str, str]) -> dict[str, Any]:
    """The ping view as the auction saw it, from the ``leads`` table's strings: each field
    typed by its spec (a transformed field, ``zip3`` or ``prefix``, is text); '' is null."""
    kinds: dict[str, str] = {}
    for name, pf in flow.ping_fields.items():
        spec = flow.fields.get(name)
        keeps = pf.transform in ("keep", "lower", "upper")
        kinds[pf.rename or name] = spec.type if spec is not None and keeps else "string"
    out: dict[str, Any] = {}
    for k, v in stored.items():
        kind = kinds.get(k, "string")
        if v == "":
            out[k] = None
        elif kind == "boolean":
            out[k] = v == "true"
        elif kind == "integer":
            try:
                out[k] = int(v)
            except ValueError:
                out[k] = v
        elif kind == "number":
            try:
                out[k] = float(v)
            except ValueError:
                out[k] = v
        else:
            out[k] = v
    return out


class Rates:
    """Revenue per lead and per ping and sold %, from ``count`` (auctions), ``revenue``,
    ``pings`` and ``sold``."""

    revenue: float
    pings: int
    sold: int

    @property
    def count(self) -> int:
        raise NotImplementedError

    @property
    def per_lead(self) -> float:
        return self.revenue / self.count if self.count else 0.0

    @property
    def per_ping(self) -> float:
        return self.revenue / self.pings if self.pings else 0.0

    @property
    def sold_pct(self) -> float:
        return 100.0 * self.sold / self.count if self.count else 0.0


@dataclass
class Arm(Rates):
    """One side's totals: the baseline (the configuration each auction ran with) or the
    candidate."""

    auctions: int = 0
    revenue: float = 0.0
    pings: int = 0
    posts: int = 0
    sold: int = 0
    exclusive: int = 0
    shared: int = 0
    modelled: int = 0  # auctions whose outcome needed a model
    model_revenue: float = 0.0
    model_posts: int = 0
    unobserved: int = 0
    censored: int = 0
    wins: dict[str, int] = field(default_factory=dict)
    spend: dict[str, float] = field(default_factory=dict)

    def add(self, o: Outcome) -> None:
        self.auctions += 1
        self.revenue += o.revenue
        self.pings += o.pings
        self.posts += o.posts
        if o.winners:
            self.sold += 1
            if o.outcome == "sold_exclusive":
                self.exclusive += 1
            else:
                self.shared += 1
        if not o.exact:
            self.modelled += 1
        self.model_revenue += o.model_revenue
        self.model_posts += o.model_posts
        self.unobserved += o.unobserved
        self.censored += o.censored
        for b, v in o.spend.items():
            self.wins[b] = self.wins.get(b, 0) + 1
            self.spend[b] = self.spend.get(b, 0.0) + v

    @property
    def count(self) -> int:
        return self.auctions

    @property
    def depth(self) -> float:
        return self.posts / self.auctions if self.auctions else 0.0


@dataclass
class Comparison:
    """A difference (candidate − baseline) with its bootstrap interval."""

    name: str
    baseline: float
    candidate: float
    low: float
    high: float

    @property
    def diff(self) -> float:
        return self.candidate - self.baseline

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0


@dataclass
class ReplayResult:
    baseline: Arm
    candidate: Arm
    recorded: Arm  # the outcomes as they happened
    comparisons: list[Comparison]
    #: Auctions the baseline decided from recorded answers alone, and how many of them
    #: reproduced the recorded outcome (winners and revenue).
    exact: int = 0
    reproduced: int = 0
    mismatches: list[str] = field(default_factory=list)
    #: Auctions whose configuration version was not found (replayed under ``--config``).
    fallback: int = 0
    duplicates: int = 0
    seconds: float = 0.0
    decide_seconds: float = 0.0
    confidence: float = 0.95
    resamples: int = BOOTSTRAP


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Scope:
    """Which auctions a lab command reads: received in [since, until), of one run's prefix,
    of one experiment variant, of a lead set (``lead_table``: a table of lead ids, see
    :func:`lead_set`). Every condition is optional; all that are given apply."""

    since: datetime | None = None
    until: datetime | None = None
    lead_prefix: str | None = None
    variant: str | None = None
    lead_table: str | None = None

    def where(self, *, duplicates: bool = False) -> tuple[str, dict[str, Any]]:
        """``(condition on the auctions table, parameters)``; without ``duplicates`` the
        duplicate leads (never auctioned) are left out."""
        conds = ["close_reason = 'duplicate'" if duplicates else "close_reason != 'duplicate'"]
        params: dict[str, Any] = {}
        if self.since is not None:
            conds.append("received_at >= toDateTime64(%(since)s, 3, 'UTC')")
            params["since"] = ch_time(self.since)
        if self.until is not None:
            conds.append("received_at < toDateTime64(%(until)s, 3, 'UTC')")
            params["until"] = ch_time(self.until)
        if self.lead_prefix is not None:
            conds.append("startsWith(lead_id, %(prefix)s)")
            params["prefix"] = self.lead_prefix
        if self.variant is not None:
            conds.append("variant = %(variant)s")
            params["variant"] = self.variant
        if self.lead_table is not None:
            conds.append(f"lead_id IN (SELECT lead_id FROM {self.lead_table})")
        return " AND ".join(conds), params

    def without_variant(self) -> Scope:
        return replace(self, variant=None)


@contextmanager
def lead_set(client: Any, db: str, lead_ids: Sequence[str]) -> Iterator[str]:
    """A lead set as a table (``{db}.lab_leads_<random>``) for :class:`Scope`: a query of
    constant size whatever the number of ids (an inline list would hit ClickHouse's
    ``max_query_size``); dropped afterwards."""
    name = f"{db}.lab_leads_{uuid.uuid4().hex[:12]}"
    client.command(f"CREATE TABLE {name} (lead_id String) ENGINE = Memory")
    try:
        for i in range(0, len(lead_ids), 100_000):
            client.insert(name, [[x] for x in lead_ids[i : i + 100_000]], column_names=["lead_id"])
        yield name
    finally:
        client.command(f"DROP TABLE IF EXISTS {name}")


def _ms(col: str) -> str:
    return f"toUnixTimestamp64Milli({col})"


def load_chunks(
    client: Any,
    db: str,
    scope: Scope,
    *,
    flows: Mapping[str, FlowConfig],
    chunk: int = CHUNK,
) -> tuple[int, int, Iterator[list[Recorded]]]:
    """``(auctions in scope, duplicates skipped, chunks of Recorded)``; each chunk is three
    queries (auctions with their leads, pings, posts), selected by ``cityHash64(lead_id)``."""
    where, params = scope.where()
    total = int(
        client.query(
            f"SELECT count() FROM {db}.auctions FINAL WHERE {where}", parameters=params
        ).result_rows[0][0]
    )
    dup_where, _ = scope.where(duplicates=True)
    dups = int(
        client.query(
            f"SELECT count() FROM {db}.auctions FINAL WHERE {dup_where}", parameters=params
        ).result_rows[0][0]
    )
    k = max(1, math.ceil(total / chunk))

    def chunks() -> Iterator[list[Recorded]]:
        for i in range(k):
            p = {**params, "k": k, "i": i}
            part = "cityHash64(lead_id) %% %(k)s = %(i)s"
            leads_of = (
                f"lead_id IN (SELECT lead_id FROM {db}.auctions FINAL WHERE {where} AND {part})"
            )
            heads = client.query(
                f"""SELECT a.lead_id, a.flow, a.config_hash, a.variant, a.outcome, a.winners, a.prices,
                       a.price_total, {_ms("a.opened_at")}, {_ms("a.deadline_at")},
                       {_ms("a.closed_at")}, {_ms("l.created_at")}, l.ping_fields
                FROM (SELECT * FROM {db}.auctions FINAL WHERE {where} AND {part}) AS a
                INNER JOIN (SELECT lead_id, created_at, ping_fields FROM {db}.leads FINAL
                            WHERE {leads_of}) AS l USING (lead_id)""",
                parameters=p,
            ).result_rows
            pings: dict[str, list[PingRec]] = {}
            for r in client.query(
                f"""SELECT lead_id, buyer_id, tier, status, price, exclusive, conditions,
                       {_ms("sent_at")}, {_ms("answered_at")}, latency_ms, timeout_ms, reason
                FROM {db}.pings FINAL WHERE {leads_of}""",
                parameters=p,
            ).result_rows:
                pings.setdefault(r[0], []).append(
                    PingRec(
                        buyer_id=r[1],
                        tier=r[2],
                        status=r[3],
                        price=r[4],
                        exclusive=bool(r[5]),
                        conditions=orjson.loads(r[6]) if r[6] else {},
                        sent_at_ms=int(r[7]),
                        answered_at_ms=int(r[8]),
                        latency_ms=float(r[9]),
                        timeout_ms=r[10],
                        reason=r[11],
                    )
                )
            posts: dict[str, dict[str, str]] = {}
            for lead, buyer, status in client.query(
                f"""SELECT lead_id, buyer_id,
                       if(countIf(status = 'accepted') > 0, 'accepted', argMax(status, attempt))
                FROM {db}.posts FINAL WHERE {leads_of} GROUP BY lead_id, buyer_id""",
                parameters=p,
            ).result_rows:
                posts.setdefault(lead, {})[buyer] = status
            out = []
            for h in heads:
                flow = flows.get(h[1])
                out.append(
                    Recorded(
                        lead_id=h[0],
                        flow=h[1],
                        config_hash=h[2],
                        variant=h[3],
                        outcome=h[4],
                        winners=sorted(h[5]),
                        prices=dict(zip(h[5], h[6])),
                        price_total=float(h[7]),
                        opened_at_ms=int(h[8]),
                        deadline_at_ms=int(h[9]),
                        closed_at_ms=int(h[10]),
                        created_at_ms=int(h[11]),
                        ping_fields=typed_ping_fields(flow, h[12]) if flow else dict(h[12]),
                        pings=sorted(pings.get(h[0], []), key=lambda p: p.buyer_id),
                        posts=posts.get(h[0], {}),
                    )
                )
            yield out

    return total, dups, chunks()


def acceptance_rates(
    client: Any, db: str, settings: Settings, scope: Scope
) -> dict[str, dict[str, float]]:
    """flow -> buyer -> observed post acceptance rate over the window, all variants (with
    the flow's acceptance prior, as the live ranking computes it): the model for posts not
    sent."""
    where, params = scope.without_variant().where()
    rows = client.query(
        f"""SELECT flow, buyer_id, countIf(acc), count() FROM (
                SELECT flow, lead_id, buyer_id, max(status = 'accepted') AS acc
                FROM {db}.posts FINAL
                WHERE lead_id IN (SELECT lead_id FROM {db}.auctions FINAL WHERE {where})
                GROUP BY flow, lead_id, buyer_id)
            GROUP BY flow, buyer_id""",
        parameters=params,
    ).result_rows
    out: dict[str, dict[str, float]] = {}
    for flow, buyer, accepted, posted in rows:
        f = settings.flows.get(flow)
        prior = f.strategy.acceptance_prior if f is not None else None
        out.setdefault(flow, {})[buyer] = selling.acceptance_rate(
            int(accepted),
            int(posted),
            prior.rate if prior else 0.7,
            prior.weight if prior else 10.0,
        )
    for name, f in settings.flows.items():  # buyers never posted: the prior
        rates = out.setdefault(name, {})
        for b in settings.buyers:
            if name in b.flows:
                rates.setdefault(b.id, f.strategy.acceptance_prior.rate)
    return out


def versions(client: Any, db: str) -> dict[str, dict[str, Any]]:
    """hash -> version document, from ``flow_versions``."""
    return {
        h: orjson.loads(doc)
        for h, doc in client.query(
            f"SELECT hash, config_json FROM {db}.flow_versions FINAL"
        ).result_rows
    }


# --------------------------------------------------------------------------- the run


class VersionBook:
    """The configuration each recorded auction ran with: its version from ``flow_versions``
    as its experiment variant ran it; a version not recorded (auctions from before versions
    were, or one this pingpost cannot read) falls back to ``settings``' flow."""

    def __init__(self, stored: Mapping[str, dict[str, Any]], settings: Settings) -> None:
        self._stored = stored
        self._settings = settings
        self._docs: dict[tuple[str, str, str], tuple[dict[str, Any], bool]] = {}
        self._strategies: dict[tuple[str, str, str], Strategy] = {}

    def doc_for(self, rec: Recorded) -> tuple[dict[str, Any], bool] | None:
        """``(document, fell back)``; None for a flow neither recorded nor configured."""
        key = (rec.flow, rec.config_hash, rec.variant)
        hit = self._docs.get(key)
        if hit is not None:
            return hit
        doc = self._stored.get(rec.config_hash)
        if doc is not None:
            try:
                doc = variant_doc(doc, rec.variant)
                self._strategies[key] = Strategy.from_doc(doc)
                self._docs[key] = (doc, False)
                return self._docs[key]
            except ValueError:  # pydantic's ValidationError is one
                pass
        if rec.flow not in self._settings.flows:
            return None
        doc = variant_doc(
            orjson.loads(flow_version(self._settings, rec.flow).config_json), rec.variant
        )
        self._strategies[key] = Strategy.from_doc(doc)
        self._docs[key] = (doc, True)
        return self._docs[key]

    def strategy(self, rec: Recorded) -> Strategy:
        """The auction's own configuration (after :meth:`doc_for` found it)."""
        return self._strategies[(rec.flow, rec.config_hash, rec.variant)]


_METRICS = ("revenue", "pings", "sold")


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    a = (1.0 - confidence) / 2.0
    return float(np.quantile(values, a)), float(np.quantile(values, 1.0 - a))


def run_replay(
    client: Any,
    db: str,
    settings: Settings,
    overrides: Mapping[str, Any],
    scope: Scope | None = None,
    *,
    seed: int = 0,
    resamples: int = BOOTSTRAP,
    confidence: float = 0.95,
    chunk: int = CHUNK,
    progress: Callable[[int, int], None] | None = None,
) -> ReplayResult:
    """Replay every auction in scope under its own configuration version (baseline) and
    under it with ``overrides`` (candidate); compare with bootstrap intervals."""
    import time

    t0 = time.perf_counter()
    stored = versions(client, db)
    scope = scope or Scope()
    rates = acceptance_rates(client, db, settings, scope)
    total, dups, chunks = load_chunks(client, db, scope, flows=settings.flows, chunk=chunk)
    book = VersionBook(stored, settings)
    strategies: dict[tuple[str, str, str], tuple[Strategy, Strategy]] = {}
    fallback = 0

    def strategies_for(rec: Recorded) -> tuple[Strategy, Strategy] | None:
        """The configuration the auction ran with and the candidate built on it."""
        nonlocal fallback
        found = book.doc_for(rec)
        if found is None:
            return None
        doc, fell_back = found
        fallback += fell_back
        key = (rec.flow, rec.config_hash, rec.variant)
        if key not in strategies:
            strategies[key] = (
                book.strategy(rec),
                Strategy.from_doc(apply_overrides(doc, overrides)),
            )
        return strategies[key]

    base, cand, rec_arm = Arm(), Arm(), Arm()
    result = ReplayResult(base, cand, rec_arm, [], confidence=confidence, resamples=resamples)
    rng = np.random.default_rng(seed)
    #: per resample, the weighted sums of each auction's row (below) and the weight total
    boot = np.zeros((resamples, 2 * len(_METRICS) + 1))
    done = 0
    decide_s = 0.0
    for recs in chunks:
        rows = np.zeros((len(recs), 2 * len(_METRICS) + 1))
        t = time.perf_counter()
        for j, rec in enumerate(recs):
            pair = strategies_for(rec)
            if pair is None:
                continue
            b_strat, c_strat = pair
            acc = rates.get(rec.flow, {})
            b = replay(rec, b_strat, acc, seed)
            c = replay(rec, c_strat, acc, seed)
            base.add(b)
            cand.add(c)
            rec_arm.add(_as_recorded(rec))
            if b.exact:
                result.exact += 1
                if sorted(b.winners) == list(rec.winners) and math.isclose(
                    b.revenue, rec.price_total, abs_tol=0.005
                ):
                    result.reproduced += 1
                elif len(result.mismatches) < 20:
                    result.mismatches.append(
                        f"{rec.lead_id}: recorded {rec.outcome} {list(rec.winners)} "
                        f"{rec.price_total:.2f}, replayed {b.outcome} {sorted(b.winners)} "
                        f"{b.revenue:.2f}"
                    )
            rows[j] = (
                b.revenue,
                b.pings,
                bool(b.winners),
                c.revenue,
                c.pings,
                bool(c.winners),
                1.0,
            )
        decide_s += time.perf_counter() - t
        # Poisson bootstrap: each resample weighs each auction by a Poisson(1) count.
        step = max(1, _WEIGHTS_AT_ONCE // max(1, resamples))
        for s in range(0, len(recs), step):
            w = rng.poisson(1.0, size=(resamples, min(step, len(recs) - s)))
            boot += w @ rows[s : s + step]
        done += len(recs)
        if progress is not None:
            progress(done, total)
    result.fallback = fallback
    result.duplicates = dups
    n = base.auctions
    if n:
        m = len(_METRICS)
        bb, bc, w = boot[:, :m], boot[:, m : 2 * m], np.maximum(boot[:, 2 * m], 1.0)
        per_lead = (bc[:, 0] - bb[:, 0]) / w
        per_ping = bc[:, 0] / np.maximum(bc[:, 1], 1) - bb[:, 0] / np.maximum(bb[:, 1], 1)
        sold = 100.0 * (bc[:, 2] - bb[:, 2]) / w
        for name, vals, b_val, c_val in (
            ("revenue per lead", per_lead, base.per_lead, cand.per_lead),
            ("revenue per ping", per_ping, base.per_ping, cand.per_ping),
            ("sold %", sold, base.sold_pct, cand.sold_pct),
        ):
            lo, hi = _interval(vals, confidence)
            result.comparisons.append(Comparison(name, b_val, c_val, lo, hi))
    result.seconds = time.perf_counter() - t0
    result.decide_seconds = decide_s
    return result


def _as_recorded(rec: Recorded) -> Outcome:
    """The recorded outcome in the replay's terms (for the side-by-side table)."""
    out = Outcome(rec.outcome, list(rec.winners), [], 0, len(rec.posts))
    out.pings = sum(1 for p in rec.pings if p.pinged)
    out.prices = [rec.prices.get(w, 0.0) for w in rec.winners]
    out.spend = {w: rec.prices.get(w, 0.0) for w in rec.winners}
    return out


def check_overrides(settings: Settings, overrides: Mapping[str, Any]) -> None:
    """Refuse a strategy file the configured flows cannot take, before any query: a
    ``ValueError`` naming each key's path and the problem, one per line."""
    from pydantic import ValidationError

    for name in settings.flows:
        doc = orjson.loads(flow_version(settings, name).config_json)
        try:
            Strategy.from_doc(apply_overrides(doc, overrides))
        except ValidationError as exc:
            raise ValueError(
                "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
            ) from None


def load_overrides(path: str) -> dict[str, Any]:
    """A strategy file (YAML or JSON): the flow keys to override (streams.rules.replay)."""
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a mapping of flow keys to override")
    return data


def format_rows(result: ReplayResult) -> list[tuple[str, str, str, str]]:
    """(metric, recorded, baseline, candidate) rows for the terminal and HTML tables."""
    r, b, c = result.recorded, result.baseline, result.candidate

    def money(x: float) -> str:
        return f"{x:,.2f}"

    rows = [
        ("auctions", f"{r.auctions:,}", f"{b.auctions:,}", f"{c.auctions:,}"),
        ("revenue", money(r.revenue), money(b.revenue), money(c.revenue)),
        ("revenue per lead", money(r.per_lead), money(b.per_lead), money(c.per_lead)),
        ("revenue per ping", f"{r.per_ping:.3f}", f"{b.per_ping:.3f}", f"{c.per_ping:.3f}"),
        ("sold %", f"{r.sold_pct:.1f}", f"{b.sold_pct:.1f}", f"{c.sold_pct:.1f}"),
        (
            "sold exclusive / shared",
            f"{r.exclusive:,} / {r.shared:,}",
            f"{b.exclusive:,} / {b.shared:,}",
            f"{c.exclusive:,} / {c.shared:,}",
        ),
        ("posts per lead (waterfall depth)", f"{r.depth:.2f}", f"{b.depth:.2f}", f"{c.depth:.2f}"),
        (
            "auctions needing the model",
            "—",
            _pct(b.modelled, b.auctions),
            _pct(c.modelled, c.auctions),
        ),
        ("revenue from modelled posts", "—", money(b.model_revenue), money(c.model_revenue)),
    ]
    return rows


def _pct(x: int, n: int) -> str:
    return f"{x:,} ({100.0 * x / n:.1f} %)" if n else "0"


def buyer_rows(result: ReplayResult) -> list[tuple[str, str, str, str, str, str, str]]:
    """(buyer, wins recorded/baseline/candidate, spend recorded/baseline/candidate)."""
    r, b, c = result.recorded, result.baseline, result.candidate
    names = sorted(set(r.wins) | set(b.wins) | set(c.wins))
    return [
        (
            n,
            f"{r.wins.get(n, 0):,}",
            f"{b.wins.get(n, 0):,}",
            f"{c.wins.get(n, 0):,}",
            f"{r.spend.get(n, 0.0):,.2f}",
            f"{b.spend.get(n, 0.0):,.2f}",
            f"{c.spend.get(n, 0.0):,.2f}",
        )
        for n in names
    ]


def print_result(result: ReplayResult, console: Any | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 120)
    t = Table(
        title="Replay: recorded, baseline (the configuration each auction ran with), candidate"
    )
    for col in ("", "recorded", "baseline", "candidate"):
        t.add_column(col, justify="right" if col else "left")
    for row in format_rows(result):
        t.add_row(*row)
    console.print(t)
    d = Table(
        title=f"Candidate − baseline, {int(result.confidence * 100)} % bootstrap interval "
        f"({result.resamples} resamples, paired by auction)"
    )
    for col in ("", "baseline", "candidate", "difference", "interval", "significant"):
        d.add_column(col, justify="right" if col else "left")
    for cmp in result.comparisons:
        fmt = "{:+,.3f}" if cmp.name == "revenue per ping" else "{:+,.2f}"
        d.add_row(
            cmp.name,
            f"{cmp.baseline:,.3f}" if cmp.name == "revenue per ping" else f"{cmp.baseline:,.2f}",
            f"{cmp.candidate:,.3f}" if cmp.name == "revenue per ping" else f"{cmp.candidate:,.2f}",
            fmt.format(cmp.diff),
            f"[{fmt.format(cmp.low)}, {fmt.format(cmp.high)}]",
            "yes" if cmp.significant else "no",
        )
    console.print(d)
    bt = Table(title="Per buyer: wins and spend")
    for col in (
        "buyer",
        "wins rec.",
        "wins base",
        "wins cand.",
        "spend rec.",
        "spend base",
        "spend cand.",
    ):
        bt.add_column(col, justify="left" if col == "buyer" else "right")
    for buyer_row in buyer_rows(result):
        bt.add_row(*buyer_row)
    console.print(bt)
    b = result.baseline
    console.print(
        f"Baseline decided {result.exact:,} of {b.auctions:,} auctions from recorded answers "
        f"alone; {result.reproduced:,} of them reproduce the recorded outcome"
        + (
            f" ({len(result.mismatches)} differ, first: {result.mismatches[0]})"
            if result.mismatches
            else ""
        )
        + "."
    )
    console.print(
        f"Model use (candidate): {cand_model_line(result)}. "
        f"{result.duplicates:,} duplicate leads (never auctioned) left out"
        + (
            f"; {result.fallback:,} auctions had no recorded configuration version and were replayed under --config's"
            if result.fallback
            else ""
        )
        + "."
    )
    rate = b.auctions / result.decide_seconds if result.decide_seconds else 0.0
    console.print(
        f"{b.auctions:,} auctions replayed twice in {result.seconds:.1f} s "
        f"(deciding: {rate:,.0f} auctions/s, both arms)."
    )


def cand_model_line(result: ReplayResult) -> str:
    c = result.candidate
    return (
        f"{c.model_posts:,} posts answered by the acceptance model, {c.unobserved:,} pings "
        f"never sent for real (counted as no bid), {c.censored:,} timeouts it would have "
        f"waited longer for (kept as timeouts)"
    )
