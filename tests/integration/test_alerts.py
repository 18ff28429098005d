"""Streaming metrics and alerts on the real broker and warehouse, against real simulated buyers.

A steady stream of leads goes to two buyers. One of them turns slow (p50 ≈ 900 ms, set at
runtime through the simulator's ``/__sim/config``): the response-time rule must fire within
two rule windows, and resolve once the buyer is fast again — exactly one `firing` and one
`resolved` row in the `alerts` table, one record each on the alerts topic, and one webhook
call each on a real local HTTP receiver. Short windows (1 s base, 2 s rule) keep it quick.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

import schemas
from streams.tools.demo import generate_leads
from tests.integration.pipeline import SOLAR_FLOW, TOKEN, Pipeline, wait_for

pytestmark = pytest.mark.integration

FAST = {"median": 30, "p99": 80}
SLOW = {"median": 900, "p99": 1000}
SIM = {
    "bid_probability": 0.8,
    "latency_ms": FAST,
    "late_share": 0.0,
    "error_rate": 0.0,
    "post_reject_rate": 0.0,
}
BUYERS: dict[str, dict[str, Any]] = {
    "steady": {"sim": SIM},
    # A long timeout so its slow answers are recorded as answers with their latency.
    "slowpoke": {"timeout_ms": 2000, "sim": SIM},
}
FLOW = {**SOLAR_FLOW, "deadline_ms": 2500}
WINDOW_S = 2
METRICS = {"window_s": 1, "grace_s": 0.5, "export_window_s": 4}
RATE = 12  # leads per second


class Receiver:
    """A real local HTTP server recording every webhook call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.calls.append({"json": json.loads(body), "headers": dict(self.headers)})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?token=s3cret-hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Pump:
    """Posts leads at a steady rate in the background until stopped."""

    def __init__(self, url: str, rate: float) -> None:
        self.url, self.rate = url, rate
        self.stop_flag = threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        leads = generate_leads(2000, seed=3)
        with httpx.Client(timeout=10, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
            i = 0
            next_at = time.monotonic()
            while not self.stop_flag.is_set():
                r = c.post(self.url, json=leads[i % len(leads)])
                assert r.status_code in (202, 429), r.text  # 429: over capacity, skipped
                self.sent += r.status_code == 202
                i += 1
                next_at += 1 / self.rate
                self.stop_flag.wait(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> Pump:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_flag.set()
        self.thread.join(timeout=15)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def market(
    kafka_bootstrap: str, warehouse_url: str, tmp_path: Path, receiver: Receiver
) -> Iterator[Pipeline]:
    alerts = [
        {
            "name": "slow_buyer",
            "metric": "response_p50_ms",
            "scope": "buyer",
            "comparison": ">",
            "threshold": 600,
            "resolve_threshold": 400,
            "window": f"{WINDOW_S}s",
            "for": 0,
            "resolve_for": "1s",
            "min_samples": 5,
            "message": "contact buyer",
            "webhook": {"url": receiver.url, "headers": {"X-Hook-Key": "hook-secret-123"}},
        }
    ]
    p = Pipeline(
        tmp_path, kafka_bootstrap, warehouse_url, BUYERS, flow=FLOW, metrics=METRICS, alerts=alerts
    )
    try:
        p.start()
        yield p
    finally:
        p.stop()


def _metrics(p: Pipeline) -> str:
    r = httpx.get(f"http://127.0.0.1:{p.metrics_port}/metrics", timeout=10)
    r.raise_for_status()
    return r.text


def _gauge(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            return float(m.group(2))
        if not labels and line.startswith(name + " "):
            return float(line.split()[1])
    return None


def _set_latency(p: Pipeline, buyer: str, latency: dict[str, float]) -> None:
    r = httpx.put(f"{p.sim(buyer)}/__sim/config", json={"latency_ms": latency}, timeout=10)
    assert r.status_code == 200, r.text


def _alert_rows(p: Pipeline) -> list[tuple[Any, ...]]:
    return p.rows(
        "SELECT rule, subject, state, value, toUnixTimestamp64Milli(at), message "
        "FROM {db}.alerts FINAL ORDER BY at, state"
    )


def test_slow_buyer_fires_once_and_resolves_once(market: Pipeline, receiver: Receiver) -> None:
    p = market
    window_ms = WINDOW_S * 1000
    with Pump(p.url, RATE):
        # Metrics flow: both buyers show up on /metrics with a fast p50, and nothing fires.
        wait_for(
            lambda: (
                (_gauge(_metrics(p), "pingpost_pings", scope="buyer", id="slowpoke") or 0) >= 10
            ),
            60,
            "slowpoke's pings on /metrics",
        )
        text = _metrics(p)
        p50 = _gauge(
            text, "pingpost_response_time_ms", scope="buyer", id="slowpoke", quantile="0.5"
        )
        assert p50 is not None and p50 < 200, p50
        assert _gauge(text, "pingpost_bid_rate", scope="flow", id="solar") is not None
        assert not _alert_rows(p) and not receiver.calls

        slow_at = time.time() * 1000
        _set_latency(p, "slowpoke", SLOW)
        fired = wait_for(
            lambda: [r for r in _alert_rows(p) if r[2] == "firing"], 30, "the firing row"
        )
        detected_s = time.time() - slow_at / 1000
        ((rule, subject, _, value, at_ms, message),) = fired
        assert (rule, subject) == ("slow_buyer", "buyer:slowpoke")
        assert value > 600 and "contact buyer" in message
        # Fired within two rule windows of the change (event time of the evaluated window).
        assert at_ms - slow_at <= 2 * window_ms, (at_ms - slow_at, detected_s)
        assert (
            _gauge(
                _metrics(p), "pingpost_alert_firing", rule="slow_buyer", subject="buyer:slowpoke"
            )
            == 1.0
        )

        fast_at = time.time() * 1000
        _set_latency(p, "slowpoke", FAST)
        resolved = wait_for(
            lambda: [r for r in _alert_rows(p) if r[2] == "resolved"], 30, "the resolved row"
        )
        ((_, subject, _, value, resolved_at, _),) = resolved
        assert subject == "buyer:slowpoke" and value <= 400 and resolved_at > fast_at
        # Keep traffic (and evaluation) going a few more rule windows: nothing flaps.
        wait_for(
            lambda: (
                (_gauge(_metrics(p), "pingpost_metrics_evaluated_until_seconds") or 0) * 1000
                >= resolved_at + 3 * window_ms
            ),
            30,
            "three more rule windows evaluated",
        )
    rows = _alert_rows(p)
    assert [(r[1], r[2]) for r in rows] == [
        ("buyer:slowpoke", "firing"),
        ("buyer:slowpoke", "resolved"),
    ], rows
    wait_for(lambda: len(receiver.calls) >= 2, 30, "two webhook calls")
    states = [c["json"]["state"] for c in receiver.calls]
    assert states == ["firing", "resolved"], receiver.calls
    for call in receiver.calls:
        assert call["json"]["subject"] == "buyer:slowpoke"
        assert call["headers"]["X-Hook-Key"] == "hook-secret-123"
        assert call["headers"]["Idempotency-Key"] == call["json"]["alert_id"]
    assert [r["state"] for r in _topic_alerts(p)] == ["firing", "resolved"]
    # Secrets of the webhook never reach logs or topics.
    logs = "".join(f.read_text(errors="replace") for f in (p.root / "run" / "logs").glob("*"))
    assert "s3cret-hook" not in logs and "hook-secret-123" not in logs
    print(
        f"\nslow buyer detected {detected_s:.1f}s after the change "
        f"(firing window end {(at_ms - slow_at) / 1000:.1f}s after it)"
    )


def test_a_restarted_metrics_worker_keeps_the_alert_and_never_repeats_it(
    market: Pipeline, receiver: Receiver
) -> None:
    """Stop the metrics worker while the alert fires and start it again: it restores the
    firing state from the alerts topic, rebuilds its windows from the replayed offsets, keeps
    evaluating without a second `firing`, and resolves once when the buyer recovers."""
    p = market
    window_ms = WINDOW_S * 1000
    health = f"http://127.0.0.1:{p.metrics_port}/healthz"
    with Pump(p.url, RATE):
        wait_for(
            lambda: (
                (_gauge(_metrics(p), "pingpost_pings", scope="buyer", id="slowpoke") or 0) >= 10
            ),
            60,
            "slowpoke's pings on /metrics",
        )
        _set_latency(p, "slowpoke", SLOW)
        wait_for(lambda: [r for r in _alert_rows(p) if r[2] == "firing"], 30, "the firing row")

        assert p.stack.stop("metrics")
        restarted_at = time.time() * 1000
        p.stack.spawn("metrics", ["worker", "--role", "metrics"])
        wait_for(lambda: _get_json(health).get("caught_up"), 60, "the restarted worker")
        assert (
            _gauge(
                _metrics(p), "pingpost_alert_firing", rule="slow_buyer", subject="buyer:slowpoke"
            )
            == 1.0
        )
        # Still slow: the restarted worker evaluates on, and must not fire again. (The topic,
        # not the table: a window counts as evaluated only once its alerts are on Kafka.)
        wait_for(
            lambda: (
                (_get_json(health).get("evaluated_until_ms") or 0) >= restarted_at + 3 * window_ms
            ),
            30,
            "three windows after the restart",
        )
        assert [r["state"] for r in _topic_alerts(p)] == ["firing"]

        _set_latency(p, "slowpoke", FAST)
        wait_for(lambda: [r for r in _alert_rows(p) if r[2] == "resolved"], 30, "the resolved row")
    assert [r[2] for r in _alert_rows(p)] == ["firing", "resolved"]
    wait_for(lambda: len(receiver.calls) >= 2, 30, "two webhook calls")
    assert [c["json"]["state"] for c in receiver.calls] == ["firing", "resolved"]
    assert [r["state"] for r in _topic_alerts(p)] == ["firing", "resolved"]


def _topic_alerts(p: Pipeline) -> list[dict[str, Any]]:
    return [schemas.decode_as("Alert", m.value) for m in asyncio.run(p.read_topic(p.names.alerts))]


def _get_json(url: str) -> dict[str, Any]:
    try:
        r = httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return {}
    return r.json() if r.status_code == 200 else {}  # type: ignore[no-any-return]
