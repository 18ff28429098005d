"""How fast ``pingpost replay`` decides: auctions per second on one core, no warehouse.

Builds N recorded auctions like the demo market's (config/demo.yaml's solar flow and five
buyers: random bids, exclusivity, answer times and post answers, seeded), then replays each
under its own configuration and under a candidate (``--override`` YAML, default a higher
exclusive minimum), as ``run_replay`` does, and prints the decision rate. Run on purpose:

    .venv/bin/python bench/replay_bench.py --auctions 200000

The figure to compare with the issue's goal (>= 10,000 auctions/s on one core) is
"auctions/s (both arms)": each auction decided twice, as a replay does.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import orjson
import yaml

from streams.rules.replay import PingRec, Recorded, Strategy, apply_overrides, replay
from streams.settings import flow_version, load_settings

REPO = Path(__file__).resolve().parents[1]
T0 = 1_780_000_000_000


def auctions(n: int, buyers: dict[str, str], seed: int) -> list[Recorded]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        opened = T0 + i * 20
        pings, posts = [], {}
        for b, tier in buyers.items():
            lat = rnd.lognormvariate(4.2, 0.6)
            if lat > 480:
                status, price = "timeout", None
            elif rnd.random() < 0.3:
                status, price = "no_bid", None
            else:
                status, price = "bid", round(rnd.lognormvariate(3.8, 0.35), 2)
            excl = status == "bid" and rnd.random() < 0.15
            pings.append(
                PingRec(
                    b, tier, status, price, excl, {}, opened + 2, opened + 2 + int(lat), lat, 498.0
                )
            )
            if status == "bid":
                posts[b] = "accepted" if rnd.random() < 0.85 else "rejected"
        fields = {
            "state": rnd.choice(["CA", "TX", "AZ"]),
            "zip": "902",
            "homeowner": True,
            "credit_range": rnd.choice(["700+", "650-699", "<600"]),
            "consent": True,
        }
        out.append(
            Recorded(
                f"lead-{i}",
                "solar",
                fields,
                opened - 500,
                opened,
                opened + 750,
                opened + 500,
                pings,
                posts,
                "unsold",
                [],
                0.0,
            )
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--auctions", type=int, default=100_000)
    ap.add_argument("--override", help="YAML of flow keys (default: floors.exclusive_min 90)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    settings = load_settings(REPO / "config" / "demo.yaml")
    doc = orjson.loads(flow_version(settings, "solar").config_json)
    overrides = (
        yaml.safe_load(Path(args.override).read_text())
        if args.override
        else {"floors": {"exclusive_min": 90.0}}
    )
    base, cand = Strategy.from_doc(doc), Strategy.from_doc(apply_overrides(doc, overrides))
    buyers = {b.id: b.tier for b in settings.buyers if "solar" in b.flows}
    recs = auctions(args.auctions, buyers, args.seed)
    rates = dict.fromkeys(buyers, 0.8)
    t = time.process_time()
    for r in recs:
        replay(r, base, rates)
        replay(r, cand, rates)
    cpu = time.process_time() - t
    print(f"auctions: {len(recs):,}, pings each: {len(buyers)}")
    print(
        f"CPU: {cpu:.2f} s -> {len(recs) / cpu:,.0f} auctions/s (both arms), "
        f"{2 * len(recs) / cpu:,.0f} decisions/s"
    )
    print(
        f"a day at the demo's 50 leads/s (4.32 M auctions): {4.32e6 / (len(recs) / cpu) / 60:.1f} min of deciding"
    )


if __name__ == "__main__":
    main()
