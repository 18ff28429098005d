"""The embedded warehouse's errors: its own (start-up, data dir in use) and the ones it reports
to a client as ClickHouse would (``Code: N. DB::Exception: ... (NAME)``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

__all__ = [
    "BAD_ARGUMENTS",
    "CANNOT_DECOMPRESS",
    "ClickHouseError",
    "DataDirInUseError",
    "NETWORK_ERROR",
    "NOT_IMPLEMENTED",
    "STD_EXCEPTION",
    "WarehouseError",
]

_CODE_RE: Final = re.compile(r"^Code: (\d+)\.")

# ClickHouse error codes used for errors raised by the server itself.
STD_EXCEPTION: Final = (1001, "STD_EXCEPTION")
BAD_ARGUMENTS: Final = (36, "BAD_ARGUMENTS")
NOT_IMPLEMENTED: Final = (48, "NOT_IMPLEMENTED")
CANNOT_DECOMPRESS: Final = (271, "CANNOT_DECOMPRESS")
NETWORK_ERROR: Final = (210, "NETWORK_ERROR")


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
