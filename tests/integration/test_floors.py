"""Floors end to end: a bid below the flow's floor never wins, and its ping row says why."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterator
from typing import Any

import pytest

from streams.tools.demo import generate_leads
from tests.integration.pipeline import SOLAR_FLOW, Pipeline, wait_for

pytestmark = pytest.mark.integration

SIM = {
    "bid_probability": 1.0,
    "latency_ms": {"median": 10, "p99": 40},
    "late_share": 0.0,
    "error_rate": 0.0,
    "post_reject_rate": 0.0,
    "exclusive_share": 0.0,
}
BUYERS = {
    "cheap": {"sim": {**SIM, "price": {"median": 15, "p99": 20}}},
    "rich": {"sim": {**SIM, "price": {"median": 90, "p99": 120}}},
}
FLOW = {
    **copy.deepcopy(SOLAR_FLOW),
    "floors": {
        "base": 40.0,
        "quality": {"rules": [{"field": "homeowner", "equals": True, "multiplier": 1.0}]},
    },
}
N = 20


@pytest.fixture(scope="module")
def floored(
    kafka_bootstrap: str, warehouse_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Pipeline, list[str]]]:
    p = Pipeline(
        tmp_path_factory.mktemp("floors"), kafka_bootstrap, warehouse_url, BUYERS, flow=FLOW
    )
    try:
        p.start()
        ids = [a["lead_id"] for a in asyncio.run(p.post_many(generate_leads(N, seed=404)))]
        p.settled(ids)
        yield p, ids
    finally:
        p.stop()


def test_bids_below_the_floor_never_win(floored: tuple[Pipeline, list[str]]) -> None:
    p, ids = floored
    winners = p.rows(
        "SELECT arrayJoin(winners) FROM {db}.auctions FINAL WHERE lead_id IN %(ids)s", ids=ids
    )
    assert {w for (w,) in winners} == {"rich"}

    def cheap_rows() -> list[tuple[Any, ...]]:
        return p.rows(
            "SELECT status, price, reason FROM {db}.pings FINAL "
            "WHERE buyer_id = 'cheap' AND lead_id IN %(ids)s",
            ids=ids,
        )

    # The ping rows come through the sink from the bids topic, the settled auctions from the
    # results topic: "settled" does not mean every ping row is in yet.
    cheap = wait_for(
        lambda: (lambda r: r if len(r) >= N else None)(cheap_rows()),
        30,
        "every ping row of 'cheap'",
    )
    assert len(cheap) == N
    for status, price, reason in cheap:
        assert status == "bid" and price < 40
        assert "below floor 40.00" in reason
    assert not p.received("cheap", "post")
