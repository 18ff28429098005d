"""Pytest plugin: one real Kafka broker (4.1, KRaft, loopback) for the whole session.

Load it with ``pytest_plugins = ["tests.integration.kafka_fixture"]`` in a conftest or
``-p tests.integration.kafka_fixture``. The broker gets free ports and a data dir under
pytest's tmp dir, so it never collides with a developer's broker on 9092 nor with
another test session. If it cannot start the fixture FAILS with the broker log's tail:
a missing broker is an environment bug to fix, not a reason to skip integration tests.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from connectors.kafka_broker import KafkaBroker, KafkaPortInUseError, KafkaRuntimeError

# Cold JVM start on two shared cores (the first start also formats the log dir and may
# resolve jars, which is not counted here) is ~3 s; leave a wide margin for busy CI.
BROKER_START_TIMEOUT = 120.0


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports that were free a moment ago.

    All sockets stay bound until every port is chosen, so the ports differ from each
    other; another process may still grab one before the broker binds it, which the
    fixture handles by retrying with fresh ports.
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port_block(count: int, host: str = "127.0.0.1") -> int:
    """The first of ``count`` consecutive ports that were all free a moment ago."""
    import random

    for _ in range(100):
        start = random.randint(20_000, 60_000)
        sockets = []
        try:
            for port in range(start, start + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.bind((host, port))
            return start
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports found")


def start_test_broker(data_dir: Path, attempts: int = 3) -> KafkaBroker:
    """Start a broker on fresh free ports in ``data_dir``; fail the test if impossible."""
    last_error: Exception | None = None
    for _ in range(attempts):
        port, controller_port = free_ports(2)
        broker = KafkaBroker(port=port, controller_port=controller_port, data_dir=data_dir)
        try:
            broker.start(wait=True, timeout=BROKER_START_TIMEOUT)
            return broker
        except KafkaPortInUseError as exc:  # lost the race for a port: pick new ones
            last_error = exc
        except KafkaRuntimeError as exc:
            broker.stop()
            pytest.fail(f"could not start the Kafka test broker:\n{exc}", pytrace=False)
    pytest.fail(f"no free ports for the Kafka test broker: {last_error}", pytrace=False)


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """A running single-node Kafka broker, stopped at the end of the session."""
    broker = start_test_broker(tmp_path_factory.mktemp("kafka"))
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: KafkaBroker) -> str:
    """``host:port`` of the session broker, for ``bootstrap_servers``."""
    return kafka_broker.bootstrap
