"""The post stage's class (``streams.stages.post.PostStage``) in memory: dicts for its
tables, recording senders for its topics, a real ``BuyerClient`` over a scripted transport,
a fake cap owner, a clock the test moves, and a fence that always confirms. No broker, no
Faust worker: the waterfall, the window, the caps, the PII wait and the reconciliation of
timed-out posts as the stage runs them."""

from __future__ import annotations

import asyncio
import copy
import gc
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

import schemas
from connectors.buyers import BuyerClient
from streams.runtime.agents import DeadLetters, InFlight, Requeue
from streams.settings import Settings, parse_settings
from streams.stages.post import PII_REQUEUE_MS, PostStage, settled_result

REPO = Path(__file__).resolve().parents[3]
RAW = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
T0 = 1_767_000_000_000  # the tests' "now" (epoch ms)
LEAD = "lead-1"
PII = {
    "first_name": "Ada",
    "last_name": "Lovelace",
    "email": "ada.lovelace@example.com",
    "phone": "5551234567",
}


def make_settings(**flow_changes: Any) -> Settings:
    raw = yaml.safe_load(yaml.safe_dump(RAW))
    raw["flows"]["solar"].pop("floors", None)
    raw["flows"]["solar"]["pii_wait_ms"] = 10  # the shortest allowed: a missing PII waits 10 ms
    raw["flows"]["solar"].update(flow_changes)
    return parse_settings(raw, env={})


def cand(buyer: str, price: float, *, exclusive: bool = False) -> dict[str, Any]:
    return {
        "buyer_id": buyer,
        "tier": "standard",
        "ping_id": f"ping-{buyer}",
        "price": price,
        "exclusive": exclusive,
        "conditions": {},
    }


def order(*cands: dict[str, Any], closed_at: int = T0) -> dict[str, Any]:
    return {
        "lead_id": LEAD,
        "flow": "solar",
        "source": "test",
        "mode": "exclusive" if cands and cands[0]["exclusive"] else "shared",
        "slots": 1,
        "candidates": list(cands),
        "ping_fields": {"state": "CA", "zip": "902", "homeowner": True, "consent": True},
        "received_at_ms": closed_at - 900,
        "created_at_ms": closed_at - 900,
        "opened_at_ms": closed_at - 800,
        "deadline_at_ms": closed_at - 50,
        "closed_at_ms": closed_at,
        "close_reason": "deadline",
        "close_lag_ms": 1.0,
        "pinged": len(cands),
        "bids": len(cands),
        "skip_buyers": [],
    }


class Clock:
    def __init__(self, at: int = T0) -> None:
        self.at = at

    def __call__(self) -> int:
        return self.at


@dataclass
class Sender:
    """A topic's ``send``: decodes and keeps each record; its ack is already done."""

    schema: str
    records: list[dict[str, Any]] = field(default_factory=list)

    async def __call__(self, *, key: bytes, value: bytes) -> asyncio.Future[None]:
        rec = schemas.decode_as(self.schema, value)
        assert key == rec["lead_id"].encode()
        self.records.append(rec)
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ack.set_result(None)
        return ack


@dataclass
class Buyers:
    """A buyer market behind the transport seam: each buyer's post answers, in order (the
    last one repeats); ``None`` answers nothing (the client's timeout)."""

    answers: dict[str, list[dict[str, Any] | None]]
    posts: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    async def post(
        self, url: str, headers: Mapping[str, str], body: bytes, timeout_s: float
    ) -> tuple[int, bytes]:
        buyer = next(b["id"] for b in RAW["buyers"] if b["post_url"] == url)
        self.posts.append((buyer, orjson.loads(body)))
        script = self.answers[buyer]
        answer = script.pop(0) if len(script) > 1 else script[0]
        if answer is None:
            raise TimeoutError
        return 200, orjson.dumps(answer)

    async def aclose(self) -> None:
        pass

    def asked(self) -> list[str]:
        return [b for b, _ in self.posts]


ACCEPT: dict[str, Any] = {"accepted": True}


def reject(why: str = "not today") -> dict[str, Any]:
    return {"accepted": False, "reason": why}


@dataclass
class Caps:
    """The cap owners: a refusal per buyer, every call recorded."""

    refuse: dict[str, str] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)

    async def reserve(
        self,
        buyer_id: str,
        lead_id: str,
        price: float,
        *,
        rebalancing: Any = None,
        timeout_s: float | None = None,
    ) -> tuple[bool, str]:
        self.calls.append(("reserve", buyer_id))
        why = self.refuse.get(buyer_id)
        return (why is None, why or "")

    async def commit(self, buyer_id: str, lead_id: str, price: float) -> None:
        self.calls.append(("commit", buyer_id))

    async def release(self, buyer_id: str, lead_id: str) -> None:
        self.calls.append(("release", buyer_id))


async def _no_ping(*args: Any, **kwargs: Any) -> dict[str, Any]:
    raise AssertionError("no backup wave in these flows")


class Harness:
    def __init__(
        self,
        answers: dict[str, list[dict[str, Any] | None]],
        *,
        settings: Settings | None = None,
        caps: Caps | None = None,
        pii: dict[str, Any] | None = PII,
        postings: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings or make_settings()
        self.clock = Clock()
        self.pii: dict[str, Any] = {}
        if pii is not None:
            self.pii[LEAD] = {"fields": dict(pii), "expires_at_ms": T0 + 3_600_000}
        self.postings: dict[str, Any] = {} if postings is None else postings
        self.deliveries = Sender("Delivery")
        self.results = Sender("AuctionResult")
        self.buyers = Buyers(answers)
        self.client = BuyerClient(self.buyers)
        self.caps = caps
        dead = DeadLetters(None, "post", self.settings)
        self.stage = PostStage(
            self.settings,
            pii=self.pii,
            postings=self.postings,
            send_delivery=self.deliveries,
            send_result=self.results,
            buyers=lambda: self.client,
            caps=lambda: self.caps,
            dead=dead,
            inflight=InFlight("post", 10, dead),
            plan=lambda req, at: ([], []),
            ping=_no_ping,
            ranking=lambda flow: {"acceptance": None, "payment": {}},
            confirmed=lambda: True,
            hold=lambda what: None,
            rebalancing=lambda: False,
            durable_set=self._set,
            durable_pop=self._pop,
            clock=self.clock,
        )
        #: Every write of the postings table, as (status of each attempt, its ack); the ack
        #: is done at once unless ``hold_acks`` (the changelog's acknowledgement withheld).
        self.writes: list[tuple[dict[str, str], asyncio.Future[None]]] = []
        self.hold_acks = False

    def _set(self, table: Any, key: str, value: Any, partition: int) -> asyncio.Future[None]:
        table[key] = value
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if table is self.postings:
            attempts = {b: a["status"] for b, a in value.get("attempts", {}).items()}
            self.writes.append((attempts, ack))
        if not (self.hold_acks and table is self.postings):
            ack.set_result(None)
        return ack

    @staticmethod
    def _pop(table: Any, key: str, partition: int) -> None:
        table.pop(key, None)

    def delivered(self, buyer: str) -> list[tuple[str, str]]:
        return [
            (d["status"], d["reason"]) for d in self.deliveries.records if d["buyer_id"] == buyer
        ]

    @property
    def result(self) -> dict[str, Any]:
        assert self.results.records, "no result"
        return self.results.records[-1]


async def test_an_exclusive_winner_that_accepts_is_sold() -> None:
    h = Harness({"sunrise": [ACCEPT], "brightpath": [ACCEPT]})
    await h.stage.run_order(order(cand("sunrise", 90, exclusive=True), cand("brightpath", 50)))

    assert h.buyers.asked() == ["sunrise"]
    assert h.delivered("sunrise") == [("accepted", "")]
    assert h.delivered("brightpath") == []
    body = h.buyers.posts[0][1]
    assert body["email"] == PII["email"] and body["exclusive"] is True and body["price"] == 90
    assert len(h.results.records) == 1
    assert h.result["outcome"] == "sold_exclusive"
    assert h.result["winners"] == ["sunrise"] and h.result["prices"] == [90.0]
    # Settled for good: the table keeps the encoded result alone, which nothing in it makes
    # the cyclic GC track (the waterfall's progress was ~6 tracked containers per lead).
    kept = h.postings[LEAD]
    assert list(kept) == ["result"] and not gc.is_tracked(kept)
    assert schemas.decode_as("AuctionResult", settled_result(kept) or b"") == h.result
    assert LEAD not in h.pii  # PII is not kept past the sale


async def test_no_post_leaves_before_its_pending_attempt_is_acknowledged_by_kafka() -> None:
    """The intent (the attempt recorded as pending) is on the changelog before the buyer is
    asked: only that record's acknowledgement is waited for (not a flush of the producer)."""
    h = Harness({"sunrise": [ACCEPT]})
    h.hold_acks = True
    run = asyncio.ensure_future(h.stage.run_order(order(cand("sunrise", 90, exclusive=True))))
    for _ in range(20):  # let the waterfall run as far as it can
        await asyncio.sleep(0)
    assert [w for w, _ in h.writes] == [{"sunrise": "pending"}]
    assert h.buyers.asked() == []  # the ack is withheld: no request has left
    h.writes[0][1].set_result(None)
    await asyncio.wait_for(run, 5)
    assert h.buyers.asked() == ["sunrise"] and h.result["outcome"] == "sold_exclusive"


async def test_a_settled_lead_re_emits_its_result_without_posting() -> None:
    h = Harness({"sunrise": [ACCEPT]})
    o = order(cand("sunrise", 90, exclusive=True))
    await h.stage.run_order(o)
    await h.stage.run_order(o)  # redelivered
    assert h.buyers.asked() == ["sunrise"]
    assert len(h.results.records) == 2 and h.results.records[0] == h.results.records[1]


async def test_a_settled_lead_kept_whole_by_an_older_version_re_emits_its_result() -> None:
    # A postings changelog written before settled leads were kept as their encoded result.
    first = Harness({"sunrise": [ACCEPT]})
    o = order(cand("sunrise", 90, exclusive=True))
    await first.stage.run_order(o)
    whole = {
        "attempts": {"sunrise": {"status": "accepted", "attempt": 1}},
        "sold": [{"buyer_id": "sunrise", "price": 90.0}],
        "mode": "exclusive",
        "n": 1,
        "result": orjson.loads(orjson.dumps(first.result)),  # as the changelog restores it
    }
    h = Harness({"sunrise": [ACCEPT]}, postings={LEAD: whole})
    await h.stage.run_order(o)
    assert h.buyers.asked() == []
    assert h.results.records == [first.result]


async def test_an_exclusive_winner_that_rejects_falls_back_to_the_next_bidder() -> None:
    h = Harness({"sunrise": [reject("duplicate")], "brightpath": [ACCEPT]})
    await h.stage.run_order(order(cand("sunrise", 90, exclusive=True), cand("brightpath", 50)))

    assert h.buyers.asked() == ["sunrise", "brightpath"]
    assert h.delivered("sunrise") == [("rejected", "duplicate")]
    assert h.delivered("brightpath") == [("accepted", "")]
    assert h.result["outcome"] == "sold_shared"  # the next bid did not ask for exclusivity
    assert h.result["winners"] == ["brightpath"] and h.result["post_attempts"] == 2


async def test_shared_mode_posts_to_the_top_shared_max_at_once() -> None:
    h = Harness(
        {b: [ACCEPT] for b in ("sunrise", "brightpath", "greenleaf", "backupsolar")},
        settings=make_settings(strategy={"mode": "highest", "shared_max": 2}),
    )
    started: list[str] = []
    inner = h.buyers.post

    async def slow_post(
        url: str, headers: Mapping[str, str], body: bytes, timeout_s: float
    ) -> tuple[int, bytes]:
        started.append(url)
        await asyncio.sleep(0.01)
        # both slots are in flight before either answers
        assert len(started) == 2
        return await inner(url, headers, body, timeout_s)

    h.buyers.post = slow_post  # type: ignore[method-assign]
    await h.stage.run_order(
        order(cand("sunrise", 60), cand("brightpath", 50), cand("greenleaf", 40))
    )
    assert sorted(h.buyers.asked()) == ["brightpath", "sunrise"]
    assert h.result["outcome"] == "sold_shared"
    assert h.result["winners"] == ["sunrise", "brightpath"]
    assert h.result["price_total"] == 110.0
    assert all(body["exclusive"] is False for _, body in h.buyers.posts)


async def test_a_timed_out_post_is_not_resold_and_is_reconciled_later() -> None:
    h = Harness({"sunrise": [None], "brightpath": [ACCEPT]})
    await h.stage.run_order(order(cand("sunrise", 90, exclusive=True), cand("brightpath", 50)))

    # asked again with the same key while the window allowed, then left ambiguous
    assert set(h.buyers.asked()) == {"sunrise"}
    assert len({body["post_id"] for _, body in h.buyers.posts}) == 1
    assert h.delivered("sunrise") == [("timeout", "no answer within 3000 ms")]
    assert h.delivered("brightpath") == []  # an exclusive lead is not sold to the next bidder
    assert h.result["outcome"] == "unsold"
    assert h.result["reason"].startswith("no answer in time from sunrise")
    state = h.postings[LEAD]
    assert state["reconcile"]["due_ms"] == T0 + 1000
    assert LEAD in h.pii  # kept until the reconciliation is done
    settled_at = h.result["settled_at_ms"]

    # not due yet: nobody is asked
    h.buyers.answers["sunrise"] = [ACCEPT]
    asks = len(h.buyers.posts)
    await h.stage.reconcile_due()
    await h.stage.drain_reconciling()
    assert len(h.buyers.posts) == asks

    h.clock.at = T0 + 1000
    await h.stage.reconcile_due()
    await h.stage.drain_reconciling()
    assert len(h.buyers.posts) == asks + 1
    assert h.delivered("sunrise")[-1] == (
        "accepted",
        "accepted after the post timed out (reconciled)",
    )
    assert len(h.results.records) == 2
    assert h.result["outcome"] == "sold_exclusive" and h.result["winners"] == ["sunrise"]
    assert h.result["settled_at_ms"] == settled_at  # a correction of the same lead
    assert "reconcile" not in h.postings[LEAD]
    assert LEAD not in h.pii

    # recorded once: later ticks and a direct retry change nothing
    h.clock.at = T0 + 60_000
    await h.stage.reconcile_due()
    await h.stage.drain_reconciling()
    await h.stage.reconcile_lead(LEAD)
    assert len(h.buyers.posts) == asks + 1 and len(h.results.records) == 2
    assert [d for d in h.deliveries.records if d["status"] == "accepted"] == [
        h.deliveries.records[-1]
    ]


async def test_a_capped_buyer_refused_a_slot_is_skipped_with_the_reason() -> None:
    caps = Caps(refuse={"voltmarket": "leads_per_hour 150 reached"})
    h = Harness({"voltmarket": [ACCEPT], "sunrise": [ACCEPT]}, caps=caps)
    await h.stage.run_order(order(cand("voltmarket", 60), cand("sunrise", 40)))

    assert h.buyers.asked() == ["sunrise"]
    assert h.delivered("voltmarket") == [("skipped", "cap: leads_per_hour 150 reached")]
    assert caps.calls == [("reserve", "voltmarket")]  # sunrise is not capped
    assert h.result["winners"] == ["sunrise"]


async def test_a_capped_buyer_granted_a_slot_is_counted_on_acceptance() -> None:
    caps = Caps()
    h = Harness({"voltmarket": [ACCEPT]}, caps=caps)
    await h.stage.run_order(order(cand("voltmarket", 60)))
    assert caps.calls == [("reserve", "voltmarket"), ("commit", "voltmarket")]
    assert h.result["winners"] == ["voltmarket"]


async def test_only_capped_buyers_refused_leaves_the_lead_unsold_naming_the_caps() -> None:
    caps = Caps(refuse={"voltmarket": "spend reached"})
    h = Harness({"voltmarket": [ACCEPT]}, caps=caps)
    await h.stage.run_order(order(cand("voltmarket", 60)))
    assert h.buyers.asked() == []
    assert h.result["outcome"] == "unsold"
    assert h.result["reason"] == (
        "no acceptable bid at post time; caps reached: voltmarket: spend reached"
    )


async def test_no_post_is_sent_with_less_than_the_minimum_budget_left() -> None:
    s = make_settings(post_timeout_ms=5000, min_post_budget_ms=200)
    h = Harness({"sunrise": [ACCEPT]}, settings=s)
    # resumed with 199 ms of its window left
    h.postings[LEAD] = {
        "attempts": {},
        "sold": [],
        "mode": None,
        "n": 0,
        "result": None,
        "spent_ms": 5000 - 199,
    }
    await h.stage.run_order(order(cand("sunrise", 90, exclusive=True)))
    assert h.buyers.asked() == []
    assert h.result["outcome"] == "unsold"
    assert h.result["reason"] == "post window of 5000 ms exhausted"
    assert h.result["post_attempts"] == 0


async def test_the_window_left_is_used_when_at_least_the_minimum() -> None:
    s = make_settings(post_timeout_ms=5000, min_post_budget_ms=200)
    h = Harness({"sunrise": [ACCEPT]}, settings=s)
    h.postings[LEAD] = {
        "attempts": {},
        "sold": [],
        "mode": None,
        "n": 0,
        "result": None,
        "spent_ms": 5000 - 200,
    }
    await h.stage.run_order(order(cand("sunrise", 90, exclusive=True)))
    assert h.buyers.asked() == ["sunrise"]
    assert h.result["winners"] == ["sunrise"]


async def test_missing_pii_is_requeued_within_the_requeue_window() -> None:
    h = Harness({"sunrise": [ACCEPT]}, pii=None)
    h.clock.at = T0 + PII_REQUEUE_MS - 1
    with pytest.raises(Requeue):
        await h.stage.run_order(order(cand("sunrise", 90, exclusive=True)))
    assert h.buyers.asked() == [] and h.results.records == []
    assert LEAD not in h.postings


async def test_missing_pii_after_the_requeue_window_settles_unsold() -> None:
    h = Harness({"sunrise": [ACCEPT]}, pii=None)
    h.clock.at = T0 + PII_REQUEUE_MS
    await h.stage.run_order(order(cand("sunrise", 90, exclusive=True)))
    assert h.buyers.asked() == []
    assert h.result["outcome"] == "unsold"
    assert h.result["reason"] == "PII unavailable (no lead-pii record 60 s after the close)"


async def test_pii_arriving_while_the_post_waits_is_used() -> None:
    s = make_settings(pii_wait_ms=2000)
    h = Harness({"sunrise": [ACCEPT]}, settings=s, pii=None)
    got = asyncio.ensure_future(h.stage.wait_pii(LEAD, 2.0))
    await asyncio.sleep(0)
    h.pii[LEAD] = {"fields": PII, "expires_at_ms": T0}
    h.stage._waiters.pop(LEAD).set()  # what the pii agent does once it stored the record
    assert (await got) == {"fields": PII, "expires_at_ms": T0}


async def test_a_rejection_reason_is_scrubbed_of_the_leads_pii() -> None:
    why = f"duplicate: Ada Lovelace <{PII['email']}> called from (555) 123-4567"
    h = Harness({"sunrise": [reject(why)]})
    await h.stage.run_order(order(cand("sunrise", 90, exclusive=True)))
    [(status, reason)] = h.delivered("sunrise")
    assert status == "rejected"
    assert reason.startswith("duplicate: ")
    for value in ("Ada", "Lovelace", PII["email"], "123-4567"):
        assert value not in reason
    assert "[redacted]" in reason
    assert h.result["reason"] == "all posts rejected or failed"


async def test_a_lead_whose_ping_rounds_were_lost_is_unsold_for_a_platform_reason() -> None:
    from streams.tools.report import is_platform_reason

    h = Harness({})
    await h.stage.run_order({**order(), "close_reason": "round_lost"})
    assert h.buyers.asked() == []
    reason = h.result["reason"]
    assert reason.startswith("ping round lost") and is_platform_reason(reason)
    # (a round that came back with no bid is the market's answer)
    h = Harness({})
    await h.stage.run_order(order())
    assert h.result["reason"] == "no bids"
    assert not is_platform_reason(h.result["reason"])


class _ScannedDict(dict):  # type: ignore[type-arg]
    """A table whose full scans are counted."""

    scans = 0

    def items(self):  # type: ignore[no-untyped-def,override]
        self.scans += 1
        return super().items()


async def test_the_reconcile_timer_reads_its_index_not_the_whole_table() -> None:
    """The postings table holds every lead of the last closed_retention_s: the reconcile
    timer (each second) scans it only to rebuild its index, not on every tick."""
    postings = _ScannedDict({f"old-{i}": {"result": {"outcome": "sold"}} for i in range(1000)})
    h = Harness({"sunrise": [None], "brightpath": [ACCEPT]}, postings=postings)
    await h.stage.run_order(order(cand("sunrise", 90, exclusive=True), cand("brightpath", 50)))
    assert h.postings[LEAD]["reconcile"]["due_ms"] == T0 + 1000
    h.buyers.answers["sunrise"] = [ACCEPT]
    asks = len(h.buyers.posts)
    for tick in range(20):
        h.clock.at = T0 + tick * 1000
        await h.stage.reconcile_due()
        await h.stage.drain_reconciling()
    assert postings.scans == 1  # the first tick's rebuild; not one per tick
    assert len(h.buyers.posts) == asks + 1  # asked again when due, all the same
    assert h.result["outcome"] == "sold_exclusive"


async def test_a_reconcile_entry_restored_from_the_changelog_is_found() -> None:
    """An entry this worker did not write (restored at start or after a partition moved
    here) is found on the first tick after the table's recovery, and by the periodic
    rebuild at the latest."""
    from streams.stages.post import RECONCILE_RESCAN_S

    first = Harness({"sunrise": [None], "brightpath": [ACCEPT]})
    await first.stage.run_order(order(cand("sunrise", 90, exclusive=True), cand("brightpath", 50)))
    restored = copy.deepcopy(first.postings[LEAD])
    assert restored["reconcile"]["due_ms"] == T0 + 1000

    for recover in (True, False):
        h = Harness({"sunrise": [ACCEPT]})
        h.clock.at = T0 + 1000
        await h.stage.reconcile_due()  # the index is built: nothing to reconcile yet
        h.postings[LEAD] = copy.deepcopy(restored)  # the changelog's entry arrives
        await h.stage.reconcile_due()
        await h.stage.drain_reconciling()
        assert h.buyers.posts == []  # not in the index
        if recover:
            h.stage.recovered()
        else:
            h.clock.at = T0 + 1000 + int(RECONCILE_RESCAN_S * 1000)
        await h.stage.reconcile_due()
        await h.stage.drain_reconciling()
        assert h.buyers.asked() == ["sunrise"], recover
        assert h.result["outcome"] == "sold_exclusive"
