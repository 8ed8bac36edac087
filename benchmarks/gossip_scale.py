"""DFedSAM-MGS (Q = 4) on 1,000-node graphs: seconds per round and peak memory.

Synthetic data (LEAF, 50 examples per node), MLP 60-200-10, 5 SAM steps per node per round, a ring
and a random 4-regular graph, the Ray executor with one worker per CPU. Mixing is sparse (no dense
1000 x 1000 matrix). The first round (actor start-up) is left out of the per-round figure. Peak
memory is the peak resident set of this process plus that of each actor (shared object-store pages
are counted in each process that touches them, so the sum overstates). Prints one JSON object.

    python benchmarks/gossip_scale.py [--nodes 1000] [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import actor_pids, built, peak_rss_gib, time_rounds  # noqa: E402



def scenario(nodes: int, topology: dict) -> dict:
    return {
        "name": "gossip-scale",
        "seed": 0,
        "rounds": 1,
        "data": {"dataset": "synthetic", "num_clients": nodes, "samples_per_client": 50, "test_size": 1000},
        "model": {"name": "mlp", "hidden": [200]},
        "topology": topology,
        "algorithm": {"name": "dfedsam_mgs", "gossip_steps": 4, "local_steps": 5, "batch_size": 32, "eval_nodes": 8},
        "system": {"executor": "ray"},
    }


def measure(nodes: int, topology: dict, rounds: int) -> dict:
    with built(scenario(nodes, topology)) as (ctx, flow, _):
        times = time_rounds(flow, rounds)
        start = time.perf_counter()
        metrics = flow.evaluate()
        eval_s = time.perf_counter() - start
        actors = [peak_rss_gib(pid) for pid in actor_pids(flow.executor)]
    return {
        "topology": topology["name"],
        "nodes": nodes,
        "s_per_round": round(statistics.median(times[1:]), 3),
        "first_round_s": round(times[0], 2),
        "evaluation_s": round(eval_s, 3),
        "peak_rss_driver_gib": round(peak_rss_gib(), 3),
        "peak_rss_actors_gib": [round(a, 3) for a in actors],
        "peak_rss_total_gib": round(peak_rss_gib() + sum(actors), 3),
        "consensus_distance": round(metrics["consensus_distance"], 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    results = [
        measure(args.nodes, {"name": "ring"}, args.rounds),
        measure(args.nodes, {"name": "random_regular", "degree": 4}, args.rounds),
    ]
    print(json.dumps({"benchmark": "gossip_scale", "targets": {"s_per_round": 3.0, "peak_gib": 4.0}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
