"""``pingpost supervise -- worker --role sink``: run a command, restart it when it fails.

``pingpost up`` starts every worker this way. The supervisor runs the command as its child
and restarts it, with a log line and a growing delay (1 s doubling to 30 s, back to 1 s once
a run lasted a minute), whenever it exits with a non-zero status or is killed by a signal: a
worker whose Kafka client got stuck exits with status 75 (``streams.runtime.liveness``) to be
restarted here. It does not restart:

- a command that fails within ``min_uptime`` of the supervisor's start (a start-up error
  such as a bad config: its status is the supervisor's, so ``pingpost up`` reports it);
- a command stopped through the supervisor: SIGTERM or SIGINT is passed on to the child,
  and the supervisor exits with the child's status once it has stopped.

The child dies with the supervisor (Linux: ``PR_SET_PDEATHSIG``): ``kill -9`` of the pid in
``.run/pids/`` still kills the worker, as before supervision.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["supervise", "Backoff"]

MIN_UPTIME_S = 10.0


class Backoff:
    """1 s, doubling up to ``max_s``; back to the first delay after a run of ``reset_after_s``."""

    def __init__(
        self, first_s: float = 1.0, max_s: float = 30.0, reset_after_s: float = 60.0
    ) -> None:
        self.first_s, self.max_s, self.reset_after_s = first_s, max_s, reset_after_s
        self.delay = first_s

    def next(self, ran_s: float) -> float:
        if ran_s >= self.reset_after_s:
            self.delay = self.first_s
        delay = self.delay
        self.delay = min(self.delay * 2, self.max_s)
        return delay


def _die_with_parent(parent: int) -> Callable[[], None]:
    def preexec() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # not Linux: the child may outlive a kill -9
            return
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os._exit(1)

    return preexec


def _status(rc: int) -> int:
    return rc if rc >= 0 else 128 - rc


def supervise(
    cmd: list[str],
    name: str,
    *,
    min_uptime: float = MIN_UPTIME_S,
    backoff: Backoff | None = None,
    say: Callable[[str], None] | None = None,
    popen: Callable[..., Any] = subprocess.Popen,
) -> int:
    """Run ``cmd`` until it exits 0 or is stopped through us; returns the exit status."""
    backoff = backoff or Backoff()
    out = say or (
        lambda m: print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] [supervisor] {m}", flush=True)
    )
    state: dict[str, Any] = {"stopping": False, "child": None}

    def on_signal(signum: int, _frame: Any) -> None:
        state["stopping"] = True
        child = state["child"]
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    began = time.monotonic()
    restarts = 0
    while True:
        started = time.monotonic()
        child = state["child"] = popen(cmd, preexec_fn=_die_with_parent(os.getpid()))
        rc = child.wait()
        ran = time.monotonic() - started
        if state["stopping"] or rc == 0:
            return _status(rc) if rc not in (-signal.SIGTERM, -signal.SIGINT) else 0
        if time.monotonic() - began < min_uptime:
            out(
                f"{name} exited with status {_status(rc)} {ran:.1f} s after start: a start-up "
                "failure, not restarted"
            )
            return _status(rc)
        delay = backoff.next(ran)
        restarts += 1
        out(
            f"{name} exited with status {_status(rc)} after {ran:.0f} s; restarting it in "
            f"{delay:.0f} s (restart {restarts})"
        )
        deadline = time.monotonic() + delay
        while not state["stopping"] and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        if state["stopping"]:
            return 0


def main_args(config: str | None, command: list[str]) -> list[str]:
    """The child's command line: this Python running ``pingpost [--config C] COMMAND``."""
    if command and command[0] == "--":
        command = command[1:]
    return [
        sys.executable,
        "-m",
        "streams.tools.cli",
        *(["--config", config] if config else []),
        *command,
    ]
