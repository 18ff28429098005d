"""Alert rules over the windowed metrics: a pure state machine per (rule, subject).

Evaluation happens once per closed base window (``metrics.window_s``), at the window's end
time ``at``, over the rule's ``window`` ending there. Per (rule, subject):

- ``ok``: a window with data (``min_samples`` reached) that breaches ``comparison
  threshold`` extends the breach streak, anything else resets it. After ``1 + for/window_s``
  breaching evaluations in a row the alert fires.
- ``firing``: an evaluation that is past ``resolve_threshold`` — or has no data (an idle
  subject is not breaching; Prometheus resolves a vanished series the same way) — extends the
  recovery streak, a breach resets it. After ``1 + resolve_for/window_s`` in a row it resolves.

The band between threshold and resolve threshold, and the two streaks, are the hysteresis: a
value hovering at the threshold cannot flap. Each transition is produced once, identified by
``(rule, subject, at, state)``; ``at`` is event time (a window end), so a replay after a
restart recomputes the same transition with the same id. :meth:`AlertEngine.seed` loads the
last transition per (rule, subject) from the alerts topic and evaluation never goes back
before it: what was emitted before a restart is not emitted again.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Literal

from streams.rules.windows import Subject, WindowedMetrics, metric_value, samples_for
from streams.settings.metrics import AlertRule

__all__ = [
    "AlertEngine",
    "AlertState",
    "Transition",
    "breaches",
    "recovered",
    "step",
    "steps_for",
    "subject_key",
]

State = Literal["firing", "resolved"]


def subject_key(subject: Subject) -> str:
    """``buyer:sunrise`` / ``flow:solar``: the alert's subject (the `alerts.subject` column)."""
    return f"{subject[0]}:{subject[1]}"


def _compare(value: float, op: str, threshold: float) -> bool:
    if op == "<":
        return value < threshold
    if op == "<=":
        return value <= threshold
    if op == ">":
        return value > threshold
    return value >= threshold


def breaches(rule: AlertRule, value: float | None, samples: int) -> bool:
    return (
        value is not None
        and samples >= rule.min_samples
        and _compare(value, rule.comparison, rule.threshold)
    )


def recovered(rule: AlertRule, value: float | None, samples: int) -> bool:
    """Past the resolve threshold, or no data."""
    if value is None or samples < rule.min_samples:
        return True
    return not _compare(value, rule.comparison, rule.resolve_at)


def steps_for(duration_s: float, window_s: int) -> int:
    """Evaluations in a row that a condition must hold for ``duration_s`` (0 → 1)."""
    return 1 + int(round(duration_s / window_s))


@dataclass
class AlertState:
    firing: bool = False
    streak: int = 0
    #: Event time of the last transition (0: none yet).
    last_at_ms: int = 0
    value: float | None = None


@dataclass(frozen=True)
class Transition:
    rule: AlertRule
    subject: Subject
    state: State
    value: float | None
    samples: int
    at_ms: int

    @property
    def alert_id(self) -> str:
        return f"{self.rule.name}|{subject_key(self.subject)}|{self.at_ms}|{self.state}"

    def describe(self) -> str:
        r = self.rule
        shown = "no data" if self.value is None else f"{r.metric} {_fmt(self.value)}"
        window = f"{_fmt(r.window or 0)}s" if r.window else "one window"
        if self.state == "firing":
            head = f"{r.message} — " if r.message else ""
            return (
                f"{head}{shown} {r.comparison} {_fmt(r.threshold)} over {window} "
                f"({self.samples} samples)"
            )
        return f"resolved: {shown} past {_fmt(r.resolve_at)} over {window} ({self.samples} samples)"

    def record(self, window_s: int) -> dict[str, Any]:
        """The ``Alert`` event (schemas/alert.avsc)."""
        r = self.rule
        return {
            "alert_id": self.alert_id,
            "rule": r.name,
            "metric": r.metric,
            "scope": self.subject[0],
            "subject": subject_key(self.subject),
            "state": self.state,
            "value": self.value,
            "threshold": r.threshold,
            "comparison": r.comparison,
            "samples": self.samples,
            "window_s": float(r.window or window_s),
            "at_ms": self.at_ms,
            "message": self.describe(),
        }


def _fmt(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else str(v)


def step(
    rule: AlertRule, st: AlertState, value: float | None, samples: int, at_ms: int, window_s: int
) -> State | None:
    """Advance one evaluation; returns the transition's new state, or None."""
    st.value = value
    if not st.firing:
        st.streak = st.streak + 1 if breaches(rule, value, samples) else 0
        if st.streak >= steps_for(rule.for_, window_s):
            st.firing, st.streak, st.last_at_ms = True, 0, at_ms
            return "firing"
        return None
    st.streak = st.streak + 1 if recovered(rule, value, samples) else 0
    if st.streak >= steps_for(rule.resolve_after, window_s):
        st.firing, st.streak, st.last_at_ms = False, 0, at_ms
        return "resolved"
    return None


class AlertEngine:
    """Every rule over every matching subject of a :class:`WindowedMetrics`."""

    def __init__(self, rules: list[AlertRule], window_s: int) -> None:
        self.rules = list(rules)
        self.window_s = window_s
        self.states: dict[tuple[str, Subject], AlertState] = {}

    def span_ms(self, rule: AlertRule) -> int:
        return int(round((rule.window or self.window_s) * 1000))

    def max_span_ms(self) -> int:
        return max([self.span_ms(r) for r in self.rules] or [self.window_s * 1000])

    def max_streak_ms(self) -> int:
        """The longest run of evaluations a decision depends on."""
        steps = max(
            [
                max(steps_for(r.for_, self.window_s), steps_for(r.resolve_after, self.window_s))
                for r in self.rules
            ]
            or [1]
        )
        return steps * self.window_s * 1000

    def seed(self, rule_name: str, subject: Subject, state: str, at_ms: int) -> None:
        """Restore the last emitted transition of (rule, subject) (from the alerts topic)."""
        st = self.states.setdefault((rule_name, subject), AlertState())
        if at_ms >= st.last_at_ms:
            st.firing, st.streak, st.last_at_ms = state == "firing", 0, at_ms

    def snapshot(self) -> dict[tuple[str, Subject], AlertState]:
        return copy.deepcopy(self.states)

    def restore(self, snap: dict[tuple[str, Subject], AlertState]) -> None:
        self.states = snap

    def firing(self) -> list[tuple[str, Subject, AlertState]]:
        return [(r, s, st) for (r, s), st in self.states.items() if st.firing]

    def evaluate(self, store: WindowedMetrics, end_ms: int) -> list[Transition]:
        """Evaluate every rule at window end ``end_ms``."""
        out = []
        for rule in self.rules:
            span = self.span_ms(rule)
            subjects: set[Subject]
            if rule.id is not None:
                subjects = {(rule.scope, rule.id)}
            else:
                subjects = store.subjects(end_ms, span, rule.scope)
                # Subjects without data now but with state (firing or mid-streak) still step:
                # that is how an idle subject resolves.
                subjects |= {
                    s
                    for (name, s), st in self.states.items()
                    if name == rule.name and (st.firing or st.streak)
                }
            for subject in sorted(subjects):
                st = self.states.get((rule.name, subject))
                if st is not None and end_ms <= st.last_at_ms:
                    continue  # already decided (before a restart): never emit twice
                agg = store.aggregate(subject, end_ms, span)
                value, samples = metric_value(agg, rule.metric), samples_for(agg, rule.metric)
                if st is None:
                    if not breaches(rule, value, samples):
                        continue  # nothing to remember for a healthy subject
                    st = self.states[(rule.name, subject)] = AlertState()
                new = step(rule, st, value, samples, end_ms, self.window_s)
                if new is not None:
                    out.append(Transition(rule, subject, new, value, samples, end_ms))
                if not st.firing and not st.streak and st.last_at_ms == 0:
                    del self.states[(rule.name, subject)]  # healthy again, nothing to keep
        return out
