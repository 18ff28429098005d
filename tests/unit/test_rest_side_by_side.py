"""bench/rest_side_by_side.py runs two stacks at once: the moved config must share no port."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from streams.settings import parse_settings
from streams.tools.stack import web_port_for

_spec = importlib.util.spec_from_file_location("rest_side_by_side", "bench/rest_side_by_side.py")
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
sys.modules["rest_side_by_side"] = bench  # its dataclass looks its module up
_spec.loader.exec_module(bench)

ADDRESS = re.compile(r"^(?:[a-z]+://)?[\w.]+:(\d+)(?:/.*)?$")


def _ports(node: Any, key: str = "") -> list[int]:
    """Every port a parsed configuration names: ``port`` keys and ``host:port`` addresses."""
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _ports(v, str(k))]
    if isinstance(node, list):
        return [p for v in node for p in _ports(v, key)]
    if isinstance(node, int) and not isinstance(node, bool) and key.endswith("port"):
        return [node]
    if isinstance(node, str) and (m := ADDRESS.match(node)):
        return [int(m.group(1))]
    return []


def _stack_ports(text: str) -> set[int]:
    s = parse_settings(yaml.safe_load(text), env={})
    ports = set(_ports(s.model_dump(mode="json")))
    base = s.worker.web_port
    ports |= {web_port_for(base, n) for n in ("worker", "sink", "metrics")}
    return ports - {0}


def test_the_moved_config_shares_no_port_with_the_demo_config() -> None:
    text = Path("config/demo.yaml").read_text()
    demo = _stack_ports(text)
    moved = _stack_ports(bench.shifted_config(text, 10000))
    # Kafka, the warehouse (its url and its port), ingest, metrics, 5 buyers, 3 workers.
    assert len(demo) >= 11
    assert demo.isdisjoint(moved), sorted(demo & moved)
    assert len(moved) == len(demo)


def test_a_demo_config_with_its_own_worker_section_is_refused() -> None:
    # The moved config appends a worker section for the web ports; a demo config that grows
    # one must be noticed, not given two.
    text = Path("config/demo.yaml").read_text() + "\nworker:\n  web_port: 7000\n"
    with pytest.raises(SystemExit, match="worker"):
        bench.shifted_config(text, 10000)


def test_a_failed_round_keeps_the_logs_and_the_rounds_before_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stack that does not start: its logs outlive the worktree they were written in, and
    the table still shows the rounds that completed."""
    trees = [bench.Tree(n, tmp_path / n, tmp_path) for n in ("before", "after")]
    for t in trees:
        (t.path / ".run" / "logs").mkdir(parents=True)
        (t.path / ".run" / "logs" / "worker.log").write_text(f"{t.name} worker log")
        t.results.append({"total": "7.0", "parts": "(…)", "leads": "1", "ports": "default"})
    trees[0].cli = lambda *a, **k: 1  # type: ignore[method-assign]  # "up" fails
    trees[1].cli = lambda *a, **k: 0  # type: ignore[method-assign]
    pairs = [(t, tmp_path / f"{t.name}.yaml") for t in trees]
    with pytest.raises(SystemExit, match="before-logs-1"):
        bench.one_round(1, pairs, rest=1, settle=0, work=tmp_path)
    assert (tmp_path / "before-logs-1" / "worker.log").read_text() == "before worker log"
    assert not (tmp_path / "after-logs-1").exists()
    bench.print_table(trees)
    out = capsys.readouterr().out
    assert "| before | 1 | default | 7.0 |" in out and "round 1: after − before = +0.0" in out
    assert "| 2 |" not in out
