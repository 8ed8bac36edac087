"""Scale: a million-client federation and a 10,000-node decentralized graph on one machine.

1. FedAvg on 1,000,000 Synthetic clients (each generated on demand from its own seed), logistic
   regression, 100 sampled per round, evaluation on a fixed held-out set, 20 rounds.
   Targets: peak memory under 4 GiB, under 1 s per round.
2. D-PSGD on a 10,000-node ring (sparse mixing, never a dense N x N matrix), Synthetic + logistic
   regression: seconds per round and memory.

Inline executor (one process), so peak RSS is the whole footprint. Prints one JSON object.

    python benchmarks/scale.py [--clients 1000000] [--rounds 20] [--ring 10000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import built, peak_rss_gib, time_rounds  # noqa: E402



def timed_rounds(raw: dict, rounds: int) -> dict:
    with built(raw) as (ctx, flow, setup):
        times = time_rounds(flow, rounds)
        t = time.perf_counter()
        metrics = flow.evaluate()
        evaluation = time.perf_counter() - t
    return {
        "setup_s": round(setup, 2),
        "s_per_round": round(statistics.median(times[1:]), 4),
        "max_s_per_round": round(max(times[1:]), 4),
        "evaluation_s": round(evaluation, 3),
        "test_accuracy": round(metrics["test_accuracy"], 4),
        "peak_rss_gib_so_far": round(peak_rss_gib(), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--ring", type=int, default=10_000)
    args = parser.parse_args()
    million = timed_rounds({
        "name": "million",
        "data": {"dataset": "synthetic", "num_clients": args.clients, "samples_per_client": 50, "test_size": 5000},
        "model": {"name": "logreg"},
        "algorithm": {"name": "fedavg", "clients_per_round": 100, "lr": 0.05},
        "system": {"executor": "inline"},
    }, args.rounds)
    ring = timed_rounds({
        "name": "ring",
        "data": {"dataset": "synthetic", "num_clients": args.ring, "samples_per_client": 20, "test_size": 2000},
        "model": {"name": "logreg"},
        "topology": {"name": "ring"},
        "algorithm": {"name": "dpsgd", "lr": 0.05, "eval_nodes": 16},
        "system": {"executor": "inline"},
    }, 5)
    print(json.dumps({
        "benchmark": "scale",
        "fedavg_million": {"clients": args.clients, "rounds": args.rounds, **million,
                           "targets": {"s_per_round": 1.0, "peak_gib": 4.0}},
        "dpsgd_ring": {"nodes": args.ring, "rounds": 5, **ring},
        "peak_rss_gib": round(peak_rss_gib(), 3),
    }, indent=2))


if __name__ == "__main__":
    main()
