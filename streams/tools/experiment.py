"""``pingpost experiment``: a flow's live A/B test, read from the warehouse.

Per variant: leads, revenue per lead and per ping, sold %, exclusive/shared sales and what
each buyer won and spent; per variant other than the control (the experiment's first), the
difference from the control with a bootstrap interval and a verdict, given only once both
have ``min_leads`` leads. The variants are independent samples: each is resampled on its own
(a Poisson bootstrap over its auctions, read in chunks, so memory stays bounded at any
window), and a resample of the difference is the difference of the two resamples.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from streams.settings import Settings
from streams.tools.replay import Comparison, Rates, Scope

__all__ = ["ExperimentResult", "VariantStats", "print_experiment", "run_experiment"]

CHUNK = 200_000
BOOTSTRAP = 400


@dataclass
class VariantStats(Rates):
    name: str
    share: float | None  # configured share (None: in the data, no longer configured)
    leads: int = 0
    revenue: float = 0.0
    pings: int = 0
    sold: int = 0
    exclusive: int = 0
    shared: int = 0
    wins: dict[str, int] = field(default_factory=dict)
    spend: dict[str, float] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return self.leads


@dataclass
class ExperimentResult:
    flow: str
    experiment: str
    control: str
    min_leads: int
    variants: list[VariantStats]
    #: variant -> its comparisons with the control
    comparisons: dict[str, list[Comparison]] = field(default_factory=dict)
    confidence: float = 0.95
    resamples: int = BOOTSTRAP

    def verdict(self, variant: str) -> str:
        """'collecting', or per the revenue per lead: 'better', 'worse', 'no difference shown'."""
        by = {v.name: v for v in self.variants}
        if min(by[variant].leads, by[self.control].leads) < self.min_leads:
            return "collecting"
        rev = self.comparisons[variant][0]
        if not rev.significant:
            return "no difference shown"
        return "better" if rev.diff > 0 else "worse"


def run_experiment(
    client: Any,
    db: str,
    settings: Settings,
    flow: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    lead_prefix: str | None = None,
    seed: int = 0,
    resamples: int = BOOTSTRAP,
    confidence: float = 0.95,
    progress: Callable[[int, int], None] | None = None,
) -> ExperimentResult:
    """The experiment of ``flow`` (as configured) over the auctions in scope. ValueError if
    the flow is unknown or declares no experiment."""
    cfg = settings.flows.get(flow)
    if cfg is None:
        raise ValueError(f"no flow '{flow}' in the configuration ({', '.join(settings.flows)})")
    exp = cfg.experiment
    if exp is None:
        raise ValueError(f"flow '{flow}' declares no experiment (flows.{flow}.experiment)")
    scope, params = Scope(since, until, lead_prefix).where()
    where = f"{scope} AND flow = %(flow)s AND variant != ''"
    params["flow"] = flow
    stats = {v.name: VariantStats(v.name, v.share) for v in exp.variants}
    for name, n, rev, pings, sold, excl, shared in client.query(
        f"""SELECT variant, count(), sum(price_total), sum(pinged), countIf(outcome != 'unsold'),
                   countIf(outcome = 'sold_exclusive'), countIf(outcome = 'sold_shared')
            FROM {db}.auctions FINAL WHERE {where} GROUP BY variant ORDER BY variant""",
        parameters=params,
    ).result_rows:
        v = stats.setdefault(name, VariantStats(name, None))
        v.leads, v.revenue, v.pings = int(n), float(rev), int(pings)
        v.sold, v.exclusive, v.shared = int(sold), int(excl), int(shared)
    for name, buyer, wins, spend in client.query(
        f"""SELECT variant, w, count(), sum(p) FROM {db}.auctions FINAL
            ARRAY JOIN winners AS w, prices AS p WHERE {where} GROUP BY variant, w""",
        parameters=params,
    ).result_rows:
        if name in stats:
            stats[name].wins[buyer] = int(wins)
            stats[name].spend[buyer] = float(spend)
    control = exp.variants[0].name
    result = ExperimentResult(
        flow,
        exp.name,
        control,
        exp.min_leads,
        list(stats.values()),
        confidence=confidence,
        resamples=resamples,
    )
    names = list(stats)
    total = sum(v.leads for v in stats.values())
    if total == 0:
        return result
    # Poisson bootstrap, one accumulator per variant: weighted revenue, pings, sold, weight.
    rng = np.random.default_rng(seed)
    boot = {n: np.zeros((resamples, 4)) for n in names}
    k = max(1, math.ceil(total / CHUNK))
    done = 0
    for i in range(k):
        rows = client.query(
            f"""SELECT variant, price_total, pinged, outcome != 'unsold'
                FROM {db}.auctions FINAL
                WHERE {where} AND cityHash64(lead_id) %% %(k)s = %(i)s""",
            parameters={**params, "k": k, "i": i},
        ).result_rows
        by: dict[str, list[tuple[float, float, float, float]]] = {}
        for name, rev, pings, sold in rows:
            by.setdefault(name, []).append((float(rev), float(pings), float(sold), 1.0))
        for name, vals in by.items():
            if name not in boot:
                continue
            x = np.asarray(vals)
            w = rng.poisson(1.0, size=(resamples, len(vals)))
            boot[name] += w @ x
        done += len(rows)
        if progress is not None:
            progress(done, total)
    a = (1.0 - confidence) / 2.0

    def metrics(b: np.ndarray) -> list[np.ndarray]:
        n = np.maximum(b[:, 3], 1.0)
        return [b[:, 0] / n, b[:, 0] / np.maximum(b[:, 1], 1.0), 100.0 * b[:, 2] / n]

    ctl = stats[control]
    for name in names:
        if name == control:
            continue
        v = stats[name]
        comps = []
        for label, rv, rc, bv, bc in zip(
            ("revenue per lead", "revenue per ping", "sold %"),
            metrics(boot[name]),
            metrics(boot[control]),
            (v.per_lead, v.per_ping, v.sold_pct),
            (ctl.per_lead, ctl.per_ping, ctl.sold_pct),
        ):
            d = rv - rc
            comps.append(
                Comparison(label, bc, bv, float(np.quantile(d, a)), float(np.quantile(d, 1 - a)))
            )
        result.comparisons[name] = comps
    return result


def print_experiment(result: ExperimentResult, console: Any | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 120)
    t = Table(
        title=f"Experiment {result.experiment} (flow {result.flow}); control: {result.control}"
    )
    for col in (
        "variant",
        "share",
        "leads",
        "revenue",
        "per lead",
        "per ping",
        "sold %",
        "excl. / shared",
    ):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for v in result.variants:
        t.add_row(
            v.name,
            "—" if v.share is None else f"{v.share:.0%}",
            f"{v.leads:,}",
            f"{v.revenue:,.2f}",
            f"{v.per_lead:,.2f}",
            f"{v.per_ping:,.3f}",
            f"{v.sold_pct:.1f}",
            f"{v.exclusive:,} / {v.shared:,}",
        )
    console.print(t)
    pct = int(result.confidence * 100)
    d = Table(
        title=f"Variant − {result.control}, {pct} % bootstrap interval "
        f"({result.resamples} resamples); verdict at {result.min_leads:,} leads per variant"
    )
    for col in ("variant", "metric", "difference", "interval", "significant", "verdict"):
        d.add_column(col, justify="left" if col in ("variant", "metric", "verdict") else "right")
    for name, comps in result.comparisons.items():
        verdict = result.verdict(name)
        for j, c in enumerate(comps):
            fmt = "{:+,.3f}" if c.name == "revenue per ping" else "{:+,.2f}"
            d.add_row(
                name if j == 0 else "",
                c.name,
                fmt.format(c.diff),
                f"[{fmt.format(c.low)}, {fmt.format(c.high)}]",
                "yes" if c.significant else "no",
                verdict if j == 0 else "",
            )
    console.print(d)
    b = Table(title="Per buyer: wins / spend by variant")
    b.add_column("buyer")
    for v in result.variants:
        b.add_column(v.name, justify="right")
    buyers = sorted({x for v in result.variants for x in v.wins})
    for buyer in buyers:
        b.add_row(
            buyer,
            *(
                f"{v.wins.get(buyer, 0):,} / {v.spend.get(buyer, 0.0):,.2f}"
                for v in result.variants
            ),
        )
    console.print(b)
    for name in result.comparisons:
        if result.verdict(name) == "collecting":
            short = min(v.leads for v in result.variants if v.name in (name, result.control))
            console.print(
                f"{name}: collecting ({short:,} of {result.min_leads:,} leads in the smaller "
                "arm): the interval is shown, the verdict waits."
            )
