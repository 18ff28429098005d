"""connectors.buyers: response parsing, request building, timeouts, and one real HTTP round."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web

from connectors.buyers import (
    AiohttpTransport,
    BuyerClient,
    BuyerTransportError,
    Conditions,
    PingOutcome,
    parse_ping_response,
    parse_post_response,
)
from streams.settings import BuyerConfig, PostResponseMapping, ResponseMapping

SECRET = "s3cret-key-value"
MAX_PRICE = 10_000.0


def make_buyer(
    *,
    url: str = "http://buyer.test",
    response: ResponseMapping | None = None,
    post_response: PostResponseMapping | None = None,
) -> BuyerConfig:
    return BuyerConfig.model_validate(
        {
            "id": "b1",
            "flows": ["solar"],
            "ping_url": f"{url}/ping",
            "post_url": f"{url}/post",
            "headers": {"X-Api-Key": SECRET, "content-type": "text/plain"},
            "response": response or ResponseMapping(),
            "post_response": post_response or PostResponseMapping(),
        }
    )


@dataclass
class Sent:
    url: str
    headers: dict[str, str]
    body: bytes
    timeout_s: float


@dataclass
class FakeTransport:
    """Answers from a script: ``(status, body)`` or an exception, after ``delay_s``."""

    script: list[tuple[int, bytes] | BaseException]
    delay_s: float = 0.0
    requests: list[Sent] = field(default_factory=list)
    closed: bool = False

    async def post(
        self, url: str, headers: Mapping[str, str], body: bytes, timeout_s: float
    ) -> tuple[int, bytes]:
        self.requests.append(Sent(url, dict(headers), body, timeout_s))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        answer = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def aclose(self) -> None:
        self.closed = True


def js(obj: Any) -> bytes:
    return orjson.dumps(obj)


NESTED = ResponseMapping(
    bid="data.bid",
    price="data.offer.amount",
    exclusive="data.offer.exclusive",
    buyer_id="meta.buyer",
    conditions="data.terms",
)

# (case id, http status, body, mapping, expected status, expected reason fragment)
PING_CASES: list[tuple[str, int, bytes, ResponseMapping, str, str]] = [
    ("bid", 200, js({"bid": True, "price": 45.0}), ResponseMapping(), "bid", ""),
    ("bid-int-price", 200, js({"bid": True, "price": 45}), ResponseMapping(), "bid", ""),
    ("bid-flag-absent", 200, js({"price": 12.5}), ResponseMapping(), "bid", ""),
    ("http-204", 204, b"", ResponseMapping(), "no_bid", "no bid"),
    ("bid-false", 200, js({"bid": False}), ResponseMapping(), "no_bid", "no bid"),
    (
        "bid-false-garbage-price",
        200,
        js({"bid": False, "price": "x"}),
        ResponseMapping(),
        "no_bid",
        "no bid",
    ),
    (
        "bid-not-bool",
        200,
        js({"bid": "yes", "price": 1}),
        ResponseMapping(),
        "error",
        "bid is not a boolean",
    ),
    ("price-missing", 200, js({"bid": True}), ResponseMapping(), "error", "price missing"),
    (
        "price-null",
        200,
        js({"bid": True, "price": None}),
        ResponseMapping(),
        "error",
        "price missing",
    ),
    (
        "price-string",
        200,
        js({"bid": True, "price": "45"}),
        ResponseMapping(),
        "error",
        "price is not a number",
    ),
    (
        "price-bool",
        200,
        js({"bid": True, "price": True}),
        ResponseMapping(),
        "error",
        "price is not a number",
    ),
    ("price-negative", 200, js({"bid": True, "price": -1}), ResponseMapping(), "error", "negative"),
    (
        "price-nan-raw",
        200,
        b'{"bid": true, "price": NaN}',
        ResponseMapping(),
        "error",
        "invalid JSON",
    ),
    (
        "price-inf-raw",
        200,
        b'{"bid": true, "price": 1e999}',
        ResponseMapping(),
        "error",
        "invalid JSON",
    ),
    ("price-absurd", 200, js({"bid": True, "price": 1e9}), ResponseMapping(), "error", "absurd"),
    ("not-json", 200, b"OK thanks", ResponseMapping(), "error", "invalid JSON"),
    ("empty-200", 200, b"", ResponseMapping(), "error", "invalid JSON"),
    ("json-array", 200, js([1, 2]), ResponseMapping(), "error", "invalid JSON"),
    (
        "html-500",
        500,
        b"<html><body>Internal Server Error</body></html>",
        ResponseMapping(),
        "error",
        "http 500",
    ),
    ("redirect", 302, b"", ResponseMapping(), "error", "http 302"),
    (
        "exclusive-string",
        200,
        js({"bid": True, "price": 5, "exclusive": "yes"}),
        ResponseMapping(),
        "error",
        "exclusive is not a boolean",
    ),
    (
        "conditions-not-object",
        200,
        js({"price": 5, "conditions": ["CA"]}),
        ResponseMapping(),
        "error",
        "invalid conditions",
    ),
    (
        "conditions-states-string",
        200,
        js({"price": 5, "conditions": {"states": "CA"}}),
        ResponseMapping(),
        "error",
        "invalid conditions: states",
    ),
    (
        "conditions-age-negative",
        200,
        js({"price": 5, "conditions": {"max_age": -3}}),
        ResponseMapping(),
        "error",
        "invalid conditions: max_age",
    ),
    (
        "conditions-consent-string",
        200,
        js({"price": 5, "conditions": {"require_consent": "true"}}),
        ResponseMapping(),
        "error",
        "invalid conditions: require_consent",
    ),
    (
        "buyer-id-object",
        200,
        js({"price": 5, "buyer_id": {"x": 1}}),
        ResponseMapping(),
        "error",
        "buyer_id",
    ),
    (
        "nested-bid",
        200,
        js({"data": {"bid": True, "offer": {"amount": 31.5, "exclusive": True}}}),
        NESTED,
        "bid",
        "",
    ),
    ("nested-no-bid", 200, js({"data": {"bid": False}}), NESTED, "no_bid", "no bid"),
    ("nested-price-missing", 200, js({"data": {"offer": {}}}), NESTED, "error", "price missing"),
    (
        "nested-path-through-scalar",
        200,
        js({"data": {"offer": 7}}),
        NESTED,
        "error",
        "price missing",
    ),
]


@pytest.mark.parametrize(
    ("http_status", "body", "mapping", "want_status", "want_reason"),
    [c[1:] for c in PING_CASES],
    ids=[c[0] for c in PING_CASES],
)
def test_parse_ping_response(
    http_status: int, body: bytes, mapping: ResponseMapping, want_status: str, want_reason: str
) -> None:
    status, price, exclusive, _ref, _cond, reason = parse_ping_response(
        http_status, body, mapping, max_price=MAX_PRICE
    )
    assert status == want_status
    if want_status == "bid":
        assert reason == ""
        assert price is not None and price > 0
    else:
        assert want_reason in reason
        assert price is None and exclusive is False
    assert len(reason) <= 200
    assert "Internal Server Error" not in reason  # body never copied into the reason


def test_parse_ping_full_default_response() -> None:
    body = js(
        {
            "bid": True,
            "price": 45.00,
            "exclusive": False,
            "buyer_id": "buyer_123",
            "conditions": {
                "max_age_minutes": 5,
                "states": ["CA", "TX"],
                "require_consent": True,
                "exclusive_required": False,
                "unknown_future_key": 1,
            },
        }
    )
    assert parse_ping_response(200, body, ResponseMapping(), max_price=MAX_PRICE) == (
        "bid",
        45.0,
        False,
        "buyer_123",
        Conditions(max_age_minutes=5.0, states=("CA", "TX"), require_consent=True),
        "",
    )


def test_parse_ping_nested_mapping_values() -> None:
    body = js(
        {
            "meta": {"buyer": 42},
            "data": {
                "bid": True,
                "offer": {"amount": 31.5, "exclusive": True},
                "terms": {"max_age": 10, "exclusive_required": True},
            },
        }
    )
    status, price, exclusive, ref, cond, _ = parse_ping_response(
        200, body, NESTED, max_price=MAX_PRICE
    )
    assert (status, price, exclusive, ref) == ("bid", 31.5, True, "42")
    assert cond == Conditions(max_age_minutes=10.0, exclusive_required=True)


def test_parse_ping_max_age_alias_and_conflict() -> None:
    def cond(c: dict[str, Any]) -> tuple[str, Conditions, str]:
        s, _, _, _, parsed, reason = parse_ping_response(
            200, js({"price": 1, "conditions": c}), ResponseMapping(), max_price=MAX_PRICE
        )
        return s, parsed, reason

    assert cond({"max_age": 5})[1].max_age_minutes == 5.0
    assert cond({"max_age_minutes": 7.5})[1].max_age_minutes == 7.5
    assert cond({"max_age": 5, "max_age_minutes": 5})[1].max_age_minutes == 5.0
    status, _, reason = cond({"max_age": 5, "max_age_minutes": 6})
    assert status == "error" and "disagree" in reason
    assert cond({})[1] == Conditions()


def test_parse_ping_price_bounds() -> None:
    def run(price: float, **kw: float) -> tuple[str, str]:
        s, _, _, _, _, reason = parse_ping_response(
            200, js({"price": price}), ResponseMapping(), **{"max_price": 100.0, **kw}
        )
        return s, reason

    assert run(100.0) == ("bid", "")
    assert run(0.0) == ("bid", "")
    assert run(100.01)[0] == "error" and "absurd" in run(100.01)[1]
    # a low price is a bid: the flow's min_price is the auction's to apply (the ping row
    # then says why it cannot win), not a malformed answer
    assert run(0.01) == ("bid", "")


@pytest.mark.parametrize(
    ("price", "text"),
    [
        (1e308, "price 1e+308 above max_price 100.00 (absurd)"),
        (1.7976931348623157e308, "price 1.79769e+308 above max_price 100.00 (absurd)"),
        (-1e308, "price -1e+308 is negative"),
        (123456789012.5, "price 1.23457e+11 above max_price 100.00 (absurd)"),
        (150.5, "price 150.50 above max_price 100.00 (absurd)"),
    ],
)
def test_an_absurd_price_is_readable_in_the_reason(price: float, text: str) -> None:
    status, _, _, _, _, reason = parse_ping_response(
        200, js({"price": price}), ResponseMapping(), max_price=100.0
    )
    assert (status, reason) == ("error", text)


# (case id, http status, body, mapping, expected status, expected reason fragment)
POST_CASES: list[tuple[str, int, bytes, PostResponseMapping, str, str]] = [
    ("accepted-true", 200, js({"accepted": True}), PostResponseMapping(), "accepted", ""),
    ("status-accepted", 201, js({"status": "accepted"}), PostResponseMapping(), "accepted", ""),
    ("status-ACCEPTED", 200, js({"status": "ACCEPTED"}), PostResponseMapping(), "accepted", ""),
    (
        "rejected-with-reason",
        200,
        js({"accepted": False, "reason": "duplicate lead"}),
        PostResponseMapping(),
        "rejected",
        "duplicate lead",
    ),
    (
        "status-rejected",
        200,
        js({"status": "rejected"}),
        PostResponseMapping(),
        "rejected",
        "rejected",
    ),
    (
        "rejected-long-reason",
        200,
        js({"accepted": False, "reason": "x" * 5000}),
        PostResponseMapping(),
        "rejected",
        "xxx",
    ),
    (
        "nested-mapping",
        200,
        js({"result": {"ok": False, "why": {"text": "out of area"}}}),
        PostResponseMapping(accepted="result.ok", reason="result.why.text"),
        "rejected",
        "out of area",
    ),
    ("http-500", 500, b"<html>boom</html>", PostResponseMapping(), "error", "http 500"),
    (
        "http-422-json",
        422,
        js({"accepted": False, "reason": "bad zip"}),
        PostResponseMapping(),
        "error",
        "http 422: bad zip",
    ),
    ("not-json", 200, b"thanks!", PostResponseMapping(), "error", "invalid JSON"),
    ("empty-object", 200, js({}), PostResponseMapping(), "error", "no accepted or status"),
    (
        "accepted-string",
        200,
        js({"accepted": "true"}),
        PostResponseMapping(),
        "error",
        "accepted is not a boolean",
    ),
    (
        "unknown-status",
        200,
        js({"status": "pending"}),
        PostResponseMapping(),
        "error",
        "unknown status",
    ),
]


@pytest.mark.parametrize(
    ("http_status", "body", "mapping", "want_status", "want_reason"),
    [c[1:] for c in POST_CASES],
    ids=[c[0] for c in POST_CASES],
)
def test_parse_post_response(
    http_status: int,
    body: bytes,
    mapping: PostResponseMapping,
    want_status: str,
    want_reason: str,
) -> None:
    status, reason = parse_post_response(http_status, body, mapping)
    assert status == want_status
    assert want_reason in reason
    assert len(reason) <= 200
    assert "<html>" not in reason


# --------------------------------------------------------------------------- client + fake


PING_BODY = {"ping_id": "p-1", "flow": "solar", "tmax_ms": 450, "state": "CA", "zip": "902"}


@pytest.mark.parametrize(
    ("http_status", "body", "mapping", "want_status", "want_reason"),
    [c[1:] for c in PING_CASES],
    ids=[c[0] for c in PING_CASES],
)
async def test_client_ping_cases(
    http_status: int, body: bytes, mapping: ResponseMapping, want_status: str, want_reason: str
) -> None:
    fake = FakeTransport([(http_status, body)])
    async with BuyerClient(fake) as client:
        out = await client.ping(make_buyer(response=mapping), PING_BODY, 0.5, max_price=MAX_PRICE)
    assert fake.closed
    assert out.status == want_status
    assert want_reason in out.reason
    assert out.http_status == http_status
    assert out.latency_ms >= 0


async def test_client_ping_request_shape() -> None:
    fake = FakeTransport([(200, js({"bid": True, "price": 45, "buyer_id": "buyer_123"}))])
    client = BuyerClient(fake)
    out = await client.ping(make_buyer(), PING_BODY, 0.45, max_price=MAX_PRICE)
    await client.aclose()

    assert out == PingOutcome(
        status="bid",
        latency_ms=out.latency_ms,
        price=45.0,
        buyer_ref="buyer_123",
        http_status=200,
    )
    (sent,) = fake.requests
    assert sent.url == "http://buyer.test/ping"
    assert orjson.loads(sent.body) == PING_BODY
    assert sent.timeout_s == 0.45
    assert sent.headers["X-Api-Key"] == SECRET  # the secret value, unwrapped
    # the protocol's Content-Type wins over a configured one (any case)
    assert {k: v for k, v in sent.headers.items() if k.lower() == "content-type"} == {
        "Content-Type": "application/json"
    }
    assert "Idempotency-Key" not in sent.headers


async def test_client_post_sends_idempotency_key() -> None:
    fake = FakeTransport([(200, js({"accepted": True}))])
    async with BuyerClient(fake) as client:
        body = {**PING_BODY, "post_id": "post-9", "price": 45.0, "exclusive": True}
        out = await client.post(make_buyer(), body, "post-9", 3.0)
        again = await client.post(make_buyer(), body, "post-9", 3.0)
    assert out.status == again.status == "accepted"
    assert out.http_status == 200
    assert [r.headers["Idempotency-Key"] for r in fake.requests] == ["post-9", "post-9"]
    assert all(r.url == "http://buyer.test/post" for r in fake.requests)
    assert fake.requests[0].headers["Content-Type"] == "application/json"
    assert fake.requests[0].headers["X-Api-Key"] == SECRET


@pytest.mark.parametrize(
    ("http_status", "body", "mapping", "want_status", "want_reason"),
    [c[1:] for c in POST_CASES],
    ids=[c[0] for c in POST_CASES],
)
async def test_client_post_cases(
    http_status: int,
    body: bytes,
    mapping: PostResponseMapping,
    want_status: str,
    want_reason: str,
) -> None:
    fake = FakeTransport([(http_status, body)])
    async with BuyerClient(fake) as client:
        out = await client.post(make_buyer(post_response=mapping), {}, "post-1", 1.0)
    assert (out.status, out.http_status) == (want_status, http_status)
    assert want_reason in out.reason


@pytest.mark.parametrize(
    ("failure", "want_status", "want_reason"),
    [
        (TimeoutError(), "timeout", "no answer within 200 ms"),
        (TimeoutError(), "timeout", "no answer within 200 ms"),
        (
            BuyerTransportError("connection failed: Connection refused"),
            "error",
            "connection failed: Connection refused",
        ),
        (RuntimeError(f"bug with {SECRET}"), "error", "transport failure: RuntimeError"),
    ],
    ids=["timeout", "asyncio-timeout", "connection-error", "transport-bug"],
)
async def test_client_transport_failures(
    failure: BaseException, want_status: str, want_reason: str
) -> None:
    fake = FakeTransport([failure])
    async with BuyerClient(fake) as client:
        ping = await client.ping(make_buyer(), PING_BODY, 0.2, max_price=MAX_PRICE)
        post = await client.post(make_buyer(), {}, "post-1", 0.2)
    for out in (ping, post):
        assert (out.status, out.reason, out.http_status) == (want_status, want_reason, None)
        assert SECRET not in out.reason


async def test_client_enforces_timeout_on_slow_transport() -> None:
    # The transport would answer with a bid after 1 s; the client's deadline wins.
    fake = FakeTransport([(200, js({"price": 10}))], delay_s=1.0)
    async with BuyerClient(fake) as client:
        out = await client.ping(make_buyer(), PING_BODY, 0.05, max_price=MAX_PRICE)
        late_post = await client.post(make_buyer(), {}, "post-1", 0.05)
    assert out.status == "timeout" and out.price is None
    assert out.reason == "no answer within 50 ms"
    assert 45 <= out.latency_ms < 300
    assert late_post.status == "timeout"


async def test_client_latency_measures_the_request() -> None:
    fake = FakeTransport([(200, js({"price": 10}))], delay_s=0.03)
    async with BuyerClient(fake) as client:
        out = await client.ping(make_buyer(), PING_BODY, 1.0, max_price=MAX_PRICE)
    assert out.status == "bid"
    assert 25 <= out.latency_ms < 500


async def test_client_no_time_left_does_not_send() -> None:
    fake = FakeTransport([(200, js({"price": 10}))])
    async with BuyerClient(fake) as client:
        out = await client.ping(make_buyer(), PING_BODY, 0.0, max_price=MAX_PRICE)
    assert out.status == "timeout"
    assert fake.requests == []


async def test_client_caps_response_size_for_any_transport() -> None:
    fake = FakeTransport([(200, js({"price": 10, "pad": "x" * 2000}))])
    async with BuyerClient(fake, max_response_bytes=1024) as client:
        out = await client.ping(make_buyer(), PING_BODY, 1.0, max_price=MAX_PRICE)
    assert (out.status, out.reason) == ("error", "response too large")


async def test_client_cancellation_propagates() -> None:
    fake = FakeTransport([(200, js({"price": 10}))], delay_s=5.0)
    async with BuyerClient(fake) as client:
        task = asyncio.create_task(client.ping(make_buyer(), PING_BODY, 10.0, max_price=1.0))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# --------------------------------------------------------------------------- real HTTP


@dataclass
class Buyer:
    url: str
    calls: dict[str, int]


@pytest.fixture
async def real_buyer() -> AsyncIterator[Buyer]:
    calls: dict[str, int] = {}

    def count(request: web.Request) -> int:
        calls[request.path] = calls.get(request.path, 0) + 1
        return calls[request.path]

    async def bid(request: web.Request) -> web.Response:
        count(request)
        assert request.headers["X-Api-Key"] == SECRET
        assert request.headers["Content-Type"] == "application/json"
        ping = await request.json()
        return web.json_response({"bid": True, "price": 45.0, "buyer_id": ping["ping_id"]})

    async def slow(request: web.Request) -> web.Response:
        count(request)
        await asyncio.sleep(2.0)
        return web.json_response({"bid": True, "price": 1.0})

    async def drop_first(request: web.Request) -> web.Response:
        if count(request) == 1:  # the buyer's end of the socket dies without an answer
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(0.1)
        return web.json_response({"accepted": True})

    async def huge(request: web.Request) -> web.Response:
        count(request)
        return web.Response(body=b"x" * 100_000, content_type="application/json")

    app = web.Application()
    app.router.add_post("/bid", bid)
    app.router.add_post("/slow", slow)
    app.router.add_post("/drop_first", drop_first)
    app.router.add_post("/huge", huge)
    # handler_cancellation: the slow handler stops when the client gives up.
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Buyer(f"http://127.0.0.1:{port}", calls)
    finally:
        await runner.cleanup()


def real_config(url: str, ping: str, post: str = "/drop_first") -> BuyerConfig:
    return BuyerConfig.model_validate(
        {
            "id": "real",
            "flows": ["solar"],
            "ping_url": url + ping,
            "post_url": url + post,
            "headers": {"X-Api-Key": SECRET},
        }
    )


async def test_aiohttp_transport_real_bid_and_real_timeout(real_buyer: Buyer) -> None:
    async with BuyerClient(AiohttpTransport()) as client:
        bid = await client.ping(
            real_config(real_buyer.url, "/bid"), PING_BODY, 0.5, max_price=MAX_PRICE
        )
        assert (bid.status, bid.price, bid.buyer_ref, bid.http_status) == (
            "bid",
            45.0,
            "p-1",
            200,
        )

        started = time.monotonic()
        late = await client.ping(
            real_config(real_buyer.url, "/slow"), PING_BODY, 0.2, max_price=MAX_PRICE
        )
        elapsed = time.monotonic() - started
    assert (late.status, late.reason, late.price) == ("timeout", "no answer within 200 ms", None)
    assert 0.19 <= elapsed < 0.3
    assert 190 <= late.latency_ms < 300


async def test_aiohttp_transport_retries_a_dropped_connection_once(real_buyer: Buyer) -> None:
    async with BuyerClient(AiohttpTransport()) as client:
        out = await client.post(real_config(real_buyer.url, "/bid"), {"x": 1}, "post-1", 2.0)
    assert out.status == "accepted"
    assert real_buyer.calls["/drop_first"] == 2


async def test_aiohttp_transport_errors(real_buyer: Buyer) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    async with BuyerClient(AiohttpTransport(max_response_bytes=65536)) as client:
        big = await client.ping(
            real_config(real_buyer.url, "/huge"), PING_BODY, 1.0, max_price=MAX_PRICE
        )
        refused = await client.ping(real_config(dead, "/bid"), PING_BODY, 1.0, max_price=1.0)
    assert (big.status, big.reason) == ("error", "response too large")
    assert (refused.status, refused.reason) == ("error", "connection failed: Connection refused")


async def test_aiohttp_transport_lazy_session_and_close() -> None:
    transport = AiohttpTransport()
    await transport.aclose()  # never used: nothing to close, no session created
    with pytest.raises(RuntimeError):
        await transport.post("http://127.0.0.1:9/", {}, b"{}", 0.1)
