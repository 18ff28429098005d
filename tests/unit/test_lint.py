"""Static checks as a test: undefined names, unused imports, bug-prone patterns, import
order, pyupgrade, stale noqa comments (ruff), and the formatter.

An agent's failure policy turns a NameError into dead letters at run time (it happened: a
missing import dead-lettered every PII record of a demo run). The linter catches it first.
"""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_finds_nothing() -> None:
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    out = subprocess.run(
        [
            ruff,
            "check",
            "--output-format",
            "concise",
            "streams",
            "connectors",
            "schemas",
            "tests",
            "bench",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_code_is_formatted() -> None:
    """``ruff format`` (the project's one style; ``.pre-commit-config.yaml`` applies it)."""
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    out = subprocess.run(
        [ruff, "format", "--check", "streams", "connectors", "schemas", "tests", "bench"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
