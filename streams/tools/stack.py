"""The local stack: Kafka, the warehouse, buyers, workers and ingest as background processes.

``pingpost up`` starts what is not running yet (each component with its log in
``.run/logs/`` and its pid in ``.run/pids/``) and waits until each is ready; ``pingpost down``
stops them in reverse order. Used by the demo and by the end-to-end tests (with their own
run directory and ports).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from connectors.kafka_broker import KafkaBroker, create_topics
from streams.settings import Settings
from streams.topics import topic_specs

__all__ = ["Stack", "StackError", "web_port_for"]


class StackError(RuntimeError):
    pass


def _http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            status: int = resp.status
            return 200 <= status < 300
    except OSError:
        return False


def _port_of(url: str) -> int:
    from urllib.parse import urlparse

    return urlparse(url).port or 8123


async def _group_stable(bootstrap: str, group: str, members: int) -> bool:
    """True when consumer group ``group`` is Stable with at least ``members`` members."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_consumer_groups([group])
    except Exception:
        return False
    finally:
        await admin.close()
    for resp in described:
        for g in getattr(resp, "groups", []):
            # (error_code, group_id, state, protocol_type, protocol, members, ...)
            if g[1] == group and g[2] == "Stable" and len(g[5]) >= members:
                return True
    return False


def _port_taken(host: str, port: int) -> bool:
    """Whether another process listens on ``host:port`` (a bind as the server would do it,
    with SO_REUSEADDR, fails)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def web_port_for(base: int, name: str) -> int:
    """The Faust web port of the worker the stack runs as ``name`` (``worker.web_port`` is
    ``base``): ``worker`` at ``base``, ``workerN`` at ``base + N - 1``, ``sink`` at
    ``base - 2``, ``metrics`` at ``base - 1``; 0 (off) for any other name, when ``base`` is 0,
    or when the port would fall outside 1..65535. Each worker on the host gets its own port,
    and a restarted worker gets its old one back."""
    if name == "sink":
        port = base - 2
    elif name == "metrics":
        port = base - 1
    elif name == "worker":
        port = base
    elif name.startswith("worker") and name[6:].isdigit() and int(name[6:]) >= 2:
        port = base + int(name[6:]) - 1
    else:
        return 0
    return port if base and 1 <= port <= 65535 else 0


@dataclass
class Stack:
    settings: Settings
    config_path: Path
    run_dir: Path
    kafka_port: int = 9092
    #: The broker's KRaft controller port; ``None`` means ``kafka_port + 1``. A caller that
    #: picked ``kafka_port`` as a free ephemeral port picks this one the same way: the port
    #: next to a free one may be any client's ephemeral port (CI once lost a run to that).
    kafka_controller_port: int | None = None
    say: Callable[[str], None] = print
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    #: What this Stack object started (components in start order; "kafka" if it started the
    #: broker): what :meth:`abort` stops when ``up`` fails half-way.
    started: list[str] = field(default_factory=list)

    @property
    def pid_dir(self) -> Path:
        return self.run_dir / "pids"

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    def private_run_dir(self) -> None:
        """Create the run dir (and its pids/ and logs/) readable by their owner only, and
        take group/other access away from one an older version left world-readable:
        everything below it — the broker's log segments, the warehouse, Faust's data, logs —
        holds PII or secrets."""
        for d in (self.run_dir, self.pid_dir, self.log_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)

    def broker(self) -> KafkaBroker:
        return KafkaBroker(
            port=self.kafka_port,
            controller_port=self.kafka_controller_port,
            data_dir=self.run_dir / "kafka",
            num_partitions=self.settings.kafka.partitions,
        )

    # -- process helpers ---------------------------------------------------------------
    def _pid(self, name: str) -> int | None:
        f = self.pid_dir / f"{name}.pid"
        try:
            pid = int(f.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except OSError:
            return None
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
            if state == "Z":
                return None
        except OSError:
            pass
        return pid

    def running(self, name: str) -> bool:
        return self._pid(name) is not None

    def spawn(
        self, name: str, args: list[str], env: dict[str, str] | None = None, nice: int = 0
    ) -> int:
        if args[:1] == ["worker"] and "--web-port" not in args:
            args = [*args, "--web-port", str(web_port_for(self.settings.worker.web_port, name))]
        if (
            args[:1] == ["worker"]
            and self.settings.worker.static_membership
            and "--instance-id" not in args
        ):
            args = [*args, "--instance-id", name]  # the slot: a restart takes its place back
        if self.running(name):
            # A second read of the pid file: None if the process exited since running() read
            # it (no caller uses the pid).
            return self._pid(name)  # type: ignore[return-value]
        old = self._procs.pop(name, None)
        if old is not None:  # reap a process that died (e.g. was killed) before replacing it
            try:
                old.wait(timeout=10)
            except subprocess.TimeoutExpired:
                logging.getLogger(__name__).warning(
                    "%s (pid %d) did not exit; replacing it anyway", name, old.pid
                )
        self.private_run_dir()
        log = open(
            os.open(self.log_dir / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
            "ab",
        )
        full_env = dict(os.environ)
        full_env["PINGPOST_CONFIG"] = str(self.config_path)
        # Workers keep their Faust data directory under the run dir, not the caller's cwd.
        full_env["PINGPOST_RUN_DIR"] = str(self.run_dir)
        full_env.update(env or {})
        self.started.append(name)
        if args[:1] == ["worker"]:  # restarted when it fails (streams/tools/supervise.py)
            args = ["supervise", "--", *args]
        proc = subprocess.Popen(
            [sys.executable, "-m", "streams.tools.cli", "--config", str(self.config_path), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=full_env,
            cwd=os.getcwd(),
            preexec_fn=(lambda: os.nice(nice)) if nice else None,
        )
        log.close()
        self._procs[name] = proc  # keep the handle: reaped in stop(), no zombie
        (self.pid_dir / f"{name}.pid").write_text(str(proc.pid))
        return proc.pid

    def wait_until(self, name: str, ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if not self.running(name):
                raise StackError(
                    f"{name} exited during start-up; see {self.log_dir / (name + '.log')}:\n"
                    + self.tail(name)
                )
            time.sleep(0.1)
        raise StackError(
            f"{name} not ready after {timeout:.0f}s; see "
            f"{self.log_dir / (name + '.log')}:\n" + self.tail(name)
        )

    def _logged(self, name: str, offset: int, text: str) -> bool:
        """Whether ``name``'s log has ``text`` past byte ``offset`` (this start's output)."""
        try:
            with open(self.log_dir / f"{name}.log", "rb") as f:
                f.seek(offset)
                return text.encode() in f.read()
        except OSError:
            return False

    def tail(self, name: str, lines: int = 30) -> str:
        try:
            text = (self.log_dir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, name: str, timeout: float = 15.0) -> bool:
        pid = self._pid(name)
        if pid is None:
            return False
        try:
            os.killpg(pid, signal.SIGTERM)
        except OSError:
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._pid(name) is not None:
            time.sleep(0.1)
        if self._pid(name) is not None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        (self.pid_dir / f"{name}.pid").unlink(missing_ok=True)
        proc = self._procs.pop(name, None)
        if proc is not None:
            proc.wait(timeout=5)
        return True

    # -- components --------------------------------------------------------------------
    COMPONENTS = ("warehouse", "buyers", "worker", "sink", "metrics", "ingest")

    def up(
        self,
        *,
        with_buyers: bool = True,
        embedded_warehouse: bool = True,
        start_kafka: bool = True,
        workers: int = 1,
        with_metrics: bool = True,
    ) -> None:
        s = self.settings
        if not self.running("ingest") and _port_taken(s.ingest.host, s.ingest.port):
            raise StackError(
                f"ingest port {s.ingest.port} is already in use by another process "
                f"(ingest.listen: {s.ingest.listen}); stop that process or set "
                f"ingest.listen to a free port in {self.config_path}"
            )
        self.private_run_dir()
        if start_kafka:
            broker = self.broker()
            if not broker.is_running():
                self.say(
                    f"starting Kafka on {broker.bootstrap} "
                    "(the first run fetches its jars with Maven)"
                )
                self.started.append("kafka")
            broker.start(wait=True, timeout=120)
        asyncio.run(
            create_topics(
                s.kafka.bootstrap, [(t.name, t.partitions, t.config) for t in topic_specs(s)]
            )
        )
        env: dict[str, str] = {}
        ch = s.clickhouse.url.rstrip("/")
        if embedded_warehouse:
            if not self.running("warehouse"):
                self.say(f"starting the warehouse (chDB) on {ch}")
            self.spawn(
                "warehouse",
                [
                    "warehouse",
                    "--data-dir",
                    str(self.run_dir / "warehouse"),
                    "--port",
                    str(_port_of(ch)),
                ],
                env,
                # On a shared host, analytics must not take CPU from auctions:
                # measured close-lag p99 117 ms → 17 ms with the warehouse niced.
                nice=10,
            )
            self.wait_until("warehouse", lambda: _http_ok(f"{ch}/ping"), 60)
        self._migrate()
        if with_buyers and s.simulator.buyers:
            if not self.running("buyers"):
                self.say(f"starting {len(s.simulator.buyers)} simulated buyers")
            self.spawn("buyers", ["buyers", "simulate"], env)
            for b in s.simulator.buyers.values():
                url = f"http://{s.simulator.host}:{b.port}/__sim/stats"
                self.wait_until("buyers", partial(_http_ok, url), 30)
        started: list[tuple[str, int]] = []
        for i in range(workers):
            name = "worker" if i == 0 else f"worker{i + 1}"
            if not self.running(name):
                self.say(f"starting auction worker {i + 1}")
                log = self.log_dir / f"{name}.log"
                started.append((name, log.stat().st_size if log.exists() else 0))
            self.spawn(name, ["worker", "--role", "auction"], env)
        if not self.running("sink"):
            self.say("starting the sink worker")
            log = self.log_dir / "sink.log"
            started.append(("sink", log.stat().st_size if log.exists() else 0))
        self.spawn("sink", ["worker", "--role", "sink"], env, nice=10)
        if with_metrics:
            # Exactly one: the metrics role owns every partition (streams/stages/metrics.py).
            if not self.running("metrics"):
                self.say("starting the metrics worker (alerts, /metrics)")
                log = self.log_dir / "metrics.log"
                started.append(("metrics", log.stat().st_size if log.exists() else 0))
            self.spawn("metrics", ["worker", "--role", "metrics"], env, nice=10)
        self.spawn("ingest", ["ingest"], env)
        self.wait_until(
            "ingest", lambda: _http_ok(f"http://{s.ingest.host}:{s.ingest.port}/healthz"), 60
        )
        # Ready means a worker owns its partitions and finished restoring its tables: leads
        # sent now start their ping round at once, and no worker is still starting up (a
        # Faust start costs a second or two of CPU the first auctions would feel).
        for name, offset in started:
            self.wait_until(name, partial(self._logged, name, offset, "[^Worker]: Ready"), 120)
        self.wait_until(
            "worker",
            lambda: asyncio.run(_group_stable(s.kafka.bootstrap, s.kafka.app_id, members=workers)),
            90,
        )
        if with_metrics and s.metrics.port:
            self.wait_until(
                "metrics", lambda: _http_ok(f"http://{s.metrics.host}:{s.metrics.port}/healthz"), 90
            )

    def abort(self) -> list[str]:
        """Stop what this Stack object started, newest first (after ``up`` failed half-way:
        nothing it started is left running); returns the names stopped."""
        stopped = []
        for name in reversed(self.started):
            if name == "kafka":
                broker = self.broker()
                if broker.is_running():
                    broker.stop()
                    stopped.append(name)
            elif self.stop(name):
                stopped.append(name)
        self.started.clear()
        return stopped

    def _migrate(self) -> None:
        from connectors.clickhouse import connect, migrate

        async def go() -> None:
            wh = await connect(self.settings.clickhouse, attempts=20, delay_s=0.5)
            try:
                await migrate(wh)
            finally:
                await wh.close()

        asyncio.run(go())

    def down(self, *, stop_kafka: bool = True) -> list[str]:
        extra = (
            sorted(
                p.stem for p in self.pid_dir.glob("worker*.pid") if p.stem not in self.COMPONENTS
            )
            if self.pid_dir.exists()
            else []
        )
        stopped = [n for n in [*reversed(self.COMPONENTS), *extra] if self.stop(n)]
        broker = self.broker()
        if stop_kafka and broker.is_running():
            broker.stop()
            stopped.append("kafka")
        return stopped

    def status(self) -> dict[str, bool]:
        out = {"kafka": self.broker().is_running()}
        out.update({n: self.running(n) for n in self.COMPONENTS})
        if self.pid_dir.exists():
            out.update(
                {
                    p.stem: self.running(p.stem)
                    for p in sorted(self.pid_dir.glob("*.pid"))
                    if p.stem not in out
                }
            )
        return out
