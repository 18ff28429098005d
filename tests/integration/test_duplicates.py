"""Duplicate leads on the real broker: the same person twice at the same instant and once
more later — one sale (reject mode), or no ping to the buyer who already bought it
(skip_buyers mode)."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterator
from typing import Any

import pytest

from streams.tools.demo import generate_leads
from tests.integration.pipeline import SOLAR_FLOW, Pipeline

pytestmark = pytest.mark.integration

SIM = {
    "bid_probability": 1.0,
    "latency_ms": {"median": 10, "p99": 40},
    "late_share": 0.0,
    "error_rate": 0.0,
    "post_reject_rate": 0.0,
    "post_error_rate": 0.0,
    "exclusive_share": 0.0,
    "conditions": {},
}
BUYERS = {
    "top": {"sim": {**SIM, "price": {"median": 90, "p99": 95}}},
    "second": {"sim": {**SIM, "price": {"median": 50, "p99": 55}}},
}


def flow(action: str) -> dict[str, Any]:
    return {
        **copy.deepcopy(SOLAR_FLOW),
        "strategy": {**SOLAR_FLOW.get("strategy", {}), "shared_max": 1},
        "duplicates": {"fields": ["email", "phone"], "window_s": 3600, "action": action},
    }


def twin(lead: dict[str, Any]) -> dict[str, Any]:
    """The same person again, written a little differently."""
    return {**lead, "email": lead["email"].upper(), "zip": lead["zip"]}


@pytest.fixture(scope="module")
def rejected(
    kafka_bootstrap: str, warehouse_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Pipeline, list[Any]]]:
    p = Pipeline(
        tmp_path_factory.mktemp("dupes"),
        kafka_bootstrap,
        warehouse_url,
        BUYERS,
        flow=flow("reject"),
    )
    try:
        p.start()
        person, other = generate_leads(2, seed=707)
        # the same person twice at the same instant, plus someone else
        first = asyncio.run(p.post_many([person, twin(person), other], wait=True))
        later = asyncio.run(p.post_many([twin(person)], wait=True))  # after the sale
        p.settled([a["lead_id"] for a in first + later])
        yield p, [first, later]
    finally:
        p.stop()


def test_one_person_is_sold_once(rejected: tuple[Pipeline, list[Any]]) -> None:
    p, (first, later) = rejected
    a, b, other = first
    (c,) = later
    outcomes = sorted([a["outcome"], b["outcome"]])
    assert outcomes == ["sold_shared", "unsold"]
    dup = a if a["outcome"] == "unsold" else b
    sold = b if dup is a else a
    assert dup["reason"] == (f"duplicate of lead {sold['lead_id']} (same email, phone) within 1h")
    assert c["outcome"] == "unsold" and c["reason"].startswith(
        f"duplicate of lead {sold['lead_id']}"
    )
    assert other["outcome"] == "sold_shared"  # a different person is not affected
    rows = dict(
        p.rows(
            "SELECT lead_id, reason FROM {db}.auctions FINAL WHERE lead_id IN %(ids)s",
            ids=[dup["lead_id"], c["lead_id"]],
        )
    )
    assert rows[dup["lead_id"]] == dup["reason"]
    # the duplicates were never pinged nor posted
    pinged = {r["json"]["ping_id"] for b in BUYERS for r in p.received(b, "ping")}
    assert len(pinged) == 2 * len(BUYERS)  # the two auctioned leads only
    posted = [r["json"]["lead_id"] for b in BUYERS for r in p.received(b, "post")]
    assert dup["lead_id"] not in posted and c["lead_id"] not in posted


@pytest.fixture(scope="module")
def skipping(
    kafka_bootstrap: str, warehouse_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Pipeline, list[Any]]]:
    p = Pipeline(
        tmp_path_factory.mktemp("dupes2"),
        kafka_bootstrap,
        warehouse_url,
        BUYERS,
        flow=flow("skip_buyers"),
    )
    try:
        p.start()
        (person,) = generate_leads(1, seed=708)
        first = asyncio.run(p.post_many([person], wait=True))
        again = asyncio.run(p.post_many([twin(person)], wait=True))
        p.settled([a["lead_id"] for a in first + again])
        yield p, [first[0], again[0]]
    finally:
        p.stop()


def test_the_buyer_who_bought_is_not_pinged_again(skipping: tuple[Pipeline, list[Any]]) -> None:
    p, (first, again) = skipping
    assert first["buyers"] == ["top"]
    assert again["buyers"] == ["second"]  # sold again, to someone who does not have it
    assert len(p.received("top", "ping")) == 1
    assert len(p.received("second", "ping")) == 2
    (row,) = p.rows(
        "SELECT status, reason FROM {db}.pings FINAL WHERE buyer_id = 'top' AND lead_id = %(l)s",
        l=again["lead_id"],
    )
    assert row == ("filtered", "already bought this lead (a duplicate within the flow's window)")
