"""Just enough ClickHouse SQL scanning to route a request: split ``INSERT ... FORMAT X`` from its
inline data, find the leading keyword and output format, quote names and setting values."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

__all__ = [
    "PLAIN",
    "InsertSplit",
    "classify",
    "leading_keyword",
    "output_format",
    "quote_identifier",
    "quote_string",
    "set_names",
    "statement_tokens",
    "without_format",
]

_TRAILING_FORMAT_RE: Final = re.compile(rb"\bFORMAT\s+([A-Za-z0-9_]+)\s*;?\s*$", re.IGNORECASE)


class _NeedMore(Exception):
    """The buffered SQL ends inside a token: read more of the body before deciding."""


_WORD, _STRING, _OPEN, _CLOSE, _OTHER = range(5)
_SPACE: Final = frozenset(b" \t\n\r\f\v")
_WORD_BYTES: Final = frozenset(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_$"
) | frozenset(range(0x80, 0x100))


@dataclass(frozen=True, slots=True)
class _Token:
    kind: int
    start: int
    end: int


def _tokens(buf: bytes | bytearray, final: bool) -> Iterator[_Token]:
    """ClickHouse SQL tokens of ``buf`` without whitespace and comments.

    Just enough lexing to find statement keywords at parenthesis depth 0 without being
    fooled by strings, quoted identifiers or comments. Raises ``_NeedMore`` when a token
    may continue past the end of ``buf`` and more input can follow (``final`` false).
    """
    n = len(buf)
    i = 0
    while i < n:
        c = buf[i]
        if c in _SPACE:
            i += 1
        elif buf.startswith(b"--", i):
            j = buf.find(b"\n", i)
            if j < 0:
                if final:
                    return
                raise _NeedMore
            i = j + 1
        elif buf.startswith(b"/*", i):
            j = buf.find(b"*/", i + 2)
            if j < 0:
                if final:
                    return
                raise _NeedMore
            i = j + 2
        elif c in b"'\"`":
            j = i + 1
            while True:
                if j >= n:
                    if final:
                        yield _Token(_STRING, i, n)
                        return
                    raise _NeedMore
                if buf[j] == 0x5C:  # backslash escapes the next byte
                    j += 2
                elif buf[j] == c:
                    if j + 1 < n and buf[j + 1] == c:  # doubled quote
                        j += 2
                    elif j + 1 >= n and not final:
                        raise _NeedMore  # can't tell a closing quote from a doubled one yet
                    else:
                        j += 1
                        break
                else:
                    j += 1
            yield _Token(_STRING, i, j)
            i = j
        elif c in _WORD_BYTES:
            j = i + 1
            while j < n and buf[j] in _WORD_BYTES:
                j += 1
            if j == n and not final:
                raise _NeedMore
            yield _Token(_WORD, i, j)
            i = j
        else:
            if c in b"-/" and i + 1 == n and not final:
                raise _NeedMore  # could be the start of a comment
            kind = _OPEN if c in b"([" else _CLOSE if c in b")]" else _OTHER
            yield _Token(kind, i, i + 1)
            i += 1


@dataclass(frozen=True, slots=True)
class InsertSplit:
    """``INSERT ... FORMAT <fmt>`` then data from ``data_start``."""

    statement: str
    fmt: str
    data_start: int


PLAIN: Final = object()  # not an INSERT with inline data: run the whole text as one query


def classify(buf: bytes | bytearray, final: bool) -> InsertSplit | object | None:
    """Decide how to run the request text buffered so far; ``None`` means read more."""
    try:
        tokens = _tokens(buf, final)
        first = next(tokens, None)
        if first is None:
            return PLAIN if final else None
        if first.kind != _WORD or bytes(buf[first.start : first.end]).upper() != b"INSERT":
            return PLAIN
        depth = 0
        prev = first
        for tok in tokens:
            if tok.kind == _OPEN:
                depth += 1
            elif tok.kind == _CLOSE:
                depth = max(0, depth - 1)
            elif tok.kind == _WORD and depth == 0:
                word = bytes(buf[tok.start : tok.end]).upper()
                if word in (b"VALUES", b"SELECT", b"WITH", b"FROM"):
                    # VALUES data, INSERT SELECT, FROM INFILE: chDB parses these itself.
                    return PLAIN
                prev_word = bytes(buf[prev.start : prev.end]).upper()
                # ``FORMAT`` right after INTO/TABLE or a dot is a table named "format".
                if word == b"FORMAT" and prev_word not in (b"INTO", b"TABLE", b"."):
                    name = next(tokens, None)
                    if name is None or name.kind != _WORD:
                        return PLAIN if final or name is not None else None
                    statement = bytes(buf[: tok.start]).decode("utf-8", errors="replace").strip()
                    fmt = bytes(buf[name.start : name.end]).decode("ascii", errors="replace")
                    return InsertSplit(statement, fmt, _data_start(buf, name.end, final))
            prev = tok
        return PLAIN if final else None
    except _NeedMore:
        return None


def _data_start(buf: bytes | bytearray, i: int, final: bool) -> int:
    """Where inline data starts after the format name: ClickHouse's own rule.

    Skip spaces and tabs, then one line break. Binary data (a Native block of 9 columns
    starts with a tab byte) is safe because clients put a newline right after the name.
    """
    n = len(buf)
    while i < n and buf[i] in b" \t\f":
        i += 1
    if i < n and buf[i] == 0x0D:
        i += 1
    if i >= n and not final:
        raise _NeedMore
    if i < n and buf[i] == 0x0A:
        i += 1
    return i


#: Token kinds, for scanners elsewhere (``queries``).
WORD, OPEN, CLOSE = _WORD, _OPEN, _CLOSE
Token = _Token


def statement_tokens(sql: bytes) -> list[Token]:
    """The tokens of a complete statement (strings, comments and quoted names skipped over
    as the engine would)."""
    try:
        return list(_tokens(sql, final=True))
    except _NeedMore:  # pragma: no cover - final=True never asks for more
        return []


def set_names(sql: bytes) -> set[str]:
    """The settings a ``SET a = 1, b = 'x'`` statement assigns (empty for any other
    statement). Setting names are case-sensitive, as in ClickHouse."""
    toks = statement_tokens(sql)
    if not toks or sql[toks[0].start : toks[0].end].upper() != b"SET":
        return set()
    names: set[str] = set()
    depth, expect_name = 0, True
    for t in toks[1:]:
        text = sql[t.start : t.end]
        if t.kind == OPEN:
            depth += 1
        elif t.kind == CLOSE:
            depth -= 1
        elif depth == 0 and text == b",":
            expect_name = True
        elif expect_name and depth == 0:
            if text[:1] in (b"`", b'"'):
                text = text[1:-1]
            names.add(text.decode("utf-8", errors="replace"))
            expect_name = False
    return names


def leading_keyword(sql: bytes | bytearray) -> str:
    try:
        first = next(_tokens(sql, final=True), None)
    except _NeedMore:  # pragma: no cover - final=True never asks for more
        return ""
    if first is None:
        return ""
    return bytes(sql[first.start : first.end]).decode("ascii", errors="replace").upper()


def output_format(sql: bytes | bytearray, default_format: str) -> str:
    tail = bytes(sql[-256:])
    match = _TRAILING_FORMAT_RE.search(tail)
    return match.group(1).decode() if match else default_format


def without_format(sql: bytes | bytearray) -> bytes:
    """``sql`` without its trailing ``FORMAT`` clause (and ``;``), for use as a subquery."""
    body = bytes(sql).rstrip()
    tail = body[-256:]
    match = _TRAILING_FORMAT_RE.search(tail)
    if match is not None:
        body = body[: len(body) - len(tail) + match.start()]
    return body.rstrip().rstrip(b";").rstrip()


def quote_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def quote_string(value: str) -> str:
    # Quoted literals are coerced to the setting's type, so numbers and words both work.
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
