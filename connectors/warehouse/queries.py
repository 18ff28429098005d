"""A query's id as the client named it: ``query_id`` in ``system.processes`` and ``KILL QUERY``.

chDB names every query with a UUID of its own and takes no id from its caller (there is no
``query_id`` setting, and its ``query()`` has no such argument). So the facade tags each
request's query with the setting ``log_comment = 'query_id:<id>'`` (the client's own
``log_comment``, sent with the request or set in its session, wins, and that query keeps the
engine's id), which the engine shows in ``system.processes.Settings``, and

* rewrites every reference to ``system.processes`` in a statement into a subquery that shows
  the client's id as ``query_id`` (and ``initial_query_id``) and hides the tag from
  ``Settings``;
* runs ``KILL QUERY WHERE <condition>`` as three engine statements: the condition over that
  subquery gives the engine's ids, ``KILL QUERY WHERE query_id IN (...)`` kills them, and its
  result is shown with the client's ids, in the format the client asked for.

Limits: where the client set no ``log_comment``, ``getSetting('log_comment')`` and
``system.settings`` show the tag; the subquery has no ``ALIAS`` columns (``Settings.Names``,
``Settings.Values``, ``ProfileEvents.Names``, ``ProfileEvents.Values``: use
``mapKeys(Settings)``...), and a column qualified as ``system.processes.x`` must use an alias
instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeAlias

from connectors.warehouse.sql import CLOSE, OPEN, WORD, Token, quote_string, statement_tokens

__all__ = [
    "TAG_PREFIX",
    "KillQuery",
    "kill_query",
    "map_processes",
    "parse_kill",
    "tag",
]

#: Runs one statement on the request's session: (sql, format, query parameters) -> output.
Run: TypeAlias = Callable[[str, str, dict[str, str]], bytes]

#: ``log_comment`` of a query the facade ran for a client's ``query_id``.
TAG_PREFIX: Final = "query_id:"

_TAG: Final = quote_string(TAG_PREFIX)
_ENGINE_ID: Final = "__pingpost_engine_query_id"
_CLIENT_ID: Final = "__pingpost_client_query_id"
_TAGGED: Final = (
    f"SELECT *, query_id AS {_ENGINE_ID}, if(startsWith(Settings['log_comment'], {_TAG}), "
    f"substring(Settings['log_comment'], {len(TAG_PREFIX) + 1}), '') AS {_CLIENT_ID} "
    "FROM system.processes"
)
#: system.processes with the client's ids, and the two helper columns.
_MAPPED: Final = (
    f"SELECT * REPLACE ("
    f"if({_CLIENT_ID} != '', {_CLIENT_ID}, query_id) AS query_id, "
    f"if({_CLIENT_ID} != '' AND initial_query_id = {_ENGINE_ID}, {_CLIENT_ID}, "
    "initial_query_id) AS initial_query_id, "
    f"mapFilter((k, v) -> NOT (k = 'log_comment' AND startsWith(v, {_TAG})), Settings) "
    f"AS Settings) FROM ({_TAGGED})"
)
#: What a client reading system.processes is shown instead.
PROCESSES: Final = f"(SELECT * EXCEPT ({_ENGINE_ID}, {_CLIENT_ID}) FROM ({_MAPPED}))"

# Words after a table that are not its alias (a subquery then gets ``AS processes``, so
# ``processes.query_id`` still resolves).
_NOT_ALIAS: Final = frozenset(
    b"WHERE PREWHERE FORMAT SETTINGS LIMIT OFFSET ORDER GROUP HAVING WINDOW QUALIFY JOIN "
    b"INNER LEFT RIGHT FULL CROSS ANY ALL ASOF SEMI ANTI GLOBAL ARRAY UNION EXCEPT INTERSECT "
    b"INTO ON USING FINAL SAMPLE PASTE NATURAL OUTER".split()
)


def tag(settings: dict[str, str], query_id: str) -> None:
    """Tag the request's query with its id, unless the client sent a ``log_comment``."""
    settings.setdefault("log_comment", TAG_PREFIX + query_id)


def _word(sql: bytes, tok: Token) -> bytes:
    return sql[tok.start : tok.end].upper()


def _name(sql: bytes, tok: Token) -> bytes:
    """An identifier's name, bare or quoted with backticks or double quotes."""
    text = sql[tok.start : tok.end]
    if text[:1] in (b"`", b'"'):
        return text[1:-1].lower()
    return text.lower() if tok.kind == WORD else b""


def map_processes(sql: bytes) -> bytes:
    """``sql`` with every ``system.processes`` replaced by :data:`PROCESSES`."""
    if b"processes" not in sql.lower():
        return sql
    toks = statement_tokens(sql)
    out: list[bytes] = []
    last = 0
    for i in range(len(toks) - 2):
        a, dot, b = toks[i], toks[i + 1], toks[i + 2]
        if (
            sql[dot.start : dot.end] == b"."
            and _name(sql, a) == b"system"
            and _name(sql, b) == b"processes"
            and (i == 0 or sql[toks[i - 1].start : toks[i - 1].end] != b".")
        ):
            nxt = toks[i + 3] if i + 3 < len(toks) else None
            aliased = nxt is not None and (
                (nxt.kind == WORD and _word(sql, nxt) not in _NOT_ALIAS)
                or sql[nxt.start : nxt.end][:1] in (b"`", b'"')
            )
            out += [sql[last : a.start], PROCESSES.encode()]
            if not aliased:
                out.append(b" AS processes")
            last = b.end
    if not out:
        return sql
    out.append(sql[last:])
    return b"".join(out)


@dataclass(frozen=True, slots=True)
class KillQuery:
    """``KILL QUERY WHERE <condition> [SYNC|ASYNC|TEST]``, taken apart."""

    condition: bytes
    mode: str  # "SYNC", "ASYNC", "TEST" or ""


_MODES: Final = frozenset({b"SYNC", b"ASYNC", b"TEST"})
_ENDS: Final = _MODES | {b"FORMAT", b"SETTINGS"}


def parse_kill(sql: bytes) -> KillQuery | None:
    """The parts of a ``KILL QUERY WHERE`` statement; None for anything else (``KILL
    MUTATION``, ``ON CLUSTER``...: the engine runs those as they are)."""
    toks = statement_tokens(sql)
    if len(toks) < 4 or [_word(sql, t) for t in toks[:3]] != [b"KILL", b"QUERY", b"WHERE"]:
        return None
    depth = 0
    end = len(toks)
    mode = ""
    for j in range(3, len(toks)):
        t = toks[j]
        if t.kind == OPEN:
            depth += 1
        elif t.kind == CLOSE:
            depth -= 1
        elif depth == 0 and (
            (t.kind == WORD and _word(sql, t) in _ENDS) or sql[t.start : t.end] == b";"
        ):
            end = j
            if _word(sql, t) in _MODES:
                mode = _word(sql, t).decode()
            break
    if end == 3:
        return None
    return KillQuery(condition=sql[toks[3].start : toks[end - 1].end], mode=mode)


def kill_query(run: Run, kill: KillQuery, fmt: str, params: dict[str, str]) -> bytes:
    """Kill what ``kill``'s condition selects, seen with the clients' ids; the result as the
    engine's ``KILL QUERY`` shows it, with the clients' ids, in ``fmt``.

    ``run(sql, fmt, params) -> bytes`` runs one statement on the request's session."""
    rows = run(
        f"SELECT {_ENGINE_ID}, query_id FROM ({_MAPPED}) WHERE ({kill.condition.decode()})",
        "TabSeparated",
        params,
    )
    ids: dict[str, str] = {}
    for line in rows.decode().splitlines():
        engine_id, _, client_id = line.partition("\t")
        ids[engine_id] = client_id
    where = "query_id IN (" + ", ".join(quote_string(e) for e in ids) + ")" if ids else "0"
    killed = run(f"KILL QUERY WHERE {where} {kill.mode}".strip(), "TabSeparated", {})
    shown: list[str] = []
    for line in killed.decode().splitlines():
        fields = line.split("\t")
        if len(fields) >= 2:
            fields[1] = ids.get(fields[1], fields[1])  # both TabSeparated-escaped
        shown.append("\t".join(fields))
    data = "".join(row + "\n" for row in shown)
    return run(
        "SELECT * FROM format(TabSeparated, "
        "'kill_status String, query_id String, user String, query String', "
        f"{quote_string(data)})",
        fmt,
        {},
    )
