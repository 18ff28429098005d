"""The simulated buyer market, over real HTTP on loopback (servers on free ports)."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest

from streams.settings import Settings, SimBuyerConfig, parse_settings
from streams.tools.simulator import SimulatedMarket, decide_ping

FAST: dict[str, Any] = {
    "latency_ms": {"median": 0, "p99": 0},
    "late_share": 0,
    "error_rate": 0,
}


def make_settings(
    sim: dict[str, dict[str, Any]],
    *,
    timeout_ms: int = 200,
    seed: int = 42,
    ping_path: str = "/ping",
    post_path: str = "/post",
) -> Settings:
    raw = {
        "flows": {
            "solar": {
                "fields": {"state": {}, "email": {}},
                "ping_fields": {"state": {}},
                "pii_fields": ["email"],
            }
        },
        "buyers": [
            {
                "id": bid,
                "flows": ["solar"],
                "tier": "premium",
                "ping_url": f"http://127.0.0.1:9999{ping_path}",
                "post_url": f"http://127.0.0.1:9999{post_path}",
                "timeout_ms": timeout_ms,
                "headers": {"X-Api-Key": "k-123"},
            }
            for bid in sim
        ],
        "simulator": {"seed": seed, "buyers": {bid: {"port": 1, **c} for bid, c in sim.items()}},
    }
    settings = parse_settings(raw, env={})
    # Rebind every buyer to port 0 (a free port) so parallel test runs never collide;
    # done after validation because SimBuyerConfig.port may not accept 0.
    sim_cfg = settings.simulator
    buyers = {k: v.model_copy(update={"port": 0}) for k, v in sim_cfg.buyers.items()}
    return settings.model_copy(update={"simulator": sim_cfg.model_copy(update={"buyers": buyers})})


@asynccontextmanager
async def market_and_client(
    settings: Settings,
) -> AsyncIterator[tuple[SimulatedMarket, aiohttp.ClientSession]]:
    async with SimulatedMarket(settings) as market, aiohttp.ClientSession() as http:
        yield market, http


async def ping(
    http: aiohttp.ClientSession, market: SimulatedMarket, buyer: str, ping_id: str
) -> tuple[int, Any, float]:
    """(status, parsed body or text or None, elapsed seconds)."""
    t0 = time.perf_counter()
    async with http.post(
        market.ping_url(buyer), json={"ping_id": ping_id, "flow": "solar", "state": "CA"}
    ) as resp:
        raw = await resp.read()
        ctype = resp.content_type
    elapsed = time.perf_counter() - t0
    if not raw:
        return resp.status, None, elapsed
    return resp.status, _decode(raw, ctype), elapsed


def _decode(raw: bytes, ctype: str) -> Any:
    return orjson.loads(raw) if ctype == "application/json" else raw.decode()


async def post(
    http: aiohttp.ClientSession, market: SimulatedMarket, buyer: str, key: str
) -> tuple[int, Any]:
    async with http.post(
        market.post_url(buyer),
        json={"ping_id": "p", "post_id": key, "email": "a@b.co", "price": 10.0},
        headers={"Idempotency-Key": key},
    ) as resp:
        body = await resp.json() if resp.content_type == "application/json" else await resp.text()
        return resp.status, body


# --------------------------------------------------------------------------- pings


async def test_same_ping_id_same_answer_across_instances_and_orders() -> None:
    cfg = {**FAST, "error_rate": 0.15, "bid_probability": 0.5, "exclusive_share": 0.5}
    settings = make_settings({"acme": cfg})
    ids = [f"ping-{i}" for i in range(60)]
    async with market_and_client(settings) as (m1, http1):
        a = await asyncio.gather(*(ping(http1, m1, "acme", i) for i in ids))
    async with market_and_client(settings) as (m2, http2):
        b = await asyncio.gather(*(ping(http2, m2, "acme", i) for i in reversed(ids)))
    assert [(s, body) for s, body, _ in a] == [(s, body) for s, body, _ in reversed(b)]
    # The mix is really random: several kinds of answer appear.
    assert len({s for s, _, _ in a}) >= 3  # 200, 204, 500


async def test_bid_probability_and_exclusive_share_roughly_match() -> None:
    cfg = {
        **FAST,
        "bid_probability": 0.6,
        "exclusive_share": 0.3,
        "price": {"median": 40, "p99": 90},
    }
    async with market_and_client(make_settings({"acme": cfg})) as (m, http):
        answers = await asyncio.gather(*(ping(http, m, "acme", f"p{i}") for i in range(300)))
    bids = [b for s, b, _ in answers if s == 200 and b["bid"] is True]
    no_bid_204 = sum(1 for s, _, _ in answers if s == 204)
    no_bid_false = sum(1 for s, b, _ in answers if s == 200 and b == {"bid": False})
    assert len(bids) + no_bid_204 + no_bid_false == 300
    assert 0.45 <= len(bids) / 300 <= 0.75
    assert no_bid_204 > 10 and no_bid_false > 10
    assert 0.15 <= sum(b["exclusive"] for b in bids) / len(bids) <= 0.45
    prices = [b["price"] for b in bids]
    assert all(isinstance(p, float) and p > 0 and round(p, 2) == p for p in prices)
    assert 30 <= statistics.median(prices) <= 52
    assert bids[0]["buyer_id"] == "acme-ext"
    assert bids[0]["conditions"] == {"max_age_minutes": 5}


@pytest.mark.parametrize(
    ("mode", "check"),
    [
        ("non_json", lambda s, b: s == 200 and b == "<html>oops"),
        ("http_500", lambda s, b: s == 500),
        ("negative_price", lambda s, b: s == 200 and b["bid"] is True and b["price"] == -5),
        ("string_price", lambda s, b: s == 200 and b["bid"] is True and b["price"] == "cheap"),
    ],
)
async def test_misbehaving_modes(mode: str, check: Any) -> None:
    cfg = {**FAST, "mode": mode, "bid_probability": 0}
    async with market_and_client(make_settings({"acme": cfg})) as (m, http):
        answers = await asyncio.gather(*(ping(http, m, "acme", f"p{i}") for i in range(10)))
    assert all(check(s, b) for s, b, _ in answers), answers


async def test_late_tail_arrives_after_timeout() -> None:
    settings = make_settings({"acme": {**FAST, "late_share": 1.0}}, timeout_ms=20)
    async with market_and_client(settings) as (m, http):
        answers = await asyncio.gather(*(ping(http, m, "acme", f"p{i}") for i in range(8)))
        stats = m.stats("acme")
    # timeout_ms + 50..300 ms
    assert all(0.070 <= elapsed < 0.020 + 0.300 + 0.5 for _, _, elapsed in answers)
    assert stats["counts"]["late"] == 8


async def test_runtime_config_switches_to_slow_and_back() -> None:
    settings = make_settings({"acme": FAST}, timeout_ms=30)
    async with market_and_client(settings) as (m, http):
        url = m.url_of("acme") + "/__sim/config"
        async with http.put(url, json={"mode": "slow"}) as resp:
            assert resp.status == 200
            assert (await resp.json())["mode"] == "slow"
        _, _, slow = await ping(http, m, "acme", "a")
        assert slow >= 0.230  # timeout_ms + 200 ms
        async with http.put(url, json={"mode": "normal"}) as resp:
            assert resp.status == 200
        _, _, fast = await ping(http, m, "acme", "b")
        assert fast < 0.2


async def test_latency_distribution_matches_median_and_p99() -> None:
    # Pure decision function: no HTTP, so thousands of samples are cheap.
    cfg = SimBuyerConfig(port=1, latency_ms={"median": 60, "p99": 400}, late_share=0)
    delays = sorted(decide_ping(42, "acme", f"p{i}", cfg, 500).delay_s for i in range(4000))
    assert 0.054 <= delays[2000] <= 0.066
    assert 0.30 <= delays[3960] <= 0.50
    assert delays[-1] <= 0.800  # capped at 2 x p99


async def test_server_overhead_is_small() -> None:
    async with market_and_client(make_settings({"acme": FAST})) as (m, http):
        await ping(http, m, "acme", "warm-up")
        times = [(await ping(http, m, "acme", f"p{i}"))[2] for i in range(100)]
    # Client + server round trip on loopback; the server's share is a fraction of this.
    assert statistics.median(times) < 0.005


async def test_paths_come_from_buyer_urls() -> None:
    settings = make_settings({"acme": FAST}, ping_path="/v1/bid", post_path="/v1/lead")
    async with market_and_client(settings) as (m, http):
        assert m.ping_url("acme") == f"http://127.0.0.1:{m.port_of('acme')}/v1/bid"
        status, _, _ = await ping(http, m, "acme", "x")
        assert status in (200, 204)
        async with http.post(m.url_of("acme") + "/ping", json={"ping_id": "x"}) as resp:
            assert resp.status == 404
        bound = m.bound_settings().buyer("acme")
        assert bound.post_url == m.url_of("acme") + "/v1/lead"


# --------------------------------------------------------------------------- posts


async def test_post_idempotency_same_key_same_answer_counted_once() -> None:
    cfg = {**FAST, "post_reject_rate": 0.5}
    async with market_and_client(make_settings({"acme": cfg})) as (m, http):
        first = await asyncio.gather(*(post(http, m, "acme", f"k{i}") for i in range(40)))
        again = await asyncio.gather(*(post(http, m, "acme", f"k{i}") for i in range(40)))
        async with http.get(m.url_of("acme") + "/__sim/stats") as resp:
            stats = await resp.json()
    assert first == again
    bodies = [b for _, b in first]
    assert {"accepted": True} in bodies
    rejected = [b for b in bodies if b["accepted"] is False]
    assert rejected and all(isinstance(b["reason"], str) and b["reason"] for b in rejected)
    assert stats["counts"]["posts"] == 80
    assert stats["counts"]["posts_distinct"] == 40
    assert stats["counts"]["post_replays"] == 40


async def test_post_error_rate_gives_500() -> None:
    async with market_and_client(make_settings({"acme": {**FAST, "post_error_rate": 1}})) as (
        m,
        http,
    ):
        status, _ = await post(http, m, "acme", "k1")
    assert status == 500


# --------------------------------------------------------------------------- recording & control


async def test_recording_captures_headers_and_body() -> None:
    async with market_and_client(make_settings({"acme": FAST})) as (m, http):
        base = m.url_of("acme")
        async with http.post(
            m.ping_url("acme") + "?src=test",
            data=b'{"ping_id": "r1", "state": "CA"}',
            headers={"X-Api-Key": "k-123", "Content-Type": "application/json"},
        ) as resp:
            await resp.read()
        await post(http, m, "acme", "post-1")
        async with http.get(base + "/__sim/received", params={"kind": "ping"}) as resp:
            pings = await resp.json()
        async with http.get(base + "/__sim/received", params={"kind": "post"}) as resp:
            posts = await resp.json()
        async with http.get(base + "/__sim/received", params={"kind": "bogus"}) as resp:
            assert resp.status == 400
        async with http.delete(base + "/__sim/received") as resp:
            assert resp.status == 204
        async with http.get(base + "/__sim/received") as resp:
            assert await resp.json() == []
    assert len(pings) == 1 and len(posts) == 1
    rec = pings[0]
    assert rec["kind"] == "ping" and rec["method"] == "POST" and rec["path"] == "/ping"
    assert rec["query"] == "src=test"
    assert rec["headers"]["X-Api-Key"] == "k-123"
    assert rec["body"] == '{"ping_id": "r1", "state": "CA"}'
    assert rec["json"] == {"ping_id": "r1", "state": "CA"}
    assert abs(rec["received_at"] - time.time()) < 10
    assert posts[0]["headers"]["Idempotency-Key"] == "post-1"
    assert posts[0]["json"]["email"] == "a@b.co"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"bid_probability": 2}, "bid_probability"),
        ({"latency_ms": {"median": -1}}, "latency_ms.median"),
        ({"mode": "sleepy"}, "mode"),
        ({"bogus": 1}, "bogus"),
        ({"port": 1234}, "port"),
    ],
)
async def test_config_validation_names_the_field(change: dict[str, Any], field: str) -> None:
    async with market_and_client(make_settings({"acme": FAST})) as (m, http):
        async with http.put(m.url_of("acme") + "/__sim/config", json=change) as resp:
            assert resp.status == 400
            body = await resp.json()
        assert m.config_of("acme").mode == "normal"  # unchanged
    assert field in body["fields"]
    assert any(d.startswith(field) for d in body["details"])


async def test_partial_nested_config_keeps_other_keys() -> None:
    async with market_and_client(make_settings({"acme": FAST})) as (m, http):
        async with http.put(
            m.url_of("acme") + "/__sim/config", json={"latency_ms": {"p99": 5}}
        ) as resp:
            assert resp.status == 200
        assert m.config_of("acme").latency_ms.median == 0
        assert m.config_of("acme").latency_ms.p99 == 5


async def test_pii_audit_drains_and_finds_a_value_in_any_part_of_a_ping() -> None:
    """The demo's audit (streams.tools.demo.PiiAudit): a PII value anywhere in a ping (body,
    query (decoded), header; any case) is a leak; what it read is gone from the buyer's recordings, so a
    second drain reads only what came since; a ping without PII is no leak."""
    import asyncio

    from streams.tools.demo import PiiAudit

    async with market_and_client(make_settings({"acme": FAST})) as (m, http):
        base = m.url_of("acme")
        audit = PiiAudit([base], ["ada.lovelace@example.com", "+12025550123", "abc"])
        for i, (query, body, headers) in enumerate(
            [
                ("", {"state": "CA"}, {}),
                ("", {"state": "CA", "note": "Ada.Lovelace@Example.com"}, {}),
                ("?who=%2B12025550123", {"state": "CA"}, {}),
                ("", {"state": "CA"}, {"X-Echo": "+12025550123"}),
                ("", {"state": "abc"}, {}),  # shorter than 5: not audited
            ]
        ):
            async with http.post(
                m.ping_url("acme") + query, json={"ping_id": f"p{i}", **body}, headers=headers
            ) as resp:
                await resp.read()
        await asyncio.to_thread(audit.drain)
        assert (audit.pings, audit.leaks, audit.missed) == (5, 3, 0)
        async with http.post(m.ping_url("acme"), json={"ping_id": "p9", "e": "+12025550123"}) as r:
            await r.read()
        await post(http, m, "acme", "post-1")  # a post: PII by contract, not audited
        await asyncio.to_thread(audit.drain)
        assert (audit.pings, audit.leaks) == (6, 4)
        async with http.get(base + "/__sim/received", params={"kind": "ping"}) as resp:
            assert await resp.json() == []
        # the audit forgets the posts too (nothing reads them), keeping the counters
        async with http.get(base + "/__sim/received", params={"kind": "post"}) as resp:
            assert await resp.json() == []
        async with http.get(base + "/__sim/stats") as resp:
            assert (await resp.json())["counts"]["pings"] == 6
        async with http.delete(base + "/__sim/received", params={"kind": "bogus"}) as resp:
            assert resp.status == 400
        # forgetting one kind keeps the other
        async with http.post(m.ping_url("acme"), json={"ping_id": "p10"}) as r:
            await r.read()
        await post(http, m, "acme", "post-2")
        async with http.delete(base + "/__sim/received", params={"kind": "post"}) as resp:
            assert resp.status == 204
        async with http.get(base + "/__sim/received", params={"kind": "ping"}) as resp:
            assert [r["json"]["ping_id"] for r in await resp.json()] == ["p10"]
        async with http.get(base + "/__sim/received", params={"kind": "post"}) as resp:
            assert await resp.json() == []
