"""streams.tools.cpu: a component's CPU is its whole process group's, read from /proc."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from streams.tools import cpu

BUSY = """
import sys, time
t = time.process_time()
while time.process_time() - t < 0.4:  # CPU time, in a child of the group leader
    pass
print("done", flush=True)
sys.stdin.read()
"""

LEADER = f"""
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", {BUSY!r}], stdin=sys.stdin)
child.wait()
"""


def test_sample_counts_the_whole_process_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    with subprocess.Popen(
        [sys.executable, "-c", LEADER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
        text=True,
    ) as proc:
        _measure(proc, pids)


def _measure(proc: subprocess.Popen[str], pids: Path) -> None:
    try:
        (pids / "busy.pid").write_text(str(proc.pid))
        (pids / "gone.pid").write_text("999999999")
        before = cpu.sample(pids)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "done"
        after = cpu.sample(pids)
        used = cpu.per_lead_ms(before, after, leads=10)
        # 0.4 s of CPU in the child (plus start-up) over 10 leads: at least 30 ms each.
        assert used["busy"] >= 30.0, used
        assert used["gone"] == 0.0
        assert "busy" in cpu.format_per_lead(used)
    finally:
        proc.kill()


def test_restarted_component_counts_from_zero() -> None:
    before = cpu.CpuSample({"w": 50.0}, time.monotonic())
    after = cpu.CpuSample({"w": 2.0, "new": 1.0}, time.monotonic())
    assert cpu.per_lead_ms(before, after, leads=1000) == {"w": 2.0, "new": 1.0}
