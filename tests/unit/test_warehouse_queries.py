"""connectors.warehouse.queries: the clients' query ids in system.processes and KILL QUERY.

The rewrites are checked by running them on the real engine (chDB, in process): a statement
that reads ``system.processes`` still parses and runs, under every spelling and alias a client
may use, and a string or a longer name that only looks like it is left alone. (Against a
running query over HTTP: tests/integration/test_warehouse.py.)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from chdb import session as chdb_session

from connectors.warehouse.queries import PROCESSES, TAG_PREFIX, map_processes, parse_kill, tag


@pytest.fixture(scope="module")
def engine() -> Iterator[chdb_session.Session]:
    s = chdb_session.Session()
    try:
        yield s
    finally:
        s.close()


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT query_id FROM system.processes",
        "SELECT processes.query_id FROM system.processes WHERE processes.query_id != ''",
        "SELECT p.query_id FROM system.processes p",
        "SELECT p.query_id FROM system.processes AS p WHERE p.elapsed >= 0",
        "SELECT count() FROM `system`.`processes` FORMAT TSV",
        'SELECT count() FROM "system"."processes" SETTINGS max_threads = 1',
        "SELECT count() FROM SYSTEM.PROCESSES LIMIT 1",
        "SELECT a.query_id FROM system.processes a JOIN system.processes b USING query_id",
        "SELECT count() FROM (SELECT * FROM system.processes) WHERE 1",
        "WITH x AS (SELECT query_id FROM system.processes) SELECT count() FROM x",
    ],
)
def test_every_spelling_of_system_processes_is_mapped_and_still_runs(
    engine: chdb_session.Session, sql: str
) -> None:
    mapped = map_processes(sql.encode())
    assert PROCESSES.encode() in mapped
    assert b"system.processes" not in mapped.replace(PROCESSES.encode(), b"").lower()
    engine.query(mapped.decode(), "TSV")  # parses and runs


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 'FROM system.processes'",
        "SELECT count() FROM system.processors_profile_log WHERE 0",
        "SELECT 1 -- system.processes",
        "SELECT count() FROM system.tables WHERE name = 'processes'",
    ],
)
def test_lookalikes_are_left_alone(sql: str) -> None:
    assert map_processes(sql.encode()) == sql.encode()


def test_the_mapping_shows_the_clients_id_and_hides_the_tag(
    engine: chdb_session.Session,
) -> None:
    """The statement reading system.processes is itself in it: run it tagged, as the
    warehouse runs a request, and it must see its own client id."""
    settings: dict[str, str] = {}
    tag(settings, "client-42")
    assert settings == {"log_comment": TAG_PREFIX + "client-42"}
    engine.query(f"SET log_comment = '{settings['log_comment']}'")
    try:
        out = engine.query(
            map_processes(
                b"SELECT query_id, initial_query_id, Settings['log_comment'] "
                b"FROM system.processes WHERE query_id = 'client-42'"
            ).decode(),
            "TSV",
        )
    finally:
        engine.query("SET log_comment = ''")
    assert out.bytes() == b"client-42\tclient-42\t\n"


def test_a_clients_own_log_comment_wins() -> None:
    settings = {"log_comment": "dashboard 7"}
    tag(settings, "q")
    assert settings == {"log_comment": "dashboard 7"}


@pytest.mark.parametrize(
    ("sql", "condition", "mode"),
    [
        ("KILL QUERY WHERE query_id = 'a'", b"query_id = 'a'", ""),
        ("kill query where query_id = 'a' sync", b"query_id = 'a'", "SYNC"),
        (
            "KILL QUERY WHERE (user = 'x' AND elapsed > 1) ASYNC FORMAT JSON",
            b"(user = 'x' AND elapsed > 1)",
            "ASYNC",
        ),
        ("KILL QUERY WHERE query_id IN ('a', 'sync') TEST", b"query_id IN ('a', 'sync')", "TEST"),
        ("KILL QUERY WHERE query_id = {q:String} FORMAT TSV", b"query_id = {q:String}", ""),
        ("KILL QUERY WHERE 1;", b"1", ""),
    ],
)
def test_kill_query_is_taken_apart(sql: str, condition: bytes, mode: str) -> None:
    kill = parse_kill(sql.encode())
    assert kill is not None
    assert (kill.condition, kill.mode) == (condition, mode)


@pytest.mark.parametrize(
    "sql",
    ["KILL MUTATION WHERE 1", "KILL QUERY ON CLUSTER c WHERE 1", "KILL QUERY WHERE SYNC", "KILL"],
)
def test_other_kill_statements_go_to_the_engine_as_they_are(sql: str) -> None:
    assert parse_kill(sql.encode()) is None


@pytest.mark.parametrize(
    ("sql", "names"),
    [
        (b"SET log_comment = 'a, b', max_threads = 2", {"log_comment", "max_threads"}),
        (b"set `log_comment` = 'x'", {"log_comment"}),
        (b"SET a = tuple(1, 2), b = 3 -- c = 4", {"a", "b"}),
        (b"SELECT 1", set()),
        (b"SETTINGS", set()),
    ],
)
def test_the_settings_a_set_statement_names(sql: bytes, names: set[str]) -> None:
    """A named session keeps what its client's SET assigned, even a setting the same request
    also carried (the query id's tag is one: log_comment)."""
    from connectors.warehouse.sql import set_names

    assert set_names(sql) == names
