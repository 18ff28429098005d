"""Who owns the data directory: an exclusive ``flock`` taken before chDB opens it, and the pid
chDB itself records there."""

from __future__ import annotations

import fcntl
import os
import re
import time
from pathlib import Path
from typing import Final

from connectors.warehouse.errors import DataDirInUseError

__all__ = ["LOCK_FILE_NAME", "DataDirLock", "chdb_holder_pid"]

LOCK_FILE_NAME: Final = "warehouse.lock"
_STATUS_PID_RE: Final = re.compile(rb"PID:\s*(\d+)")


class DataDirLock:
    """An exclusive ``flock`` on ``DIR/warehouse.lock`` holding the owner's pid.

    Taken before chDB opens the directory, so a second warehouse fails with a plain
    message instead of chDB's "Error initializing EmbeddedServer". The kernel drops the
    lock when the process dies, kill -9 included, so there is never a stale lock to clean.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / LOCK_FILE_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)  # owner only: the warehouse is every event pingpost saw
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = self._holder_pid(fd)
            os.close(fd)
            raise DataDirInUseError(self.data_dir, pid) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    @staticmethod
    def _holder_pid(fd: int) -> int | None:
        # The holder writes its pid right after locking; give it a moment if we raced it.
        deadline = time.monotonic() + 0.5
        while True:
            raw = os.pread(fd, 32, 0).strip()
            if raw.isdigit():
                return int(raw)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    def release(self) -> None:
        # The file stays: unlinking a lock file races with a process that just opened it.
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def chdb_holder_pid(data_dir: Path) -> int | None:
    """The pid in ClickHouse's ``status`` file, written by whichever process opened the dir."""
    try:
        match = _STATUS_PID_RE.search((data_dir / "status").read_bytes())
    except OSError:
        return None
    return int(match.group(1)) if match else None
