"""Per-round cost of fedsim against a plain single-process PyTorch loop doing the same SGD steps.

The workload: 100 clients on Synthetic(0.5, 0.5), an MLP 60-200-10, 200 examples per client,
batch 32, one local epoch, lr 0.05; 10 clients per round (the foundation issue: fedsim's Ray
executor at most 1.3x the loop) and all 100 per round (the speed issue: fedsim, vectorised, at
least 3x faster than the loop). Both sides run identical SGD steps on identical data; the first
rounds (actor start-up) are left out. Also times `fedsim run scenarios/quickstart.toml` end to end,
Ray start included. Prints one JSON object.

    python benchmarks/round_overhead.py [--rounds 30] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedsim.coordinator import RunContext, RunOptions
from fedsim.scenario import validate
from fedsim.training import minibatches, torch_threads
from fedsim.seeding import generator

WARMUP = 10  # rounds left out: actor start-up, and Ray's own processes still starting beside them

SCENARIO = {
    "name": "round-overhead",
    "seed": 0,
    "rounds": 1,
    "data": {"dataset": "synthetic", "num_clients": 100, "samples_per_client": 200},
    "model": {"name": "mlp", "hidden": [200]},
    "algorithm": {"name": "fedavg", "clients_per_round": 10, "batch_size": 32, "local_epochs": 1, "lr": 0.05},
    "system": {"executor": "ray"},
}


def scenario(per_round: int, vectorize: bool) -> dict:
    raw = json.loads(json.dumps(SCENARIO))
    raw["algorithm"]["clients_per_round"] = per_round
    raw["system"]["vectorize"] = vectorize
    return raw


def fedsim_rounds(rounds: int, workers: int, executor: str, per_round: int = 10, vectorize: bool = True) -> list[float]:
    spec = validate(scenario(per_round, vectorize), "<benchmark>", {})
    ctx = RunContext(spec, RunOptions(executor=executor, workers=workers))
    flow = spec.algorithm.build(spec.algorithm_config, ctx)
    times = []
    try:
        with torch_threads(spec.scenario.system.threads_per_worker):  # as `fedsim run` does
            for r in range(1, rounds + 1):
                start = time.perf_counter()
                flow.step(r)
                times.append(time.perf_counter() - start)
    finally:
        ctx.close()
    return times[WARMUP:]


def plain_rounds(rounds: int, per_round: int = 10, threads: int | None = None) -> list[float]:
    """What a researcher would write by hand: one process, clients one after another (with torch's
    default thread count, or `threads`)."""
    if threads is not None:
        with torch_threads(threads):
            return plain_rounds(rounds, per_round)
    spec = validate(scenario(per_round, False), "<benchmark>", {})
    ctx = RunContext(spec, RunOptions(executor="inline"))
    data, model = ctx.data, ctx.model
    global_state = {k: v.clone() for k, v in ctx.init_params.items()}
    times = []
    for r in range(1, rounds + 1):
        start = time.perf_counter()
        clients = np.sort(generator(0, "sample", r).choice(100, per_round, replace=False))
        states, sizes = [], []
        for c in clients:
            x, y = data.client(int(c))
            model.load_state_dict(global_state)
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            rng = generator(0, "train", int(c), r)
            for idx in minibatches(len(y), 32, int(np.ceil(len(y) / 32)), rng):
                opt.zero_grad()
                F.cross_entropy(model(torch.from_numpy(x[idx])), torch.from_numpy(y[idx])).backward()
                opt.step()
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            sizes.append(len(y))
        w = torch.tensor(sizes, dtype=torch.float32) / sum(sizes)
        global_state = {k: sum(wi * s[k] for wi, s in zip(w, states)) for k in global_state}
        times.append(time.perf_counter() - start)
    return times[WARMUP:]


def quickstart_seconds() -> float:
    """A fresh `fedsim run` of the quickstart into an empty folder (an earlier run there would be
    skipped, or refused if it ran another fedsim's scenario)."""
    with tempfile.TemporaryDirectory(prefix="fedsim-bench-") as out:
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "fedsim", "run", "scenarios/quickstart.toml", "--out", out, "--no-progress"],
            check=True, capture_output=True, cwd=Path(__file__).resolve().parents[1],
        )
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-quickstart", action="store_true")
    args = parser.parse_args()

    median = statistics.median
    plain = min(median(plain_rounds(args.rounds)), median(plain_rounds(args.rounds, threads=1)))
    inline = median(fedsim_rounds(args.rounds, args.workers, "inline"))
    ray_ = median(fedsim_rounds(args.rounds, args.workers, "ray"))
    ray_seq = median(fedsim_rounds(args.rounds, args.workers, "ray", vectorize=False))
    plain_all = min(median(plain_rounds(args.rounds, per_round=100)), median(plain_rounds(args.rounds, per_round=100, threads=1)))
    vec_all_ray = median(fedsim_rounds(args.rounds, args.workers, "ray", per_round=100))
    vec_all_inline = median(fedsim_rounds(args.rounds, args.workers, "inline", per_round=100))
    result = {
        "benchmark": "round_overhead",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} torch threads",
        "rounds_timed": args.rounds - WARMUP,
        "ray_workers": args.workers,
        "10_per_round": {
            "plain_loop_s": round(plain, 5),  # the faster of default threads and one thread
            "fedsim_ray_s": round(ray_, 5),
            "fedsim_ray_sequential_s": round(ray_seq, 5),
            "fedsim_inline_s": round(inline, 5),
            "ratio_ray_to_plain": round(ray_ / plain, 3),
            "ratio_ray_sequential_to_plain": round(ray_seq / plain, 3),
            "target_ratio_max": 1.3,
        },
        "100_per_round": {
            "plain_loop_s": round(plain_all, 5),
            "fedsim_vectorised_ray_s": round(vec_all_ray, 5),
            "fedsim_vectorised_inline_s": round(vec_all_inline, 5),
            "speedup_ray": round(plain_all / vec_all_ray, 2),
            "speedup_inline": round(plain_all / vec_all_inline, 2),
            "target_speedup_min": 3.0,
        },
    }
    if not args.skip_quickstart:
        result["quickstart_wall_s"] = round(quickstart_seconds(), 2)
        result["quickstart_target_s"] = {"foundation": 30, "speed": 20}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
