"""Pytest plugin: the embedded warehouse (``connectors.warehouse``) as a real subprocess.

Load it with ``pytest_plugins = ["tests.integration.warehouse_fixture"]`` in a conftest or
``-p tests.integration.warehouse_fixture``. The session fixture starts
``python -m connectors.warehouse`` on a free port with a data dir under pytest's tmp dir,
waits for ``/ping`` by polling under a deadline, yields it, and stops it with SIGTERM.
If the warehouse cannot start the fixture FAILS with the process log's tail: a missing
warehouse is an environment bug, not a reason to skip.

``start_warehouse`` is public so tests can run extra instances (restart, kill -9, a second
owner of the same directory).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# Cold start loads the 180 MB chDB engine and opens the pool; ~1 s here, wide margin for CI.
WAREHOUSE_START_TIMEOUT = 60.0
WAREHOUSE_STOP_TIMEOUT = 60.0


class WarehouseStartError(RuntimeError):
    """The warehouse process exited or never answered /ping."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the caller retries if it loses the race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class WarehouseProcess:
    """A running ``python -m connectors.warehouse`` and where it logs."""

    proc: subprocess.Popen[bytes]
    data_dir: Path
    host: str
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def stop(self, timeout: float = WAREHOUSE_STOP_TIMEOUT) -> int:
        """SIGTERM and wait for the clean shutdown; SIGKILL if it hangs. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return int(self.proc.returncode)

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _ping(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
            return bool(response.status == 200 and response.read() == b"Ok.\n")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def launch_warehouse(
    data_dir: Path, port: int, log_path: Path, host: str = "127.0.0.1"
) -> WarehouseProcess:
    """Start the process without waiting for it (see ``start_warehouse``)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "connectors.warehouse",
                "--data-dir",
                str(data_dir),
                "--host",
                host,
                "--port",
                str(port),
                "--pool-size",
                "4",
            ],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return WarehouseProcess(proc, data_dir, host, port, log_path)


def start_warehouse(
    data_dir: Path,
    log_path: Path | None = None,
    timeout: float = WAREHOUSE_START_TIMEOUT,
    attempts: int = 3,
) -> WarehouseProcess:
    """Start a warehouse on a free port and wait until ``/ping`` answers.

    Raises ``WarehouseStartError`` (with the log tail) if it exits or misses the deadline.
    Retries with a new port only when the chosen port was taken in the meantime.
    """
    log_path = log_path or data_dir.parent / f"{data_dir.name}-warehouse.log"
    last = ""
    for _ in range(attempts):
        warehouse = launch_warehouse(data_dir, free_port(), log_path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if warehouse.proc.poll() is not None:
                break
            if _ping(warehouse.url):
                return warehouse
            time.sleep(0.05)  # poll interval, not synchronisation: the deadline bounds it
        else:
            warehouse.kill()
            raise WarehouseStartError(
                f"warehouse did not answer /ping within {timeout:.0f} s:\n{warehouse.log_tail()}"
            )
        last = warehouse.log_tail()
        if "cannot listen" not in last:
            break
    raise WarehouseStartError(f"warehouse exited with code {warehouse.proc.returncode}:\n{last}")


@pytest.fixture(scope="session")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WarehouseProcess]:
    """A running warehouse for the whole session, stopped (SIGTERM) at the end."""
    base = tmp_path_factory.mktemp("warehouse")
    try:
        process = start_warehouse(base / "data", base / "warehouse.log")
    except WarehouseStartError as exc:
        pytest.fail(f"could not start the embedded warehouse:\n{exc}", pytrace=False)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="session")
def warehouse_url(warehouse: WarehouseProcess) -> str:
    """``http://127.0.0.1:<port>`` of the session warehouse."""
    return warehouse.url
