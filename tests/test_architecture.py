"""The house rules, as tests (issue 11): the import contracts of pyproject.toml
(``[tool.importlinter]``: layers, independent stages, pure rules, connectors free of streams),
no import circle anywhere in the product, and an honest ``__all__`` on every module."""

from __future__ import annotations

import importlib
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("streams", "connectors", "schemas")


def product_modules() -> list[str]:
    names = []
    for pkg in PACKAGES:
        names.append(pkg)
        mod = importlib.import_module(pkg)
        names += [m.name for m in pkgutil.walk_packages(mod.__path__, prefix=f"{pkg}.")]
    return sorted(names)


def test_import_contracts_are_kept() -> None:
    tool = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    out = subprocess.run([tool, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_no_import_circle() -> None:
    """No module imports itself back through others (a circle forces lazy imports and
    hides which module is built on which)."""
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                circles.append(path[path.index(n) :] + [n] if n in path else [m, n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph.modules):
        if m not in state:
            visit(m, [m])
    # A package importing its own submodules (re-exports) is not a circle of the code.
    circles = [
        c
        for c in circles
        if not all(x == c[0] or x.startswith(c[0] + ".") or c[0].startswith(x + ".") for x in c)
    ]
    assert circles == [], "\n".join(" -> ".join(c) for c in circles)


@pytest.mark.parametrize("name", product_modules())
def test_every_module_says_what_it_exports(name: str) -> None:
    """``__all__`` lists the module's public names, and each one exists."""
    mod = importlib.import_module(name)
    exported = getattr(mod, "__all__", None)
    if name.endswith("__main__"):
        return
    assert exported is not None, f"{name} has no __all__"
    missing = [n for n in exported if not hasattr(mod, n)]
    assert missing == [], f"{name}.__all__ names what it does not define: {missing}"
    assert len(set(exported)) == len(exported), f"{name}.__all__ repeats a name"
