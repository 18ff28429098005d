"""Two trees' stacks at rest, measured at the same time: what a change does to the idle cost.

On a shared machine, rest measurements of one tree taken one after another spread more than
the cuts being measured (docs/numbers.md: 6.9–9.1 % for eight runs of one tree). So this bench
runs both trees at once, each its own stack on its own ports, both at rest over the same
seconds, then again with the ports swapped: whatever slows the machine slows both.

- ``--before REV``: a commit, checked out into a temporary git worktree (removed at the end);
  ``--after``: a tree (default: this one, as it is on disk, uncommitted changes included).
- Each stack runs its own tree's ``config/demo.yaml``; in each round one of the two gets a copy
  with every port moved by ``--shift`` (Kafka, warehouse, ingest, metrics, buyers, workers'
  web ports). Each stack is started from its own tree (``python -m streams.tools.cli up``
  with that tree first on ``PYTHONPATH``: the ``pingpost`` script would import the installed
  tree whatever the working directory).
- In each round, once both stacks are up and ``--settle`` seconds have passed, both trees'
  ``bench/throughput.py --rates '' --rest N`` run at once: CPU per process over N s at rest,
  then five leads one second apart (receipt → ping open). Two stacks share the cores then,
  so those latencies are not a single stack's.

    .venv/bin/python bench/rest_side_by_side.py --before HEAD~1 [--rest 120] [--rounds 2]

Needs the default ports and the shifted ones free: stop any running stack first.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from streams.settings.infra import WorkerConfig

ROOT = Path(__file__).resolve().parent.parent
REST_LINE = re.compile(r"at rest: ([\d.]+) % of one core \((.*)\)")
LEADS_LINE = re.compile(r"receipt → ping open of 5 leads 1 s apart: (.*)")
# Ports in config/demo.yaml: "host:port" in addresses and URLs, and "port: N" keys.
ADDRESS = re.compile(r"(127\.0\.0\.1:)(\d{4,5})\b")
PORT_KEY = re.compile(r"(\bport: )(\d{4,5})\b")
#: ``worker.web_port`` when a config leaves it out (config/demo.yaml does).
DEFAULT_WEB_PORT: int = WorkerConfig.model_fields["web_port"].default
T = TypeVar("T")


def shifted_config(text: str, shift: int) -> str:
    """``config/demo.yaml`` with every port moved by ``shift``, the workers' web ports too
    (``worker.web_port``; the sink and metrics roles take theirs below it)."""

    def move(m: re.Match[str]) -> str:
        return f"{m.group(1)}{int(m.group(2)) + shift}"

    out = PORT_KEY.sub(move, ADDRESS.sub(move, text))
    if re.search(r"^worker:", out, re.M):
        raise SystemExit("config/demo.yaml has a worker: section; move its web_port by hand")
    return out + f"\nworker:\n  web_port: {DEFAULT_WEB_PORT + shift}\n"


@dataclass
class Tree:
    name: str
    path: Path
    log_dir: Path
    results: list[dict[str, str]] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.path)
        env.pop("PINGPOST_CONFIG", None)
        return env

    def cli(self, config: Path, *args: str, log: str) -> int:
        with open(self.log_dir / f"{self.name}-{log}.log", "a") as out:
            return subprocess.call(
                [sys.executable, "-m", "streams.tools.cli", "--config", str(config), *args],
                cwd=self.path,
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def rest(self, config: Path, seconds: float, round_no: int) -> dict[str, str]:
        out = subprocess.run(
            [
                sys.executable,
                "bench/throughput.py",
                "--config",
                str(config),
                "--rates",
                "",
                "--rest",
                f"{seconds:g}",
            ],
            cwd=self.path,
            env=self.env(),
            capture_output=True,
            text=True,
            check=False,
        )
        (self.log_dir / f"{self.name}-rest-{round_no}.txt").write_text(out.stdout + out.stderr)
        rest = REST_LINE.search(out.stdout)
        leads = LEADS_LINE.search(out.stdout)
        if out.returncode != 0 or rest is None:
            raise SystemExit(
                f"{self.name}: the rest measurement failed (exit {out.returncode}); see "
                f"{self.log_dir / f'{self.name}-rest-{round_no}.txt'}"
            )
        return {
            "total": rest.group(1),
            "parts": rest.group(2),
            "leads": leads.group(1) if leads else "(none settled)",
        }


def both(fn: Callable[[Tree, Path], T], pairs: list[tuple[Tree, Path]]) -> list[T]:
    """``fn(tree, config)`` for both trees at once."""
    with ThreadPoolExecutor(len(pairs)) as pool:
        return list(pool.map(lambda tc: fn(*tc), pairs))


def write_config(tree: Tree, path: Path, shift: int) -> Path:
    """The tree's own ``config/demo.yaml``, its ports moved by ``shift`` (0: as it is)."""
    base = (tree.path / "config" / "demo.yaml").read_text()
    path.write_text(shifted_config(base, shift) if shift else base)
    return path


def one_round(
    r: int, pairs: list[tuple[Tree, Path]], rest: float, settle: float, work: Path
) -> None:
    """Both stacks up, both at rest measured at once, both down."""
    print(f"round {r + 1}: starting both stacks", flush=True)
    codes = both(lambda t, c: t.cli(c, "up", "--workers", "1", log=f"up-{r}"), pairs)
    if any(codes):
        # The worktree goes at the end: keep the logs its "up" pointed to.
        kept = [(t, f"{t.name}-logs-{r}") for (t, _), c in zip(pairs, codes, strict=True) if c]
        for t, name in kept:
            if (t.path / ".run" / "logs").is_dir():
                shutil.copytree(t.path / ".run" / "logs", work / name)
        raise SystemExit(
            f"a stack did not start (exit codes {codes}); logs in {work} "
            f"({', '.join(name for _, name in kept)})"
        )
    time.sleep(settle)  # let start-up work (recovery, the JIT) pass before measuring
    print(f"round {r + 1}: both at rest for {rest:g} s", flush=True)
    results = both(lambda t, c: t.rest(c, rest, r), pairs)
    for (t, cfg), res in zip(pairs, results, strict=True):
        res["ports"] = "moved" if "worker:\n  web_port" in cfg.read_text() else "default"
        t.results.append(res)
    both(lambda t, c: t.cli(c, "down", log=f"down-{r}"), pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="a commit (checked out into a worktree)")
    ap.add_argument("--after", type=Path, default=ROOT, help="a tree (default: this one)")
    ap.add_argument("--rest", type=float, default=120.0, help="seconds at rest measured")
    ap.add_argument("--rounds", type=int, default=2, help="ports swap every round")
    ap.add_argument("--settle", type=float, default=60.0, help="seconds after start-up first")
    ap.add_argument("--shift", type=int, default=10000, help="ports moved by this much")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pingpost-side-by-side-"))
    before_path = work / "before"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(before_path), args.before],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    rev = subprocess.run(
        ["git", "rev-parse", "--short", args.before], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    trees = [Tree("before", before_path, work), Tree("after", args.after.resolve(), work)]
    print(
        f"side by side at rest: before = {rev} ({before_path}), after = {trees[1].path}; "
        f"{args.rounds} round(s) of {args.rest:g} s; logs in {work}",
        flush=True,
    )
    configs: list[Path] = []
    try:
        for r in range(args.rounds):
            configs = [
                write_config(t, work / f"{t.name}-{r}.yaml", args.shift if (i + r) % 2 else 0)
                for i, t in enumerate(trees)
            ]
            one_round(r, list(zip(trees, configs, strict=True)), args.rest, args.settle, work)
    finally:
        for t, cfg in zip(trees, configs, strict=False):
            t.cli(cfg, "down", log="down-final")
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(before_path)], cwd=ROOT, check=False
        )
        # Whatever rounds completed, also when a later one failed.
        print_table(trees)


def print_table(trees: list[Tree]) -> None:
    done = min(len(t.results) for t in trees)
    if not done:
        return
    print("\n| tree | round | ports | at rest, % of one core | by process | 5 leads after (ms) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in range(done):
        for t in trees:
            res = t.results[r]
            print(
                f"| {t.name} | {r + 1} | {res['ports']} | {res['total']} | {res['parts']} | "
                f"{res['leads']} |"
            )
    for r in range(done):
        a, b = (float(t.results[r]["total"]) for t in trees)
        print(f"round {r + 1}: after − before = {b - a:+.1f} points")


if __name__ == "__main__":
    main()
