"""The provisioned Grafana dashboard against Grafana's own schema models.

Grafana cannot run here (no Docker engine), so the dashboard JSON is read through
grafana-foundation-sdk, whose models are generated from Grafana's dashboard and panel-plugin
schemas: a key Grafana does not know (a typo in ``gridPos``, an option the panel type does
not have) is dropped by that round trip, and an unknown panel type has no plugin config. The
SQL of every panel is checked against the warehouse in
tests/integration/test_grafana_dashboard.py.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from grafana_foundation_sdk.cog import plugins
from grafana_foundation_sdk.cog import runtime as cogruntime
from grafana_foundation_sdk.models import dashboard as gdash

DASHBOARD = (
    Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "pingpost.json"
)

plugins.register_default_plugins()


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.to_json()))


def unknown_keys(src: Any, back: Any, path: str = "$") -> list[str]:
    """Paths of ``src`` that did not survive the round trip (or came back different)."""
    if isinstance(src, dict):
        if not isinstance(back, dict):
            return [path]
        out: list[str] = []
        for key, value in src.items():
            if key not in back:
                out.append(f"{path}.{key}")
            else:
                out += unknown_keys(value, back[key], f"{path}.{key}")
        return out
    if isinstance(src, list):
        if not isinstance(back, list) or len(src) != len(back):
            return [path]
        return [
            p for i, (a, b) in enumerate(zip(src, back)) for p in unknown_keys(a, b, f"{path}[{i}]")
        ]
    return [] if src == back else [path]


def round_trip(d: dict[str, Any]) -> list[str]:
    return unknown_keys(d, _plain(gdash.Dashboard.from_json(copy.deepcopy(d)).to_json()))


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_every_key_is_in_grafanas_dashboard_schema(dashboard: dict[str, Any]) -> None:
    assert dashboard["panels"], "the dashboard has no panels"
    assert round_trip(dashboard) == []


def test_every_panel_type_is_a_known_panel_plugin(dashboard: dict[str, Any]) -> None:
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert cogruntime.panelcfg_config(panel["type"]) is not None, panel["title"]


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda d: d["panels"][0].update(gridPoss=d["panels"][0].pop("gridPos")), "gridPoss"),
        (
            lambda d: d["panels"][0].setdefault("options", {}).update(colourMode="value"),
            "colourMode",
        ),
        (lambda d: d.update(refreshh="30s"), "refreshh"),
    ],
)
def test_the_check_catches_a_misspelt_key(
    dashboard: dict[str, Any], mutate: Any, where: str
) -> None:
    broken = copy.deepcopy(dashboard)
    mutate(broken)
    assert any(p.endswith(where) for p in round_trip(broken))
