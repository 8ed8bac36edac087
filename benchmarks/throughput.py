"""Training throughput against the machine's limit, for MLPs and the CNN.

Achieved FLOP/s of local training divided by the FLOP/s of a large float32 matrix multiply on one
thread, measured in the same run. Training FLOPs are counted analytically, three times the
forward pass: a linear layer costs 2*in*out per example forward, a convolution
2*C_in*k*k*C_out*H_out*W_out. Each model is timed on both paths (vectorised chunks, clients one
after another) through fedsim's `Worker`, and the path the worker's own calibration picks is
reported as `chosen`. Times are the thread's CPU time (blind to other processes on a shared
machine) and wall time. With two or more cores, the chosen path also runs on two Ray workers
(one thread each) and its FLOP/s is compared with two matmul threads' worth: both cores busy.
Prints one JSON object.

    python benchmarks/throughput.py [--threads 1] [--skip-two-workers]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsim.data import build_federated_data
from fedsim.data.base import FederatedData
from fedsim.executor import RayExecutor, Worker, WorkerSpec
from fedsim.models import build_model
from fedsim.params import to_numpy
from fedsim.training import SGDTrainer, TrainJob, get_params, torch_threads

STEPS = 10


def matmul_flops(threads: int, n: int = 2048, repeat: int = 5) -> dict[str, float]:
    a, b = torch.randn(n, n), torch.randn(n, n)
    with torch_threads(threads):
        a @ b
        wall, cpu = time.perf_counter(), time.thread_time()
        for _ in range(repeat):
            a @ b
        flops = 2 * n**3 * repeat
        return {"wall": flops / (time.perf_counter() - wall), "cpu": flops / (time.thread_time() - cpu)}


def forward_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one example's forward pass through the linear and convolutional layers."""
    total = 0

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += 2 * module.in_features * module.out_features
        elif isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += 2 * module.in_channels // module.groups * k * output.shape[1] * output.shape[2] * output.shape[3]

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(torch.zeros(1, *input_shape))
    for h in handles:
        h.remove()
    return total


def image_data(clients: int, per_client: int) -> FederatedData:
    """Fashion-MNIST-shaped random images: throughput depends on shapes, not on pixels."""
    rng = np.random.default_rng(0)
    n = clients * per_client
    return FederatedData(x=rng.random((n, 1, 28, 28), dtype=np.float32), y=rng.integers(0, 10, n),
                         offsets=np.arange(0, n + 1, per_client), x_test=np.zeros((1, 1, 28, 28), np.float32),
                         y_test=np.zeros(1, np.int64), num_classes=10)


def vector_data(clients: int, per_client: int) -> FederatedData:
    cfg = SimpleNamespace(dataset="synthetic", num_clients=clients, partition="natural", samples_per_client=per_client,
                          synthetic_alpha=0.5, synthetic_beta=0.5, test_size=10)
    return build_federated_data(cfg, 0)


def timed(worker: Worker, shared: dict, jobs: list[TrainJob], vectorize: bool) -> dict[str, float]:
    worker.run(shared, jobs[:2], vectorize=vectorize)  # warm-up
    wall, cpu = time.perf_counter(), time.thread_time()
    worker.run(shared, jobs, vectorize=vectorize)
    return {"wall": time.perf_counter() - wall, "cpu": time.thread_time() - cpu}


def measure(name: str, options: dict, data: FederatedData, clients: int, threads: int, peak: dict,
            two_workers: bool) -> dict[str, Any]:
    trainer = SGDTrainer(lr=0.05, batch_size=32, local_steps=STEPS)
    spec = WorkerSpec(name, options, data.feature_shape, 10, 0, trainer, threads=threads, chunk_size=min(clients, 64))
    model = build_model(name, options, data.feature_shape, 10, 0)
    shared = to_numpy(get_params(model))
    flops = 3 * forward_flops(model, data.feature_shape) * 32 * STEPS * clients
    jobs = [TrainJob(c, 1) for c in range(clients)]
    worker = Worker(data, spec)
    with contextlib.redirect_stdout(sys.stderr):
        path = worker.decide({k: torch.from_numpy(v) for k, v in shared.items()}, jobs)
    out: dict[str, Any] = {"model": name, **options, "clients": clients, "local_steps": STEPS,
                           "gflop": round(flops / 1e9, 2), "chosen": "vectorised" if path.vectorize else "sequential",
                           "choice": path.reason}
    for label, vectorize in (("vectorised", True), ("sequential", False)):
        t = timed(worker, shared, jobs, vectorize)
        out[label] = {
            "gflops_cpu": round(flops / t["cpu"] / 1e9, 1),
            "fraction_of_matmul_cpu": round(flops / t["cpu"] / peak["cpu"], 3),
            "fraction_of_matmul_wall": round(flops / t["wall"] / peak["wall"], 3),
        }
    out["chosen_fraction_of_matmul_cpu"] = out[out["chosen"]]["fraction_of_matmul_cpu"]
    if two_workers:
        with contextlib.redirect_stdout(sys.stderr):
            pool = RayExecutor(data, replace(spec, vectorize=path.vectorize), workers=2)
            try:
                params = get_params(model)
                pool.train(params, jobs[:4])  # actors started and warm
                start = time.perf_counter()
                pool.train(params, jobs)
                seconds = time.perf_counter() - start
            finally:
                pool.close()
        out["two_workers"] = {"gflops_wall": round(flops / seconds / 1e9, 1),
                              "fraction_of_two_matmul_threads_wall": round(flops / seconds / (2 * peak["wall"]), 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-two-workers", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("FEDSIM_CACHE", tempfile.mkdtemp(prefix="fedsim-throughput-"))  # calibrate afresh
    two = not args.skip_two_workers and (os.cpu_count() or 1) >= 2
    peak = matmul_flops(args.threads)
    runs = [
        measure("mlp", {"hidden": [200]}, vector_data(100, 320), 100, args.threads, peak, two),
        measure("mlp", {"hidden": [1024, 1024]}, vector_data(64, 320), 64, args.threads, peak, two),
        measure("cnn", {"channels": [32, 64], "hidden": 512}, image_data(8, 320), 8, args.threads, peak, two),
    ]
    if two:
        import ray

        ray.shutdown()
    print(json.dumps({
        "benchmark": "throughput",
        "threads": args.threads,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "matmul_gflops": {"cpu": round(peak["cpu"] / 1e9, 1), "wall": round(peak["wall"] / 1e9, 1)},
        "training": runs,
        "target_fraction_min": 0.5,
    }, indent=2))


if __name__ == "__main__":
    main()
