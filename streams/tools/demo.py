"""The demo: a stream of sample solar leads through the real stack, then the report.

Leads are generated from a seed, pushed through ``POST /v1/leads`` at a target rate with a
progress bar, and the demo waits until every one of them has a settled auction in ClickHouse
before printing the report.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["generate_leads", "push_leads", "DemoRun", "PiiAudit", "ProgressLines", "tag_leads"]

_STATES = ["CA", "TX", "AZ", "NV", "FL", "NY", "NJ", "CO", "MA", "NC"]
_ZIP_PREFIX = {
    "CA": "90",
    "TX": "75",
    "AZ": "85",
    "NV": "89",
    "FL": "33",
    "NY": "10",
    "NJ": "07",
    "CO": "80",
    "MA": "02",
    "NC": "27",
}
_FIRST = [
    "Ada",
    "Grace",
    "Alan",
    "Edsger",
    "Barbara",
    "Donald",
    "Frances",
    "Ken",
    "Radia",
    "Tim",
    "Margaret",
    "Linus",
    "Hedy",
    "John",
    "Katherine",
    "Dennis",
]
_LAST = [
    "Lovelace",
    "Hopper",
    "Turing",
    "Dijkstra",
    "Liskov",
    "Knuth",
    "Allen",
    "Thompson",
    "Perlman",
    "Berners-Lee",
    "Hamilton",
    "Torvalds",
    "Lamarr",
    "Backus",
    "Johnson",
]


def generate_leads(n: int, seed: int = 7) -> list[dict[str, Any]]:
    """``n`` valid solar leads, reproducible from ``seed``; each has unique PII values."""
    rnd = random.Random(seed)
    leads = []
    for i in range(n):
        state = rnd.choice(_STATES)
        first, last = rnd.choice(_FIRST), rnd.choice(_LAST)
        leads.append(
            {
                "flow": "solar",
                "state": state,
                "zip": _ZIP_PREFIX[state] + f"{rnd.randrange(1000):03d}",
                "homeowner": rnd.random() < 0.9,
                "electric_bill": rnd.choice(
                    ["$0-100", "$100-200", "$200-300", "$300-400", "$400+"]
                ),
                "credit_range": rnd.choice(["<600", "600-649", "650-699", "700+"]),
                "property_type": rnd.choice(
                    ["single_family", "single_family", "condo", "townhouse"]
                ),
                "consent": True,
                "first_name": first,
                "last_name": f"{last}-{seed}x{i}",
                "email": f"{first.lower()}.{last.lower()}.{seed}x{i}@example.com",
                "phone": f"+1{rnd.randrange(201, 989)}{rnd.randrange(200, 999)}{i % 10000:04d}",
                "address": f"{rnd.randrange(1, 9999)} {rnd.choice(['Main', 'Oak', 'Pine', 'Sun'])} St #{i}",
            }
        )
    return leads


def tag_leads(leads: list[dict[str, Any]], prefix: str) -> None:
    """Give each lead the id ``<prefix><n>``: a run's leads are then one ``startsWith`` away
    in every table (a query of constant size at any number of leads), and a retried POST is
    idempotent (a producer-supplied ``lead_id`` is an idempotency key)."""
    for i, lead in enumerate(leads):
        lead["lead_id"] = f"{prefix}{i:07d}"


class PiiAudit:
    """Every ping the simulated buyers received, scanned for any PII value of the run's leads
    (lower-cased, at least 5 characters), read as the run goes (``drain``): the buyers forget
    what was read, so their recordings stay small at any number of leads. One Aho-Corasick
    pass per ping, whatever the number of values."""

    def __init__(self, buyer_urls: list[str], pii_values: Any) -> None:
        import ahocorasick

        self._urls = buyer_urls
        self._auto = ahocorasick.Automaton()
        for v in pii_values:
            v = str(v).lower()
            if len(v) >= 5:
                self._auto.add_word(v, v)
        self._empty = len(self._auto) == 0
        if not self._empty:
            self._auto.make_automaton()
        self.pings = 0
        self.leaks = 0
        #: Pings a buyer dropped from its recordings before they were read (audit incomplete).
        self.missed = 0

    def drain(self, timeout: float = 30.0) -> None:
        # One client per drain, not one per request: httpx.get() builds a client, and its TLS
        # context, each time (three requests per buyer every 5 s took ~27 % of the demo
        # process in ssl.create_default_context, a core the stack under test needed).
        with httpx.Client(timeout=timeout) as http:
            for url in self._urls:
                self._drain_one(http, url)

    def _drain_one(self, http: httpx.Client, url: str) -> None:
        got = http.get(f"{url}/__sim/received", params={"kind": "ping", "drain": "1"}).json()
        for req in got:
            self.pings += 1
            blob = (
                req.get("body", "")
                + unquote_plus(req.get("path", ""))
                + unquote_plus(str(req.get("query", "")))
                + str(req.get("headers", {}))
            ).lower()
            if not self._empty and next(self._auto.iter(blob), None) is not None:
                self.leaks += 1
        # The posts carry PII by contract and nothing here reads them: forgotten, so a
        # long demo's buyers do not keep every post (100,000 leads: ~870 MiB).
        http.delete(f"{url}/__sim/received", params={"kind": "post"}).raise_for_status()
        stats = http.get(f"{url}/__sim/stats").json()
        self.missed = max(self.missed, int(stats["counts"].get("recordings_dropped", 0)))


@dataclass
class DemoRun:
    lead_ids: list[str]
    rejected: list[tuple[int, str]]
    push_seconds: float
    #: 429 answers (pipeline over capacity), each retried after its Retry-After.
    refused: int = 0


class Pacer:
    """When the next POST may go: the schedule's rate (with its ramp) times a factor that a
    429 cuts and acceptances restore (additive increase, multiplicative decrease), so a
    producer past the pipeline's capacity sends at about that capacity instead of piling
    retries on top of new leads. ``now`` is a monotonic clock, seconds.

    Both moves are paced by time, at most one per ``PERIOD_S``: a cut of ``CUT`` when a 429
    came, else a step of ``STEP`` up when a lead was accepted. (A step per acceptance, as
    first built, grew with the accepted rate itself: at 5x the capacity it settled at ~3x,
    and sent 2.8 requests a lead where a blind producer sent 4.4.)"""

    #: How far behind its schedule the pacer may catch up, seconds.
    CATCH_UP_S = 0.1
    PERIOD_S = 0.2
    CUT = 0.7
    STEP = 0.05
    FLOOR = 0.02

    def __init__(self, rate: float, ramp_s: float, start: float) -> None:
        self.rate, self.ramp_s, self.start = rate, ramp_s, start
        self.factor = 1.0
        self.next_at = start
        self._cut_at = -1e9
        self._moved_at = -1e9

    def target(self, now: float) -> float:
        t = now - self.start
        if self.ramp_s > 0 and t < self.ramp_s:
            return self.rate * (0.2 + 0.8 * t / self.ramp_s)
        return self.rate

    def sent(self, now: float) -> None:
        # Paced by schedule, not by a gap after each send: a send that wakes late (the event
        # loop busy) is caught up, up to CATCH_UP_S of the schedule (no burst after a pause).
        # Restarting from `now` lost each wake-up's delay: the demo offered 43/s, not 50/s.
        due = max(self.next_at, now - self.CATCH_UP_S)
        self.next_at = due + 1.0 / (self.target(now) * self.factor)

    def refused(self, now: float) -> None:
        if now - self._cut_at >= self.PERIOD_S:  # one cut per period, not one per answer
            self.factor = max(self.FLOOR, self.factor * self.CUT)
            self._cut_at = self._moved_at = now

    def accepted(self, now: float) -> None:
        # One step up per period, and none within a period of the last cut.
        if now - self._moved_at >= self.PERIOD_S and self.factor < 1.0:
            self.factor = min(1.0, self.factor + self.STEP)
            self._moved_at = now


class ProgressLines:
    """Progress as plain lines, for a console that is not a terminal (a log file, CI).

    rich draws its live bar only on a terminal; redirected, a 20,000-lead demo printed nothing
    between "stack up" and its report for minutes. ``update(done)`` prints one line at most
    every ``every_s`` seconds (and none on a terminal, where the bar shows it)."""

    def __init__(
        self,
        console: Console | None,
        label: str,
        total: int,
        *,
        every_s: float = 10.0,
        rate: bool = True,
        clock: Any = time.monotonic,
    ) -> None:
        self.console, self.label, self.total = console, label, total
        self.every_s, self.rate, self.clock = every_s, rate, clock
        self.start = self.last = clock()
        self.on = console is not None and not console.is_terminal

    def update(self, done: int, note: str = "") -> None:
        now = self.clock()
        if not self.on or now - self.last < self.every_s:
            return
        self.last = now
        took = now - self.start
        rate = f"{done / max(1e-9, took):.1f}/s, " if self.rate else ""
        assert self.console is not None
        self.console.print(
            f"  {self.label}: {done:,} of {self.total:,} ({rate}{took:.0f} s){note}",
            highlight=False,
        )


async def push_leads(
    url: str,
    token: str,
    leads: list[dict[str, Any]],
    *,
    rate: float,
    ramp_s: float = 3.0,
    concurrency: int = 64,
    console: Console | None = None,
    every_5s: Any = None,
    progress_every_s: float = 10.0,
    pacer: Pacer | None = None,
) -> DemoRun:
    """POST every lead at about ``rate`` per second (after a ramp of ``ramp_s``); returns
    the accepted lead ids in order. A 429 (over capacity) is handled as a producer should:
    the lead is sent again once its Retry-After has passed (at most ``MAX_429`` times), and
    the sending rate backs off (:class:`Pacer`), so past capacity the leads wait here, not
    in a storm of retries. A transport error or 503 is retried up to 4 times (the lead's id
    makes a retry idempotent). ``every_5s`` (a blocking callable) runs in a thread every 5 s
    while pushing (the PII audit reading the buyers). Off a terminal, progress is a plain line
    every ``progress_every_s`` (:class:`ProgressLines`). ``pacer`` replaces the default
    :class:`Pacer` (its ``start`` is reset to now)."""
    import heapq

    ids: list[str | None] = [None] * len(leads)
    rejected: list[tuple[int, str]] = []
    refused = 0
    slots = asyncio.Semaphore(concurrency)
    start = time.monotonic()
    if pacer is None:
        pacer = Pacer(rate, ramp_s, start)
    pacer.start = pacer.next_at = start
    headers = {"Authorization": f"Bearer {token}"}
    pushing = asyncio.Event()
    #: (ready at, lead index, 429s so far) of refused leads waiting for their Retry-After.
    retries: list[tuple[float, int, int]] = []
    changed = asyncio.Event()

    async def periodic() -> None:
        while not pushing.is_set():
            try:
                await asyncio.wait_for(pushing.wait(), 5.0)
            except TimeoutError:
                await asyncio.to_thread(every_5s)

    side = asyncio.create_task(periodic()) if every_5s is not None else None
    with Progress(
        TextColumn("pushing leads"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("push", total=len(leads))
        lines = ProgressLines(console, "pushed", len(leads), every_s=progress_every_s)
        answered = 0

        def advance() -> None:
            nonlocal answered
            answered += 1
            progress.advance(task)
            lines.update(answered, f", {refused:,} answers 429 so far" if refused else "")

        async with httpx.AsyncClient(timeout=30.0) as client:

            async def one(i: int, over: int) -> None:
                nonlocal refused
                try:
                    attempt = 0
                    while True:
                        try:
                            resp = await client.post(url, json=leads[i], headers=headers)
                        except httpx.TransportError as exc:
                            if attempt == 4:
                                rejected.append((i, f"transport error: {exc}"))
                                advance()
                                return
                            attempt += 1
                            await asyncio.sleep(0.2 * attempt)
                            continue
                        if resp.status_code == 503 and attempt < 4:
                            attempt += 1
                            await asyncio.sleep(0.2 * attempt)
                            continue
                        break
                    if resp.status_code == 429 and over < MAX_429:
                        refused += 1
                        pacer.refused(time.monotonic())
                        ready = time.monotonic() + _retry_after(resp)
                        heapq.heappush(retries, (ready, i, over + 1))
                        return
                    if resp.status_code == 202:
                        pacer.accepted(time.monotonic())
                        ids[i] = resp.json()["lead_id"]
                    else:
                        rejected.append((i, f"HTTP {resp.status_code}: {resp.text[:200]}"))
                    advance()
                finally:
                    slots.release()
                    changed.set()

            # Finished tasks are let go: memory does not grow with the number of leads sent.
            tasks: set[asyncio.Task[None]] = set()
            fresh = 0
            while fresh < len(leads) or retries or tasks:
                now = time.monotonic()
                retry_ready = bool(retries) and retries[0][0] <= now
                if (fresh < len(leads) or retry_ready) and now >= pacer.next_at:
                    await slots.acquire()
                    if retry_ready:
                        _, i, over = heapq.heappop(retries)
                    else:
                        i, over = fresh, 0
                        fresh += 1
                    pacer.sent(time.monotonic())
                    t = asyncio.create_task(one(i, over))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                    continue
                # Wait for the pacer, the next retry, or an answer (which may queue a retry).
                waits = [pacer.next_at - now] if fresh < len(leads) or retry_ready else []
                if retries and not retry_ready:
                    waits.append(retries[0][0] - now)
                changed.clear()
                try:
                    await asyncio.wait_for(changed.wait(), max(0.001, min(waits, default=1.0)))
                except TimeoutError:
                    pass
    took = time.monotonic() - start
    pushing.set()
    if side is not None:
        await side
    return DemoRun([x for x in ids if x is not None], rejected, took, refused)


#: How many 429 answers a demo lead is retried through.
MAX_429 = 20


def _retry_after(resp: httpx.Response) -> float:
    try:
        return min(30.0, max(0.1, float(resp.headers.get("Retry-After", "1"))))
    except ValueError:
        return 1.0
