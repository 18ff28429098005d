"""A sale is exactly what a buyer accepted (issue 10, item 2), on the real broker.

One buyer answers every post after the lead's whole post window: pingpost asks it again and
again with the same Idempotency-Key, gives up when the window ends, settles the lead — and the
buyer has accepted. Its slot was never offered to anyone else (the timeout is ambiguous), and
the acceptance, when the buyer is asked again after settling, is recorded as the sale. The
invariant:
the set of (lead, buyer) posts pingpost records as ``accepted`` equals the set of posts the
buyers accepted (the simulator decides each post by its key, recorded or not on our side).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from streams.tools.demo import generate_leads
from streams.tools.simulator import decide_post
from tests.integration.pipeline import SOLAR_FLOW, Pipeline, wait_for

pytestmark = pytest.mark.integration

BASE = {
    "bid_probability": 1.0,
    "post_reject_rate": 0.0,
    "exclusive_share": 0.0,
    "latency_ms": {"median": 10, "p99": 30},
    "late_share": 0.0,
    "error_rate": 0.0,
}
BUYERS: dict[str, dict[str, Any]] = {
    # Bids highest, answers every post after 2.5 s; its post timeout is 400 ms, the
    # flow's post window 1.5 s.
    "slowpoke": {
        "tier": "premium",
        "post_timeout_ms": 400,
        "sim": {
            **BASE,
            "price": {"median": 90, "p99": 95},
            "post_slow_share": 1.0,
            "post_slow_ms": 2500,
        },
    },
    "steady": {"tier": "standard", "sim": {**BASE, "price": {"median": 40, "p99": 45}}},
}
FLOW = {
    **SOLAR_FLOW,
    "post_timeout_ms": 1500,
    "strategy": {
        **SOLAR_FLOW.get("strategy", {}),
        "shared_max": 1,
        "exclusive_only": False,
        "shared_only": True,
    },
}
N = 8


@pytest.fixture(scope="module")
def market(
    kafka_bootstrap: str, warehouse_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    p = Pipeline(
        tmp_path_factory.mktemp("reconcile"), kafka_bootstrap, warehouse_url, BUYERS, flow=FLOW
    )
    try:
        p.start()
        yield p
    finally:
        p.stop()


def _accepted_by_buyers(p: Pipeline) -> set[tuple[str, str]]:
    out = set()
    for buyer_id in BUYERS:
        cfg = p.settings.simulator.buyers[buyer_id]
        for rec in p.received(buyer_id, "post"):
            body = orjson.loads(rec["body"])
            if (
                decide_post(p.settings.simulator.seed, buyer_id, body["post_id"], cfg).outcome
                == "accepted"
            ):
                out.add((body["lead_id"], buyer_id))
    return out


def _recorded(p: Pipeline, ids: list[str]) -> set[tuple[str, str]]:
    rows = p.rows(
        "SELECT lead_id, buyer_id FROM {db}.posts FINAL WHERE status = 'accepted' "
        "AND lead_id IN {ids:Array(String)}",
        ids=ids,
    )
    return {(r[0], r[1]) for r in rows}


def test_a_post_accepted_after_we_gave_up_is_a_sale_recorded_once(market: Pipeline) -> None:
    answers = asyncio.run(market.post_many(generate_leads(N, seed=601), wait=True))
    ids = [a["lead_id"] for a in answers]
    market.settled(ids)
    # Each lead went to slowpoke (best price), which never answered within the window: the
    # lead settled unsold, its one shared slot held for slowpoke (steady never got it).
    assert all(
        a.get("outcome") == "unsold" and "slowpoke" in a.get("reason", "") for a in answers
    ), answers
    assert not [
        r for r in market.received("steady", "post") if orjson.loads(r["body"])["lead_id"] in ids
    ]
    accepted = _accepted_by_buyers(market)
    assert {(lead, "slowpoke") for lead in ids} <= accepted
    # Reconciled: every acceptance becomes a recorded sale, once (posts FINAL by attempt).
    wait_for(
        lambda: _recorded(market, ids) == {x for x in accepted if x[0] in ids},
        60,
        "recorded sales to equal the buyers' acceptances",
    )
    rows = market.rows(
        "SELECT lead_id, count() FROM {db}.posts FINAL WHERE status = "
        "'accepted' AND lead_id IN {ids:Array(String)} GROUP BY lead_id, "
        "buyer_id HAVING count() > 1",
        ids=ids,
    )
    assert rows == []
    # The corrected result follows its Delivery onto Kafka (the posts row first), so the
    # auctions row may still say unsold when the posts rows are in: wait for it too.

    def winners() -> dict[str, list[str]]:
        return {
            lead: list(w)
            for lead, w in market.rows(
                "SELECT lead_id, winners FROM {db}.auctions FINAL "
                "WHERE lead_id IN {ids:Array(String)}",
                ids=ids,
            )
        }

    wait_for(
        lambda: winners() == {lead: ["slowpoke"] for lead in ids},
        30,
        "each lead's auctions row to name slowpoke as its winner",
    )
