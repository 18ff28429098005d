"""Shared fixtures: the real Kafka broker and the embedded warehouse, started once per run.

Both fail (never skip) when they cannot start: the integration tests exist to run against
the real parts.
"""

pytest_plugins = [
    "tests.integration.kafka_fixture",
    "tests.integration.warehouse_fixture",
]
