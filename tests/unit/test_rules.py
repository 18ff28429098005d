"""streams.rules and the rule keys of streams.settings: eligibility (filters, schedules,
pauses, caps), floors, scoring, winner selection, waves, auto-pause; config errors name keys.

Every case is a row of a table; the clock is always passed in (no sleeps, no wall clock)."""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from streams.rules import (
    BuyerCounters,
    acceptance_rate,
    below_floor_reason,
    cap_allows,
    cap_periods,
    choose_mode,
    eligibility,
    floor_breakdown,
    floor_for,
    pause_decision,
    pause_until_ms,
    rank,
    score,
    scores,
    wave_of,
)
from streams.rules.pinging import plan_pings
from streams.settings import (
    BuyerCaps,
    BuyerConfig,
    ConfigError,
    FlowConfig,
    ScoreWeights,
    Settings,
    StrategyConfig,
    load_settings,
    parse_settings,
)

#: The time the plans are made at (the rules take the clock as an argument).
NOW_MS = int(time.time() * 1000)


REPO = Path(__file__).resolve().parents[2]
LA = ZoneInfo("America/Los_Angeles")
UTC = UTC


def la(y: int, mo: int, d: int, h: int, mi: int = 0, s: int = 0) -> datetime:
    """A wall-clock time in Los Angeles (only for times that exist exactly once)."""
    return datetime(y, mo, d, h, mi, s, tzinfo=LA)


def utc(y: int, mo: int, d: int, h: int, mi: int = 0, s: int = 0) -> datetime:
    return datetime(y, mo, d, h, mi, s, tzinfo=UTC)


def ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


# 2024-06-03 is a Monday; 2024-06-08 a Saturday.
MON_NOON = la(2024, 6, 3, 12)


def base_raw() -> dict[str, Any]:
    """A solar flow like the demo's, plus a numeric ping field, and two buyers."""
    return {
        "flows": {
            "solar": {
                "fields": {
                    "state": {"type": "string", "pattern": "^[A-Z]{2}$"},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                    "homeowner": {"type": "boolean"},
                    "electric_bill": {
                        "type": "string",
                        "enum": ["$0-100", "$100-200", "$200-300", "$300-400", "$400+"],
                    },
                    "credit_range": {
                        "type": "string",
                        "enum": ["<600", "600-649", "650-699", "700+"],
                    },
                    "roof_age": {"type": "integer", "min": 0, "max": 100},
                    "consent": {"type": "boolean"},
                    "email": {"type": "string"},
                    "phone": {"type": "string"},
                },
                "required": ["state", "email"],
                "ping_fields": {
                    "state": {},
                    "zip": {"transform": "zip3"},
                    "homeowner": {},
                    "electric_bill": {},
                    "credit_range": {},
                    "roof_age": {},
                    "consent": {},
                },
                "pii_fields": ["email", "phone"],
            }
        },
        "buyers": [
            {
                "id": "alpha",
                "flows": ["solar"],
                "ping_url": "http://a.test/ping",
                "post_url": "http://a.test/post",
            },
            {
                "id": "beta",
                "flows": ["solar"],
                "ping_url": "http://b.test/ping",
                "post_url": "http://b.test/post",
            },
        ],
    }


def parse(raw: dict[str, Any]) -> Settings:
    return parse_settings(raw, env={})


def buyer(**kw: Any) -> BuyerConfig:
    raw = base_raw()
    raw["buyers"][0].update(kw)
    return parse(raw).buyers[0]


def flow(**kw: Any) -> FlowConfig:
    raw = base_raw()
    raw["flows"]["solar"].update(kw)
    return parse(raw).flows["solar"]


LEAD = {
    "state": "CA",
    "zip": "902",
    "homeowner": True,
    "electric_bill": "$200-300",
    "credit_range": "700+",
    "roof_age": 12,
    "consent": True,
}


def lead(**kw: Any) -> dict[str, Any]:
    out = dict(LEAD)
    for k, v in kw.items():
        if v is _MISSING:
            out.pop(k, None)
        else:
            out[k] = v
    return out


_MISSING = object()


# =========================================================================== defaults


def test_demo_config_loads_and_new_keys_keep_todays_behaviour() -> None:
    s = load_settings(REPO / "config" / "demo.yaml")
    f = s.flows["solar"]
    # the demo shows floors (base 20, exclusive 75); everything else keeps the defaults
    assert f.floors.base == 20.0 and f.floors.exclusive_min == 75.0
    assert f.waves is None and f.duplicates is None
    assert f.strategy.rank_by == "price"
    assert not f.strategy.exclusive_only and not f.strategy.shared_only
    capped = {b.id for b in s.buyers if b.caps is not None or b.auto_pause is not None}
    assert capped == {"voltmarket"}  # the demo shows a cap and an auto-pause on one buyer
    for b in s.buyers:
        assert b.schedule is None
        assert b.payment_speed == 0.5 and b.filters.fields == {}
        assert wave_of(b.tier, f.waves) == 0  # one wave pinging every tier


@pytest.mark.parametrize("state", ["CA", "NY", "TX", None])
def test_eligibility_agrees_with_todays_plan_pings_on_the_demo(state: str | None) -> None:
    s = load_settings(REPO / "config" / "demo.yaml")
    pf = lead(state=state)
    targets, filtered = plan_pings(s, "solar", pf, NOW_MS)
    eligible = [
        b.id for b in s.buyers_for("solar") if eligibility(b, pf, MON_NOON, flow="solar") is None
    ]
    assert eligible == [b.id for b in targets]
    assert len(filtered) == len(s.buyers_for("solar")) - len(eligible)


def test_strategy_defaults() -> None:
    st = StrategyConfig()
    assert (st.rank_by, st.exclusive_only, st.shared_only) == ("price", False, False)
    assert (st.weights.price, st.weights.acceptance, st.weights.payment) == (0.5, 0.3, 0.2)
    assert (st.acceptance_prior.rate, st.acceptance_prior.weight) == (0.7, 10.0)


FULL_FLOW = {
    "floors": {
        "base": 40.0,
        "exclusive_min": 75.0,
        "quality": {
            "rules": [
                {"field": "credit_range", "equals": "700+", "multiplier": 1.2},
                {"field": "homeowner", "equals": True, "multiplier": 1.1},
            ],
            "default": 1.0,
        },
        "business_hours": {
            "timezone": "America/Los_Angeles",
            "days": ["mon", "tue", "wed", "thu", "fri"],
            "hours": "09:00-17:00",
            "premium": 1.2,
        },
    },
    "strategy": {
        "rank_by": "score",
        "weights": {"price": 0.5, "acceptance": 0.3, "payment": 0.2},
        "shared_max": 3,
        "exclusive_only": False,
        "shared_only": False,
    },
    "waves": [
        {"tiers": ["premium"], "timeout_ms": 750},
        {"tiers": ["standard"], "timeout_ms": 500},
        {"tiers": ["backup"], "timeout_ms": 300},
    ],
    "duplicates": {"fields": ["email", "phone"], "window_s": 86400, "action": "skip_buyers"},
}
FULL_BUYER = {
    "filters": {
        "states": ["CA", "TX"],
        "fields": {
            "credit_range": {"in": ["700+", "650-699"]},
            "electric_bill": {"eq": "$200-300"},
            "roof_age": {"min": 0, "max": 25},
            "zip": {"not_in": ["100"]},
        },
    },
    "schedule": {
        "timezone": "America/New_York",
        "days": ["Mon", "tue", "wed", "thu", "fri"],
        "hours": "08:00-20:00",
    },
    "caps": {"leads_per_hour": 10, "leads_per_day": 100, "spend_per_day": 5000.0},
    "payment_speed": 0.9,
    "auto_pause": {"window_s": 60, "min_pings": 20, "max_failure_rate": 0.5, "cool_down_s": 120},
}


def test_every_new_key_parses() -> None:
    raw = base_raw()
    raw["flows"]["solar"].update(copy.deepcopy(FULL_FLOW))
    raw["buyers"][0].update(copy.deepcopy(FULL_BUYER))
    s = parse(raw)
    f, b = s.flows["solar"], s.buyers[0]
    assert f.floors.quality is not None and f.floors.quality.rules[1].equals is True
    assert f.floors.business_hours is not None and f.floors.business_hours.premium == 1.2
    assert [w.tiers for w in f.waves or []] == [["premium"], ["standard"], ["backup"]]
    assert f.duplicates is not None and f.duplicates.action == "skip_buyers"
    assert f.strategy.rank_by == "score"
    assert b.filters.fields["credit_range"].in_ == ["700+", "650-699"]
    assert b.schedule is not None and b.schedule.days[0] == "mon"  # case-insensitive
    assert b.caps is not None and b.caps.leads_per_hour == 10 and b.caps.timezone == "UTC"
    assert b.payment_speed == 0.9
    assert b.auto_pause is not None and b.auto_pause.cool_down_s == 120
    # a quality rule may also match a list; wrapping hours and 24:00 are valid
    raw["flows"]["solar"]["floors"]["quality"]["rules"].append(
        {"field": "zip", "in": ["902", "941"], "multiplier": 1.05}
    )
    raw["buyers"][1]["schedule"] = {"timezone": "UTC", "hours": "22:00-06:00"}
    raw["flows"]["solar"]["floors"]["business_hours"]["hours"] = "09:00-24:00"
    parse(raw)


# =========================================================================== config errors

Mutator = Callable[[dict[str, Any]], None]


def _flow_set(path: list[Any], value: Any) -> Mutator:
    def mut(raw: dict[str, Any]) -> None:
        node: Any = raw["flows"]["solar"]
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value

    return mut


def _buyer_set(key: str, value: Any, i: int = 0) -> Mutator:
    def mut(raw: dict[str, Any]) -> None:
        raw["buyers"][i][key] = value

    return mut


def _rule(**kw: Any) -> Mutator:
    return _flow_set(
        ["floors", "quality", "rules", 0],
        {"field": "credit_range", "equals": "700+", "multiplier": 1.2, **kw},
    )


def _filter(name: str, spec: Any) -> Mutator:
    return _buyer_set("filters", {"fields": {name: spec}})


def _bh(**kw: Any) -> Mutator:
    return _flow_set(["floors", "business_hours"], {**FULL_FLOW["floors"]["business_hours"], **kw})  # type: ignore[dict-item]


def _without(d: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != key}


CONFIG_ERRORS: list[tuple[str, Mutator, list[str]]] = [
    (
        "exclusive_only and shared_only",
        _flow_set(["strategy"], {"exclusive_only": True, "shared_only": True}),
        ["flows.solar.strategy", "exclusive_only", "shared_only"],
    ),
    (
        "rank_by unknown",
        _flow_set(["strategy"], {"rank_by": "random"}),
        ["flows.solar.strategy.rank_by"],
    ),
    (
        "negative weight",
        _flow_set(["strategy"], {"weights": {"price": -1}}),
        ["flows.solar.strategy.weights.price"],
    ),
    (
        "all weights zero",
        _flow_set(["strategy"], {"weights": {"price": 0, "acceptance": 0, "payment": 0}}),
        ["flows.solar.strategy.weights", "positive"],
    ),
    (
        "prior rate above 1",
        _flow_set(["strategy"], {"acceptance_prior": {"rate": 1.5}}),
        ["flows.solar.strategy.acceptance_prior.rate"],
    ),
    (
        "quality rule on a PII field",
        _rule(field="email", equals="x@y.z"),
        ["flows.solar", "floors.quality.rules[0].field", "email", "PII"],
    ),
    (
        "quality rule on an unknown field",
        _rule(field="income"),
        ["flows.solar", "floors.quality.rules[0].field", "income", "not a ping field"],
    ),
    (
        "quality rule equals a value outside the enum",
        _rule(equals="700 +"),
        ["floors.quality.rules[0].equals", "700 +"],
    ),
    (
        "quality rule equals the wrong type",
        _rule(field="homeowner", equals="yes"),
        ["floors.quality.rules[0].equals", "boolean"],
    ),
    (
        "quality rule on zip3 with the full zip as a number",
        _rule(field="zip", equals=90210),
        ["floors.quality.rules[0].equals", "zip3"],
    ),
    (
        "quality rule with equals and in",
        _rule(**{"in": ["700+"]}),
        ["flows.solar.floors.quality.rules[0]", "exactly one"],
    ),
    (
        "quality rule with neither",
        _flow_set(["floors", "quality", "rules", 0], {"field": "credit_range", "multiplier": 1.2}),
        ["flows.solar.floors.quality.rules[0]", "exactly one"],
    ),
    (
        "quality rule with empty in",
        _rule(equals=None, **{"in": []}),
        ["flows.solar.floors.quality.rules[0].in"],
    ),
    (
        "quality multiplier zero",
        _rule(multiplier=0),
        ["flows.solar.floors.quality.rules[0].multiplier"],
    ),
    (
        "quality default negative",
        _flow_set(["floors", "quality", "default"], -1),
        ["flows.solar.floors.quality.default"],
    ),
    ("negative base", _flow_set(["floors", "base"], -5), ["flows.solar.floors.base"]),
    (
        "negative exclusive_min",
        _flow_set(["floors", "exclusive_min"], -1),
        ["flows.solar.floors.exclusive_min"],
    ),
    ("unknown floors key", _flow_set(["floors", "bsae"], 5), ["flows.solar.floors.bsae"]),
    (
        "business hours unknown time zone",
        _bh(timezone="Mars/Olympus_Mons"),
        ["flows.solar.floors.business_hours.timezone", "Mars/Olympus_Mons"],
    ),
    (
        "business hours not HH:MM-HH:MM",
        _bh(hours="9-17"),
        ["flows.solar.floors.business_hours.hours", "HH:MM-HH:MM"],
    ),
    (
        "business hours past 24:00",
        _bh(hours="09:00-24:30"),
        ["flows.solar.floors.business_hours.hours"],
    ),
    (
        "business hours start at 24:00",
        _bh(hours="24:00-06:00"),
        ["flows.solar.floors.business_hours.hours"],
    ),
    (
        "business hours empty window",
        _bh(hours="09:00-09:00"),
        ["flows.solar.floors.business_hours.hours", "empty"],
    ),
    (
        "business hours unknown day",
        _bh(days=["mon", "funday"]),
        ["flows.solar.floors.business_hours.days[1]"],
    ),
    ("business hours no days", _bh(days=[]), ["flows.solar.floors.business_hours.days"]),
    (
        "business hours without premium",
        _flow_set(
            ["floors", "business_hours"], _without(FULL_FLOW["floors"]["business_hours"], "premium")
        ),  # type: ignore[arg-type]
        ["flows.solar.floors.business_hours.premium", "required"],
    ),
    (
        "business hours without time zone",
        _flow_set(
            ["floors", "business_hours"],
            _without(FULL_FLOW["floors"]["business_hours"], "timezone"),
        ),  # type: ignore[arg-type]
        ["flows.solar.floors.business_hours.timezone", "required"],
    ),
    (
        "wave without tiers",
        _flow_set(["waves", 1], {"tiers": [], "timeout_ms": 500}),
        ["flows.solar.waves[1].tiers", "at least one tier"],
    ),
    (
        "wave without timeout",
        _flow_set(["waves", 0], {"tiers": ["premium"]}),
        ["flows.solar.waves[0].timeout_ms", "required"],
    ),
    (
        "tier in two waves",
        _flow_set(["waves", 2], {"tiers": ["premium"], "timeout_ms": 300}),
        ["flows.solar", "waves[2].tiers", "premium", "waves[0]"],
    ),
    ("empty wave list", _flow_set(["waves"], []), ["flows.solar", "waves", "at least one"]),
    (
        "duplicates on an undeclared field",
        _flow_set(["duplicates"], {"fields": ["ssn"]}),
        ["flows.solar", "duplicates.fields", "ssn"],
    ),
    (
        "duplicates without fields",
        _flow_set(["duplicates"], {"fields": []}),
        ["flows.solar.duplicates.fields"],
    ),
    (
        "duplicates bad action",
        _flow_set(["duplicates"], {"fields": ["email"], "action": "drop"}),
        ["flows.solar.duplicates.action"],
    ),
    (
        "buyer filter on a PII field",
        _filter("email", {"eq": "a@b.c"}),
        ["buyers[0].filters.fields.email", "not a ping field"],
    ),
    (
        "buyer filter without operator",
        _filter("credit_range", {}),
        ["buyers[0].filters.fields.credit_range", "at least one"],
    ),
    (
        "buyer filter with in and eq",
        _filter("credit_range", {"in": ["700+"], "eq": "700+"}),
        ["buyers[0].filters.fields.credit_range", "not both"],
    ),
    (
        "buyer filter with empty in",
        _filter("credit_range", {"in": []}),
        ["buyers[0].filters.fields.credit_range", "empty"],
    ),
    (
        "buyer filter typo in enum",
        _filter("credit_range", {"in": ["700+", "750+"]}),
        ["buyers[0].filters.fields.credit_range.in", "750+"],
    ),
    (
        "buyer filter not_in typo",
        _filter("credit_range", {"not_in": ["<500"]}),
        ["buyers[0].filters.fields.credit_range.not_in", "<500"],
    ),
    (
        "buyer filter eq wrong type",
        _filter("homeowner", {"eq": "true"}),
        ["buyers[0].filters.fields.homeowner.eq", "boolean"],
    ),
    (
        "buyer filter min above max",
        _filter("roof_age", {"min": 30, "max": 5}),
        ["buyers[0].filters.fields.roof_age", "above max"],
    ),
    (
        "buyer filter min on a string",
        _filter("credit_range", {"min": 1}),
        ["buyers[0].filters.fields.credit_range", "min/max"],
    ),
    (
        "buyer filter min on zip3",
        _filter("zip", {"min": 900}),
        ["buyers[0].filters.fields.zip", "min/max", "zip3"],
    ),
    (
        "buyer filter python name",
        _filter("credit_range", {"in_": ["700+"]}),
        ["buyers[0].filters.fields.credit_range.in_", "not permitted"],
    ),
    (
        "schedule unknown time zone",
        _buyer_set("schedule", {"timezone": "EST5"}),
        ["buyers[0].schedule.timezone", "EST5"],
    ),
    (
        "schedule without time zone",
        _buyer_set("schedule", {"hours": "08:00-20:00"}),
        ["buyers[0].schedule.timezone", "required"],
    ),
    (
        "schedule bad hours",
        _buyer_set("schedule", {"timezone": "UTC", "hours": "8am-8pm"}),
        ["buyers[0].schedule.hours"],
    ),
    ("negative cap", _buyer_set("caps", {"leads_per_day": -1}), ["buyers[0].caps.leads_per_day"]),
    (
        "fractional lead cap",
        _buyer_set("caps", {"leads_per_hour": 2.5}),
        ["buyers[0].caps.leads_per_hour"],
    ),
    (
        "negative spend cap",
        _buyer_set("caps", {"spend_per_day": -0.01}),
        ["buyers[0].caps.spend_per_day"],
    ),
    (
        "caps unknown time zone",
        _buyer_set("caps", {"timezone": "Nowhere/City"}),
        ["buyers[0].caps.timezone"],
    ),
    ("payment speed above 1", _buyer_set("payment_speed", 1.5, i=1), ["buyers[1].payment_speed"]),
    (
        "auto-pause rate above 1",
        _buyer_set("auto_pause", {"max_failure_rate": 2}),
        ["buyers[0].auto_pause.max_failure_rate"],
    ),
    (
        "auto-pause zero pings",
        _buyer_set("auto_pause", {"min_pings": 0}),
        ["buyers[0].auto_pause.min_pings"],
    ),
    (
        "auto-pause unknown key",
        _buyer_set("auto_pause", {"windows": 60}),
        ["buyers[0].auto_pause.windows", "not permitted"],
    ),
]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [(m, e) for _, m, e in CONFIG_ERRORS],
    ids=[n for n, _, _ in CONFIG_ERRORS],
)
def test_config_error_names_the_key(mutate: Mutator, expected: list[str]) -> None:
    raw = base_raw()
    raw["flows"]["solar"].update(copy.deepcopy(FULL_FLOW))
    raw["buyers"][0].update(copy.deepcopy(FULL_BUYER))
    parse(raw)  # valid before the mutation, so the mutation alone is the error
    mutate(raw)
    with pytest.raises(ConfigError) as info:
        parse(raw)
    msg = str(info.value)
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_filter_field_must_be_a_ping_field_of_every_flow_the_buyer_serves() -> None:
    raw = base_raw()
    roof = copy.deepcopy(raw["flows"]["solar"])
    del roof["ping_fields"]["roof_age"]
    raw["flows"]["roof"] = roof
    raw["buyers"][0]["flows"] = ["solar", "roof"]
    raw["buyers"][0]["filters"] = {"fields": {"roof_age": {"max": 20}}}
    with pytest.raises(ConfigError) as info:
        parse(raw)
    assert "buyers[0].filters.fields.roof_age" in str(info.value)
    assert "'roof'" in str(info.value)
    raw["buyers"][0]["flows"] = ["solar"]
    assert parse(raw).buyers[0].filters.fields["roof_age"].max == 20


def test_renamed_ping_field_is_referenced_by_its_ping_name() -> None:
    raw = base_raw()
    raw["flows"]["solar"]["ping_fields"]["credit_range"] = {"rename": "credit"}
    raw["flows"]["solar"]["floors"] = {
        "base": 10,
        "quality": {"rules": [{"field": "credit_range", "equals": "700+", "multiplier": 1.2}]},
    }
    with pytest.raises(ConfigError, match=r"floors\.quality\.rules\[0\]\.field"):
        parse(raw)
    raw["flows"]["solar"]["floors"]["quality"]["rules"][0]["field"] = "credit"
    f = parse(raw).flows["solar"]
    assert floor_for(f, {"credit": "700+"}, MON_NOON, exclusive=False) == 12.0


# =========================================================================== eligibility

NY_SCHED = {
    "timezone": "America/Los_Angeles",
    "days": ["mon", "tue", "wed", "thu", "fri"],
    "hours": "08:00-20:00",
}
WRAP_FRI = {"timezone": "America/Los_Angeles", "days": ["fri"], "hours": "22:00-06:00"}
WRAP_ALL = {"timezone": "America/Los_Angeles", "hours": "22:00-06:00"}
SAT_NIGHT = {"timezone": "America/Los_Angeles", "days": ["sat"], "hours": "22:00-06:00"}
STATES = {"filters": {"states": ["CA", "TX"]}}


def _f(**fields: Any) -> dict[str, Any]:
    return {"filters": {"fields": fields}}


ELIGIBILITY: list[
    tuple[str, dict[str, Any], dict[str, Any], datetime | int, dict[str, Any], str | None]
] = [
    # (id, buyer config, lead, at, kwargs, expected reason or None)
    ("no rules", {}, LEAD, MON_NOON, {}, None),
    ("state in filter", STATES, LEAD, MON_NOON, {}, None),
    (
        "state not in filter",
        STATES,
        lead(state="NY"),
        MON_NOON,
        {},
        "state NY not in filter [CA, TX]",
    ),
    (
        "state missing",
        STATES,
        lead(state=_MISSING),
        MON_NOON,
        {},
        "state (missing) not in filter [CA, TX]",
    ),
    ("field in", _f(credit_range={"in": ["700+", "650-699"]}), LEAD, MON_NOON, {}, None),
    (
        "field not in",
        _f(credit_range={"in": ["700+", "650-699"]}),
        lead(credit_range="<600"),
        MON_NOON,
        {},
        "credit_range <600 not in filter [700+, 650-699]",
    ),
    (
        "field missing",
        _f(credit_range={"in": ["700+"]}),
        lead(credit_range=_MISSING),
        MON_NOON,
        {},
        "credit_range missing",
    ),
    ("field eq", _f(electric_bill={"eq": "$200-300"}), LEAD, MON_NOON, {}, None),
    (
        "field not eq",
        _f(electric_bill={"eq": "$200-300"}),
        lead(electric_bill="$0-100"),
        MON_NOON,
        {},
        "electric_bill $0-100 is not $200-300",
    ),
    (
        "boolean eq false",
        _f(homeowner={"eq": True}),
        lead(homeowner=False),
        MON_NOON,
        {},
        "homeowner false is not true",
    ),
    (
        "1 is not true",
        _f(homeowner={"eq": True}),
        lead(homeowner=1),
        MON_NOON,
        {},
        "homeowner 1 is not true",
    ),
    (
        "not_in excluded",
        _f(credit_range={"not_in": ["<600"]}),
        lead(credit_range="<600"),
        MON_NOON,
        {},
        "credit_range <600 is excluded by filter [<600]",
    ),
    ("not_in passes", _f(credit_range={"not_in": ["<600"]}), LEAD, MON_NOON, {}, None),
    ("min inclusive", _f(roof_age={"min": 5, "max": 30}), lead(roof_age=5), MON_NOON, {}, None),
    ("max inclusive", _f(roof_age={"min": 5, "max": 30}), lead(roof_age=30), MON_NOON, {}, None),
    (
        "below min",
        _f(roof_age={"min": 5, "max": 30}),
        lead(roof_age=4),
        MON_NOON,
        {},
        "roof_age 4 below filter min 5",
    ),
    (
        "above max",
        _f(roof_age={"min": 5, "max": 30}),
        lead(roof_age=31),
        MON_NOON,
        {},
        "roof_age 31 above filter max 30",
    ),
    (
        "range on missing",
        _f(roof_age={"max": 30}),
        lead(roof_age=_MISSING),
        MON_NOON,
        {},
        "roof_age missing",
    ),
    ("zip3 value in", _f(zip={"in": ["902", "941"]}), LEAD, MON_NOON, {}, None),
    (
        "zip3 value out",
        _f(zip={"in": ["902", "941"]}),
        lead(zip="100"),
        MON_NOON,
        {},
        "zip 100 not in filter [902, 941]",
    ),
    # schedule: start inclusive, end exclusive, in the buyer's zone
    ("schedule start", {"schedule": NY_SCHED}, lead(), la(2024, 6, 3, 8), {}, None),
    ("schedule last second", {"schedule": NY_SCHED}, lead(), la(2024, 6, 3, 19, 59, 59), {}, None),
    (
        "schedule end",
        {"schedule": NY_SCHED},
        lead(),
        la(2024, 6, 3, 20),
        {},
        "outside schedule (Mon 20:00 America/Los_Angeles",
    ),
    (
        "schedule before start",
        {"schedule": NY_SCHED},
        lead(),
        la(2024, 6, 3, 7, 59, 59),
        {},
        "outside schedule (Mon 07:59 America/Los_Angeles",
    ),
    (
        "schedule late evening",
        {"schedule": NY_SCHED},
        lead(),
        la(2024, 6, 3, 22, 10),
        {},
        "outside schedule (Mon 22:10 America/Los_Angeles",
    ),
    (
        "schedule weekend",
        {"schedule": NY_SCHED},
        lead(),
        la(2024, 6, 8, 12),
        {},
        "outside schedule (Sat 12:00",
    ),
    ("schedule in UTC instant", {"schedule": NY_SCHED}, lead(), utc(2024, 6, 3, 15), {}, None),
    (
        "schedule epoch ms",
        {"schedule": NY_SCHED},
        lead(),
        ms(la(2024, 6, 3, 20)),
        {},
        "outside schedule (Mon 20:00",
    ),
    # wrapping past midnight belongs to the day it starts on
    ("wrap start", {"schedule": WRAP_FRI}, lead(), la(2024, 6, 7, 22), {}, None),
    (
        "wrap before start",
        {"schedule": WRAP_FRI},
        lead(),
        la(2024, 6, 7, 21, 59),
        {},
        "outside schedule (Fri 21:59",
    ),
    ("wrap after midnight", {"schedule": WRAP_FRI}, lead(), la(2024, 6, 8, 3), {}, None),
    ("wrap last second", {"schedule": WRAP_FRI}, lead(), la(2024, 6, 8, 5, 59, 59), {}, None),
    (
        "wrap end",
        {"schedule": WRAP_FRI},
        lead(),
        la(2024, 6, 8, 6),
        {},
        "outside schedule (Sat 06:00",
    ),
    (
        "wrap morning of the start day",
        {"schedule": WRAP_FRI},
        lead(),
        la(2024, 6, 7, 3),
        {},
        "outside schedule (Fri 03:00",
    ),
    (
        "wrap next evening",
        {"schedule": WRAP_FRI},
        lead(),
        la(2024, 6, 8, 22, 30),
        {},
        "outside schedule (Sat 22:30",
    ),
    ("wrap every day 23:59", {"schedule": WRAP_ALL}, lead(), la(2024, 6, 4, 23, 59), {}, None),
    ("wrap every day 05:59", {"schedule": WRAP_ALL}, lead(), la(2024, 6, 4, 5, 59), {}, None),
    (
        "wrap every day noon",
        {"schedule": WRAP_ALL},
        lead(),
        la(2024, 6, 4, 12),
        {},
        "outside schedule (Tue 12:00",
    ),
    # the night DST starts (2024-03-10 02:00 PST -> 03:00 PDT) inside a wrapping window
    (
        "DST night: Sat 21:59 PST",
        {"schedule": SAT_NIGHT},
        lead(),
        utc(2024, 3, 10, 5, 59),
        {},
        "outside schedule (Sat 21:59",
    ),
    ("DST night: Sat 22:00 PST", {"schedule": SAT_NIGHT}, lead(), utc(2024, 3, 10, 6), {}, None),
    (
        "DST night: Sun 03:30 PDT",
        {"schedule": SAT_NIGHT},
        lead(),
        utc(2024, 3, 10, 10, 30),
        {},
        None,
    ),
    (
        "DST night: Sun 05:59 PDT",
        {"schedule": SAT_NIGHT},
        lead(),
        utc(2024, 3, 10, 12, 59),
        {},
        None,
    ),
    (
        "DST night: Sun 06:00 PDT",
        {"schedule": SAT_NIGHT},
        lead(),
        utc(2024, 3, 10, 13),
        {},
        "outside schedule (Sun 06:00",
    ),
    # pauses
    (
        "paused",
        {},
        LEAD,
        MON_NOON,
        {"paused_until_ms": ms(MON_NOON) + 1},
        "paused until 2024-06-03T19:00:00.001Z",
    ),
    ("pause ends at its instant", {}, LEAD, MON_NOON, {"paused_until_ms": ms(MON_NOON)}, None),
    ("pause over", {}, LEAD, MON_NOON, {"paused_until_ms": ms(MON_NOON) - 60_000}, None),
    # caps before the ping: reached when the count equals the cap
    (
        "day cap hit exactly",
        {"caps": {"leads_per_day": 10}},
        LEAD,
        MON_NOON,
        {"counters": BuyerCounters(leads_day=10)},
        "cap leads_per_day 10 reached",
    ),
    (
        "day cap one left",
        {"caps": {"leads_per_day": 10}},
        LEAD,
        MON_NOON,
        {"counters": BuyerCounters(leads_day=9)},
        None,
    ),
    (
        "hour cap hit",
        {"caps": {"leads_per_hour": 3, "leads_per_day": 10}},
        LEAD,
        MON_NOON,
        {"counters": BuyerCounters(leads_hour=3, leads_day=5)},
        "cap leads_per_hour 3 reached",
    ),
    ("zero cap", {"caps": {"leads_per_day": 0}}, LEAD, MON_NOON, {}, "cap leads_per_day 0 reached"),
    (
        "spend cap reached",
        {"caps": {"spend_per_day": 500}},
        LEAD,
        MON_NOON,
        {"counters": BuyerCounters(spend_day=500.0)},
        "cap spend_per_day 500.00 reached",
    ),
    (
        "spend cap left",
        {"caps": {"spend_per_day": 500}},
        LEAD,
        MON_NOON,
        {"counters": BuyerCounters(spend_day=499.99)},
        None,
    ),
    (
        "caps, nothing counted",
        {"caps": {"leads_per_day": 10, "spend_per_day": 1}},
        LEAD,
        MON_NOON,
        {"counters": None},
        None,
    ),
    # order: filters, then schedule, then pause, then caps
    (
        "filter before schedule",
        {**STATES, "schedule": NY_SCHED},
        lead(state="NY"),
        la(2024, 6, 8, 12),
        {"paused_until_ms": 2**62},
        "state NY not in filter",
    ),
    (
        "schedule before pause",
        {"schedule": NY_SCHED, "caps": {"leads_per_day": 0}},
        LEAD,
        la(2024, 6, 8, 12),
        {"paused_until_ms": 2**62},
        "outside schedule",
    ),
    (
        "pause before caps",
        {"caps": {"leads_per_day": 0}},
        LEAD,
        MON_NOON,
        {"paused_until_ms": 2**62},
        "paused until",
    ),
    (
        "flow not served",
        {},
        LEAD,
        MON_NOON,
        {"flow": "roofing"},
        "buyer does not serve flow roofing",
    ),
    ("flow served", {}, LEAD, MON_NOON, {"flow": "solar"}, None),
]


@pytest.mark.parametrize(
    ("cfg", "fields", "at", "kw", "expected"),
    [row[1:] for row in ELIGIBILITY],
    ids=[row[0] for row in ELIGIBILITY],
)
def test_eligibility(
    cfg: dict[str, Any],
    fields: dict[str, Any],
    at: datetime | int,
    kw: dict[str, Any],
    expected: str | None,
) -> None:
    got = eligibility(buyer(**cfg), fields, at, **kw)
    if expected is None:
        assert got is None
    else:
        assert got is not None and got.startswith(expected), got


def test_eligibility_rejects_naive_times() -> None:
    with pytest.raises(ValueError, match="aware"):
        eligibility(buyer(schedule=NY_SCHED), LEAD, datetime(2024, 6, 3, 12))


def test_schedule_reason_names_local_time_and_window() -> None:
    got = eligibility(buyer(schedule=NY_SCHED), LEAD, la(2024, 6, 3, 22, 10))
    assert got == (
        "outside schedule (Mon 22:10 America/Los_Angeles; schedule mon,tue,wed,thu,fri 08:00-20:00)"
    )


# =========================================================================== caps


CAP_ROWS: list[tuple[str, dict[str, Any] | None, BuyerCounters | None, float, str | None]] = [
    ("no caps", None, BuyerCounters(leads_day=10**6), 10**6, None),
    ("day: 9 counted, one more fits", {"leads_per_day": 10}, BuyerCounters(leads_day=9), 1.0, None),
    (
        "day: 10 counted, hit exactly",
        {"leads_per_day": 10},
        BuyerCounters(leads_day=10),
        1.0,
        "cap leads_per_day 10 reached",
    ),
    ("hour: 2 of 3", {"leads_per_hour": 3}, BuyerCounters(leads_hour=2), 1.0, None),
    (
        "hour: 3 of 3",
        {"leads_per_hour": 3},
        BuyerCounters(leads_hour=3),
        1.0,
        "cap leads_per_hour 3 reached",
    ),
    ("zero cap", {"leads_per_day": 0}, BuyerCounters(), 1.0, "cap leads_per_day 0 reached"),
    (
        "spend fills the budget exactly",
        {"spend_per_day": 100},
        BuyerCounters(spend_day=70),
        30.0,
        None,
    ),
    (
        "spend one cent over",
        {"spend_per_day": 100},
        BuyerCounters(spend_day=70),
        30.01,
        "cap spend_per_day 100.00 would be exceeded (spent 70.00 + price 30.01)",
    ),
    ("float sums fit", {"spend_per_day": 0.3}, BuyerCounters(spend_day=0.1), 0.2, None),
    ("nothing counted", {"leads_per_day": 1, "spend_per_day": 50}, None, 50.0, None),
    (
        "nothing counted, price over budget",
        {"spend_per_day": 50},
        None,
        50.5,
        "cap spend_per_day 50.00 would be exceeded",
    ),
]


@pytest.mark.parametrize(
    ("caps", "counters", "price", "expected"),
    [r[1:] for r in CAP_ROWS],
    ids=[r[0] for r in CAP_ROWS],
)
def test_cap_allows(
    caps: dict[str, Any] | None, counters: BuyerCounters | None, price: float, expected: str | None
) -> None:
    got = cap_allows(BuyerCaps(**caps) if caps is not None else None, counters, price)
    if expected is None:
        assert got is None
    else:
        assert got is not None and got.startswith(expected), got


def test_buyer_counters_are_frozen() -> None:
    c = BuyerCounters(leads_hour=1)
    with pytest.raises(AttributeError):
        c.leads_hour = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("tz", "at", "expected"),
    [
        ("UTC", utc(2024, 6, 3, 13, 45), ("2024-06-03T13+00:00", "2024-06-03")),
        # 23:00 in New York is already tomorrow in UTC: the day is the zone's
        ("America/New_York", utc(2024, 6, 4, 3), ("2024-06-03T23-04:00", "2024-06-03")),
        # 01:30 happens twice when DST ends: two hours, one day
        ("America/New_York", utc(2024, 11, 3, 5, 30), ("2024-11-03T01-04:00", "2024-11-03")),
        ("America/New_York", utc(2024, 11, 3, 6, 30), ("2024-11-03T01-05:00", "2024-11-03")),
    ],
    ids=["utc", "zone day", "dst first 01:30", "dst second 01:30"],
)
def test_cap_periods(tz: str, at: datetime, expected: tuple[str, str]) -> None:
    assert cap_periods(BuyerCaps(timezone=tz), at) == expected
    assert cap_periods(BuyerCaps(timezone=tz), ms(at)) == expected


# =========================================================================== floors

FLOORS = copy.deepcopy(FULL_FLOW["floors"])  # base 40, excl 75, 700+ x1.2, owner x1.1, LA 9-17
RENTER_LOW = lead(credit_range="<600", homeowner=False)
OUTSIDE = la(2024, 6, 3, 18)  # Monday evening


def _floors(**kw: Any) -> FlowConfig:
    return flow(floors={**copy.deepcopy(FLOORS), **kw})


FLOOR_ROWS: list[tuple[str, FlowConfig, dict[str, Any], datetime | int, bool, float]] = [
    ("no floors", flow(), LEAD, MON_NOON, False, 0.0),
    ("no floors, exclusive", flow(), LEAD, MON_NOON, True, 0.0),
    ("base only", _floors(quality=None, business_hours=None), LEAD, MON_NOON, False, 40.0),
    ("no rule matches: default", _floors(), RENTER_LOW, OUTSIDE, False, 40.0),
    (
        "default multiplier",
        _floors(quality={**FLOORS["quality"], "default": 0.9}),  # type: ignore[dict-item]
        RENTER_LOW,
        OUTSIDE,
        False,
        36.0,
    ),
    (
        "default unused when a rule matches",
        _floors(quality={**FLOORS["quality"], "default": 0.9}),  # type: ignore[dict-item]
        lead(homeowner=False),
        OUTSIDE,
        False,
        48.0,
    ),
    ("credit rule", _floors(), lead(homeowner=False), OUTSIDE, False, 48.0),
    ("both rules multiply", _floors(), LEAD, OUTSIDE, False, 52.8),
    (
        "quality field missing",
        _floors(),
        lead(credit_range=_MISSING, homeowner=_MISSING),
        OUTSIDE,
        False,
        40.0,
    ),
    (
        "rule with in",
        _floors(quality={"rules": [{"field": "zip", "in": ["902", "941"], "multiplier": 1.5}]}),
        LEAD,
        OUTSIDE,
        False,
        60.0,
    ),
    # business hours Mon-Fri 09:00-17:00 LA: start inclusive, end exclusive
    ("hours start", _floors(), RENTER_LOW, la(2024, 6, 3, 9), False, 48.0),
    ("hours before start", _floors(), RENTER_LOW, la(2024, 6, 3, 8, 59, 59), False, 40.0),
    ("hours last minute", _floors(), RENTER_LOW, la(2024, 6, 3, 16, 59), False, 48.0),
    ("hours end", _floors(), RENTER_LOW, la(2024, 6, 3, 17), False, 40.0),
    ("hours on Saturday", _floors(), RENTER_LOW, la(2024, 6, 8, 12), False, 40.0),
    ("all multipliers", _floors(), LEAD, MON_NOON, False, 63.36),
    ("epoch ms", _floors(), RENTER_LOW, ms(la(2024, 6, 3, 9)), False, 48.0),
    # DST: the same UTC instant is 08:00 before and 09:00 after the change
    ("DST start: Fri 16:00Z is 08:00 PST", _floors(), RENTER_LOW, utc(2024, 3, 8, 16), False, 40.0),
    ("DST start: Fri 17:00Z is 09:00 PST", _floors(), RENTER_LOW, utc(2024, 3, 8, 17), False, 48.0),
    (
        "DST start: Mon 16:00Z is 09:00 PDT",
        _floors(),
        RENTER_LOW,
        utc(2024, 3, 11, 16),
        False,
        48.0,
    ),
    (
        "DST start: Mon 23:59Z is 16:59 PDT",
        _floors(),
        RENTER_LOW,
        utc(2024, 3, 11, 23, 59),
        False,
        48.0,
    ),
    ("DST start: Tue 00:00Z is 17:00 PDT", _floors(), RENTER_LOW, utc(2024, 3, 12, 0), False, 40.0),
    ("DST end: Fri 16:00Z is 09:00 PDT", _floors(), RENTER_LOW, utc(2024, 11, 1, 16), False, 48.0),
    ("DST end: Mon 16:00Z is 08:00 PST", _floors(), RENTER_LOW, utc(2024, 11, 4, 16), False, 40.0),
    ("DST end: Mon 17:00Z is 09:00 PST", _floors(), RENTER_LOW, utc(2024, 11, 4, 17), False, 48.0),
    # exclusive: at least exclusive_min
    ("exclusive minimum", _floors(), RENTER_LOW, OUTSIDE, True, 75.0),
    ("exclusive above the minimum", _floors(base=80), LEAD, MON_NOON, True, 126.72),
    ("exclusive minimum alone", flow(floors={"exclusive_min": 75}), LEAD, MON_NOON, True, 75.0),
    (
        "exclusive minimum does not touch shared",
        flow(floors={"exclusive_min": 75}),
        LEAD,
        MON_NOON,
        False,
        0.0,
    ),
]


@pytest.mark.parametrize(
    ("fl", "fields", "at", "exclusive", "expected"),
    [r[1:] for r in FLOOR_ROWS],
    ids=[r[0] for r in FLOOR_ROWS],
)
def test_floor_for(
    fl: FlowConfig, fields: dict[str, Any], at: datetime | int, exclusive: bool, expected: float
) -> None:
    assert floor_for(fl, fields, at, exclusive=exclusive) == pytest.approx(expected, abs=1e-9)


BELOW_ROWS: list[tuple[str, float, dict[str, Any], datetime, bool, str | None]] = [
    (
        "brief example",
        40.0,
        lead(homeowner=False),
        OUTSIDE,
        False,
        "price 40.00 below floor 48.00 (base 40 × quality 1.2)",
    ),
    ("exactly at the floor", 48.0, lead(homeowner=False), OUTSIDE, False, None),
    (
        "a cent below",
        47.99,
        lead(homeowner=False),
        OUTSIDE,
        False,
        "price 47.99 below floor 48.00 (base 40 × quality 1.2)",
    ),
    ("float product equals price", 52.8, LEAD, OUTSIDE, False, None),
    (
        "business hours named",
        45.0,
        RENTER_LOW,
        MON_NOON,
        False,
        "price 45.00 below floor 48.00 (base 40 × business hours 1.2)",
    ),
    (
        "every factor named",
        60.0,
        LEAD,
        MON_NOON,
        False,
        "price 60.00 below floor 63.36 (base 40 × quality 1.32 × business hours 1.2)",
    ),
    ("shared bid at 60 is fine", 60.0, RENTER_LOW, OUTSIDE, False, None),
    (
        "exclusive bid below the exclusive minimum",
        60.0,
        RENTER_LOW,
        OUTSIDE,
        True,
        "exclusive price 60.00 below exclusive minimum 75.00",
    ),
    ("exclusive bid at the minimum", 75.0, RENTER_LOW, OUTSIDE, True, None),
]


@pytest.mark.parametrize(
    ("price", "fields", "at", "exclusive", "expected"),
    [r[1:] for r in BELOW_ROWS],
    ids=[r[0] for r in BELOW_ROWS],
)
def test_below_floor_reason(
    price: float, fields: dict[str, Any], at: datetime, exclusive: bool, expected: str | None
) -> None:
    assert below_floor_reason(_floors(), price, fields, at, exclusive=exclusive) == expected


def test_exclusive_floor_above_the_minimum_explains_its_parts() -> None:
    got = below_floor_reason(_floors(base=80), 100.0, LEAD, OUTSIDE, exclusive=True)
    assert got == "exclusive price 100.00 below floor 105.60 (base 80 × quality 1.32)"
    fl = floor_breakdown(_floors(base=80), LEAD, OUTSIDE, exclusive=True)
    assert (fl.base, fl.premium, fl.exclusive_min, fl.value) == (80, 1.0, 75.0, 105.6)


# =========================================================================== scoring

W = ScoreWeights()


@pytest.mark.parametrize(
    ("accepted", "posted", "kw", "expected"),
    [
        (0, 0, {}, 0.7),  # a new buyer starts at the prior
        (10, 10, {}, 0.85),
        (0, 10, {}, 0.35),
        (100, 100, {}, 107 / 110),
        (0, 0, {"prior_rate": 0.5, "prior_weight": 0}, 0.5),
        (3, 4, {"prior_weight": 0}, 0.75),  # no prior: the raw rate
        (5, 10, {"prior_rate": 0.9, "prior_weight": 10}, 0.7),
    ],
)
def test_acceptance_rate(accepted: int, posted: int, kw: dict[str, float], expected: float) -> None:
    assert acceptance_rate(accepted, posted, **kw) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("accepted", "posted", "kw"),
    [
        (5, 4, {}),
        (-1, 3, {}),
        (0, -1, {}),
        (0, 0, {"prior_rate": 1.5}),
        (0, 0, {"prior_weight": -1}),
    ],
)
def test_acceptance_rate_rejects_nonsense(accepted: int, posted: int, kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        acceptance_rate(accepted, posted, **kw)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((50, 100, 0.8, 0.5, W), 0.5 * 0.5 + 0.3 * 0.8 + 0.2 * 0.5),
        ((100, 100, 0.0, 0.0, W), 0.5),  # the top bid's price term is exactly w_price
        ((10_000, 10_000, 1.0, 1.0, W), 1.0),  # scale-free: weights sum to the maximum
        ((40, 0, 1.0, 1.0, W), 0.5),  # no max price: no price term
        ((150, 100, 0.0, 0.0, W), 0.5),  # clamped to [0, 1]
        ((50, 100, 1.5, -1, W), 0.25 + 0.3),  # rates clamped too
        ((50, 100, 0.8, 0.5, {"price": 1.0}), 0.5),  # a mapping of weights, missing = 0
    ],
)
def test_score(args: tuple[Any, ...], expected: float) -> None:
    assert score(*args) == pytest.approx(expected)


def test_score_normalisation_makes_price_scale_irrelevant() -> None:
    def order(factor: float) -> tuple[list[str], dict[str, float]]:
        cands = [cand("a", 50 * factor), cand("b", 45 * factor)]
        acc = {"a": 0.2, "b": 0.95}
        got = rank(cands, rank_by="score", weights=W, acceptance=acc, payment={})
        return ([c["buyer_id"] for c in got], scores(cands, weights=W, acceptance=acc, payment={}))

    assert order(1) == order(100) == order(0.01)
    assert order(1)[0] == ["b", "a"]


def cand(
    buyer_id: str, price: float, *, at: int = 100, exclusive: bool = False, required: bool = False
) -> dict[str, Any]:
    """A Candidate record as ``decide`` builds it."""
    return {
        "buyer_id": buyer_id,
        "tier": "standard",
        "ping_id": f"p-{buyer_id}",
        "price": float(price),
        "exclusive": exclusive,
        "conditions": {
            "max_age_minutes": None,
            "states": None,
            "require_consent": False,
            "exclusive_required": required,
        },
        "answered_at_ms": 1_717_243_200_000 + at,
    }


RANK_ROWS: list[
    tuple[str, list[dict[str, Any]], str, Any, dict[str, float], dict[str, float], list[str]]
] = [
    (
        "by price",
        [cand("a", 10), cand("b", 30), cand("c", 20)],
        "price",
        W,
        {},
        {},
        ["b", "c", "a"],
    ),
    # ranking by price, a tie is never broken by the score (acceptance history, payment)
    (
        "equal price: earlier answer beats better acceptance",
        [cand("a", 40, at=10), cand("b", 40, at=20)],
        "price",
        W,
        {"a": 0.5, "b": 0.9},
        {},
        ["a", "b"],
    ),
    (
        "equal price: earlier answer beats the new buyer's prior",
        [cand("old", 40, at=10), cand("new", 40, at=20)],
        "price",
        W,
        {"old": acceptance_rate(3, 10)},
        {},
        ["old", "new"],
    ),
    (
        "equal price: earlier answer beats a good record",
        [cand("new", 40, at=10), cand("old", 40, at=20)],
        "price",
        W,
        {"old": acceptance_rate(20, 20)},
        {},
        ["new", "old"],
    ),
    (
        "equal price: earlier answer beats a faster payer",
        [cand("a", 40, at=10), cand("b", 40, at=20)],
        "price",
        W,
        {},
        {"a": 0.1, "b": 0.9},
        ["a", "b"],
    ),
    (
        "equal price: earlier answer",
        [cand("a", 25, at=300), cand("b", 25, at=200)],
        "price",
        W,
        {},
        {},
        ["b", "a"],
    ),
    (
        "equal price and answer time: buyer id, whatever the scores",
        [cand("b", 25, at=200), cand("a", 25, at=200)],
        "price",
        W,
        {"a": 0.1, "b": 0.9},
        {"a": 0.1, "b": 0.9},
        ["a", "b"],
    ),
    (
        "equal everything: buyer id",
        [cand("z", 25, at=200), cand("m", 25, at=200), cand("a", 25, at=250)],
        "price",
        W,
        {},
        {},
        ["m", "z", "a"],
    ),
    (
        "price beats acceptance when ranking by price",
        [cand("a", 50), cand("b", 45)],
        "price",
        W,
        {"a": 0.2, "b": 0.95},
        {},
        ["a", "b"],
    ),
    (
        "acceptance beats price when ranking by score",
        [cand("a", 50), cand("b", 45)],
        "score",
        W,
        {"a": 0.2, "b": 0.95},
        {},
        ["b", "a"],
    ),
    (
        "score mode with price-only weights is price order",
        [cand("a", 50), cand("b", 45)],
        "score",
        {"price": 1.0},
        {"a": 0.2, "b": 0.95},
        {},
        ["a", "b"],
    ),
    (
        "weights without acceptance: the answer time decides",
        [cand("a", 40, at=10), cand("b", 40, at=20)],
        "price",
        ScoreWeights(price=1, acceptance=0, payment=0),
        {"a": 0.1, "b": 0.9},
        {},
        ["a", "b"],
    ),
    (
        "score tie: earlier answer",
        [cand("a", 40, at=20), cand("b", 40, at=10)],
        "score",
        W,
        {},
        {},
        ["b", "a"],
    ),
    ("empty", [], "score", W, {}, {}, []),
]


@pytest.mark.parametrize(
    ("cands", "rank_by", "weights", "acc", "pay", "expected"),
    [r[1:] for r in RANK_ROWS],
    ids=[r[0] for r in RANK_ROWS],
)
def test_rank(
    cands: list[dict[str, Any]],
    rank_by: str,
    weights: Any,
    acc: dict[str, float],
    pay: dict[str, float],
    expected: list[str],
) -> None:
    for perm in itertools.permutations(cands):  # independent of arrival order
        got = rank(list(perm), rank_by=rank_by, weights=weights, acceptance=acc, payment=pay)
        assert [c["buyer_id"] for c in got] == expected


def test_rank_keeps_the_records_untouched() -> None:
    cands = [cand("a", 10), cand("b", 30)]
    before = copy.deepcopy(cands)
    got = rank(cands, rank_by="score", weights=W, acceptance={}, payment={})
    assert cands == before  # not mutated, no extra keys (they are Avro Candidate records)
    assert got[0] is cands[1] and got[1] is cands[0]
    with pytest.raises(ValueError, match="rank_by"):
        rank(cands, rank_by="random", weights=W, acceptance={}, payment={})


def test_scores_use_the_prior_and_config_default_for_unknown_buyers() -> None:
    got = scores([cand("new", 40)], weights=W, acceptance={}, payment={})
    assert got["new"] == pytest.approx(0.5 + 0.3 * 0.7 + 0.2 * 0.5)


# =========================================================================== mode

MODE_ROWS: list[tuple[str, list[dict[str, Any]], bool, bool, str]] = [
    ("nothing", [], False, False, "none"),
    ("nothing, exclusive_only", [], True, False, "none"),
    (
        "best asks exclusive",
        [cand("a", 90, exclusive=True), cand("b", 50)],
        False,
        False,
        "exclusive",
    ),
    (
        "best requires exclusive",
        [cand("a", 90, required=True), cand("b", 50)],
        False,
        False,
        "exclusive",
    ),
    ("best is shared", [cand("a", 90), cand("b", 50, exclusive=True)], False, False, "shared"),
    (
        "exclusive_only sells a shared bid exclusively",
        [cand("a", 90), cand("b", 50)],
        True,
        False,
        "exclusive",
    ),
    (
        "shared_only skips an exclusive best bid",
        [cand("a", 90, exclusive=True), cand("b", 50)],
        False,
        True,
        "shared",
    ),
    (
        "shared_only with only exclusive bids",
        [cand("a", 90, exclusive=True), cand("b", 50, required=True)],
        False,
        True,
        "none",
    ),
]


@pytest.mark.parametrize(
    ("ranked", "exclusive_only", "shared_only", "expected"),
    [r[1:] for r in MODE_ROWS],
    ids=[r[0] for r in MODE_ROWS],
)
def test_choose_mode(
    ranked: list[dict[str, Any]], exclusive_only: bool, shared_only: bool, expected: str
) -> None:
    assert choose_mode(ranked, exclusive_only=exclusive_only, shared_only=shared_only) == expected


def test_choose_mode_refuses_both() -> None:
    with pytest.raises(ValueError):
        choose_mode([cand("a", 1)], exclusive_only=True, shared_only=True)


def test_all_bids_below_floor_leave_nothing_to_sell() -> None:
    fl = _floors()
    bids = [cand("a", 47.99), cand("b", 30), cand("c", 74.99, exclusive=True)]
    kept = [
        c
        for c in bids
        if below_floor_reason(
            fl, c["price"], lead(homeowner=False), OUTSIDE, exclusive=c["exclusive"]
        )
        is None
    ]
    assert kept == []
    ranked = rank(kept, rank_by="price", weights=W, acceptance={}, payment={})
    assert choose_mode(ranked, exclusive_only=False, shared_only=False) == "none"


def test_exclusive_bid_below_minimum_drops_out_and_the_shared_bids_sell() -> None:
    fl = _floors()
    bids = [cand("a", 70, exclusive=True), cand("b", 55), cand("c", 50)]
    kept = [
        c
        for c in bids
        if below_floor_reason(
            fl, c["price"], lead(homeowner=False), OUTSIDE, exclusive=c["exclusive"]
        )
        is None
    ]
    ranked = rank(kept, rank_by="price", weights=W, acceptance={}, payment={})
    assert [c["buyer_id"] for c in ranked] == ["b", "c"]
    assert choose_mode(ranked, exclusive_only=False, shared_only=False) == "shared"


# =========================================================================== waves


@pytest.mark.parametrize(
    ("tier", "expected"),
    [("premium", 0), ("standard", 1), ("backup", 2), ("gold", None)],
)
def test_wave_of(tier: str, expected: int | None) -> None:
    f = flow(waves=copy.deepcopy(FULL_FLOW["waves"]))
    assert wave_of(tier, f.waves) == expected
    assert wave_of(tier, None) == 0  # no waves: one wave with every tier


def test_wave_may_hold_several_tiers() -> None:
    f = flow(
        waves=[
            {"tiers": ["premium", "standard"], "timeout_ms": 600},
            {"tiers": ["backup"], "timeout_ms": 300},
        ]
    )
    assert [wave_of(t, f.waves) for t in ("premium", "standard", "backup")] == [0, 0, 1]


# =========================================================================== auto-pause

NOW = 10_000_000
WIN = {"window_s": 60, "min_pings": 20, "max_failure_rate": 0.5}


def outcomes(
    ok: int,
    failed: int,
    *,
    at: int = NOW - 1_000,
    ok_status: str = "bid",
    fail_status: str = "timeout",
) -> list[tuple[int, str]]:
    return [(at, ok_status)] * ok + [(at, fail_status)] * failed


PAUSE_ROWS: list[tuple[str, list[tuple[int, str]], dict[str, Any], bool]] = [
    ("no pings", [], WIN, False),
    ("over the rate", outcomes(9, 11), WIN, True),
    ("exactly at the rate", outcomes(10, 10), WIN, False),
    ("errors count as failures", outcomes(9, 11, fail_status="error"), WIN, True),
    ("no-bids are healthy", outcomes(9, 11, ok_status="no_bid"), WIN, True),
    ("all no-bids", outcomes(20, 0, ok_status="no_bid"), WIN, False),
    ("too few pings", outcomes(0, 19), WIN, False),
    ("filtered rows are not pings", outcomes(0, 19) + [(NOW - 1, "filtered")] * 5, WIN, False),
    ("old failures slid out", outcomes(9, 0) + outcomes(0, 11, at=NOW - 60_000), WIN, False),
    ("failures just inside", outcomes(9, 0) + outcomes(0, 11, at=NOW - 59_999), WIN, True),
    ("at now counts", outcomes(9, 11, at=NOW), WIN, True),
    ("future outcomes ignored", outcomes(9, 0) + outcomes(0, 11, at=NOW + 1), WIN, False),
    ("zero tolerance", outcomes(19, 1), {**WIN, "max_failure_rate": 0.0}, True),
    ("zero tolerance, no failure", outcomes(20, 0), {**WIN, "max_failure_rate": 0.0}, False),
    ("rate 1 never pauses", outcomes(0, 50), {**WIN, "max_failure_rate": 1.0}, False),
]


@pytest.mark.parametrize(
    ("outs", "kw", "expected"), [r[1:] for r in PAUSE_ROWS], ids=[r[0] for r in PAUSE_ROWS]
)
def test_pause_decision(outs: list[tuple[int, str]], kw: dict[str, Any], expected: bool) -> None:
    assert pause_decision(outs, NOW, **kw) is expected


def test_pause_until() -> None:
    assert pause_until_ms(NOW, 120) == NOW + 120_000
    b = buyer(auto_pause={"cool_down_s": 0.5})
    assert b.auto_pause is not None
    until = pause_until_ms(NOW, b.auto_pause.cool_down_s)
    assert eligibility(b, LEAD, NOW + 499, paused_until_ms=until) is not None
    assert eligibility(b, LEAD, NOW + 500, paused_until_ms=until) is None


def test_epoch_ms_and_datetime_agree() -> None:
    b = buyer(schedule=NY_SCHED)
    for minutes in range(0, 24 * 60 * 7, 37):
        at = MON_NOON + timedelta(minutes=minutes)
        assert eligibility(b, LEAD, at) == eligibility(b, LEAD, ms(at))


# --------------------------------------------------------------------------- unsold reason


@pytest.mark.parametrize(
    ("posts_sent", "cap_skips", "window_cut", "timed_out", "want"),
    [
        (0, [], False, [], "no acceptable bid at post time"),
        (0, ["volt"], False, [], "no acceptable bid at post time; caps reached: volt"),
        # The only bidder rejected after an outage: its rejection, not the window.
        (1, [], False, [], "all posts rejected or failed"),
        (2, [], True, [], "post window of 5000 ms exhausted"),
        (2, [], True, ["a", "b"], "no answer in time from a, b (asked again after settling)"),
    ],
    ids=["no bid", "caps", "ran out of buyers", "cut short", "timed out"],
)
def test_unsold_reason(
    posts_sent: int, cap_skips: list[str], window_cut: bool, timed_out: list[str], want: str
) -> None:
    from streams.rules.posting import unsold_reason

    assert (
        unsold_reason(
            posts_sent=posts_sent,
            cap_skips=cap_skips,
            window_cut=window_cut,
            timed_out=timed_out,
            post_timeout_ms=5000,
        )
        == want
    )
