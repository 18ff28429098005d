"""The terminal report: what the market did, queried from ClickHouse (deduplicated with FINAL).

Every figure comes from the analyst tables, so the report and the tables agree by
construction. ``lead_ids`` restricts it to one run (the demo); ``since``/``until`` to the leads
received in ``[since, until)`` (every event of a lead counts with the lead, so a lead's pings and
posts are never split across two reports); both together intersect.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = [
    "Report",
    "build_report",
    "headline_rows",
    "parse_time",
    "print_report",
    "scope_where",
    "ch_time",
    "MARKET_REASONS",
    "is_platform_reason",
    "platform_unsold",
]


@dataclass
class Report:
    leads: int = 0
    auctions: int = 0
    sold: int = 0
    sold_exclusive: int = 0
    sold_shared: int = 0
    unsold: int = 0
    revenue: float = 0.0
    pings: int = 0
    filtered: int = 0
    close_lag_p50: float = 0.0
    close_lag_p99: float = 0.0
    close_lag_max: float = 0.0
    #: p99 without the first 2 s of the run (a cold stack's warm-up), reported beside the
    #: overall figure, never instead of it.
    close_lag_p99_warm: float = 0.0
    duration_p50: float = 0.0
    #: Receipt → ping round open (``opened_at - received_at``): the queue before the ping,
    #: which close lag does not show.
    open_delay_p50: float = 0.0
    open_delay_p99: float = 0.0
    sold_without_accepted_post: int = 0
    buyers: list[dict[str, Any]] = field(default_factory=list)
    unsold_reasons: list[tuple[str, int]] = field(default_factory=list)
    #: (tier, leads won, revenue) and (post attempts, leads) of settled leads.
    tiers: list[tuple[str, int, float]] = field(default_factory=list)
    waterfall: list[tuple[int, int]] = field(default_factory=list)
    first_received: datetime | None = None
    last_settled: datetime | None = None

    @property
    def sold_pct(self) -> float:
        return 100.0 * self.sold / self.auctions if self.auctions else 0.0

    @property
    def revenue_per_lead(self) -> float:
        return self.revenue / self.leads if self.leads else 0.0

    @property
    def revenue_per_ping(self) -> float:
        return self.revenue / self.pings if self.pings else 0.0


def ch_time(t: datetime) -> str:
    """A datetime as a ClickHouse literal in UTC with milliseconds (naive means UTC), for
    ``toDateTime64(..., 3, 'UTC')``: independent of the server's and the client's time zone."""
    if t.tzinfo is not None:
        t = t.astimezone(UTC).replace(tzinfo=None)
    return t.strftime("%Y-%m-%d %H:%M:%S.") + f"{t.microsecond // 1000:03d}"


def scope_where(
    database: str,
    lead_ids: Sequence[str] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    lead_prefix: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """``("WHERE ...", params)`` selecting the leads of a report in any lead-keyed table
    (``""`` for everything). ``lead_prefix`` selects one run's leads (the demo and the benches
    give their leads ids with a run prefix): a query of constant size at any number of leads,
    where ``lead_ids`` grows with them."""
    conds: list[str] = []
    params: dict[str, Any] = {}
    if lead_ids is not None:
        conds.append("lead_id IN %(ids)s")
        params["ids"] = list(lead_ids)
    if lead_prefix is not None:
        conds.append("startsWith(lead_id, %(prefix)s)")
        params["prefix"] = lead_prefix
    window: list[str] = []
    if since is not None:
        window.append("received_at >= toDateTime64(%(since)s, 3, 'UTC')")
        params["since"] = ch_time(since)
    if until is not None:
        window.append("received_at < toDateTime64(%(until)s, 3, 'UTC')")
        params["until"] = ch_time(until)
    if window:
        conds.append(
            f"lead_id IN (SELECT lead_id FROM {database}.leads FINAL WHERE {' AND '.join(window)})"
        )
    return ("WHERE " + " AND ".join(conds) if conds else ""), params


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """``--since``/``--until``: ISO 8601 (``2025-06-01``, ``2025-06-01T14:30``, with an
    optional offset; without one it is UTC) or a duration ago (``90s``, ``15m``, ``2h``,
    ``7d``, ``1w``). Returns an aware UTC datetime; raises ``ValueError`` with the reason."""
    text = text.strip()
    m = _RELATIVE.match(text)
    if m:
        now = now or datetime.now(UTC)
        return now - timedelta(seconds=float(m.group(1)) * _UNIT_S[m.group(2)])
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"'{text}' is neither an ISO 8601 time (2025-06-01T14:30) nor a "
            "duration ago (15m, 2h, 7d)"
        ) from None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def build_report(
    client: Any,
    database: str,
    lead_ids: Sequence[str] | None = None,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    lead_prefix: str | None = None,
) -> Report:
    """Query the report with a *synchronous* clickhouse-connect client."""
    db = database
    where, params = scope_where(db, lead_ids, since, until, lead_prefix)

    def one(sql: str) -> Sequence[Any]:
        row: Sequence[Any] = client.query(sql, parameters=params).result_rows[0]
        return row

    r = Report()
    (r.leads,) = one(f"SELECT count() FROM {db}.leads FINAL {where}")
    (
        r.auctions,
        r.sold_exclusive,
        r.sold_shared,
        r.unsold,
        r.revenue,
        r.close_lag_p50,
        r.close_lag_p99,
        r.close_lag_max,
        r.duration_p50,
        r.open_delay_p50,
        r.open_delay_p99,
        r.first_received,
        r.last_settled,
    ) = one(
        f"""SELECT count(), countIf(outcome = 'sold_exclusive'), countIf(outcome = 'sold_shared'),
                   countIf(outcome = 'unsold'), sum(price_total),
                   quantileExact(0.5)(close_lag_ms), quantileExact(0.99)(close_lag_ms),
                   max(close_lag_ms), quantileExact(0.5)(duration_ms),
                   quantileExact(0.5)(toUnixTimestamp64Milli(opened_at)
                                      - toUnixTimestamp64Milli(received_at)),
                   quantileExact(0.99)(toUnixTimestamp64Milli(opened_at)
                                       - toUnixTimestamp64Milli(received_at)),
                   min(received_at), max(settled_at)
            FROM {db}.auctions FINAL {where}"""
    )
    r.sold = r.sold_exclusive + r.sold_shared
    if r.first_received is not None and r.auctions:
        warm_where = (f"{where} AND" if where else "WHERE") + " received_at >= %(warm)s"
        (r.close_lag_p99_warm,) = client.query(
            f"SELECT quantileExact(0.99)(close_lag_ms) FROM {db}.auctions FINAL {warm_where}",
            parameters={**params, "warm": r.first_received + timedelta(seconds=2)},
        ).result_rows[0]
    (r.pings, r.filtered) = one(
        f"SELECT countIf(status != 'filtered'), countIf(status = 'filtered') "
        f"FROM {db}.pings FINAL {where}"
    )
    and_where = f"AND {where[6:]}" if where else ""
    (r.sold_without_accepted_post,) = one(
        f"""SELECT count() FROM {db}.auctions AS a FINAL
            WHERE a.outcome != 'unsold' {and_where}
              AND a.lead_id NOT IN (SELECT lead_id FROM {db}.posts FINAL
                                    WHERE status = 'accepted')"""
    )
    r.unsold_reasons = [
        tuple(x)
        for x in client.query(
            f"SELECT reason, count() AS n FROM {db}.auctions FINAL "
            f"{where or 'WHERE 1'} AND outcome = 'unsold' GROUP BY reason ORDER BY n DESC",
            parameters=params,
        ).result_rows
    ]
    r.tiers = [
        tuple(x)
        for x in client.query(
            f"SELECT tier, count(), sum(price) FROM {db}.posts FINAL "
            f"{where or 'WHERE 1'} AND status = 'accepted' GROUP BY tier ORDER BY sum(price) DESC",
            parameters=params,
        ).result_rows
    ]
    r.waterfall = [
        tuple(x)
        for x in client.query(
            f"SELECT post_attempts, count() FROM {db}.auctions FINAL {where} "
            f"GROUP BY post_attempts ORDER BY post_attempts",
            parameters=params,
        ).result_rows
    ]
    rows = client.query(
        f"""WITH p AS (SELECT buyer_id, any(tier) AS tier,
                         countIf(status != 'filtered') AS pings,
                         countIf(status = 'bid') AS bids,
                         countIf(status = 'timeout') AS timeouts,
                         countIf(status = 'error') AS errors,
                         avgIf(price, status = 'bid') AS avg_bid,
                         quantileExactIf(0.5)(latency_ms, status != 'filtered') AS p50,
                         quantileExactIf(0.99)(latency_ms, status != 'filtered') AS p99
                  FROM {db}.pings FINAL {where} GROUP BY buyer_id),
             q AS (SELECT buyer_id, countIf(status != 'skipped') AS posts,
                         countIf(status = 'accepted') AS accepted,
                         sumIf(price, status = 'accepted') AS spend
                  FROM {db}.posts FINAL {where} GROUP BY buyer_id)
            SELECT p.buyer_id, p.tier, p.pings, p.bids, p.timeouts, p.errors, p.avg_bid,
                   p.p50, p.p99, q.posts, q.accepted, q.spend
            FROM p LEFT JOIN q ON p.buyer_id = q.buyer_id ORDER BY q.spend DESC, p.buyer_id""",
        parameters=params,
    ).result_rows
    for bid, tier, pings, bids, timeouts, errors, avg_bid, p50, p99, posts, accepted, spend in rows:
        r.buyers.append(
            {
                "buyer_id": bid,
                "tier": tier,
                "pings": pings,
                "bid_rate": bids / pings if pings else 0.0,
                "win_rate": accepted / bids if bids else 0.0,
                "avg_bid": avg_bid if bids else 0.0,
                "p50": p50,
                "p99": p99,
                "timeouts": timeouts,
                "errors": errors,
                "posts": posts,
                "accepted": accepted,
                "accept_rate": accepted / posts if posts else 0.0,
                "spend": spend or 0.0,
            }
        )
    return r


#: Unsold for these reasons is the market's answer (a cap reached is appended to them); any
#: other reason (a post window exhausted, PII missing, an internal error) is the platform's.
MARKET_REASONS = (
    "no bids",
    "no acceptable bid",
    "all posts rejected or failed",
    "no acceptable bid at post time",
)


#: Reasons that name the market, not the platform, by their start: a duplicate rejected by
#: the flow's rule; a buyer that did not answer its post within the window (asked again later).
MARKET_REASON_PREFIXES = ("duplicate of lead", "no answer in time from ")


def is_platform_reason(reason: str) -> bool:
    """Whether an unsold lead's reason is the platform's failure (not the market's)."""
    return reason.split("; caps reached:")[0] not in MARKET_REASONS and not reason.startswith(
        MARKET_REASON_PREFIXES
    )


def platform_unsold(reasons: Sequence[tuple[str, int]]) -> int:
    """Leads unsold for a platform reason, from ``(reason, leads)`` (``Report.unsold_reasons``)."""
    return sum(n for reason, n in reasons if is_platform_reason(reason))


def headline_rows(r: Report) -> list[tuple[str, str]]:
    """The summary's (label, value) rows, shared by the terminal and the HTML report."""
    return [
        ("leads", f"{r.leads:,}"),
        ("auctions settled", f"{r.auctions:,}"),
        ("sold", f"{r.sold:,} ({r.sold_pct:.1f}%)"),
        (
            "  exclusive / shared",
            f"{r.sold_exclusive:,} / {r.sold_shared:,}"
            + (
                f"  ({100 * r.sold_exclusive / r.sold:.0f}% / {100 * r.sold_shared / r.sold:.0f}%)"
                if r.sold
                else ""
            ),
        ),
        ("unsold", f"{r.unsold:,}"),
        ("revenue", f"${r.revenue:,.2f}"),
        ("revenue per lead", f"${r.revenue_per_lead:,.2f}"),
        (
            "revenue per ping",
            f"${r.revenue_per_ping:,.2f}  ({r.pings:,} pings, {r.filtered:,} filtered)",
        ),
        ("receipt → ping open p50 / p99", f"{r.open_delay_p50:.0f} / {r.open_delay_p99:.0f} ms"),
        (
            "auction close lag p50 / p99 / max",
            f"{r.close_lag_p50:.1f} / {r.close_lag_p99:.1f} / {r.close_lag_max:.1f} ms",
        ),
        ("  p99 after the first 2 s", f"{r.close_lag_p99_warm:.1f} ms"),
        ("ping round p50", f"{r.duration_p50:.0f} ms"),
        ("sold leads without an accepted post", f"{r.sold_without_accepted_post}"),
    ]


def print_report(
    r: Report,
    console: Console | None = None,
    *,
    title: str = "pingpost report",
    extra: dict[str, str] | None = None,
) -> None:
    c = console or Console()
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(justify="right")
    for k, v in [*headline_rows(r), *(extra or {}).items()]:
        t.add_row(k, v)
    c.print(t)
    b = Table(title="buyers: pings", title_justify="left")
    for col in (
        "buyer",
        "tier",
        "pings",
        "bid rate",
        "avg bid",
        "p50",
        "p99",
        "timeouts",
        "errors",
    ):
        b.add_column(col, justify="left" if col in ("buyer", "tier") else "right")
    for x in r.buyers:
        b.add_row(
            x["buyer_id"],
            x["tier"],
            f"{x['pings']:,}",
            f"{100 * x['bid_rate']:.1f}%",
            f"${x['avg_bid']:.2f}",
            f"{x['p50']:.0f} ms",
            f"{x['p99']:.0f} ms",
            f"{x['timeouts']:,}",
            f"{x['errors']:,}",
        )
    c.print(b)
    w = Table(title="buyers: wins and posts", title_justify="left")
    for col in ("buyer", "leads won", "win rate", "posts", "accept rate", "spend"):
        w.add_column(col, justify="left" if col == "buyer" else "right")
    for x in r.buyers:
        w.add_row(
            x["buyer_id"],
            f"{x['accepted']:,}",
            f"{100 * x['win_rate']:.1f}%",
            f"{x['posts']:,}",
            f"{100 * x['accept_rate']:.1f}%",
            f"${x['spend']:,.2f}",
        )
    c.print(w)
    c.print(
        "win rate = leads won / bids; accept rate = accepted posts / posts sent; "
        "p50/p99 = ping latency",
        style="dim",
    )
    if r.tiers or r.waterfall:
        g = Table(
            title="sales by tier, and post attempts per lead (waterfall depth)",
            title_justify="left",
        )
        for col in ("tier", "sales", "revenue", "", "post attempts", "leads"):
            g.add_column(col, justify="left" if col == "tier" else "right")
        for i in range(max(len(r.tiers), len(r.waterfall))):
            tier: tuple[str, int | None, float | None] = (
                r.tiers[i] if i < len(r.tiers) else ("", None, None)
            )
            depth: tuple[int | None, int | None] = (
                r.waterfall[i] if i < len(r.waterfall) else (None, None)
            )
            g.add_row(
                tier[0],
                "" if tier[1] is None else f"{tier[1]:,}",
                "" if tier[2] is None else f"${tier[2]:,.2f}",
                "",
                "" if depth[0] is None else str(depth[0]),
                "" if depth[1] is None else f"{depth[1]:,}",
            )
        c.print(g)
    if r.unsold_reasons:
        u = Table(title="why unsold", title_justify="left")
        u.add_column("reason")
        u.add_column("leads", justify="right")
        for reason, n in r.unsold_reasons:
            u.add_row(reason or "(none)", f"{n:,}")
        c.print(u)
