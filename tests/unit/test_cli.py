"""The command line and the local stack as an operator meets them: worker web ports."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from streams.settings import parse_settings
from streams.tools import stack as stack_mod
from streams.tools.cli import build_parser
from streams.tools.stack import Stack, web_port_for


def _settings(**worker: Any) -> Any:
    raw = yaml.safe_load(Path("config/demo.yaml").read_text())
    raw.setdefault("worker", {}).update(worker)
    return parse_settings(raw, env={})


@pytest.mark.parametrize(
    ("base", "name", "port"),
    [
        (6066, "worker", 6066),
        (6066, "worker2", 6067),
        (6066, "worker5", 6070),
        (6066, "sink", 6064),
        (6066, "metrics", 6065),
        (0, "worker", 0),
        (0, "worker2", 0),
        (0, "sink", 0),  # 0: off for every worker
        (6066, "worker-bench", 0),
        (6066, "worker1", 0),
        (6066, "ingest", 0),
        (1, "sink", 0),
        (65535, "worker2", 0),  # off rather than an impossible port
    ],
)
def test_web_port_for(base: int, name: str, port: int) -> None:
    assert web_port_for(base, name) == port


class _FakePopen:
    calls: list[list[str]] = []

    def __init__(self, cmd: list[str], **_: Any) -> None:
        _FakePopen.calls.append(cmd)
        self.pid = os.getpid()


def test_up_gives_each_worker_its_own_web_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ``pingpost up`` (and a restart through the stack) spawns for each worker."""
    monkeypatch.setattr(stack_mod.subprocess, "Popen", _FakePopen)
    _FakePopen.calls = []
    st = Stack(_settings(web_port=7100), tmp_path / "c.yaml", tmp_path / "run")
    st.spawn("worker", ["worker", "--role", "auction"])
    st.spawn("worker2", ["worker", "--role", "auction"])
    st.spawn("sink", ["worker", "--role", "sink"])
    st.spawn("metrics", ["worker", "--role", "metrics"])
    st.spawn("buyers", ["buyers", "simulate"])
    ports = [c[c.index("--web-port") + 1] if "--web-port" in c else None for c in _FakePopen.calls]
    assert ports == ["7100", "7101", "7098", "7099", None]


def test_worker_command_uses_the_configured_web_port() -> None:
    from streams.app import create_app

    args = build_parser().parse_args(["worker", "--role", "auction"])
    app = create_app(_settings(web_port=7100), args.role, web_port=args.web_port)
    assert (app.conf.web_enabled, app.conf.web_port) == (True, 7100)
    args = build_parser().parse_args(["worker", "--web-port", "0"])
    app = create_app(_settings(web_port=7100), args.role, web_port=args.web_port)
    assert app.conf.web_enabled is False


# --------------------------------------------------------------------------- one-line errors


def _config(tmp_path: Path, **ports: int) -> Path:
    """The demo config with ClickHouse, Kafka and ingest on the given (or fresh free) ports."""
    raw = yaml.safe_load(Path("config/demo.yaml").read_text())
    free = iter(_free_ports(3))
    ch, kafka, ingest = (ports.get(k) or next(free) for k in ("clickhouse", "kafka", "ingest"))
    raw["clickhouse"]["url"] = f"http://127.0.0.1:{ch}"
    raw["kafka"]["bootstrap"] = f"127.0.0.1:{kafka}"
    raw["ingest"]["listen"] = f"127.0.0.1:{ingest}"
    path = tmp_path / "pingpost.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize(
    "argv",
    [
        ["sql", "SELECT 1"],
        ["report"],
        ["report", "--html", "x"],
        ["replay", "--strategy", "config/strategies/shared-max-2.yaml"],
    ],
)
def test_no_warehouse_is_one_line_saying_where_and_how(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from streams.tools.cli import main

    (port,) = _free_ports(1)  # nothing listens there
    config = _config(tmp_path, clickhouse=port)
    assert main(["--config", str(config), *argv]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert f"http://127.0.0.1:{port}" in err and "clickhouse.url" in err and str(config) in err
    assert "pingpost up" in err and "Traceback" not in err


def test_up_with_the_ingest_port_taken_starts_nothing_and_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    from streams.tools import cli

    def no_broker(self: Stack) -> Any:
        raise AssertionError("started Kafka although ingest cannot start")

    monkeypatch.setattr(Stack, "broker", no_broker)
    monkeypatch.setattr(cli, "RUN_DIR", tmp_path / "run")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = _config(tmp_path, ingest=port)
        assert cli.main(["--config", str(config), "up"]) == 1
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1, err
    assert f"ingest port {port}" in err and "ingest.listen" in err and str(config) in err
    assert not (tmp_path / "run" / "pids").exists() or not list(
        (tmp_path / "run" / "pids").iterdir()
    )


def test_up_failing_half_way_stops_what_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A component that fails after others started: they are stopped, one line, exit 1."""
    import subprocess

    from streams.tools import cli
    from streams.tools.stack import StackError

    real_popen = subprocess.Popen

    def popen(cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        return real_popen(
            ["sleep", "60"],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def up(self: Stack, **_: Any) -> None:
        self.spawn("buyers", ["buyers", "simulate"])
        self.spawn("worker", ["worker", "--role", "auction"])
        raise StackError(
            f"ingest exited during start-up; see {self.log_dir}/ingest.log:\n"
            "Traceback (most recent call last):\n  ..."
        )

    monkeypatch.setattr(stack_mod.subprocess, "Popen", popen)
    monkeypatch.setattr(Stack, "up", up)
    monkeypatch.setattr(cli, "RUN_DIR", tmp_path / "run")
    st = Stack(_settings(), tmp_path / "c.yaml", tmp_path / "run")
    try:
        status = cli.main(["--config", str(_config(tmp_path)), "up"])
        running = [n for n in ("buyers", "worker") if st.running(n)]
    finally:
        for name in ("buyers", "worker"):  # whatever the outcome, leave nothing behind
            st.stop(name)
    _, err = capsys.readouterr()
    assert status == 1 and running == []
    assert len(err.strip().splitlines()) == 1, err
    assert "ingest exited during start-up" in err and "ingest.log" in err
    assert "stopped what this run started: worker, buyers" in err


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        ("floors:\n  exclusive_min: -5\n", "floors.exclusive_min: Input should be greater than"),
        ("strategy:\n  shared_max: 0\n", "strategy.shared_max: Input should be greater than"),
        ("post_timeout_ms: 3\n", "cannot override post_timeout_ms"),
        ("buyers:\n  nobody: {timeout_ms: 100}\n", "buyers.nobody: not a buyer of this flow"),
        ("- 1\n", "expected a mapping of flow keys"),
    ],
)
def test_replay_refuses_a_bad_strategy_file_naming_the_key_before_any_query(
    strategy: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from streams.tools.cli import main

    (port,) = _free_ports(1)  # no warehouse: the file is judged first
    path = tmp_path / "candidate.yaml"
    path.write_text(strategy)
    config = _config(tmp_path, clickhouse=port)
    assert main(["--config", str(config), "replay", "--strategy", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "No such file"), ("# only a comment\n\n", "no lead id in it (one per line)")],
)
def test_replay_refuses_an_unreadable_or_empty_lead_set_before_any_query(
    content: str | None, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from streams.tools.cli import main

    (port,) = _free_ports(1)  # no warehouse: the file is judged first
    leads = tmp_path / "leads.txt"
    if content is not None:
        leads.write_text(content)
    config = _config(tmp_path, clickhouse=port)
    argv = ["--config", str(config), "replay", "--strategy", "config/strategies/same.yaml"]
    assert main([*argv, "--leads", str(leads)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
