"""The one connector to buyers' HTTP endpoints: pings and posts (CONTRACT §2, §3).

Layers, from pure to impure:

* :func:`parse_ping_response` / :func:`parse_post_response` turn ``(http status, body)`` into
  an outcome. Pure and total: whatever bytes a buyer sends, they return a status and a reason.
* :class:`Transport` is the seam: ``post(url, headers, body, timeout_s) -> (status, body)``.
  Unit tests use a fake; production uses :class:`AiohttpTransport`, one shared keep-alive
  ``aiohttp.ClientSession`` (FIELD-NOTES: httpx's pool collapses at fan-out concurrency).
* :class:`BuyerClient` builds the request (JSON via orjson, configured headers with their
  secrets, ``Idempotency-Key`` on posts), enforces the timeout, measures latency and never
  raises for anything a buyer does: a bad buyer is a recorded outcome, not a crash.

Reason strings are meant for the ``pings`` / ``posts`` tables: short, low-cardinality, never
a secret, and never more than ~200 characters of anything the buyer sent.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal, Protocol

import aiohttp
import orjson

# What this client reads of a buyer's configuration. Structural: ``streams.settings``'
# ``BuyerConfig`` and its mappings fit them, and connectors import nothing from streams/.


class ResponseMapping(Protocol):
    """Where a buyer's ping response keeps each value (dotted paths into the JSON)."""

    @property
    def bid(self) -> str: ...
    @property
    def price(self) -> str: ...
    @property
    def exclusive(self) -> str: ...
    @property
    def buyer_id(self) -> str: ...
    @property
    def conditions(self) -> str: ...


class PostResponseMapping(Protocol):
    """Where a buyer's post response keeps its answer."""

    @property
    def accepted(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def reason(self) -> str: ...


class BuyerConfig(Protocol):
    """A buyer's endpoints, headers and response mappings."""

    @property
    def ping_url(self) -> str: ...
    @property
    def post_url(self) -> str: ...
    @property
    def headers(self) -> Mapping[str, Any]: ...
    @property
    def response(self) -> ResponseMapping: ...
    @property
    def post_response(self) -> PostResponseMapping: ...


__all__ = [
    "AiohttpTransport",
    "BuyerConfig",
    "PostResponseMapping",
    "ResponseMapping",
    "BuyerClient",
    "BuyerTransportError",
    "Conditions",
    "PingOutcome",
    "PingStatus",
    "PostOutcome",
    "PostStatus",
    "Transport",
    "parse_ping_response",
    "parse_post_response",
]

log = logging.getLogger(__name__)

PingStatus = Literal["bid", "no_bid", "timeout", "error"]
PostStatus = Literal["accepted", "rejected", "error", "timeout"]

DEFAULT_MAX_RESPONSE_BYTES: Final = 64 * 1024
#: Cap on any buyer-supplied text copied into a reason (rejection reasons, buyer ids).
MAX_REASON_CHARS: Final = 200
MAX_BUYER_REF_CHARS: Final = 128
USER_AGENT: Final = "pingpost/0.1"

_MISSING: Final = object()


# --------------------------------------------------------------------------- outcomes


@dataclass(frozen=True, slots=True)
class Conditions:
    """What a bid is conditional on; the strategy checks these before selling."""

    max_age_minutes: float | None = None
    states: tuple[str, ...] | None = None
    require_consent: bool = False
    exclusive_required: bool = False


@dataclass(frozen=True, slots=True)
class PingOutcome:
    status: PingStatus
    latency_ms: float
    price: float | None = None
    exclusive: bool = False
    #: The ``buyer_id`` the buyer put in its response (informational).
    buyer_ref: str | None = None
    conditions: Conditions = Conditions()
    #: Why this is not a bid ("" for a bid).
    reason: str = ""
    http_status: int | None = None


@dataclass(frozen=True, slots=True)
class PostOutcome:
    status: PostStatus
    latency_ms: float
    reason: str = ""
    http_status: int | None = None


# --------------------------------------------------------------------------- parsing


class _Invalid(Exception):
    """A malformed response value; the message becomes the outcome's reason."""


def _lookup(doc: Any, path: str) -> Any:
    """Follow a dotted path (``data.offer.amount``; digits index lists). ``null`` is absent."""
    node = doc
    for part in path.split("."):
        if isinstance(node, dict):
            node = node.get(part, _MISSING)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
        if node is _MISSING:
            return _MISSING
    return _MISSING if node is None else node


def _clip(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """One line, at most ``limit`` characters: buyer text is untrusted and unbounded."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _price_text(price: float) -> str:
    """A price for a reason: ``45.00``, or ``1e+308`` when two decimals would be a wall of
    digits (at most ~13 characters either way)."""
    return f"{price:.2f}" if abs(price) < 1e9 else f"{price:.6g}"


def _is_number(v: Any) -> bool:
    # bool is an int subclass; a JSON ``true`` is not a price.
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _load_object(body: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _Invalid("invalid JSON") from None
    if not isinstance(doc, dict):
        raise _Invalid("invalid JSON: expected an object")
    return doc


def _opt_bool(doc: Any, path: str, name: str) -> bool | None:
    v = _lookup(doc, path)
    if v is _MISSING:
        return None
    if not isinstance(v, bool):
        raise _Invalid(f"{name} is not a boolean")
    return v


def _parse_conditions(raw: Any) -> Conditions:
    if raw is _MISSING:
        return Conditions()
    if not isinstance(raw, dict):
        raise _Invalid("invalid conditions: not an object")

    age: float | None = None
    for key in ("max_age_minutes", "max_age"):  # contract: max_age is an alias
        v = raw.get(key)
        if v is None:
            continue
        if not _is_number(v) or not math.isfinite(v) or v <= 0:
            raise _Invalid(f"invalid conditions: {key} is not a positive number")
        if age is not None and float(v) != age:
            raise _Invalid("invalid conditions: max_age and max_age_minutes disagree")
        age = float(v)

    states_raw = raw.get("states")
    states: tuple[str, ...] | None = None
    if states_raw is not None:
        if not isinstance(states_raw, list) or not all(isinstance(s, str) for s in states_raw):
            raise _Invalid("invalid conditions: states is not a list of strings")
        states = tuple(states_raw)

    flags: dict[str, bool] = {}
    for key in ("require_consent", "exclusive_required"):
        v = raw.get(key)
        if v is None:
            flags[key] = False
        elif isinstance(v, bool):
            flags[key] = v
        else:
            raise _Invalid(f"invalid conditions: {key} is not a boolean")

    # Unknown keys are ignored: buyers may send more than we act on.
    return Conditions(
        max_age_minutes=age,
        states=states,
        require_consent=flags["require_consent"],
        exclusive_required=flags["exclusive_required"],
    )


def _buyer_ref(doc: Any, path: str) -> str | None:
    v = _lookup(doc, path)
    if v is _MISSING:
        return None
    if isinstance(v, str):
        return _clip(v, MAX_BUYER_REF_CHARS)
    if isinstance(v, int) and not isinstance(v, bool):  # numeric ids are common
        return str(v)
    raise _Invalid("buyer_id is not a string")


def parse_ping_response(
    http_status: int,
    body: bytes,
    mapping: ResponseMapping,
    *,
    max_price: float,
) -> tuple[PingStatus, float | None, bool, str | None, Conditions, str]:
    """Classify one ping answer: ``(status, price, exclusive, buyer_ref, conditions, reason)``.

    Only ``"bid"`` or ``"no_bid"``/``"error"`` come out of here (timeouts happen before a
    response exists). A response without a ``bid`` flag is treated as a bid, so its price
    must be valid; ``bid: false`` is a no-bid whatever else the body holds.
    """
    if http_status == 204:
        return "no_bid", None, False, None, Conditions(), "no bid (http 204)"
    if not 200 <= http_status < 300:
        return "error", None, False, None, Conditions(), f"http {http_status}"
    try:
        doc = _load_object(body)
        if _opt_bool(doc, mapping.bid, "bid") is False:
            return "no_bid", None, False, None, Conditions(), "no bid"

        price = _lookup(doc, mapping.price)
        if price is _MISSING:
            raise _Invalid("price missing")
        if not _is_number(price):  # "45" included: the contract's price is a JSON number
            raise _Invalid("price is not a number")
        price = float(price)
        if not math.isfinite(price):  # unreachable via orjson today; cheap insurance
            raise _Invalid("price is not finite")
        if price < 0:
            raise _Invalid(f"price {_price_text(price)} is negative")
        if price > max_price:
            raise _Invalid(
                f"price {_price_text(price)} above max_price {_price_text(max_price)} (absurd)"
            )

        exclusive = _opt_bool(doc, mapping.exclusive, "exclusive") or False
        conditions = _parse_conditions(_lookup(doc, mapping.conditions))
        ref = _buyer_ref(doc, mapping.buyer_id)
    except _Invalid as exc:
        return "error", None, False, None, Conditions(), str(exc)
    return "bid", price, exclusive, ref, conditions, ""


def parse_post_response(
    http_status: int, body: bytes, mapping: PostResponseMapping
) -> tuple[PostStatus, str]:
    """Classify one post answer: ``(status, reason)``.

    ``accepted`` (a boolean) decides when present; otherwise ``status`` must be
    ``"accepted"`` or ``"rejected"`` (case-insensitive). Anything else from a 2xx is garbage,
    i.e. a delivery error: the sale must be explicit.
    """
    if not 200 <= http_status < 300:
        return "error", _with_buyer_reason(f"http {http_status}", body, mapping)
    try:
        doc = _load_object(body)
        accepted = _opt_bool(doc, mapping.accepted, "accepted")
        if accepted is None:
            status = _lookup(doc, mapping.status)
            if status is _MISSING:
                raise _Invalid("no accepted or status in response")
            if not isinstance(status, str) or status.lower() not in ("accepted", "rejected"):
                raise _Invalid("unknown status")
            accepted = status.lower() == "accepted"
    except _Invalid as exc:
        return "error", str(exc)
    if accepted:
        return "accepted", ""
    return "rejected", _buyer_reason(doc, mapping) or "rejected"


def _buyer_reason(doc: Any, mapping: PostResponseMapping) -> str:
    v = _lookup(doc, mapping.reason)
    if v is _MISSING:
        return ""
    return _clip(v if isinstance(v, str) else orjson.dumps(v).decode())


def _with_buyer_reason(prefix: str, body: bytes, mapping: PostResponseMapping) -> str:
    """``http 422: duplicate lead`` when the buyer explains its error in JSON."""
    try:
        reason = _buyer_reason(_load_object(body), mapping)
    except _Invalid:
        return prefix
    return _clip(f"{prefix}: {reason}") if reason else prefix


# --------------------------------------------------------------------------- transport


class BuyerTransportError(Exception):
    """The request did not get an HTTP answer (connection refused, reset, bad HTTP, ...).

    ``reason`` is safe to record: it never holds a URL, a header or a secret.
    ``retriable`` says whether sending the same request again could succeed.
    """

    def __init__(self, reason: str, *, retriable: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retriable = retriable


class Transport(Protocol):
    async def post(
        self, url: str, headers: Mapping[str, str], body: bytes, timeout_s: float
    ) -> tuple[int, bytes]:
        """POST and return ``(status, body)``.

        Raises ``TimeoutError`` when no full answer arrived within ``timeout_s``, and
        :class:`BuyerTransportError` when there is no HTTP answer at all.
        """
        ...

    async def aclose(self) -> None: ...


def _translate(exc: aiohttp.ClientError) -> BuyerTransportError:
    """Map aiohttp errors to safe reasons (``str(exc)`` can embed the URL and its query)."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return BuyerTransportError("connection failed: TLS certificate rejected", retriable=False)
    if isinstance(exc, aiohttp.ClientSSLError):
        return BuyerTransportError("connection failed: TLS error")
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return BuyerTransportError("connection failed: DNS lookup failed")
    if isinstance(exc, aiohttp.ClientOSError):  # incl. ClientConnectorError
        # "Connection refused" rather than "Connect call failed ('10.0.0.7', 443)": one
        # groupable reason per cause in the pings table.
        detail = os.strerror(exc.errno) if exc.errno else type(exc).__name__
        return BuyerTransportError(f"connection failed: {_clip(detail, 80)}")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return BuyerTransportError("connection failed: server disconnected")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return BuyerTransportError("connection failed: incomplete response body")
    if isinstance(exc, aiohttp.InvalidURL):
        return BuyerTransportError("invalid URL", retriable=False)
    if isinstance(exc, aiohttp.ClientResponseError):
        return BuyerTransportError("invalid HTTP response")
    return BuyerTransportError(f"connection failed: {type(exc).__name__}")


def _stale_connection(exc: BaseException) -> bool:
    """A reused keep-alive socket the buyer had already closed (not a refused connect)."""
    return isinstance(exc, aiohttp.ServerDisconnectedError) or (
        isinstance(exc, aiohttp.ClientOSError) and not isinstance(exc, aiohttp.ClientConnectorError)
    )


class AiohttpTransport:
    """One shared ``aiohttp.ClientSession`` with a keep-alive pool for every buyer.

    The session is created lazily on first use, inside the running loop that will use it
    (aiohttp binds a session to its loop). Redirects are not followed: a ping or post that
    is redirected is an error, and PII must never follow a redirect to another host.

    A request that fails on a dead keep-alive socket is retried once within the same
    timeout: aiohttp only does that for idempotent methods, and our POSTs are safe to repeat
    (a ping carries its ``ping_id``, a post its ``Idempotency-Key``).
    """

    def __init__(
        self,
        *,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        # Fan-out concurrency is bounded upstream (worker.max_inflight x buyers), so no
        # global cap; the per-host cap only stops one buyer from absorbing every socket.
        limit: int = 0,
        limit_per_host: int = 1000,
        ttl_dns_cache: int = 60,
        keepalive_timeout: float = 15.0,
    ) -> None:
        self._max_response_bytes = max_response_bytes
        self._connector_args: dict[str, Any] = {
            "limit": limit,
            "limit_per_host": limit_per_host,
            "ttl_dns_cache": ttl_dns_cache,
            "keepalive_timeout": keepalive_timeout,
        }
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            if self._closed:
                raise RuntimeError("AiohttpTransport is closed")
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(**self._connector_args),
                timeout=aiohttp.ClientTimeout(total=None),  # every request sets its own
                headers={"User-Agent": USER_AGENT},
                raise_for_status=False,
                cookie_jar=aiohttp.DummyCookieJar(),  # buyers are APIs; no state between leads
            )
        return self._session

    async def post(
        self, url: str, headers: Mapping[str, str], body: bytes, timeout_s: float
    ) -> tuple[int, bytes]:
        session = self._get_session()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        retried = False
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            try:
                return await self._once(session, url, headers, body, remaining)
            except TimeoutError:  # before ClientError: ServerTimeoutError is both
                raise
            except aiohttp.ClientError as exc:
                if not retried and _stale_connection(exc):
                    retried = True
                    log.info(
                        "retrying a request on a fresh connection after %s", type(exc).__name__
                    )
                    continue
                raise _translate(exc) from None

    async def _once(
        self,
        session: aiohttp.ClientSession,
        url: str,
        headers: Mapping[str, str],
        body: bytes,
        timeout_s: float,
    ) -> tuple[int, bytes]:
        async with session.post(
            url,
            data=body,
            headers=dict(headers),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            allow_redirects=False,
        ) as resp:
            return resp.status, await self._read_capped(resp)

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes:
        cap = self._max_response_bytes
        if resp.content_length is not None and resp.content_length > cap:
            raise BuyerTransportError("response too large", retriable=False)
        buf = bytearray()
        while True:
            chunk = await resp.content.read(cap + 1 - len(buf))
            if not chunk:
                return bytes(buf)
            buf += chunk
            if len(buf) > cap:
                raise BuyerTransportError("response too large", retriable=False)

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


# --------------------------------------------------------------------------- client


def _request_headers(buyer: BuyerConfig, extra: Mapping[str, str]) -> dict[str, str]:
    # Secrets are unwrapped here and only here, straight into the outgoing request.
    ours = {"Content-Type": "application/json", "Accept": "application/json", **extra}
    reserved = {k.lower() for k in ours}
    headers = {
        name: value.get_secret_value()
        for name, value in buyer.headers.items()
        if name.lower() not in reserved  # the protocol's own headers win over config
    }
    headers.update(ours)
    return headers


@dataclass(frozen=True, slots=True)
class _Failure:
    """No usable HTTP answer: the request timed out or never got one."""

    status: Literal["timeout", "error"]
    reason: str


def _timeout_reason(timeout_s: float) -> str:
    return f"no answer within {max(0, round(timeout_s * 1000))} ms"


class BuyerClient:
    """Pings and posts buyers. Never raises for anything a buyer does.

    Programming errors still raise: a body orjson cannot serialize is a bug in the caller.
    Cancellation propagates (the auction's deadline may cancel a ping in flight).
    """

    def __init__(
        self,
        transport: Transport | None = None,
        *,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        self._max_response_bytes = max_response_bytes
        self._transport: Transport = (
            transport
            if transport is not None
            else AiohttpTransport(max_response_bytes=max_response_bytes)
        )

    @property
    def transport(self) -> Transport:
        return self._transport

    async def __aenter__(self) -> BuyerClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def _send(
        self, url: str, headers: Mapping[str, str], payload: bytes, timeout_s: float
    ) -> tuple[tuple[int, bytes] | _Failure, float]:
        """``((http status, body) or a failure, latency_ms)``.

        Latency uses ``time.perf_counter`` (monotonic), not ``loop.time()``: under uvloop,
        which production runs, the loop clock has 1 ms resolution, too coarse for p50s of
        a few ms on a LAN.
        """
        start = time.perf_counter()
        answer: tuple[int, bytes] | _Failure
        try:
            if timeout_s <= 0:  # the deadline is already gone: don't bother the buyer
                raise TimeoutError
            # The transport times out too; this is the authoritative deadline whatever
            # transport is plugged in.
            async with asyncio.timeout(timeout_s):
                answer = await self._transport.post(url, headers, payload, timeout_s)
        except TimeoutError:
            answer = _Failure("timeout", _timeout_reason(timeout_s))
        except BuyerTransportError as exc:
            answer = _Failure("error", exc.reason)
        except Exception as exc:  # a transport bug must not take the auction down
            answer = _Failure("error", f"transport failure: {type(exc).__name__}")
        latency_ms = (time.perf_counter() - start) * 1000
        if not isinstance(answer, _Failure) and len(answer[1]) > self._max_response_bytes:
            answer = _Failure("error", "response too large")
        return answer, latency_ms

    async def ping(
        self,
        buyer: BuyerConfig,
        body: Mapping[str, Any],
        timeout_s: float,
        *,
        max_price: float,
    ) -> PingOutcome:
        payload = orjson.dumps(body)
        headers = _request_headers(buyer, {})
        answer, latency_ms = await self._send(buyer.ping_url, headers, payload, timeout_s)
        if isinstance(answer, _Failure):
            return PingOutcome(status=answer.status, latency_ms=latency_ms, reason=answer.reason)
        http_status, raw = answer
        status, price, exclusive, ref, conditions, reason = parse_ping_response(
            http_status, raw, buyer.response, max_price=max_price
        )
        return PingOutcome(
            status=status,
            latency_ms=latency_ms,
            price=price,
            exclusive=exclusive,
            buyer_ref=ref,
            conditions=conditions,
            reason=reason,
            http_status=http_status,
        )

    async def post(
        self,
        buyer: BuyerConfig,
        body: Mapping[str, Any],
        post_id: str,
        timeout_s: float,
    ) -> PostOutcome:
        payload = orjson.dumps(body)
        headers = _request_headers(buyer, {"Idempotency-Key": post_id})
        answer, latency_ms = await self._send(buyer.post_url, headers, payload, timeout_s)
        if isinstance(answer, _Failure):
            return PostOutcome(status=answer.status, latency_ms=latency_ms, reason=answer.reason)
        http_status, raw = answer
        status, reason = parse_post_response(http_status, raw, buyer.post_response)
        return PostOutcome(
            status=status, latency_ms=latency_ms, reason=reason, http_status=http_status
        )
