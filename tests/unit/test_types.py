"""The type checker as a test: ``mypy --strict`` on the product code finds nothing (issue 11).

What is checked, and how strictly, is ``[tool.mypy]`` in pyproject.toml (``mypy`` alone from
the repository root runs the same check). Its cache (``.mypy_cache/``) keeps a rerun to a few
seconds.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_mypy_strict_finds_nothing() -> None:
    mypy = Path(sys.executable).with_name("mypy")
    out = subprocess.run([str(mypy)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
