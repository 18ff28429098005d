"""The embedded warehouse's errors: its own (start-up, data dir in use) and the ones it reports
to a client as ClickHouse would (``Code: N. DB::Exception: ... (NAME)``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

__all__ = [
    "AUTHENTICATION_FAILED",
    "BAD_ARGUMENTS",
    "CANNOT_DECOMPRESS",
    "ClickHouseError",
    "DataDirInUseError",
    "NETWORK_ERROR",
    "NOT_IMPLEMENTED",
    "READONLY",
    "STD_EXCEPTION",
    "UNKNOWN_COMPRESSION_METHOD",
    "WarehouseError",
    "http_status",
]

_CODE_RE: Final = re.compile(r"^Code: (\d+)\.")

# ClickHouse error codes used for errors raised by the server itself.
STD_EXCEPTION: Final = (1001, "STD_EXCEPTION")
BAD_ARGUMENTS: Final = (36, "BAD_ARGUMENTS")
NOT_IMPLEMENTED: Final = (48, "NOT_IMPLEMENTED")
READONLY: Final = (164, "READONLY")
AUTHENTICATION_FAILED: Final = (516, "AUTHENTICATION_FAILED")
CANNOT_DECOMPRESS: Final = (271, "CANNOT_DECOMPRESS")
UNKNOWN_COMPRESSION_METHOD: Final = (89, "UNKNOWN_COMPRESSION_METHOD")
NETWORK_ERROR: Final = (210, "NETWORK_ERROR")
QUERY_WITH_SAME_ID_IS_ALREADY_RUNNING: Final = (216, "QUERY_WITH_SAME_ID_IS_ALREADY_RUNNING")


#: ClickHouse's HTTP status for an exception code (src/Server/HTTP/exceptionCodeToHTTPStatus.cpp);
#: every other code is 500. Numbers from the engine's own ``errorCodeToName``.
_HTTP_STATUS: Final = {
    **dict.fromkeys((194,), 401),  # REQUIRED_PASSWORD
    # UNKNOWN_USER, WRONG_PASSWORD, ACCESS_DENIED, SET_NON_GRANTED_ROLE, AUTHENTICATION_FAILED
    **dict.fromkeys((192, 193, 497, 512, 516), 403),
    # CANNOT_PARSE_*, THERE_IS_NO_COLUMN, DUPLICATE_COLUMN, BAD_ARGUMENTS, ILLEGAL_COLUMN,
    # *_AST*, SYNTAX_ERROR, TYPE_MISMATCH, INCORRECT_DATA, VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE,
    # CANNOT_COMPILE_REGEXP
    **dict.fromkeys(
        (
            6,
            8,
            15,
            25,
            26,
            27,
            36,
            37,
            38,
            41,
            44,
            53,
            62,
            72,
            117,
            123,
            167,
            168,
            223,
            321,
            376,
            427,
            441,
            675,
            676,
        ),
        400,
    ),
    # UNKNOWN_FUNCTION, _IDENTIFIER, _TYPE, _STORAGE, _TABLE, _AGGREGATE_FUNCTION, _FORMAT,
    # _TYPE_OF_QUERY, _DATABASE, _SETTING, _DIRECTION_OF_SORTING, _DATABASE_ENGINE, _ROLE
    **dict.fromkeys((46, 47, 50, 56, 60, 63, 73, 78, 81, 115, 152, 336, 511), 404),
    229: 413,  # QUERY_IS_TOO_LARGE
    48: 501,  # NOT_IMPLEMENTED
    **dict.fromkeys((76, 209, 439), 503),  # CANNOT_OPEN_FILE, SOCKET_TIMEOUT, CANNOT_SCHEDULE_TASK
    381: 411,  # HTTP_LENGTH_REQUIRED
    159: 408,  # TIMEOUT_EXCEEDED
    779: 415,  # UNSUPPORTED_MEDIA_TYPE
}


def http_status(code: int) -> int:
    """The HTTP status a ClickHouse server answers an exception with this code with."""
    return _HTTP_STATUS.get(code, 500)


class WarehouseError(RuntimeError):
    """The warehouse could not start or run."""


class DataDirInUseError(WarehouseError):
    """Another process already owns the data directory."""

    def __init__(
        self, data_dir: Path, pid: int | None, holder: str = "another warehouse process"
    ) -> None:
        self.data_dir = data_dir
        self.pid = pid
        who = f"{holder} (pid {pid})" if pid is not None else f"{holder} (pid unknown)"
        super().__init__(f"data directory {data_dir} is already in use by {who}")


class ClickHouseError(Exception):
    """An error to report to the client the way ClickHouse does."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text

    @classmethod
    def server(cls, kind: tuple[int, str], message: str) -> ClickHouseError:
        code, name = kind
        return cls(code, f"Code: {code}. DB::Exception: {message}. ({name})")

    @classmethod
    def from_engine(cls, exc: BaseException) -> ClickHouseError:
        """Keep ClickHouse's text from a chDB exception, minus chDB's wrapper prefixes."""
        message = str(exc)
        start = message.find("Code: ")
        if start >= 0:
            message = message[start:].strip()
            match = _CODE_RE.match(message)
            if match:
                return cls(int(match.group(1)), message)
        return cls.server(STD_EXCEPTION, message or type(exc).__name__)
