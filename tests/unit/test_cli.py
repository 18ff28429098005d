"""The command line and the local stack as an operator meets them: worker web ports."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from streams import stack as stack_mod
from streams.cli import build_parser
from streams.settings import parse_settings
from streams.stack import Stack, web_port_for


def _settings(**worker: Any) -> Any:
    raw = yaml.safe_load(Path("config/demo.yaml").read_text())
    raw.setdefault("worker", {}).update(worker)
    return parse_settings(raw, env={})


@pytest.mark.parametrize(("base", "name", "port"), [
    (6066, "worker", 6066), (6066, "worker2", 6067), (6066, "worker5", 6070),
    (6066, "sink", 6064), (6066, "metrics", 6065),
    (0, "worker", 0), (0, "worker2", 0), (0, "sink", 0),  # 0: off for every worker
    (6066, "worker-bench", 0), (6066, "worker1", 0), (6066, "ingest", 0),
    (1, "sink", 0), (65535, "worker2", 0),  # off rather than an impossible port
])
def test_web_port_for(base: int, name: str, port: int) -> None:
    assert web_port_for(base, name) == port


class _FakePopen:
    calls: list[list[str]] = []

    def __init__(self, cmd: list[str], **_: Any) -> None:
        _FakePopen.calls.append(cmd)
        self.pid = os.getpid()


def test_up_gives_each_worker_its_own_web_port(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``pingpost up`` (and a restart through the stack) spawns for each worker."""
    monkeypatch.setattr(stack_mod.subprocess, "Popen", _FakePopen)
    _FakePopen.calls = []
    st = Stack(_settings(web_port=7100), tmp_path / "c.yaml", tmp_path / "run")
    st.spawn("worker", ["worker", "--role", "auction"])
    st.spawn("worker2", ["worker", "--role", "auction"])
    st.spawn("sink", ["worker", "--role", "sink"])
    st.spawn("metrics", ["worker", "--role", "metrics"])
    st.spawn("buyers", ["buyers", "simulate"])
    ports = [c[c.index("--web-port") + 1] if "--web-port" in c else None
             for c in _FakePopen.calls]
    assert ports == ["7100", "7101", "7098", "7099", None]


def test_worker_command_uses_the_configured_web_port() -> None:
    from streams.app import create_app

    args = build_parser().parse_args(["worker", "--role", "auction"])
    app = create_app(_settings(web_port=7100), args.role, web_port=args.web_port)
    assert (app.conf.web_enabled, app.conf.web_port) == (True, 7100)
    args = build_parser().parse_args(["worker", "--web-port", "0"])
    app = create_app(_settings(web_port=7100), args.role, web_port=args.web_port)
    assert app.conf.web_enabled is False
