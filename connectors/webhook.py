"""The one connector to alert webhooks: POST JSON, retried with backoff, never blocking.

``WebhookSender.submit`` only enqueues; one background task delivers in order (a `resolved`
never overtakes its `firing`), each request with a timeout, retried on connection errors,
timeouts, 429 and 5xx with doubling backoff. Each POST carries ``Idempotency-Key: <alert_id>``
so a receiver can drop a repeat (delivery is at least once: a crash between the POST and the
alert's record reaching Kafka can repeat it). When every attempt failed, ``on_failure`` is
called with the reason (the metrics role dead-letters it). The URL and headers are secrets:
they never appear in logs or in failure reasons — only the rule's name does.

httpx, not aiohttp: this is a low-volume client (FIELD-NOTES).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

__all__ = ["WebhookDelivery", "WebhookSender"]

log = logging.getLogger(__name__)

#: Pending deliveries beyond this are dropped (and reported as failures): a dead receiver
#: must not grow memory without bound.
MAX_QUEUED = 1000
MAX_BACKOFF_S = 30.0


@dataclass(frozen=True)
class WebhookDelivery:
    rule: str
    alert_id: str
    url: str
    headers: dict[str, str]
    payload: dict[str, Any]


FailureHook = Callable[[WebhookDelivery, str], Awaitable[None]]


class WebhookSender:
    def __init__(
        self,
        *,
        timeout_s: float,
        attempts: int,
        backoff_s: float,
        on_failure: FailureHook | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.on_failure = on_failure
        # httpx logs every request's full URL at INFO; a webhook URL is a secret (it often
        # carries the token), so that logger stays at WARNING in a process that sends them.
        logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger("httpx").level))
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s), transport=transport, follow_redirects=False
        )
        self._queue: asyncio.Queue[WebhookDelivery] = asyncio.Queue(MAX_QUEUED)
        self._task: asyncio.Task[None] | None = None
        self.delivered = 0
        self.failed = 0

    def submit(self, delivery: WebhookDelivery) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="alert-webhooks")
        try:
            self._queue.put_nowait(delivery)
        except asyncio.QueueFull:
            self.failed += 1
            log.error(
                "alert webhook of rule %s dropped: %d deliveries already queued",
                delivery.rule,
                MAX_QUEUED,
            )
            if self.on_failure is not None:
                asyncio.ensure_future(self.on_failure(delivery, "dropped: webhook queue full"))

    async def _run(self) -> None:
        while True:
            delivery = await self._queue.get()
            try:
                await self._deliver(delivery)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one delivery kill the sender
                log.exception("alert webhook of rule %s: unexpected error", delivery.rule)
            finally:
                self._queue.task_done()

    async def _deliver(self, d: WebhookDelivery) -> None:
        delay = self.backoff_s
        reason = ""
        for attempt in range(1, self.attempts + 1):
            try:
                resp = await self._client.post(
                    d.url, json=d.payload, headers={**d.headers, "Idempotency-Key": d.alert_id}
                )
                if 200 <= resp.status_code < 300:
                    self.delivered += 1
                    return
                reason = f"HTTP {resp.status_code}"
                if resp.status_code < 500 and resp.status_code not in (408, 429):
                    break  # the receiver refuses this request: a retry will not help
            except httpx.TimeoutException:
                reason = "timeout"
            except httpx.HTTPError as exc:  # connection refused, reset, DNS, ...
                reason = type(exc).__name__
            if attempt < self.attempts:
                log.warning(
                    "alert webhook of rule %s failed (%s), attempt %d/%d; retrying in %.1fs",
                    d.rule,
                    reason,
                    attempt,
                    self.attempts,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
        self.failed += 1
        why = f"webhook failed after {attempt} attempt(s): {reason}"
        log.error("alert webhook of rule %s (%s): %s", d.rule, d.alert_id, why)
        if self.on_failure is not None:
            await self.on_failure(d, why)

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout``) for queued deliveries."""
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except TimeoutError:
            pass

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        await self._client.aclose()
