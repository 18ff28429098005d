"""CPU time of the local stack's processes, read from ``/proc`` (Linux).

Each component the stack starts leads its own process group (its pid in
``.run/pids/<name>.pid``; the broker's JVM in ``.run/kafka/broker.pid``, in its launcher's
group); its CPU is the user + system time of every live process in that group (a supervised
worker and its supervisor, the JVM). Two samples taken around
some work give each component's CPU seconds for it: divide by the leads settled in between for
the CPU cost per lead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CpuSample", "sample", "per_lead_ms", "format_per_lead"]

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class CpuSample:
    #: CPU seconds (user + system) per component, from its process group.
    seconds: dict[str, float]
    #: ``time.monotonic()`` when taken.
    at: float


def _groups() -> dict[int, float]:
    """CPU seconds of every live process, summed per process group."""
    out: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        # Fields after the command name (which may hold spaces and parentheses).
        fields = raw.rsplit(")", 1)[1].split()
        pgrp, utime, stime = int(fields[2]), int(fields[11]), int(fields[12])
        out[pgrp] = out.get(pgrp, 0.0) + (utime + stime) / _TICK
    return out


def sample(pid_dir: Path, extra: dict[str, int] | None = None) -> CpuSample:
    """CPU seconds so far of each component with a pid file in ``pid_dir`` and of the Kafka
    broker the stack runs (``<run dir>/kafka/broker.pid``), plus ``extra``: name → pid of a
    process group not started by the stack."""
    import time

    pids: dict[str, int] = dict(extra or {})
    files = sorted(pid_dir.glob("*.pid")) if pid_dir.exists() else []
    broker = pid_dir.parent / "kafka" / "broker.pid"
    for f in [*files, broker] if broker.exists() else files:
        try:
            pids["kafka" if f == broker else f.stem] = int(f.read_text().strip())
        except (OSError, ValueError):
            continue
    groups = _groups()
    return CpuSample(
        {name: groups.get(_pgrp(pid), 0.0) for name, pid in pids.items()}, time.monotonic()
    )


def _pgrp(pid: int) -> int:
    """The process group of ``pid`` (its own pid when it cannot be read: exited)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return pid


def per_lead_ms(before: CpuSample, after: CpuSample, leads: int) -> dict[str, float]:
    """CPU ms per lead of each component between two samples (a component restarted in
    between counts from zero: its new group's time only)."""
    out: dict[str, float] = {}
    for name, end in after.seconds.items():
        start = before.seconds.get(name, 0.0)
        used = end - start if end >= start else end
        out[name] = 1000.0 * used / leads if leads else 0.0
    return out


def format_per_lead(ms: dict[str, float]) -> str:
    """``"12.3 ms: worker-1 6.1, kafka 3.0, ..."``, largest first."""
    total = sum(ms.values())
    parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(ms.items(), key=lambda kv: -kv[1]) if v)
    return f"{total:.1f} ms ({parts})"
