"""Buyer statistics as pure bookkeeping: observed post acceptance over a sliding window
(ranking by score) and auto-pause decisions (issue 3, rule 10). The stages feed them events
and the time; ``streams.stages.buyer_feeds`` and the metrics stage wire them in."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from streams.rules import selling as rules
from streams.settings import AutoPauseConfig

__all__ = [
    "AcceptanceCounter",
    "PAUSE_RULE",
    "POSTED",
    "PauseTracker",
    "Transition",
    "WINDOW_S",
    "pause_alert",
]


#: How far back acceptance is counted (a buyer's recent behaviour, not its history).
WINDOW_S = 24 * 3600.0


#: Post answers that count as "posted"; ``skipped`` was never sent.
POSTED = frozenset({"accepted", "rejected", "error", "timeout"})


class AcceptanceCounter:
    """Accepted / posted per buyer over a sliding window, counting each attempt once."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_ms = int(window_s * 1000)
        self._seen: dict[str, tuple[str, bool]] = {}  # attempt_id -> (buyer, accepted)
        self._order: deque[tuple[int, str]] = deque()  # (at_ms, attempt_id), oldest first
        self.accepted: dict[str, int] = {}
        self.posted: dict[str, int] = {}

    def add(self, attempt_id: str, buyer_id: str, status: str, at_ms: int) -> None:
        if status not in POSTED or attempt_id in self._seen:
            return  # not a post answer, or a redelivered one
        ok = status == "accepted"
        self._seen[attempt_id] = (buyer_id, ok)
        self._order.append((at_ms, attempt_id))
        self.posted[buyer_id] = self.posted.get(buyer_id, 0) + 1
        if ok:
            self.accepted[buyer_id] = self.accepted.get(buyer_id, 0) + 1

    def expire(self, now: int) -> None:
        while self._order and self._order[0][0] <= now - self.window_ms:
            _, attempt_id = self._order.popleft()
            buyer, ok = self._seen.pop(attempt_id)
            self.posted[buyer] -= 1
            if ok:
                self.accepted[buyer] -= 1

    def rates(self, prior_rate: float, prior_weight: float) -> dict[str, float]:
        return {
            b: rules.acceptance_rate(self.accepted.get(b, 0), n, prior_rate, prior_weight)
            for b, n in self.posted.items()
        }


@dataclass(frozen=True)
class Transition:
    buyer_id: str
    state: str  # paused | resumed
    at_ms: int
    failure_rate: float
    pings: int
    until_ms: int | None


class PauseTracker:
    """Auto-pause (issue 3, rule 10): a buyer whose timeout+error share over its sliding
    window passes its threshold is paused for its cool-down, then resumes by itself. After a
    resume only outcomes from then on count, so old failures cannot pause it again at once."""

    def __init__(self, configs: dict[str, AutoPauseConfig]) -> None:
        self.configs = configs
        self._outcomes: dict[str, deque[tuple[int, str, str]]] = {b: deque() for b in configs}
        self._seen: set[str] = set()
        self.paused_until: dict[str, int] = {}
        self._since: dict[str, int] = {}

    def add(self, buyer_id: str, ping_id: str, status: str, at_ms: int) -> None:
        if buyer_id not in self.configs or status not in rules.PING_STATUSES:
            return
        if ping_id in self._seen:
            return  # redelivered
        self._seen.add(ping_id)
        self._outcomes[buyer_id].append((at_ms, ping_id, status))

    def _window(self, buyer_id: str, now: int) -> list[tuple[int, str]]:
        cfg, q = self.configs[buyer_id], self._outcomes[buyer_id]
        oldest = now - int(cfg.window_s * 1000)
        while q and q[0][0] <= oldest:
            self._seen.discard(q.popleft()[1])
        since = self._since.get(buyer_id, 0)
        return [(at, st) for at, _, st in q if at >= since]

    def evaluate(self, now: int) -> list[Transition]:
        out = []
        for buyer_id, cfg in self.configs.items():
            until = self.paused_until.get(buyer_id)
            window = self._window(buyer_id, now)
            if until is not None:
                if now >= until:
                    del self.paused_until[buyer_id]
                    self._since[buyer_id] = now
                    out.append(Transition(buyer_id, "resumed", now, 0.0, 0, None))
                continue
            if rules.pause_decision(
                window,
                now,
                window_s=cfg.window_s,
                min_pings=cfg.min_pings,
                max_failure_rate=cfg.max_failure_rate,
            ):
                failed = sum(1 for _, st in window if st in rules.FAILED_PING_STATUSES)
                until = rules.pause_until_ms(now, cfg.cool_down_s)
                self.paused_until[buyer_id] = until
                out.append(
                    Transition(buyer_id, "paused", now, failed / len(window), len(window), until)
                )
        return out

    def paused(self, buyer_id: str) -> int | None:
        """Until when ``buyer_id`` is paused (epoch ms), or None."""
        return self.paused_until.get(buyer_id)

    def seed(self, buyer_id: str, state: str, at_ms: int) -> None:
        """Restore the last recorded transition (after a restart): only outcomes after it
        count, and a pause still runs its cool-down (a resume is due if it ended meanwhile)."""
        cfg = self.configs.get(buyer_id)
        if cfg is None or at_ms < self._since.get(buyer_id, -1):
            return
        self._since[buyer_id] = at_ms
        if state == "firing":
            self.paused_until[buyer_id] = rules.pause_until_ms(at_ms, cfg.cool_down_s)
        else:
            self.paused_until.pop(buyer_id, None)


#: The rule name auto-pause transitions are recorded under (alerts topic and table).
PAUSE_RULE = "auto_pause"


def pause_alert(t: Transition, cfg: AutoPauseConfig) -> dict[str, Any]:
    """The ``Alert`` record of a pause transition (firing = paused, resolved = resumed)."""
    state = "firing" if t.state == "paused" else "resolved"
    subject = f"buyer:{t.buyer_id}"
    if t.state == "paused":
        assert t.until_ms is not None, "a pause always ends (PauseTracker.evaluate)"
        msg = (
            f"buyer {t.buyer_id} paused: {t.failure_rate:.0%} of {t.pings} pings timed out "
            f"or failed; resumes at {rules._iso(t.until_ms)}"
        )
    else:
        msg = f"buyer {t.buyer_id} resumed after its cool-down"
    return {
        "alert_id": f"{PAUSE_RULE}|{subject}|{t.at_ms}|{state}",
        "rule": PAUSE_RULE,
        "metric": "failure_rate",
        "scope": "buyer",
        "subject": subject,
        "state": state,
        "value": t.failure_rate if t.state == "paused" else None,
        "threshold": cfg.max_failure_rate,
        "comparison": ">",
        "samples": t.pings,
        "window_s": cfg.window_s,
        "at_ms": t.at_ms,
        "message": msg,
    }
