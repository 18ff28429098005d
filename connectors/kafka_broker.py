"""Run a real Apache Kafka broker on loopback, owned by the project.

No Docker engine and no Kafka tarball are available on our machines, but Maven Central
is: ``kafka/pom.xml`` resolves ``org.apache.kafka:kafka_2.13`` (4.1.x) and a log4j2
binding into ``~/.m2``. This module turns that into a running single-node KRaft cluster
(broker and controller in one JVM) the same way the distribution's shell scripts would:

* ``kafka.tools.StorageTool format`` once per data dir (what ``kafka-storage.sh`` runs);
* ``java ... kafka.Kafka server.properties`` (what ``kafka-server-start.sh`` runs),
  detached in its own session so it outlives the CLI call that started it.

Nothing here is an emulator: the tests and the dev stack talk to the real broker, so
protocol-level incompatibilities (Kafka 4 dropped old API versions, KIP-896) show up here
first. Standard library only, plus aiokafka for topic administration.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import os
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DEFAULT_HEAP",
    "KafkaBroker",
    "KafkaPortInUseError",
    "KafkaRuntimeError",
    "TopicSpec",
    "create_topics",
    "default_repo_root",
    "ensure_jars",
]

# Modest on purpose: the broker shares two cores and the memory with the workers, the
# warehouse and the test suite. 512 MiB is plenty for a single-node dev/test cluster.
DEFAULT_HEAP = "-Xmx512m -Xms256m"

# (topic name, partition count, topic-level config)
TopicSpec = tuple[str, int, Mapping[str, str]]

_CLASSPATH_FILE = Path(".run/kafka/classpath.txt")
_POM_FILE = Path("kafka/pom.xml")
_KEY_PREFIX = "# pom-sha256="
# Marks our JVMs on their command line, so a pid (from the pid file or a /proc scan) is
# only ever taken for *our* broker on *this* data dir, never a recycled pid.
_DIR_MARKER = "-Dpingpost.kafka.dir="
_PORT_MARKER = "-Dpingpost.kafka.port="


class KafkaRuntimeError(RuntimeError):
    """The broker could not be provisioned, started, stopped or administered."""


class KafkaPortInUseError(KafkaRuntimeError):
    """A port the broker needs is taken; callers picking free ports can retry."""


def default_repo_root() -> Path:
    """The checkout this module lives in (``connectors/`` is a top-level package)."""
    return Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- jars


def _require_tool(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise KafkaRuntimeError(
            f"`{name}` is not on PATH; the local Kafka broker needs it ({hint})."
        )
    return path


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock: two test sessions or a CLI and a test starting at
    once must not both run Maven into ~/.m2 or format the same dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_cached_classpath(cache: Path, key: str) -> str | None:
    try:
        header, _, classpath = cache.read_text().partition("\n")
    except FileNotFoundError:
        return None
    classpath = classpath.strip()
    if header != _KEY_PREFIX + key or not classpath:
        return None
    # ~/.m2 may have been wiped since (new machine, cleaned cache): re-resolve then.
    if not all(Path(p).is_file() for p in classpath.split(os.pathsep)):
        return None
    return classpath


def ensure_jars(repo_root: str | os.PathLike[str] | None = None) -> str:
    """Return the broker's Java classpath, resolving it with Maven when needed.

    The classpath is cached in ``<repo>/.run/kafka/classpath.txt`` under the SHA-256 of
    ``kafka/pom.xml``, so Maven runs once per pom change (or when a cached jar vanished
    from ``~/.m2``). Raises :class:`KafkaRuntimeError` if ``java``/``mvn`` are missing
    or Maven fails.
    """
    root = Path(repo_root) if repo_root is not None else default_repo_root()
    pom = root / _POM_FILE
    if not pom.is_file():
        raise KafkaRuntimeError(f"{pom} not found: is {root} a pingpost checkout?")
    key = hashlib.sha256(pom.read_bytes()).hexdigest()
    cache = root / _CLASSPATH_FILE

    cached = _read_cached_classpath(cache, key)
    if cached is not None:
        return cached

    # java is checked here too, so a missing JDK fails before a long Maven run.
    _require_tool("java", "install a JDK 17+, e.g. `apt-get install openjdk-17-jdk-headless`")
    mvn = _require_tool("mvn", "install Maven 3.8+, e.g. `apt-get install maven`")

    with _file_lock(cache.with_suffix(".lock")):
        cached = _read_cached_classpath(cache, key)  # another process may have won
        if cached is not None:
            return cached
        out = cache.with_suffix(".mvn-out")
        cmd = [
            mvn,
            "-q",
            "-B",
            "-Dstyle.color=never",
            "-f",
            str(pom),
            "dependency:build-classpath",
            f"-Dmdep.outputFile={out}",
            "-Dmdep.includeScope=runtime",
        ]
        try:
            proc = subprocess.run(
                cmd,
                cwd=root,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=900,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise KafkaRuntimeError(
                f"Maven did not finish in {exc.timeout}s: {shlex.join(cmd)}"
            ) from exc
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-40:])
            raise KafkaRuntimeError(
                f"Maven could not resolve the Kafka jars (exit {proc.returncode}):\n"
                f"$ {shlex.join(cmd)}\n{tail}"
            )
        classpath = out.read_text().strip()
        out.unlink()
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(f"{_KEY_PREFIX}{key}\n{classpath}\n")
        tmp.replace(cache)  # atomic: readers never see a half-written file
        return classpath


# --------------------------------------------------------------------- readiness


def _kafka_request(
    host: str, port: int, api_key: int, api_version: int, body: bytes, timeout: float
) -> bytes | None:
    """One request/response round trip with a non-flexible (header v1) request.

    A raw socket instead of aiokafka so :meth:`KafkaBroker.start` stays synchronous and
    usable from inside a running event loop (pytest-asyncio, the CLI), and so polling a
    not-yet-listening port costs no client log noise. Returns the response body after
    the correlation id, or None if the broker is not reachable (yet).
    """
    correlation_id = 1
    client_id = b"pingpost-ready"
    header = struct.pack(">hhih", api_key, api_version, correlation_id, len(client_id))
    request = header + client_id + body
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(struct.pack(">i", len(request)) + request)
            (size,) = struct.unpack(">i", _recv_exact(sock, 4))
            payload = _recv_exact(sock, size)
    except OSError:
        return None
    if len(payload) < 4 or struct.unpack_from(">i", payload)[0] != correlation_id:
        return None
    return payload[4:]


def _metadata_ready(host: str, port: int, timeout: float) -> bool:
    """Metadata v1 for all topics; True once the broker lists at least one broker.

    The client listener only opens once the broker has caught up with the metadata log
    and been unfenced, and Metadata is what every client sends first.
    """
    response = _kafka_request(host, port, 3, 1, struct.pack(">i", -1), timeout)
    # brokers: array(int32 count, ...) comes first in the v1 response.
    if response is None or len(response) < 4:
        return False
    (broker_count,) = struct.unpack_from(">i", response)
    return bool(broker_count > 0)


def _group_coordinator_ready(host: str, port: int, timeout: float) -> bool:
    """FindCoordinator v1 for a throwaway group; True once it returns no error.

    The first FindCoordinator on a fresh cluster creates ``__consumer_offsets``
    (internal topics are created even with auto-creation off) and answers
    COORDINATOR_NOT_AVAILABLE until its partitions have leaders. Doing that here makes
    "ready" include the group coordinator, so the first Faust worker or consumer group
    after a fresh start joins at once instead of logging errors while it retries.
    """
    key = b"pingpost-readiness"
    body = struct.pack(">h", len(key)) + key + struct.pack(">b", 0)  # key_type 0 = group
    response = _kafka_request(host, port, 10, 1, body, timeout)
    # v1 response: throttle_time_ms int32, error_code int16, ...
    if response is None or len(response) < 6:
        return False
    (error_code,) = struct.unpack_from(">h", response, 4)
    return bool(error_code == 0)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by broker")
        buf += chunk
    return bytes(buf)


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Match the broker's own bind semantics (Kafka sets SO_REUSEADDR) so a port in
        # TIME_WAIT from a previous run is not reported as busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


# ------------------------------------------------------------------ processes


def _proc_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.decode(errors="replace").split("\0")


def _pid_alive(pid: int) -> bool:
    """Alive and not a zombie. The JVM is re-parented to whatever reaps orphans; in a
    container that may be a PID 1 that never reaps, and kill(pid, 0) succeeds on a
    zombie, so read the process state instead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # Format: "pid (comm) S ..."; comm may contain spaces/parens, so split at the last ')'.
    state = stat.rpartition(")")[2].split()[0]
    return state not in ("Z", "X")


def _new_cluster_id() -> str:
    """A KRaft cluster id the way ``Uuid.randomUuid().toString()`` makes one: 16 random
    bytes, URL-safe base64 without padding, never starting with '-' (Kafka regenerates
    those so the id cannot be mistaken for a CLI flag)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _tail(path: Path, lines: int = 60) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode(errors="replace")
    except OSError:
        return "(no broker log)"
    return "\n".join(text.splitlines()[-lines:])


# ------------------------------------------------------------------- broker

_LOG4J2_PROPERTIES = """\
# Written by connectors/kafka_broker.py on every start; edit the module, not this file.
# Everything goes to stdout, which the launcher appends to broker.log: one file to tail,
# and JVM-level failures (bad flags, OOM) land in the same place.
status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.console.ref = STDOUT
# Per-request and per-partition state chatter; WARN keeps the log readable.
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = WARN
"""


@dataclass
class KafkaBroker:
    """A single-node KRaft Kafka (broker + controller in one JVM) on loopback.

    State lives in ``data_dir``: ``server.properties``, ``log4j2.properties``,
    ``cluster.id``, ``broker.pid``, ``broker.log`` (the previous run's is kept as
    ``broker.log.1``) and the log segments under ``data/``. Several brokers can run side
    by side as long as their data dirs and ports differ.
    """

    port: int = 9092
    # None: port + 1 (9093 for the default broker, the usual KRaft controller port).
    controller_port: int | None = None
    # None: <repo>/.run/kafka
    data_dir: Path | None = None
    heap: str = DEFAULT_HEAP
    host: str = "127.0.0.1"
    # Default partition count for topics created without one. Our topics are created
    # explicitly with their own counts; 6 matches them so a stray default still lines up.
    num_partitions: int = 6
    # Extra broker settings, applied last (override the defaults below).
    extra_config: Mapping[str, str] = field(default_factory=dict)
    repo_root: Path = field(default_factory=default_repo_root)

    def __post_init__(self) -> None:
        if self.controller_port is None:
            self.controller_port = self.port + 1
        if self.data_dir is None:
            self.data_dir = self.repo_root / ".run" / "kafka"
        # Absolute, so the marker on the JVM command line is stable across cwd changes.
        self.data_dir = Path(self.data_dir).resolve()
        if self.port == self.controller_port:
            raise ValueError("port and controller_port must differ")

    # ---------------------------------------------------------------- paths

    @property
    def bootstrap(self) -> str:
        """``host:port`` for client ``bootstrap_servers``."""
        return f"{self.host}:{self.port}"

    @property
    def _dir(self) -> Path:
        assert self.data_dir is not None  # set in __post_init__
        return self.data_dir

    @property
    def log_dir(self) -> Path:
        """Kafka's ``log.dirs``: the partitions' segment files and the metadata log."""
        return self._dir / "data"

    @property
    def log_file(self) -> Path:
        """The broker's stdout/stderr (all of its logging)."""
        return self._dir / "broker.log"

    @property
    def pid_file(self) -> Path:
        return self._dir / "broker.pid"

    @property
    def properties_file(self) -> Path:
        return self._dir / "server.properties"

    # --------------------------------------------------------------- status

    def pid(self) -> int | None:
        """The running broker's pid for this data dir, or None."""
        marker = _DIR_MARKER + str(self._dir)
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            pid = None
        if pid is not None and self._is_ours(pid, marker):
            return pid
        # Pid file lost or stale (e.g. the dir's pid file was deleted while the JVM ran):
        # fall back to a /proc scan, so we never start a second JVM on a locked dir.
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and self._is_ours(int(entry.name), marker):
                return int(entry.name)
        return None

    @staticmethod
    def _is_ours(pid: int, marker: str) -> bool:
        cmdline = _proc_cmdline(pid)
        return (
            cmdline is not None
            and marker in cmdline
            and "kafka.Kafka" in cmdline
            and _pid_alive(pid)
        )

    def is_running(self) -> bool:
        return self.pid() is not None

    def is_ready(self, timeout: float = 2.0) -> bool:
        """True if the broker answers Metadata and has a group coordinator."""
        return _metadata_ready(self.host, self.port, timeout) and _group_coordinator_ready(
            self.host, self.port, timeout
        )

    def rss_bytes(self) -> int | None:
        """Resident memory of the broker JVM (for diagnostics and benchmarks)."""
        pid = self.pid()
        if pid is None:
            return None
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return None

    # ------------------------------------------------------------ lifecycle

    def start(self, wait: bool = True, timeout: float = 90.0) -> None:
        """Start the broker unless it already runs on this data dir.

        With ``wait`` the call returns only once the broker answers Metadata requests
        and its group coordinator is available (see :meth:`is_ready`). It raises
        :class:`KafkaRuntimeError`, with the tail of ``broker.log``, if the broker dies
        or is not ready within ``timeout`` seconds (jar resolution not included), and
        :class:`KafkaPortInUseError` if a port is taken by another process.
        """
        # Owner only: the log segments hold PII (the leads and lead-pii topics).
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self._dir, 0o700)
        with _file_lock(self._dir / "broker.lock"):
            pid = self.pid()
            if pid is not None:
                running_port = self._running_port(pid)
                if running_port not in (None, self.port):
                    raise KafkaRuntimeError(
                        f"a broker (pid {pid}) already runs on {self._dir} with port "
                        f"{running_port}, not {self.port}; stop it first"
                    )
            else:
                self._launch()
        if wait:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Poll (with a deadline) until the broker answers; fail fast if it died."""
        deadline = time.monotonic() + timeout
        while True:
            if self.is_ready(timeout=2.0):
                return
            if not self.is_running():
                raise KafkaRuntimeError(
                    f"Kafka broker exited during start-up ({self._dir}).\n"
                    f"--- tail of {self.log_file} ---\n{_tail(self.log_file)}"
                )
            if time.monotonic() >= deadline:
                raise KafkaRuntimeError(
                    f"Kafka broker on {self.bootstrap} not ready after {timeout:.0f}s "
                    f"(still running, pid {self.pid()}).\n"
                    f"--- tail of {self.log_file} ---\n{_tail(self.log_file)}"
                )
            time.sleep(0.2)  # poll interval, not synchronisation: the deadline rules

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (controlled shutdown), then SIGKILL after ``timeout`` seconds."""
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not self._wait_exit(pid, timeout):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                if not self._wait_exit(pid, 10.0):
                    raise KafkaRuntimeError(f"Kafka broker pid {pid} survived SIGKILL")
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()

    @staticmethod
    def _wait_exit(pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while _pid_alive(pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    @staticmethod
    def _running_port(pid: int) -> int | None:
        for arg in _proc_cmdline(pid) or []:
            if arg.startswith(_PORT_MARKER):
                with contextlib.suppress(ValueError):
                    return int(arg[len(_PORT_MARKER) :])
        return None

    # ------------------------------------------------------------- internals

    def _server_properties(self) -> dict[str, str]:
        voters = f"1@{self.host}:{self.controller_port}"
        props: dict[str, str] = {
            "process.roles": "broker,controller",
            "node.id": "1",
            # Static quorum (kraft.version 0) rather than `format --standalone`'s dynamic
            # one: the voter set then comes from this file on every start, so changing
            # controller_port between runs of the same data dir just works.
            "controller.quorum.voters": voters,
            "listeners": (
                f"PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}"
            ),
            "advertised.listeners": f"PLAINTEXT://{self.host}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.log_dir),
            # Topics are created explicitly with their partition counts and configs; a
            # typo'd topic name must fail, not silently create a 1-partition topic.
            "auto.create.topics.enable": "false",
            "num.partitions": str(self.num_partitions),
            # Single node: every internal topic must be satisfiable with one replica.
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # 50 partitions each by default: pointless on one node and slow to create on
            # the first group join / first transaction.
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.num.partitions": "10",
            # Default 3 s delays the first rebalance of every new group: tests and dev
            # restarts would wait for nothing.
            "group.initial.rebalance.delay.ms": "0",
            # Sized for two shared cores (defaults: 3 network, 8 io threads). 1 and 2 cut
            # the broker's own CPU at rest (1.3 -> 1.1 % of a core with no client) but not
            # measurably the stack's; kept at 2 and 4 until a chaos run's slower recovery
            # is explained (docs/numbers.md).
            "num.network.threads": "2",
            "num.io.threads": "4",
            "num.recovery.threads.per.data.dir": "1",
            # The active controller appends a no-op record to the metadata log every 500 ms
            # by default (to advance its high watermark): a third of a single node's CPU at
            # rest. One node has no follower to keep in step; 5 s keeps the log moving.
            "metadata.max.idle.interval.ms": "5000",
        }
        props.update(self.extra_config)
        return props

    def _write_config(self) -> None:
        lines = ["# Written by connectors/kafka_broker.py on every start.\n"]
        lines += [f"{k}={v}\n" for k, v in self._server_properties().items()]
        self.properties_file.write_text("".join(lines))
        (self._dir / "log4j2.properties").write_text(_LOG4J2_PROPERTIES)

    def _java_base(self, classpath: str, heap: str) -> list[str]:
        java = _require_tool("java", "install a JDK 17+")
        return [
            java,
            *shlex.split(heap),
            f"-Dlog4j2.configurationFile={self._dir / 'log4j2.properties'}",
            # log4j2's own shutdown hook races Kafka's and stops logging half-way through
            # the controlled shutdown; without it the log shows the shutdown to the end.
            "-Dlog4j2.shutdownHookEnabled=false",
            "-Djava.awt.headless=true",
            "-cp",
            classpath,
        ]

    def _format_once(self, classpath: str) -> None:
        if (self.log_dir / "meta.properties").is_file():
            return
        id_file = self._dir / "cluster.id"
        if not id_file.is_file():
            id_file.write_text(_new_cluster_id() + "\n")
        cluster_id = id_file.read_text().strip()
        cmd = [
            *self._java_base(classpath, "-Xmx256m"),
            "kafka.tools.StorageTool",
            "format",
            "--config",
            str(self.properties_file),
            "--cluster-id",
            cluster_id,
            # A half-finished earlier format must not wedge the dir forever.
            "--ignore-formatted",
        ]
        proc = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False
        )
        if proc.returncode != 0:
            raise KafkaRuntimeError(
                f"formatting the KRaft log dir {self.log_dir} failed (exit {proc.returncode}):\n"
                # The tool dumps the whole broker config at INFO first; the cause is last.
                + "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
            )

    def _launch(self) -> None:
        for name, port in (("port", self.port), ("controller_port", self.controller_port)):
            assert port is not None
            if _port_in_use(self.host, port):
                raise KafkaPortInUseError(
                    f"{name} {self.host}:{port} is already in use (another broker, or "
                    f"another service); pick another port or stop that process"
                )
        classpath = ensure_jars(self.repo_root)
        self._write_config()
        self._format_once(classpath)

        if self.log_file.exists():
            self.log_file.replace(self.log_file.with_suffix(".log.1"))
        cmd = [
            *self._java_base(classpath, self.heap),
            # Kafka's own launch script's GC settings: short pauses, no full GC on
            # System.gc() from direct-buffer cleanup.
            # (The serial collector was tried: ~15 % less broker CPU per lead, but young
            # pauses up to 60 ms against G1's 31 ms; docs/numbers.md.)
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:InitiatingHeapOccupancyPercent=35",
            "-XX:+ExplicitGCInvokesConcurrent",
            # Every pause, with the broker's uptime: the broker's own stalls can be read
            # against the latency tails (two files of 5 MB at most).
            f"-Xlog:gc:file={self._dir / 'gc.log'}:uptime:filecount=2,filesize=5M",
            # C1 only: the C2 compiler's warm-up burns a core for the broker's first minute,
            # which on a 2-core host is taken from the auction workers (close lag of a cold
            # demo). A single-node dev/test broker never needs C2's peak throughput.
            "-XX:TieredStopAtLevel=1",
            # No hsperfdata file: its sampler woke the JVM 20 times a second for jstat, which
            # nothing here reads.
            "-XX:-UsePerfData",
            # Heap dump / error files would otherwise land in the cwd.
            f"-XX:ErrorFile={self._dir / 'hs_err_pid%p.log'}",
            _DIR_MARKER + str(self._dir),
            _PORT_MARKER + str(self.port),
            "kafka.Kafka",
            str(self.properties_file),
        ]
        # Detach via `sh -c '... &'` rather than keeping a Popen: the JVM is re-parented
        # away from us, so it survives the CLI process that started it, no zombie is left
        # in a long-lived parent, and no Popen object warns (ResourceWarning, which our
        # pytest config turns into errors) about a child still running at exit.
        # start_new_session puts the JVM in its own session: Ctrl-C in the terminal that
        # ran the CLI or pytest does not reach the broker.
        launcher = '"$@" >>"$PINGPOST_KAFKA_LOG" 2>&1 </dev/null & echo $! >"$PINGPOST_KAFKA_PID"'
        env = dict(os.environ)
        env["PINGPOST_KAFKA_LOG"] = str(self.log_file)
        env["PINGPOST_KAFKA_PID"] = str(self.pid_file)
        subprocess.run(
            ["/bin/sh", "-c", launcher, "sh", *cmd],
            cwd=self._dir,
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            check=True,
            timeout=30,
        )


# ------------------------------------------------------------------- topics


async def create_topics(
    bootstrap: str,
    specs: Sequence[TopicSpec],
    *,
    timeout: float = 30.0,
) -> dict[str, bool]:
    """Create topics explicitly (replication factor 1); return name -> created-now.

    Idempotent: a topic that already exists is fine if its partition count matches,
    and a :class:`KafkaRuntimeError` if not (stream joins and keyed state rely on
    co-partitioning, so a silently different count would be a data bug). Returns once
    every partition of every topic has a leader, so producers can send right away.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError, for_code

    wanted = {name: partitions for name, partitions, _ in specs}
    if len(wanted) != len(specs):
        raise ValueError("duplicate topic names in specs")
    created: dict[str, bool] = {}
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id="pingpost-admin",
        request_timeout_ms=int(timeout * 1000),
    )
    await admin.start()
    try:
        if specs:
            response = await admin.create_topics(
                [
                    NewTopic(
                        name=name,
                        num_partitions=partitions,
                        replication_factor=1,
                        topic_configs={k: str(v) for k, v in config.items()},
                    )
                    for name, partitions, config in specs
                ],
                timeout_ms=int(timeout * 1000),
            )
            errors = []
            for name, code, *rest in response.topic_errors:
                if code == 0:
                    created[name] = True
                elif code == TopicAlreadyExistsError.errno:
                    created[name] = False
                else:
                    message = rest[0] if rest else ""
                    errors.append(f"{name}: {for_code(code).__name__} {message or ''}".strip())
            if errors:
                raise KafkaRuntimeError("creating topics failed: " + "; ".join(errors))
        await _wait_for_leaders(admin, wanted, timeout)
    finally:
        await admin.close()
    return created


async def _wait_for_leaders(admin: object, wanted: Mapping[str, int], timeout: float) -> None:
    """Topic creation returns before partition leaders are elected; poll metadata until
    each wanted topic has its partitions and all of them have a leader."""
    from aiokafka.admin import AIOKafkaAdminClient

    assert isinstance(admin, AIOKafkaAdminClient)
    deadline = time.monotonic() + timeout
    pending = dict(wanted)
    while pending:
        for topic in await admin.describe_topics(list(pending)):
            name = topic["topic"]
            partitions = topic["partitions"]
            if topic["error_code"] == 0 and partitions:
                if len(partitions) != pending[name]:
                    raise KafkaRuntimeError(
                        f"topic {name!r} exists with {len(partitions)} partitions, "
                        f"expected {pending[name]}"
                    )
                if all(p["leader"] >= 0 for p in partitions):
                    pending.pop(name)
        if not pending:
            return
        if time.monotonic() >= deadline:
            raise KafkaRuntimeError(f"topics without leaders after {timeout}s: {sorted(pending)}")
        await asyncio.sleep(0.1)  # poll interval under a deadline
