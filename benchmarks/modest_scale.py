"""MoDeST at scale: 10,000 nodes, s = 20, a = 2, 50 rounds, Synthetic + logistic regression.

Prints wall seconds per round (after the first) and the peak resident memory of the process
(inline executor: the protocol's own cost, which is what grows with the node count). One JSON
object.

    python benchmarks/modest_scale.py [--nodes 10000] [--rounds 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import built, peak_rss_gib, time_rounds  # noqa: E402



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    raw = {
        "name": "modest-scale",
        "data": {"dataset": "synthetic", "num_clients": args.nodes, "samples_per_client": 20, "test_size": 2000},
        "model": {"name": "logreg"},
        "algorithm": {"name": "modest", "sample_size": 20, "aggregators": 2, "lr": 0.05},
        "system": {"executor": "inline"},
    }
    with built(raw) as (ctx, flow, setup):
        times = time_rounds(flow, args.rounds)
        acc, _ = ctx.evaluate(flow.models[flow.latest])
    print(json.dumps({
        "benchmark": "modest_scale",
        "nodes": args.nodes,
        "rounds": args.rounds,
        "setup_s": round(setup, 2),
        "s_per_round": round(statistics.median(times[1:]), 4),
        "max_s_per_round": round(max(times[1:]), 4),
        "peak_rss_gib": round(peak_rss_gib(), 3),
        "views_materialised": len(flow.views),
        "final_accuracy": acc,
        "total_bytes": ctx.ledger.total,
        "targets": {"s_per_round": 1.0, "peak_gib": 3.0},
    }, indent=2))


if __name__ == "__main__":
    main()
