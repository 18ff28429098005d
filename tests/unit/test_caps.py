"""The cap owner's ledger: reservations, commits, releases, expiry and periods."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest

import schemas
from streams.rules import caps as C
from streams.runtime.agents import Requeue
from streams.settings import BuyerCaps
from streams.stages import caps as S


def ms(y: int, mo: int, d: int, h: int, mi: int = 0) -> int:
    return int(datetime(y, mo, d, h, mi, tzinfo=UTC).timestamp() * 1000)


T = ms(2026, 3, 10, 15)


def test_leads_per_day_cap_hit_exactly() -> None:
    caps, led = BuyerCaps(leads_per_day=3), C.new_ledger()
    got = [C.reserve(led, caps, f"l{i}", 10.0, T + i)[0] for i in range(5)]
    assert got == [True, True, True, False, False]  # 3 outstanding holds fill the cap
    for i in range(3):
        C.commit(led, caps, f"l{i}", 10.0, T + 10)
    ok, why = C.reserve(led, caps, "l9", 10.0, T + 20)
    assert not ok and "leads_per_day 3" in why
    assert C.counters(led, caps, T + 20)[2].leads_day == 3


def test_release_frees_the_slot_and_commit_is_idempotent() -> None:
    caps, led = BuyerCaps(leads_per_hour=1), C.new_ledger()
    assert C.reserve(led, caps, "a", 5.0, T)[0]
    assert not C.reserve(led, caps, "b", 5.0, T)[0]
    C.release(led, "a", T)  # rejected post
    assert C.reserve(led, caps, "b", 5.0, T)[0]
    C.commit(led, caps, "b", 5.0, T)
    C.commit(led, caps, "b", 5.0, T)  # redelivered
    C.release(led, "b", T)  # a late release cannot undo a commit
    assert C.counters(led, caps, T)[2].leads_hour == 1
    assert C.reserve(led, caps, "b", 5.0, T) == (True, "")  # replayed waterfall: same grant
    assert not C.reserve(led, caps, "a", 5.0, T)[0]  # released before: no new hold


def test_redelivered_reserve_is_the_same_hold() -> None:
    caps, led = BuyerCaps(leads_per_day=1), C.new_ledger()
    assert C.reserve(led, caps, "a", 5.0, T)[0]
    assert C.reserve(led, caps, "a", 5.0, T + 5)[0]  # not a second slot
    assert C.counters(led, caps, T + 5)[2].leads_day == 1


@pytest.mark.parametrize(
    "spent, price, ok",
    [
        (90.0, 10.0, True),  # exactly at the budget
        (90.0, 10.01, False),  # one cent over
        (100.0, 0.0, True),  # a free lead still fits
    ],
)
def test_spend_per_day(spent: float, price: float, ok: bool) -> None:
    caps, led = BuyerCaps(spend_per_day=100.0), C.new_ledger()
    assert C.reserve(led, caps, "x", spent, T)[0]
    C.commit(led, caps, "x", spent, T)
    assert C.reserve(led, caps, "y", price, T + 1)[0] is ok


def test_unanswered_reservations_expire() -> None:
    caps, led = BuyerCaps(leads_per_day=1), C.new_ledger()
    assert C.reserve(led, caps, "crashed", 5.0, T, ttl_ms=1000)[0]
    assert not C.reserve(led, caps, "b", 5.0, T + 999)[0]
    assert C.reserve(led, caps, "b", 5.0, T + 1000)[0]


def test_commit_after_expiry_still_counts() -> None:
    caps, led = BuyerCaps(leads_per_day=5), C.new_ledger()
    C.reserve(led, caps, "slow", 7.0, T, ttl_ms=10)
    C.reserve(led, caps, "other", 1.0, T + 20)  # expires the hold
    C.commit(led, caps, "slow", 7.0, T + 30)  # the buyer did accept: the sale is real
    c = C.counters(led, caps, T + 30)[2]
    assert (c.leads_day, c.spend_day) == (2, 8.0)


def test_day_rolls_over_at_midnight_in_the_caps_time_zone() -> None:
    caps, led = BuyerCaps(leads_per_day=1, timezone="America/New_York"), C.new_ledger()
    before = ms(2026, 3, 11, 3, 59)  # 23:59 on the 10th in New York (EDT, UTC-4)
    after = ms(2026, 3, 11, 4, 1)  # 00:01 on the 11th
    assert C.reserve(led, caps, "a", 1.0, before)[0]
    C.commit(led, caps, "a", 1.0, before)
    assert not C.reserve(led, caps, "b", 1.0, before + 1000)[0]
    assert C.reserve(led, caps, "b", 1.0, after)[0]
    assert set(led["days"]) == set()  # the 10th is over: pruned; b is only a hold yet
    C.commit(led, caps, "b", 1.0, after)
    assert set(led["days"]) == {"2026-03-11"}  # old days are pruned


def test_a_hold_counts_in_the_hour_it_was_reserved() -> None:
    caps, led = BuyerCaps(leads_per_hour=1), C.new_ledger()
    assert C.reserve(led, caps, "a", 1.0, ms(2026, 3, 10, 15, 59))[0]
    C.commit(led, caps, "a", 1.0, ms(2026, 3, 10, 16, 1))  # accepted after the hour turned
    assert C.counters(led, caps, ms(2026, 3, 10, 16, 2))[2].leads_hour == 0
    assert C.reserve(led, caps, "b", 1.0, ms(2026, 3, 10, 16, 2))[0]


def test_cap_view_ignores_other_periods_and_older_states() -> None:
    caps = BuyerCaps(leads_per_day=10)
    v = S.CapView()
    hour, day, _ = C.counters(C.new_ledger(), caps, T)
    v.update(
        {
            "buyer_id": "b",
            "hour": hour,
            "day": day,
            "leads_hour": 2,
            "leads_day": 9,
            "spend_day": 50.0,
            "at_ms": T,
        }
    )
    v.update(
        {
            "buyer_id": "b",
            "hour": hour,
            "day": day,
            "leads_hour": 1,
            "leads_day": 1,
            "spend_day": 1.0,
            "at_ms": T - 1,
        }
    )  # older: ignored
    assert v.counters("b", caps, T).leads_day == 9
    assert v.counters("b", caps, T + 86_400_000).leads_day == 0  # the next day
    assert v.counters("unknown", caps, T).leads_day == 0


def test_the_ledger_forgets_settled_leads_after_a_while() -> None:
    caps, led = BuyerCaps(leads_per_day=1000), C.new_ledger()
    for i in range(3):
        C.reserve(led, caps, f"l{i}", 1.0, T)
        C.commit(led, caps, f"l{i}", 1.0, T)
    assert len(led["done"]) == 3
    C.reserve(led, caps, "late", 1.0, T + C.DONE_TTL_MS + 1)
    assert led["done"] == {}  # small table value; counters are kept
    assert C.counters(led, caps, T + C.DONE_TTL_MS + 1)[2].leads_day == 4  # 3 + the hold


class _Requests:
    """The caps topic seen by a CapClient: records what was sent."""

    def __init__(self) -> None:
        self.sent: list[dict[str, object]] = []

    async def send(self, key: bytes, value: bytes) -> None:
        self.sent.append(schemas.decode_as("CapRequest", value))


async def test_a_reservation_waits_for_the_owners_decision() -> None:
    reqs = _Requests()
    client = S.CapClient(reqs, timeout_s=2.0)
    task = asyncio.create_task(client.reserve("b", "L1", 10.0, rebalancing=lambda: False))
    while not reqs.sent:
        await asyncio.sleep(0)
    client.decided({"request_id": reqs.sent[0]["request_id"], "granted": True, "reason": ""})
    assert await task == (True, "")
    assert client.pending == {}


async def test_no_decision_in_time_is_a_refusal() -> None:
    client = S.CapClient(_Requests(), timeout_s=0.12)
    granted, why = await client.reserve("b", "L1", 10.0, rebalancing=lambda: False)
    assert (granted, why) == (False, "the cap owner did not answer in time")


async def test_a_rebalance_hands_the_order_back_instead_of_waiting_it_out() -> None:
    """The owner's agent is paused by the same rebalance: waiting the whole timeout would
    hold the rebalance up (measured: 5 s stalls) and refuse a slot the owner may grant."""
    flag = {"on": False}
    client = S.CapClient(_Requests(), timeout_s=5.0)

    async def rebalance_soon() -> None:
        await asyncio.sleep(0.1)
        flag["on"] = True

    t0 = time.monotonic()
    asyncio.get_running_loop().create_task(rebalance_soon())
    with pytest.raises(Requeue):
        await client.reserve("b", "L1", 10.0, rebalancing=lambda: flag["on"])
    assert time.monotonic() - t0 < 1.0
    assert client.pending == {}


def test_expired_holds_are_dropped_and_the_next_expiry_known() -> None:
    from streams.rules.caps import expire, hold_ttl_ms, new_ledger, next_expiry, reserve
    from streams.settings import BuyerCaps

    caps = BuyerCaps(leads_per_day=2)
    led = new_ledger()
    assert next_expiry(led) is None
    assert reserve(led, caps, "a", 10.0, 1_000, ttl_ms=5_000) == (True, "")
    assert reserve(led, caps, "b", 10.0, 2_000, ttl_ms=5_000) == (True, "")
    assert reserve(led, caps, "c", 10.0, 2_500, ttl_ms=5_000)[0] is False  # full
    assert next_expiry(led) == 6_000
    assert expire(led, 5_999) is False
    assert expire(led, 6_000) is True and list(led["holds"]) == ["b"]
    assert reserve(led, caps, "c", 10.0, 6_000, ttl_ms=5_000) == (True, "")
    assert hold_ttl_ms(3_000) == 120_000 and hold_ttl_ms(100_000) == 205_000
