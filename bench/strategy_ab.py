"""Does the replay predict a live A/B test? (issue 13's acceptance; run on purpose.)

1. Runs the demo (config/demo.yaml, its five simulated buyers) with an experiment on the
   solar flow: ``control`` (the flow as configured) and ``candidate`` (the strategy file's
   ``strategy``/``floors`` keys), half the leads each.
2. Replays the control arm's auctions under the candidate (``pingpost replay --variant
   control``): the predicted difference, paired by auction, with its interval.
3. Reads the live difference between the arms (``pingpost experiment``), with its interval.

Prints both tables and whether they agree: the replay's prediction inside the live interval
(the live one is the wider: two different sets of leads), and the two intervals overlapping.

    .venv/bin/python bench/strategy_ab.py --strategy config/strategies/floor-base-10.yaml \\
        --leads 10000 --rate 60

Leaves the stack running (``make down`` stops it).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PINGPOST = [sys.executable, "-m", "streams.tools.cli"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategy", required=True, help="YAML: strategy/floors keys to test")
    ap.add_argument("--leads", type=int, default=10_000)
    ap.add_argument("--rate", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    from streams.rules.replay import OVERRIDABLE
    from streams.settings import parse_settings
    from streams.tools.cli import _sync_client
    from streams.tools.experiment import print_experiment, run_experiment
    from streams.tools.replay import Scope, print_result, run_replay

    overrides = yaml.safe_load(Path(args.strategy).read_text()) or {}
    live = {k: v for k, v in overrides.items() if k in ("strategy", "floors")}
    if set(overrides) - {"strategy", "floors"}:
        print(
            f"a live variant overrides strategy and floors only; {args.strategy} also sets "
            f"{sorted(set(overrides) - {'strategy', 'floors'})} (replay-only: {OVERRIDABLE})",
            file=sys.stderr,
        )
        return 2
    raw = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    name = f"ab-{time.strftime('%Y%m%dT%H%M%S')}"
    raw["flows"]["solar"]["experiment"] = {
        "name": name,
        "min_leads": 1000,
        "variants": [
            {"name": "control", "share": 0.5},
            {"name": "candidate", "share": 0.5, **live},
        ],
    }
    cfg = Path(tempfile.mkdtemp(prefix="pingpost-ab-")) / "ab.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = dict(os.environ)
    subprocess.run([*PINGPOST, "--config", str(cfg), "down"], cwd=REPO, env=env, check=False)
    started = time.time()
    demo = subprocess.run(
        [
            *PINGPOST,
            "--config",
            str(cfg),
            "demo",
            "--leads",
            str(args.leads),
            "--rate",
            str(args.rate),
            "--seed",
            str(args.seed),
        ],
        cwd=REPO,
        env=env,
    )
    if demo.returncode != 0:
        print(f"the demo failed (exit {demo.returncode})", file=sys.stderr)
        return 1
    settings = parse_settings(raw, env=env)
    a = argparse.Namespace(config=str(cfg))
    client = _sync_client(a, settings)
    db = settings.clickhouse.database
    (lead,) = client.query(
        f"SELECT any(lead_id) FROM {db}.auctions FINAL WHERE startsWith(lead_id, 'demo-') "
        "AND received_at >= fromUnixTimestamp64Milli(%(t)s)",
        parameters={"t": int(started * 1000)},
    ).result_rows[0]
    m = re.match(r"^(demo-\d{8}T\d{6}-\d+-)", lead or "")
    if not m:
        print(f"no demo lead found after the run (got {lead!r})", file=sys.stderr)
        return 1
    prefix = m.group(1)
    print(f"\nrun {prefix}*, experiment {name}, candidate: {overrides}\n")
    predicted = run_replay(
        client, db, settings, overrides, Scope(lead_prefix=prefix, variant="control")
    )
    print("== The replay: the control arm's auctions decided again under the candidate")
    print_result(predicted)
    measured = run_experiment(client, db, settings, "solar", lead_prefix=prefix)
    print("\n== The live experiment")
    print_experiment(measured)
    p = predicted.comparisons[0]
    m_ = measured.comparisons["candidate"][0]
    print("\n== Revenue per lead, candidate − control")
    print(f"replay (paired, control arm): {p.diff:+.2f}  [{p.low:+.2f}, {p.high:+.2f}]")
    print(f"live A/B (two arms):          {m_.diff:+.2f}  [{m_.low:+.2f}, {m_.high:+.2f}]")
    inside = m_.low <= p.diff <= m_.high
    overlap = p.low <= m_.high and m_.low <= p.high
    print(
        f"replay's prediction inside the live interval: {'yes' if inside else 'no'}; "
        f"intervals overlap: {'yes' if overlap else 'no'}; same direction: "
        f"{'yes' if (p.diff > 0) == (m_.diff > 0) else 'no'}"
    )
    client.close()
    return 0 if inside or overlap else 1


if __name__ == "__main__":
    sys.exit(main())
