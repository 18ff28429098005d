"""The demo market: simulated buyers speaking the ping/post protocol (CONTRACT §2, §3).

One real aiohttp server per ``simulator.buyers`` entry. Every answer is a pure function of
(seed, buyer id, ping_id) for pings and (seed, buyer id, Idempotency-Key) for posts, so a
replay gives identical answers whatever the concurrency order. Each answer draws a fixed
number of uniforms in a fixed order, so changing one knob (say ``bid_probability``) at runtime
does not reshuffle the others for the same ping_id.

Control endpoints on every buyer server (for tests and the PII audit)::

    GET    /__sim/received?kind=ping|post   recorded requests (JSON list); &drain=1 also
                                            forgets the ones returned
    DELETE /__sim/received                  clear recordings and counters; ?kind=ping|post
                                            forgets that kind's recordings only
    GET    /__sim/stats                     counters
    PUT    /__sim/config                    change SimBuyerConfig fields at runtime
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from statistics import NormalDist
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson
from aiohttp import web
from pydantic import ValidationError

from streams.settings import BuyerConfig, Dist, Settings, SimBuyerConfig

__all__ = [
    "MAX_RECORDED",
    "PingAnswer",
    "PostAnswer",
    "SimConfigError",
    "SimulatedMarket",
    "decide_ping",
    "decide_post",
    "run",
]

#: Recorded requests kept per buyer (oldest dropped first).
MAX_RECORDED = 200_000
#: Idempotency answers kept per buyer (oldest evicted first); bounds memory in long demos.
MAX_POST_ANSWERS = 200_000

_Z99 = 2.326  # standard-normal 99th percentile
_STD_NORMAL = NormalDist()
_POST_LATENCY = Dist(median=20, p99=100)
_REJECT_REASONS = (
    "duplicate in CRM",
    "outside service area",
    "invalid phone number",
    "daily cap reached",
)
_JSON = "application/json"

RecordKind = Literal["ping", "post"]


class SimConfigError(ValueError):
    """A runtime config change is invalid; ``fields`` names the offending keys."""

    def __init__(self, fields: list[str], details: list[str]) -> None:
        super().__init__("; ".join(details))
        self.fields = fields
        self.details = details


# --------------------------------------------------------------------------- decisions


def _rng(seed: int, buyer_id: str, kind: str, key: str) -> random.Random:
    # A stable digest (not hash(), which is salted per process) so two processes agree.
    digest = hashlib.blake2b(
        f"{seed}\x1f{buyer_id}\x1f{kind}\x1f{key}".encode(), digest_size=8
    ).digest()
    return random.Random(int.from_bytes(digest, "big"))


def _lognormal(dist: Dist, u: float) -> float:
    """Quantile of the lognormal with the given median and p99 at uniform ``u``."""
    if dist.median <= 0:
        return 0.0
    sigma = max(0.0, math.log(dist.p99 / dist.median) / _Z99) if dist.p99 > 0 else 0.0
    # inv_cdf (one uniform per sample) rather than normalvariate (rejection sampling draws
    # a variable count), keeping the draw sequence fixed.
    z = _STD_NORMAL.inv_cdf(min(max(u, 1e-12), 1 - 1e-12))
    return dist.median * math.exp(sigma * z)


def _latency_ms(dist: Dist, u: float) -> float:
    # Cap the tail at 2x p99: the late tail is modelled explicitly by ``late_share``.
    return min(_lognormal(dist, u), 2 * max(dist.p99, dist.median))


@dataclass(frozen=True, slots=True)
class PingAnswer:
    status: int
    body: bytes
    content_type: str | None
    delay_s: float
    #: "bid" | "no_bid" | "error" | "garbage"
    outcome: str
    late: bool


@dataclass(frozen=True, slots=True)
class PostAnswer:
    status: int
    body: bytes
    content_type: str | None
    delay_s: float
    #: "accepted" | "rejected" | "error"
    outcome: str


def decide_ping(
    seed: int, buyer_id: str, ping_id: str, cfg: SimBuyerConfig, timeout_ms: int
) -> PingAnswer:
    """The buyer's answer to one ping: a pure function of its arguments."""
    rng = _rng(seed, buyer_id, "ping", ping_id)
    u_late, u_lat, u_late_extra, u_err, u_bid, u_price, u_excl, u_nobid = (
        rng.random() for _ in range(8)
    )
    late = u_late < cfg.late_share
    if cfg.mode == "slow":
        delay_ms, late = timeout_ms + 200.0, True
    elif late:
        delay_ms = timeout_ms + 50.0 + 250.0 * u_late_extra
    else:
        delay_ms = _latency_ms(cfg.latency_ms, u_lat)
    delay = delay_ms / 1000.0

    bid: dict[str, Any] = {
        "bid": True,
        "price": round(_lognormal(cfg.price, u_price), 2),
        "exclusive": u_excl < cfg.exclusive_share,
        "buyer_id": f"{buyer_id}-ext",
        "conditions": dict(cfg.conditions),
    }
    if cfg.response_shape == "nested":
        bid = {
            "offer": {
                "wants": True,
                "cpl": bid["price"],
                "excl": bid["exclusive"],
                "terms": bid["conditions"],
            },
            "buyer_id": bid["buyer_id"],
        }
    if cfg.mode == "non_json":
        return PingAnswer(200, b"<html>oops", "text/html", delay, "garbage", late)
    if cfg.mode == "http_500":
        return PingAnswer(500, b"internal error", "text/plain", delay, "error", late)
    if cfg.mode == "negative_price":
        return PingAnswer(200, orjson.dumps(_with_price(bid, -5)), _JSON, delay, "garbage", late)
    if cfg.mode == "string_price":
        body = orjson.dumps(_with_price(bid, "cheap"))
        return PingAnswer(200, body, _JSON, delay, "garbage", late)
    # "normal" and "slow" answer alike; "slow" only changes the delay.
    if u_err < cfg.error_rate:
        return PingAnswer(500, b"internal error", "text/plain", delay, "error", late)
    if u_bid < cfg.bid_probability:
        return PingAnswer(200, orjson.dumps(bid), _JSON, delay, "bid", late)
    if u_nobid < 0.5:
        return PingAnswer(204, b"", None, delay, "no_bid", late)
    no = {"offer": {"wants": False}} if cfg.response_shape == "nested" else {"bid": False}
    return PingAnswer(200, orjson.dumps(no), _JSON, delay, "no_bid", late)


def _with_price(bid: dict[str, Any], price: Any) -> dict[str, Any]:
    if "offer" in bid:
        return {**bid, "offer": {**bid["offer"], "cpl": price}}
    return bid | {"price": price}


def decide_post(seed: int, buyer_id: str, key: str, cfg: SimBuyerConfig) -> PostAnswer:
    """The buyer's answer to one post (by Idempotency-Key): a pure function of its arguments."""
    rng = _rng(seed, buyer_id, "post", key)
    u_lat, u_err, u_rej, u_reason, u_slow = (rng.random() for _ in range(5))
    delay = _latency_ms(_POST_LATENCY, u_lat) / 1000.0
    if u_slow < cfg.post_slow_share:
        delay = cfg.post_slow_ms / 1000.0
    if u_err < cfg.post_error_rate:
        return PostAnswer(500, b"internal error", "text/plain", delay, "error")
    if u_rej < cfg.post_reject_rate:
        reason = _REJECT_REASONS[
            min(int(u_reason * len(_REJECT_REASONS)), len(_REJECT_REASONS) - 1)
        ]
        doc: dict[str, Any] = {"accepted": False, "reason": reason}
        if cfg.response_shape == "nested":
            doc = {"result": {"ok": False, "why": reason}}
        return PostAnswer(200, orjson.dumps(doc), _JSON, delay, "rejected")
    doc = {"result": {"ok": True}} if cfg.response_shape == "nested" else {"accepted": True}
    return PostAnswer(200, orjson.dumps(doc), _JSON, delay, "accepted")


# --------------------------------------------------------------------------- one buyer


def _url_path(url: str, default: str) -> str:
    path = urlsplit(url).path
    return path if path and path != "/" else default


def _json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type=_JSON)


def pii_echo(post: dict[str, Any]) -> str:
    """The lead's PII as a careless buyer repeats it: names, the email upper-cased, the phone
    as digits and as (555) 800-0237 / +1 555-800-0237, the address, some twice."""
    first, last = str(post.get("first_name", "")), str(post.get("last_name", ""))
    email, address = str(post.get("email", "")), str(post.get("address", ""))
    digits = "".join(ch for ch in str(post.get("phone", "")) if ch.isdigit())[-10:]
    a, b, c = digits[:3], digits[3:6], digits[6:]
    return (
        f"{first} {last} ({last.upper()}) {email.upper()} / {email} tel 1{digits} "
        f"({a}) {b}-{c} +1 {a}-{b}-{c} at {address}; again {first} {address}"
    )


def _echo_response(answer: PostAnswer, post: dict[str, Any]) -> web.Response:
    echo = pii_echo(post)
    if answer.outcome == "rejected":
        return web.Response(
            status=200,
            content_type="application/json",
            body=orjson.dumps({"accepted": False, "reason": f"duplicate of {echo}"}),
        )
    return web.Response(status=answer.status, text=f"error for {echo}")


def _answer_response(status: int, body: bytes, content_type: str | None) -> web.Response:
    if status == 204:
        return web.Response(status=204)
    return web.Response(status=status, body=body, content_type=content_type)


@dataclass(slots=True)
class _Buyer:
    id: str
    buyer: BuyerConfig
    cfg: SimBuyerConfig
    ping_path: str
    post_path: str
    records: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=MAX_RECORDED))
    counts: dict[str, int] = field(default_factory=dict)
    post_answers: dict[str, PostAnswer] = field(default_factory=dict)
    #: Idempotency-Key -> when its answer is decided (loop time): a retry waits until then.
    post_ready_at: dict[str, float] = field(default_factory=dict)
    runner: web.AppRunner | None = None
    port: int | None = None

    def count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1


class SimulatedMarket:
    """The simulated buyers of ``settings.simulator``, each on its own real HTTP server."""

    def __init__(self, settings: Settings, *, host: str | None = None, record: bool = True) -> None:
        self._settings = settings
        self._seed = settings.simulator.seed
        self._host = host or settings.simulator.host
        self._record = record
        self._buyers: dict[str, _Buyer] = {}
        for buyer_id, cfg in settings.simulator.buyers.items():
            bc = settings.buyer(buyer_id)
            ping_path = _url_path(bc.ping_url, "/ping")
            post_path = _url_path(bc.post_url, "/post")
            if ping_path == post_path:
                raise ValueError(f"buyer {buyer_id}: ping_url and post_url share path {ping_path}")
            self._buyers[buyer_id] = _Buyer(buyer_id, bc, cfg, ping_path, post_path)
        # Pending simulated-latency waits; woken on stop() so shutdown does not wait for them.
        self._sleepers: set[asyncio.Future[None]] = set()
        self._stopping = False

    # -- lifecycle

    async def start(self) -> None:
        self._stopping = False
        try:
            for b in self._buyers.values():
                await self._start_buyer(b)
        except BaseException:
            await self.stop()
            raise

    async def _start_buyer(self, b: _Buyer) -> None:
        app = web.Application()
        app.router.add_post(b.ping_path, partial(self._on_ping, b))
        app.router.add_post(b.post_path, partial(self._on_post, b))
        app.router.add_get("/__sim/received", partial(self._on_received, b))
        app.router.add_delete("/__sim/received", partial(self._on_clear, b))
        app.router.add_get("/__sim/stats", partial(self._on_stats, b))
        app.router.add_put("/__sim/config", partial(self._on_config, b))
        # No access log: per-request logging is the largest avoidable server overhead.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        b.runner = runner
        site = web.TCPSite(runner, self._host, b.cfg.port)
        try:
            await site.start()
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"buyer {b.id}: cannot listen on {self._host}:{b.cfg.port}: {exc.strerror}",
            ) from exc
        b.port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        self._stopping = True
        for fut in list(self._sleepers):
            if not fut.done():
                fut.set_result(None)
        for b in self._buyers.values():
            if b.runner is not None:
                await b.runner.cleanup()
                b.runner = None
                b.port = None

    async def __aenter__(self) -> SimulatedMarket:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- addressing

    @property
    def buyer_ids(self) -> list[str]:
        return list(self._buyers)

    def port_of(self, buyer_id: str) -> int:
        port = self._buyers[buyer_id].port
        if port is None:
            raise RuntimeError(f"buyer {buyer_id} is not running")
        return port

    def url_of(self, buyer_id: str) -> str:
        """Base URL of the buyer's server, e.g. ``http://127.0.0.1:9101``."""
        host = self._host
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"  # a wildcard bind is reachable on loopback
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port_of(buyer_id)}"

    def ping_url(self, buyer_id: str) -> str:
        return self.url_of(buyer_id) + self._buyers[buyer_id].ping_path

    def post_url(self, buyer_id: str) -> str:
        return self.url_of(buyer_id) + self._buyers[buyer_id].post_path

    def bound_settings(self) -> Settings:
        """``settings`` with each simulated buyer's ping/post URLs on its actual port.

        For tests that start the market on port 0 and then run the engine against it.
        """
        buyers = [
            b.model_copy(update={"ping_url": self.ping_url(b.id), "post_url": self.post_url(b.id)})
            if b.id in self._buyers
            else b
            for b in self._settings.buyers
        ]
        return self._settings.model_copy(update={"buyers": buyers})

    # -- in-process control (same as the /__sim endpoints)

    def config_of(self, buyer_id: str) -> SimBuyerConfig:
        return self._buyers[buyer_id].cfg

    def configure(self, buyer_id: str, changes: dict[str, Any]) -> SimBuyerConfig:
        """Change a buyer's behaviour at runtime; raises :class:`SimConfigError`."""
        b = self._buyers[buyer_id]
        b.cfg = _merge_config(b.cfg, changes)
        return b.cfg

    def received(
        self, buyer_id: str, kind: RecordKind | None = None, drain: bool = False
    ) -> list[dict[str, Any]]:
        """Recorded requests (of ``kind``); ``drain`` forgets the ones returned, so a long run
        read as it goes keeps the recordings small."""
        b = self._buyers[buyer_id]
        got = [r for r in b.records if kind is None or r["kind"] == kind]
        if drain and got:
            self.forget(buyer_id, kind)
        return got

    def forget(self, buyer_id: str, kind: RecordKind | None) -> int:
        """Drop the recordings of ``kind`` (None: all), keeping the others; returns how many
        went. (A drain without a reader: no list of what is dropped is built.)"""
        b = self._buyers[buyer_id]
        kept = [] if kind is None else [r for r in b.records if r["kind"] != kind]
        gone = len(b.records) - len(kept)
        if gone:
            b.records.clear()
            b.records.extend(kept)
        return gone

    def stats(self, buyer_id: str) -> dict[str, Any]:
        b = self._buyers[buyer_id]
        return {
            "buyer_id": b.id,
            "port": b.port,
            "mode": b.cfg.mode,
            "recorded": len(b.records),
            "counts": dict(b.counts),
        }

    def clear(self, buyer_id: str | None = None) -> None:
        """Forget recordings and counters (the idempotency store is kept, like a real CRM)."""
        for b in self._buyers.values() if buyer_id is None else [self._buyers[buyer_id]]:
            b.records.clear()
            b.counts.clear()

    # -- handlers

    async def _sleep(self, seconds: float) -> None:
        if seconds <= 0 or self._stopping:
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        handle = loop.call_later(seconds, _resolve, fut)
        self._sleepers.add(fut)
        try:
            await fut
        finally:
            handle.cancel()
            self._sleepers.discard(fut)

    async def _capture(self, b: _Buyer, kind: RecordKind, request: web.Request) -> Any:
        """Read, parse and (if recording) record the request; return the parsed JSON body."""
        raw = await request.read()
        try:
            parsed: Any = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            parsed = None
        if self._record:
            if len(b.records) == b.records.maxlen:
                b.count("recordings_dropped")  # the oldest goes: a reader can tell it missed some
            b.records.append(
                {
                    "kind": kind,
                    "method": request.method,
                    "path": request.path,
                    "query": request.query_string,
                    # str(): header names are istr, which orjson refuses as dict keys.
                    "headers": {str(k): v for k, v in request.headers.items()},
                    "body": raw.decode("utf-8", "replace"),
                    "json": parsed,
                    "received_at": time.time(),
                }
            )
        return parsed

    async def _on_ping(self, b: _Buyer, request: web.Request) -> web.Response:
        body = await self._capture(b, "ping", request)
        b.count("pings")
        ping_id = body.get("ping_id") if isinstance(body, dict) else None
        if ping_id is None or ping_id == "":
            b.count("bad_requests")
            return _json_response({"error": "body must be a JSON object with ping_id"}, 400)
        answer = decide_ping(self._seed, b.id, str(ping_id), b.cfg, b.buyer.timeout_ms)
        b.count(answer.outcome)
        if answer.late:
            b.count("late")
        await self._sleep(answer.delay_s)
        return _answer_response(answer.status, answer.body, answer.content_type)

    async def _on_post(self, b: _Buyer, request: web.Request) -> web.Response:
        body = await self._capture(b, "post", request)
        b.count("posts")
        key = request.headers.get("Idempotency-Key")
        if not key and isinstance(body, dict) and body.get("post_id"):
            key = str(body["post_id"])  # lenient: a post without the header still dedupes
        if not key:
            b.count("bad_requests")
            return _json_response({"error": "Idempotency-Key header required"}, 400)
        # Store before sleeping: a concurrent retry of the same key sees the same answer.
        answer = b.post_answers.get(key)
        now = asyncio.get_running_loop().time()
        if answer is None:
            answer = decide_post(self._seed, b.id, key, b.cfg)
            if len(b.post_answers) >= MAX_POST_ANSWERS:
                gone = next(iter(b.post_answers))
                del b.post_answers[gone]
                b.post_ready_at.pop(gone, None)
            b.post_answers[key] = answer
            b.post_ready_at[key] = now + answer.delay_s
            b.count("posts_distinct")
            b.count(f"post_{answer.outcome}")
            delay = answer.delay_s
        else:
            b.count("post_replays")
            # The buyer decided once: a retry gets the stored answer as soon as it exists.
            delay = max(0.0, b.post_ready_at.get(key, now) - now)
        await self._sleep(delay)
        if b.cfg.echo_pii and answer.outcome != "accepted" and isinstance(body, dict):
            return _echo_response(answer, body)
        return _answer_response(answer.status, answer.body, answer.content_type)

    async def _on_received(self, b: _Buyer, request: web.Request) -> web.Response:
        kind = request.query.get("kind")
        if kind not in (None, "ping", "post"):
            return _json_response({"error": "kind must be 'ping' or 'post'"}, 400)
        drain = request.query.get("drain", "").lower() in ("1", "true", "yes")
        # `kind not in (None, "ping", "post")` above narrows a str for the reader, not mypy.
        return _json_response(self.received(b.id, kind, drain))  # type: ignore[arg-type]

    async def _on_clear(self, b: _Buyer, request: web.Request) -> web.Response:
        kind = request.query.get("kind")
        if kind is None:
            self.clear(b.id)
        elif kind in ("ping", "post"):
            self.forget(b.id, kind)  # type: ignore[arg-type]
        else:
            return _json_response({"error": "kind must be 'ping' or 'post'"}, 400)
        return web.Response(status=204)

    async def _on_stats(self, b: _Buyer, request: web.Request) -> web.Response:
        return _json_response(self.stats(b.id))

    async def _on_config(self, b: _Buyer, request: web.Request) -> web.Response:
        try:
            changes = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _json_response({"error": "body must be a JSON object"}, 400)
        if not isinstance(changes, dict):
            return _json_response({"error": "body must be a JSON object"}, 400)
        try:
            cfg = self.configure(b.id, changes)
        except SimConfigError as exc:
            return _json_response(
                {"error": "invalid config", "fields": exc.fields, "details": exc.details}, 400
            )
        return _json_response(cfg.model_dump())


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _merge_config(current: SimBuyerConfig, changes: dict[str, Any]) -> SimBuyerConfig:
    if "port" in changes:
        raise SimConfigError(["port"], ["port: cannot be changed at runtime"])
    merged = current.model_dump()
    for key, value in changes.items():
        # One-level deep merge so {"latency_ms": {"median": 700}} keeps the current p99.
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merged[key] | value
        else:
            merged[key] = value
    # The port is not changeable and may be 0 (free port); validate with a placeholder.
    merged["port"] = 1
    try:
        cfg = SimBuyerConfig.model_validate(merged)
    except ValidationError as exc:
        errors = exc.errors()
        fields = [".".join(str(p) for p in e["loc"]) for e in errors]
        details = [f"{f}: {e['msg']}" for f, e in zip(fields, errors, strict=True)]
        raise SimConfigError(fields, details) from None
    return cfg.model_copy(update={"port": current.port})


# --------------------------------------------------------------------------- CLI entry


def run(settings: Settings) -> None:
    """Serve the whole market until SIGINT/SIGTERM (``pingpost buyers simulate``)."""

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with SimulatedMarket(settings) as market:
            for buyer_id in market.buyer_ids:
                tier = settings.buyer(buyer_id).tier
                print(f"buyer {buyer_id} ({tier}) on {market.url_of(buyer_id)}", flush=True)
            await stop.wait()

    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # uvloop is optional
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve())
