"""Experiments: the configuration's checks, a lead's variant (deterministic, balanced, only
inside start/stop) and the flow a variant sells under."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from streams.rules.experiments import assign, bucket, flow_for, variant_flow
from streams.rules.replay import variant_doc
from streams.settings import ConfigError, flow_version, parse_settings

REPO = Path(__file__).resolve().parents[2]
RAW = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
T = 1_780_000_000_000  # 2026-05-28


def settings_with(experiment: dict[str, Any]) -> Any:
    raw = yaml.safe_load(yaml.safe_dump(RAW))
    raw["flows"]["solar"]["experiment"] = experiment
    return parse_settings(raw, env={})


AB = {
    "name": "shared-max",
    "variants": [
        {"name": "control", "share": 0.5},
        {"name": "four", "share": 0.5, "strategy": {"shared_max": 4}, "floors": {"base": 25.0}},
    ],
}


def test_assignment_is_deterministic_and_balanced_over_10000_leads() -> None:
    exp = settings_with(AB).flows["solar"].experiment
    ids = [f"lead-{i:05d}" for i in range(10_000)]
    first = [assign(exp, i, T) for i in ids]
    assert first == [assign(exp, i, T + 86_400_000) for i in ids]  # the time does not move it
    n = first.count("four")
    # Binomial(10000, 0.5): sd 50; 4 sd either side.
    assert abs(n - 5000) < 200, n


def test_uneven_shares_are_honoured_within_sampling_error() -> None:
    exp = (
        settings_with(
            {**AB, "variants": [{"name": "a", "share": 0.8}, {"name": "b", "share": 0.2}]}
        )
        .flows["solar"]
        .experiment
    )
    n = sum(assign(exp, f"x{i}", T) == "b" for i in range(10_000))
    assert abs(n - 2000) < 4 * math.sqrt(10_000 * 0.2 * 0.8), n


def test_a_different_experiment_name_reshuffles_the_leads() -> None:
    same = sum(bucket("one", f"l{i}") < 0.5 and bucket("two", f"l{i}") < 0.5 for i in range(4000))
    assert abs(same - 1000) < 150  # independent halves: a quarter in both


def test_outside_start_and_stop_a_lead_is_in_no_variant() -> None:
    exp = (
        settings_with({**AB, "start": "2026-05-28T00:00:00Z", "stop": "2026-05-29T00:00:00Z"})
        .flows["solar"]
        .experiment
    )
    day = 1_779_926_400_000  # 2026-05-28T00:00:00Z
    assert assign(exp, "lead-1", day - 1) == ""
    assert assign(exp, "lead-1", day) in ("control", "four")
    assert assign(exp, "lead-1", day + 86_400_000) == ""


def test_a_variant_sells_under_its_overrides_and_only_those() -> None:
    flow = settings_with(AB).flows["solar"]
    four = variant_flow(flow, "four")
    assert four.strategy.shared_max == 4 and flow.strategy.shared_max == 3
    assert four.floors.base == 25.0 and four.floors.exclusive_min == flow.floors.exclusive_min
    assert four.experiment is None and four.waves == flow.waves
    assert variant_flow(flow, "four") is four  # built once
    assert variant_flow(flow, "control").strategy == flow.strategy
    assert variant_flow(flow, "") is flow and variant_flow(flow, "nope") is flow
    variant, sells = flow_for(flow, "lead-7", T)
    assert sells.strategy.shared_max == (4 if variant == "four" else 3)


def test_a_replay_reads_a_variant_from_the_recorded_version_as_it_ran() -> None:
    import orjson

    s = settings_with(AB)
    doc = orjson.loads(flow_version(s, "solar").config_json)
    four = variant_doc(doc, "four")
    assert four["flow"]["strategy"]["shared_max"] == 4 and four["flow"]["experiment"] is None
    assert variant_doc(doc, "")["flow"]["strategy"]["shared_max"] == 3


@pytest.mark.parametrize(
    ("experiment", "message"),
    [
        ({**AB, "variants": [{"name": "a", "share": 1.0}]}, "at least 2"),
        (
            {**AB, "variants": [{"name": "a", "share": 0.5}, {"name": "a", "share": 0.5}]},
            "variants[1].name: 'a' is used twice",
        ),
        (
            {**AB, "variants": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.4}]},
            "the shares add up to 0.9, not 1",
        ),
        (
            {
                **AB,
                "variants": [
                    {"name": "a", "share": 0.5},
                    {"name": "b", "share": 0.5, "strategy": {"shared_max": 0}},
                ],
            },
            "experiment.variants[1] (b): strategy.shared_max: Input should be greater",
        ),
        (
            {
                **AB,
                "variants": [
                    {"name": "a", "share": 0.5},
                    {"name": "b", "share": 0.5, "floors": {"nope": 1}},
                ],
            },
            "experiment.variants[1] (b): floors.nope: Extra inputs are not permitted",
        ),
        ({**AB, "start": "2026-05-28T00:00:00"}, "start: give a time zone"),
        (
            {**AB, "start": "2026-05-29T00:00:00Z", "stop": "2026-05-28T00:00:00Z"},
            "stop: must be after start",
        ),
    ],
)
def test_a_bad_experiment_is_refused_naming_the_key(
    experiment: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match="flows.solar") as info:
        settings_with(experiment)
    assert message in str(info.value), str(info.value)


def test_a_variant_ranking_by_score_starts_the_acceptance_feed() -> None:
    from streams.stages.buyer_feeds import ranks_by_score

    assert not ranks_by_score(settings_with(AB))
    scored = {
        **AB,
        "variants": [
            {"name": "control", "share": 0.5},
            {"name": "score", "share": 0.5, "strategy": {"rank_by": "score"}},
        ],
    }
    assert ranks_by_score(settings_with(scored))
