"""The simulated buyers of the demo and the tests (latency, bid and post behaviour)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    Field,
)

from streams.settings.base import _Model

__all__ = ["Dist", "SimBuyerConfig", "SimulatorConfig"]


class Dist(_Model):
    """A lognormal-ish distribution given by median and p99 (simulator)."""

    median: Annotated[float, Field(ge=0)]
    p99: Annotated[float, Field(ge=0)]


class SimBuyerConfig(_Model):
    """One simulated buyer of the demo market (``pingpost buyers simulate``)."""

    #: 0 picks a free port (tests).
    port: Annotated[int, Field(ge=0, le=65535)]
    bid_probability: Annotated[float, Field(ge=0, le=1)] = 0.7
    price: Dist = Dist(median=40, p99=90)
    exclusive_share: Annotated[float, Field(ge=0, le=1)] = 0.2
    latency_ms: Dist = Dist(median=60, p99=400)
    #: Share of pings answered after the buyer's timeout (the late tail).
    late_share: Annotated[float, Field(ge=0, le=1)] = 0.02
    error_rate: Annotated[float, Field(ge=0, le=1)] = 0.01
    post_reject_rate: Annotated[float, Field(ge=0, le=1)] = 0.1
    post_error_rate: Annotated[float, Field(ge=0, le=1)] = 0.0
    #: Share of posts the buyer takes ``post_slow_ms`` to answer (it still decides: a post
    #: that times out on our side may have been accepted). A retry with the same
    #: Idempotency-Key gets the stored answer once the first has been decided.
    post_slow_share: Annotated[float, Field(ge=0, le=1)] = 0.0
    post_slow_ms: Annotated[float, Field(ge=0)] = 2000.0
    #: A buyer that repeats the lead's PII (names, email, phone in several spellings,
    #: address) in every rejection reason and error body it returns (the chaos bench).
    echo_pii: bool = False
    #: Misbehaviour for tests: garbage answers.
    mode: Literal["normal", "non_json", "http_500", "negative_price", "string_price", "slow"] = (
        "normal"
    )
    #: The conditions returned with every bid (CONTRACT §2).
    conditions: dict[str, Any] = {"max_age_minutes": 5}
    #: ``flat``: the contract's field names. ``nested``: a CRM of its own —
    #: ping ``{"offer": {"wants": …, "cpl": …, "excl": …, "terms": {…}}}``, post
    #: ``{"result": {"ok": …, "why": …}}`` — for buyers configured with a response mapping.
    response_shape: Literal["flat", "nested"] = "flat"


class SimulatorConfig(_Model):
    seed: int = 42
    host: str = "127.0.0.1"
    buyers: dict[str, SimBuyerConfig] = {}
