"""The alert webhook sender against a fake transport: retries, backoff, failure recording."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from connectors.webhook import WebhookDelivery, WebhookSender


def delivery(n: int = 1) -> WebhookDelivery:
    return WebhookDelivery(
        "slow",
        f"slow|buyer:a|{n}|firing",
        "http://hooks.test/T0K3N",
        {"X-Key": "k"},
        {"state": "firing", "n": n},
    )


async def run(
    statuses: list[int | Exception], count: int = 1, attempts: int = 3
) -> tuple[list[httpx.Request], list[str], WebhookSender]:
    seen: list[httpx.Request] = []
    failures: list[str] = []
    answers = iter(statuses)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = next(answers, 204)
        if isinstance(answer, Exception):
            raise answer
        return httpx.Response(answer)

    async def on_failure(d: WebhookDelivery, reason: str) -> None:
        failures.append(reason)

    sender = WebhookSender(
        timeout_s=1,
        attempts=attempts,
        backoff_s=0.001,
        on_failure=on_failure,
        transport=httpx.MockTransport(handler),
    )
    try:
        for i in range(count):
            sender.submit(delivery(i))
        await sender.drain(timeout=5)
    finally:
        await sender.aclose()
    return seen, failures, sender


async def test_delivers_json_with_idempotency_key() -> None:
    seen, failures, sender = await run([204])
    assert len(seen) == 1 and not failures and sender.delivered == 1
    req = seen[0]
    assert req.headers["Idempotency-Key"] == "slow|buyer:a|0|firing"
    assert req.headers["X-Key"] == "k"
    assert req.read() == b'{"state":"firing","n":0}'


async def test_retries_5xx_and_connection_errors_then_succeeds() -> None:
    seen, failures, sender = await run([500, httpx.ConnectError("refused"), 503, 200], attempts=4)
    assert len(seen) == 4 and not failures and sender.delivered == 1


async def test_records_a_failure_after_every_attempt_without_the_url() -> None:
    seen, failures, sender = await run([500, 500, 500, 500])
    assert len(seen) == 3 and sender.failed == 1
    assert failures == ["webhook failed after 3 attempt(s): HTTP 500"]
    assert "T0K3N" not in failures[0]


async def test_a_4xx_is_not_retried() -> None:
    seen, failures, _ = await run([404])
    assert len(seen) == 1 and failures == ["webhook failed after 1 attempt(s): HTTP 404"]


async def test_deliveries_keep_their_order() -> None:
    seen, _, _ = await run([500, 204, 204], count=3)
    bodies: list[Any] = [r.read() for r in seen]
    assert bodies == [b'{"state":"firing","n":0}'] * 2 + [
        b'{"state":"firing","n":1}',
        b'{"state":"firing","n":2}',
    ]


async def test_submit_never_blocks_even_when_the_receiver_hangs() -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(10)
        return httpx.Response(204)

    sender = WebhookSender(
        timeout_s=0.05, attempts=1, backoff_s=0.001, transport=httpx.MockTransport(hang)
    )
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i in range(100):
            sender.submit(delivery(i))
        assert loop.time() - t0 < 0.05
    finally:
        await sender.aclose()
