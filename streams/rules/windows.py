"""Windowed metrics per buyer and per flow: pure aggregation, no Kafka.

Events are bucketed by their own event time into tumbling windows of ``window_s`` (aligned to
the epoch) per subject, ``("buyer", id)`` or ``("flow", name)``. Each window holds counters and
a fixed-bucket latency histogram; windows merge exactly (counts add), so a rule over 60 s reads
the six 10 s windows before its evaluation time, and /metrics reads the last minute the same
way.

Response time percentiles come from the histogram (bucket bounds ``BUCKETS_MS``), with linear
interpolation inside the bucket holding the rank, as Prometheus' ``histogram_quantile`` does:
the error is at most the width of that bucket (e.g. a true p50 of 620 ms is reported between
600 and 750 ms). The mean is exact (sum / count).

Event times: a ``Bid`` counts when it was answered (``answered_at_ms``), a ``Delivery`` when
its answer came back (``sent_at_ms + latency_ms``), an ``AuctionResult`` when it settled.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field, fields
from typing import Any

from streams.settings.metrics import METRICS

__all__ = [
    "Agg",
    "BUCKETS_MS",
    "Subject",
    "WindowedMetrics",
    "metric_value",
    "quantile",
    "samples_for",
]

#: Upper bounds of the latency histogram's buckets (ms); the last bucket is open-ended.
#: Dense around the usual 500-750 ms ping deadlines, where the alerts look.
BUCKETS_MS: tuple[float, ...] = (
    5,
    10,
    20,
    30,
    50,
    75,
    100,
    150,
    200,
    300,
    400,
    500,
    600,
    750,
    1000,
    1500,
    2000,
    3000,
    5000,
    10000,
    math.inf,
)

Subject = tuple[str, str]  # ("buyer", "sunrise") | ("flow", "solar")


@dataclass
class Agg:
    """Counters of one subject over one window (or a merge of several)."""

    pings: int = 0  # sent: every status but `filtered`
    bids: int = 0
    no_bids: int = 0
    timeouts: int = 0
    errors: int = 0
    filtered: int = 0
    bid_price_sum: float = 0.0
    latency_sum_ms: float = 0.0
    hist: list[int] = field(default_factory=lambda: [0] * len(BUCKETS_MS))
    posts: int = 0  # post attempts (not `skipped`)
    accepted: int = 0
    rejected: int = 0
    post_failures: int = 0  # error + timeout
    revenue: float = 0.0  # buyer: accepted post prices; flow: price_total of settled leads
    leads: int = 0  # flow: settled auctions
    sold: int = 0

    def merge(self, other: Agg) -> None:
        for f in fields(self):
            if f.name == "hist":
                self.hist = [a + b for a, b in zip(self.hist, other.hist)]
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def observe_latency(self, ms: float) -> None:
        self.latency_sum_ms += ms
        self.hist[bisect.bisect_left(BUCKETS_MS, ms)] += 1


def quantile(hist: list[int], q: float) -> float | None:
    """The q-quantile (0..1) of a fixed-bucket histogram, interpolated linearly within the
    bucket that holds the rank; the open last bucket reports its lower bound."""
    total = sum(hist)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(hist):
        if count and seen + count >= rank:
            lower = 0.0 if i == 0 else BUCKETS_MS[i - 1]
            upper = BUCKETS_MS[i]
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * max(0.0, rank - seen) / count
        seen += count
    return BUCKETS_MS[-2]


def _ratio(a: float, b: int) -> float | None:
    return a / b if b else None


def metric_value(agg: Agg, metric: str) -> float | None:
    """The value of ``metric`` for ``agg``; None when it has no denominator (no data)."""
    if metric == "pings":
        return float(agg.pings)
    if metric == "bid_rate":
        return _ratio(agg.bids, agg.pings)
    if metric == "response_rate":
        return _ratio(agg.bids + agg.no_bids, agg.pings)
    if metric == "timeout_rate":
        return _ratio(agg.timeouts, agg.pings)
    if metric == "error_rate":
        return _ratio(agg.errors, agg.pings)
    if metric == "avg_bid":
        return _ratio(agg.bid_price_sum, agg.bids)
    if metric == "avg_response_ms":
        return _ratio(agg.latency_sum_ms, agg.pings)
    if metric in ("response_p50_ms", "response_p95_ms", "response_p99_ms"):
        return quantile(agg.hist, int(metric[10:12]) / 100)
    if metric == "posts":
        return float(agg.posts)
    if metric == "accept_rate":
        return _ratio(agg.accepted, agg.posts)
    if metric == "revenue":
        return agg.revenue
    if metric == "revenue_per_ping":
        return _ratio(agg.revenue, agg.pings)
    if metric == "leads":
        return float(agg.leads)
    if metric == "sell_rate":
        return _ratio(agg.sold, agg.leads)
    raise KeyError(metric)


def samples_for(agg: Agg, metric: str) -> int:
    """The count a rule's ``min_samples`` is compared with."""
    return int(getattr(agg, METRICS[metric]))


class WindowedMetrics:
    """Tumbling windows of :class:`Agg` per subject, keyed by window start (epoch ms)."""

    def __init__(self, window_s: int) -> None:
        self.window_ms = window_s * 1000
        self.windows: dict[int, dict[Subject, Agg]] = {}

    def start_of(self, t_ms: int) -> int:
        return t_ms - t_ms % self.window_ms

    def _agg(self, t_ms: int, subject: Subject) -> Agg:
        w = self.windows.setdefault(self.start_of(t_ms), {})
        agg = w.get(subject)
        if agg is None:
            agg = w[subject] = Agg()
        return agg

    def add(self, name: str, r: dict[str, Any]) -> int | None:
        """Count one decoded event; returns its event time (ms), None if it is not counted.
        A ``PingRound`` counts as its answers; its time is the latest of theirs."""
        if name == "PingRound":
            times = [self.add("Bid", answer) for answer in r["answers"]]
            return max((t for t in times if t is not None), default=None)
        if name == "Bid":
            t = int(r["answered_at_ms"])
            for subject in (("buyer", r["buyer_id"]), ("flow", r["flow"])):
                agg = self._agg(t, subject)
                status = r["status"]
                if status == "filtered":
                    agg.filtered += 1
                    continue
                agg.pings += 1
                agg.observe_latency(float(r["latency_ms"]))
                if status == "bid":
                    agg.bids += 1
                    agg.bid_price_sum += float(r["price"] or 0.0)
                elif status == "no_bid":
                    agg.no_bids += 1
                elif status == "timeout":
                    agg.timeouts += 1
                else:
                    agg.errors += 1
            return t
        if name == "Delivery":
            if r["status"] == "skipped":
                return None
            t = int(r["sent_at_ms"] + r["latency_ms"])
            for subject in (("buyer", r["buyer_id"]), ("flow", r["flow"])):
                agg = self._agg(t, subject)
                agg.posts += 1
                if r["status"] == "accepted":
                    agg.accepted += 1
                    if subject[0] == "buyer":  # a flow's revenue comes from its results
                        agg.revenue += float(r["price"])
                elif r["status"] == "rejected":
                    agg.rejected += 1
                else:
                    agg.post_failures += 1
            return t
        if name == "AuctionResult":
            t = int(r["settled_at_ms"])
            subjects: list[Subject] = [("flow", r["flow"])]
            if r.get("variant"):  # an experiment's arm: leads, sold and revenue of its own
                subjects.append(("variant", f"{r['flow']}/{r['variant']}"))
            for subject in subjects:
                agg = self._agg(t, subject)
                agg.leads += 1
                if r["outcome"] != "unsold":
                    agg.sold += 1
                    agg.revenue += float(r["price_total"])
            return t
        return None

    def aggregate(self, subject: Subject, end_ms: int, span_ms: int) -> Agg:
        """Merge ``subject``'s windows starting in ``[end_ms - span_ms, end_ms)``."""
        out = Agg()
        for start in range(end_ms - span_ms, end_ms, self.window_ms):
            agg = self.windows.get(self.start_of(start), {}).get(subject)
            if agg is not None:
                out.merge(agg)
        return out

    def subjects(self, end_ms: int, span_ms: int, kind: str | None = None) -> set[Subject]:
        """Subjects with any event in ``[end_ms - span_ms, end_ms)``."""
        out: set[Subject] = set()
        for start in range(end_ms - span_ms, end_ms, self.window_ms):
            for subject in self.windows.get(self.start_of(start), {}):
                if kind is None or subject[0] == kind:
                    out.add(subject)
        return out

    def expire(self, before_ms: int) -> None:
        """Forget windows that end at or before ``before_ms``."""
        for start in [s for s in self.windows if s + self.window_ms <= before_ms]:
            del self.windows[start]

    def __len__(self) -> int:
        return len(self.windows)
