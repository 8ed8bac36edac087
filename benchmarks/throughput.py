"""Training throughput against the machine's limit.

Achieved FLOP/s of local training (vectorised cohorts, as fedsim runs them) divided by the FLOP/s
of a large float32 matrix multiply measured in the same run with the same thread count. Training
FLOPs are counted analytically: a linear layer costs 2*B*in*out in the forward pass and twice that
backward. Prints one JSON object.

    python benchmarks/throughput.py [--clients 100] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch

from fedsim.data import build_federated_data
from fedsim.executor import Worker, WorkerSpec
from fedsim.models import build_model
from fedsim.params import to_numpy
from fedsim.training import SGDTrainer, TrainJob, get_params, torch_threads


def matmul_flops(threads: int, n: int = 2048, repeat: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    with torch_threads(threads):
        a @ b
        start = time.perf_counter()
        for _ in range(repeat):
            a @ b
        return 2 * n**3 * repeat / (time.perf_counter() - start)


def training_flops(hidden: list[int], clients: int, threads: int) -> dict:
    cfg = SimpleNamespace(dataset="synthetic", num_clients=clients, partition="natural", samples_per_client=320,
                          synthetic_alpha=0.5, synthetic_beta=0.5, test_size=10)
    data = build_federated_data(cfg, 0)
    trainer = SGDTrainer(lr=0.05, batch_size=32, local_steps=10)
    spec = WorkerSpec("mlp", {"hidden": hidden}, data.feature_shape, 10, 0, trainer, threads=threads, vectorize=True, chunk_size=clients)
    worker = Worker(data, spec)
    shared = to_numpy(get_params(build_model("mlp", {"hidden": hidden}, data.feature_shape, 10, 0)))
    jobs = [TrainJob(c, 1) for c in range(clients)]
    worker.run(shared, jobs[:2])
    start = time.perf_counter()
    worker.run(shared, jobs)
    seconds = time.perf_counter() - start
    widths = [60, *hidden, 10]
    per_example = sum(2 * a * b for a, b in zip(widths, widths[1:])) * 3  # forward + backward
    flops = per_example * 32 * 10 * clients
    return {"mlp": widths, "clients": clients, "seconds": round(seconds, 4), "gflops": round(flops / seconds / 1e9, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    peak = matmul_flops(args.threads)
    runs = [training_flops(h, args.clients, args.threads) for h in ([200], [1024, 1024])]
    for r in runs:
        r["fraction_of_matmul"] = round(r["gflops"] * 1e9 / peak, 3)
    print(json.dumps({
        "benchmark": "throughput",
        "threads": args.threads,
        "matmul_gflops": round(peak / 1e9, 2),
        "training": runs,
        "target_fraction_min": 0.30,
    }, indent=2))


if __name__ == "__main__":
    main()
