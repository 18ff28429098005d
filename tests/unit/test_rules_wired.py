"""The rules of streams/rules/selling.py as the stages apply them: floors in the auction's decision,
filters and schedules in the ping plan."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from streams.rules.auction import acceptable, decide
from streams.rules.pinging import plan_pings
from streams.settings import parse_settings

RAW = yaml.safe_load(Path("config/demo.yaml").read_text())
# Wednesday 2026-01-07 18:00 UTC = 10:00 in Los Angeles (inside business hours).
IN_HOURS = int(datetime(2026, 1, 7, 18, 0, tzinfo=UTC).timestamp() * 1000)
# Wednesday 2026-01-07 06:00 UTC = 22:00 the day before in Los Angeles.
OFF_HOURS = int(datetime(2026, 1, 7, 6, 0, tzinfo=UTC).timestamp() * 1000)
PING = {"state": "CA", "zip": "902", "homeowner": True, "credit_range": "700+", "consent": True}


def settings(**flow_changes: Any) -> Any:
    raw = yaml.safe_load(yaml.safe_dump(RAW))
    raw["flows"]["solar"].update(flow_changes)
    return parse_settings(raw, env={})


FLOORS = {
    "base": 40.0,
    "exclusive_min": 75.0,
    "quality": {"rules": [{"field": "credit_range", "equals": "700+", "multiplier": 1.25}]},
    "business_hours": {
        "timezone": "America/Los_Angeles",
        "days": ["mon", "tue", "wed", "thu", "fri"],
        "hours": "09:00-17:00",
        "premium": 1.2,
    },
}


def bid(buyer: str, price: float, exclusive: bool = False, at: int = 1) -> dict[str, Any]:
    return {
        "buyer_id": buyer,
        "tier": "standard",
        "ping_id": f"p-{buyer}",
        "status": "bid",
        "price": price,
        "exclusive": exclusive,
        "conditions": {},
        "answered_at_ms": at,
    }


@pytest.mark.parametrize(
    ("at", "bids", "mode", "winners"),
    [
        # floor off hours: 40 × 1.25 = 50; in hours: × 1.2 = 60
        (OFF_HOURS, [bid("a", 55), bid("b", 49)], "shared", ["a"]),
        (IN_HOURS, [bid("a", 55), bid("b", 49)], "none", []),
        (IN_HOURS, [bid("a", 61), bid("b", 60)], "shared", ["a", "b"]),
        # exclusive minimum 75 for exclusive bids, however high the shared floor
        (OFF_HOURS, [bid("x", 70, exclusive=True), bid("a", 55)], "shared", ["a"]),
        (OFF_HOURS, [bid("x", 80, exclusive=True), bid("a", 55)], "exclusive", ["x", "a"]),
        # all bids below the floor: nothing to post
        (OFF_HOURS, [bid("a", 10), bid("b", 20, exclusive=True)], "none", []),
    ],
)
def test_decide_applies_the_flows_floors(
    at: int, bids: list[dict[str, Any]], mode: str, winners: list[str]
) -> None:
    s = settings(floors=FLOORS)
    flow = s.flows["solar"]
    d = decide(bids, PING, flow.strategy, at - 1000, at, flow=flow)
    assert d.mode == mode
    assert [c["buyer_id"] for c in d.candidates] == winners


def test_without_floors_the_decision_is_unchanged() -> None:
    s = settings(floors={})
    flow = s.flows["solar"]
    bids = [bid("a", 1.0), bid("b", 2.0)]
    assert decide(bids, PING, flow.strategy, 0, 1000, flow=flow) == decide(
        bids, PING, flow.strategy, 0, 1000
    )


def test_plan_pings_applies_schedules_and_field_filters() -> None:
    raw = yaml.safe_load(yaml.safe_dump(RAW))
    raw["buyers"][0]["schedule"] = {
        "timezone": "America/Los_Angeles",
        "days": ["mon", "tue", "wed", "thu", "fri"],
        "hours": "08:00-20:00",
    }
    raw["buyers"][1]["filters"] = {"fields": {"credit_range": {"in": ["650-699"]}}}
    s = parse_settings(raw, env={})
    first, second = s.buyers[0].id, s.buyers[1].id
    targets, filtered = plan_pings(s, "solar", PING, IN_HOURS)
    reasons = dict((b.id, why) for b, why in filtered)
    assert first in [b.id for b in targets]
    assert "credit_range" in reasons[second]
    targets, filtered = plan_pings(s, "solar", PING, OFF_HOURS)
    reasons = dict((b.id, why) for b, why in filtered)
    assert "schedule" in reasons[first]


def test_an_answer_is_never_recorded_later_than_now() -> None:
    """``sent_at`` is a truncated wall-clock ms and the latency a monotonic measure; their sum
    can run ahead of the clock by a ms, which made wave 2 look sent before wave 1 answered."""
    from connectors.buyers import PingOutcome
    from streams.runtime.agents import now_ms
    from streams.runtime.fanout import bid_record as _bid_record
    from streams.settings import BuyerConfig

    buyer = BuyerConfig.model_validate(
        {"id": "b", "flows": ["solar"], "ping_url": "http://x/ping", "post_url": "http://x/post"}
    )
    req = {"lead_id": "L", "flow": "solar"}
    sent = now_ms()
    rec = _bid_record(
        req, buyer, "p", sent, PingOutcome(status="bid", latency_ms=5_000.0, price=10.0)
    )
    after = now_ms()
    assert sent <= rec["answered_at_ms"] <= after
    # an answer in the past keeps its measured time
    rec = _bid_record(
        req, buyer, "p", sent - 1_000, PingOutcome(status="bid", latency_ms=300.0, price=10.0)
    )
    assert rec["answered_at_ms"] == sent - 700


@pytest.mark.parametrize(
    ("conditions", "fields", "age_min", "min_price", "reason"),
    [
        ({"states": ("TX",)}, {}, 0, 0, "lead state outside the bid's states"),
        ({"require_consent": True}, {"consent": False}, 0, 0, "bid requires consent"),
        ({"max_age_minutes": 5}, {}, 10, 0, "lead older than the bid's max_age_minutes (5)"),
        ({"states": ("CA",), "require_consent": True, "max_age_minutes": 5}, {}, 1, 0, ""),
        # under the flow's min_price: still a bid with its price (not an error the buyer's
        # error rate and auto-pause would count), and it cannot win
        ({}, {}, 0, 90.01, "price 90.00 below min_price 90.01"),
        ({}, {}, 0, 90.0, ""),
    ],
)
def test_a_bid_that_cannot_win_says_why_on_its_ping_row(
    conditions: dict[str, Any],
    fields: dict[str, Any],
    age_min: int,
    min_price: float,
    reason: str,
) -> None:
    """The reason lands in the Bid record the sink turns into the ``pings`` row."""
    import asyncio
    from types import SimpleNamespace

    import schemas
    from connectors.buyers import Conditions, PingOutcome
    from streams.runtime.agents import now_ms
    from streams.runtime.fanout import ping_buyer
    from streams.stages.sink import to_row

    s = settings(
        floors={"base": 40.0},
        strategy={**RAW["flows"]["solar"].get("strategy", {}), "min_price": min_price},
    )
    buyer = next(b for b in s.buyers if b.id == "sunrise")
    out = PingOutcome(
        status="bid", latency_ms=20.0, price=90.0, conditions=Conditions(**conditions)
    )
    sent: list[bytes] = []

    class Client:
        async def ping(self, *_: Any, **__: Any) -> PingOutcome:
            return out

    class Topic:
        async def send(self, key: bytes, value: bytes) -> None:
            sent.append(value)

    ctx = SimpleNamespace(settings=s, topic=lambda name: Topic(), buyer_client=Client)
    created = now_ms() - age_min * 60_000
    req = {
        "lead_id": "L1",
        "flow": "solar",
        "created_at_ms": created,
        "ping_fields": {**PING, **fields},
    }
    rec = asyncio.run(ping_buyer(ctx, req, buyer, "p1", now_ms() + 500))
    assert rec["reason"] == reason
    table, row = to_row("Bid", schemas.decode_as("Bid", sent[0]))
    assert table == "pings" and reason in row and row[8:10] == ["bid", 90.0]
    # the auction agrees: the same bid is acceptable exactly when the row has no reason
    ok, why = acceptable(
        rec,
        req["ping_fields"],
        s.flows["solar"].strategy,
        created,
        rec["answered_at_ms"],
        flow=s.flows["solar"],
    )
    assert (ok, why) == (reason == "", reason)
