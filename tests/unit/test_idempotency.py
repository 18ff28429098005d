"""Pure parts of safe producer retries: key checks, lead ids from keys, the bounded memory."""

from __future__ import annotations

import asyncio

import pytest

from streams.stages.ingest.idempotency import (
    KeyError_,
    LeadMemory,
    check_key,
    fingerprint,
    lead_id_for_key,
)


def test_lead_id_is_per_producer_and_key() -> None:
    a = lead_id_for_key("web", "k1")
    assert a == lead_id_for_key("web", "k1")
    assert a != lead_id_for_key("web", "k2")
    assert a != lead_id_for_key("partner", "k1")


@pytest.mark.parametrize("key", ["", "x" * 256, "has space", "tab\there", "é"])
def test_unusable_keys_are_refused(key: str) -> None:
    with pytest.raises(KeyError_):
        check_key(key)


def test_fingerprint_ignores_key_order_only() -> None:
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_memory_forgets_oldest_first_and_hands_outcomes_to_waiters() -> None:
    async def run() -> None:
        m = LeadMemory(max_entries=2)
        e = m.entry("l1")
        waiter = asyncio.get_running_loop().create_future()
        e.waiters.append(waiter)
        m.settled({"lead_id": "l1", "outcome": "unsold"})
        assert waiter.result()["outcome"] == "unsold"
        assert m.get("l1") is not None and m.get("l1").published  # type: ignore[union-attr]
        pending = asyncio.get_running_loop().create_future()
        m.entry("l2").waiters.append(pending)
        m.entry("l3")
        assert m.get("l1") is None and len(m) == 2
        m.entry("l4")  # pushes out l2: its waiter is answered "unknown", never stranded
        assert pending.done() and pending.result() == {}

    asyncio.run(run())


def test_memory_expires_by_age() -> None:
    m = LeadMemory(max_age_s=0.0)
    m.entry("old")
    assert m.get("old") is None
