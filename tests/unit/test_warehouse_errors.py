"""The embedded warehouse answers an error with the HTTP status a ClickHouse server gives
its code (src/Server/HTTP/exceptionCodeToHTTPStatus.cpp), checked against the engine's own
code names so a renumbering would show."""

from __future__ import annotations

import chdb
import pytest

from connectors.warehouse.errors import _HTTP_STATUS, http_status

EXPECTED = {
    "REQUIRED_PASSWORD": 401,
    "ACCESS_DENIED": 403,
    "AUTHENTICATION_FAILED": 403,
    "SYNTAX_ERROR": 400,
    "CANNOT_PARSE_TEXT": 400,
    "TYPE_MISMATCH": 400,
    "UNKNOWN_TABLE": 404,
    "UNKNOWN_DATABASE": 404,
    "UNKNOWN_FUNCTION": 404,
    "UNKNOWN_SETTING": 404,
    "QUERY_IS_TOO_LARGE": 413,
    "NOT_IMPLEMENTED": 501,
    "TIMEOUT_EXCEEDED": 408,
    "CANNOT_SCHEDULE_TASK": 503,
    "READONLY": 500,
    "TOO_MANY_SIMULTANEOUS_QUERIES": 500,
}


@pytest.fixture(scope="module")
def codes() -> dict[str, int]:
    rows = chdb.query(
        "SELECT errorCodeToName(number), number FROM numbers(2000) "
        "WHERE errorCodeToName(number) != ''",
        "CSV",
    ).data()
    out = {}
    for line in rows.splitlines():
        name, number = line.rsplit(",", 1)
        out[name.strip('"')] = int(number)
    return out


@pytest.mark.parametrize(("name", "status"), EXPECTED.items())
def test_a_code_gets_the_servers_status(codes: dict[str, int], name: str, status: int) -> None:
    assert http_status(codes[name]) == status


def test_every_mapped_code_is_a_code_the_engine_knows(codes: dict[str, int]) -> None:
    known = set(codes.values())
    assert set(_HTTP_STATUS) <= known
