"""The membership fence (streams/runtime/faust_patches.py point 7, ``streams.runtime.agents.member_confirmed``):
a worker acts on its partitions only while its group membership was confirmed within the
session timeout, less a margin. The heartbeat wrapper runs aiokafka's own ``_do_heartbeat``
against a fake coordinator connection (the seam: ``_send_req``)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.consumer.group_coordinator import GroupCoordinator

from streams.runtime import faust_patches
from streams.runtime.agents import MEMBERSHIP_MARGIN_S, member_confirmed, membership_age_s

NO_ERROR, REBALANCE_IN_PROGRESS, UNKNOWN_MEMBER_ID = 0, 27, 25


def app_with(coordinator: Any, session_s: float = 10.0) -> Any:
    consumer = SimpleNamespace(
        _thread=SimpleNamespace(_consumer=SimpleNamespace(_coordinator=coordinator))
    )
    return SimpleNamespace(
        consumer=consumer, conf=SimpleNamespace(broker_session_timeout=session_s)
    )


def test_confirmed_only_within_the_session_less_the_margin() -> None:
    coordinator = SimpleNamespace(_pingpost_member_at=time.monotonic() - 1.0)
    assert member_confirmed(app_with(coordinator))
    coordinator._pingpost_member_at = time.monotonic() - (10.0 - MEMBERSHIP_MARGIN_S) - 0.5
    assert not member_confirmed(app_with(coordinator))
    # A longer session leaves more time.
    assert member_confirmed(app_with(coordinator, session_s=30.0))


def test_unknown_without_a_group_consumer() -> None:
    assert membership_age_s(SimpleNamespace()) is None
    assert member_confirmed(SimpleNamespace(conf=SimpleNamespace()))
    assert membership_age_s(app_with(SimpleNamespace())) is None


class FakeCoordinator:
    """What aiokafka's ``_do_heartbeat`` reads and calls on its coordinator."""

    def __init__(self, error_code: int) -> None:
        self.error_code = error_code
        self.group_id, self.generation, self.member_id = "g", 3, "m-1"
        self.coordinator_id = 1
        self._rejoin_needed_fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def _send_req(self, request: Any) -> Any:
        return SimpleNamespace(error_code=self.error_code)

    def request_rejoin(self) -> None:
        if not self._rejoin_needed_fut.done():
            self._rejoin_needed_fut.set_result(None)

    def reset_generation(self) -> None:
        self.generation, self.member_id = -1, ""
        self.request_rejoin()

    def coordinator_dead(self) -> None:
        pass


@pytest.fixture(autouse=True)
def patched() -> None:
    faust_patches._track_membership()


@pytest.mark.parametrize(
    "code, proof", [(NO_ERROR, True), (REBALANCE_IN_PROGRESS, False), (UNKNOWN_MEMBER_ID, False)]
)
def test_only_a_clean_heartbeat_is_a_proof(code: int, proof: bool) -> None:
    async def go() -> None:
        c = FakeCoordinator(code)
        before = time.monotonic()
        await GroupCoordinator._do_heartbeat(c)  # type: ignore[arg-type]
        at = getattr(c, "_pingpost_member_at", None)
        if proof:
            assert at is not None and at >= before  # the send time: the session restarted
        else:
            assert at is None

    asyncio.run(go())


def test_a_completed_join_is_a_proof(monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        c = FakeCoordinator(NO_ERROR)
        c._lookup_assignor = lambda protocol: None  # type: ignore[attr-defined]
        # aiokafka's own body needs a real subscription; the wrapper is what is under test.
        calls: list[Any] = []

        async def fake(self: Any, *args: Any) -> None:
            calls.append(args)

        monkeypatch.setattr(GroupCoordinator, "_on_join_complete", fake)
        monkeypatch.setattr(GroupCoordinator, "_pingpost_membership", False, raising=False)
        faust_patches._track_membership()
        await GroupCoordinator._on_join_complete(c, 4, "m-1", "faust", b"")  # type: ignore[arg-type]
        assert calls and getattr(c, "_pingpost_member_at", None) is not None

    asyncio.run(go())
