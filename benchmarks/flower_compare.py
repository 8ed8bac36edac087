"""fedsim against Flower's own simulation, per round, on the same workload in one process.

The workload (issue 15): FedAvg over 100 clients of Synthetic(1, 1) (fedsim's generator, so both
sides read the very same arrays), an MLP 60-200-10 with the same initial weights, 200 examples per
client, batch 32, one local epoch = 7 SGD steps at lr 0.05 (the same minibatches: both draw them
with fedsim's `minibatches` from the generator of (seed, "train", client, round)), 10 and then 100
clients per round, and the global model evaluated on the same 2,000 test examples after every
round. Flower 1.42 runs as its documentation shows (`run_simulation` with a ServerApp whose
FedAvg strategy evaluates centrally, and a ClientApp training with torch.optim.SGD, one Ray actor
per CPU, one torch thread each); fedsim runs through `fedsim.coordinator.run`, which is
`fedsim run`, with its default settings. A round's time is the gap between two consecutive
evaluations (Flower: calls of its `evaluate_fn`; fedsim: metrics.csv's `wall_time`), start-up and
the first `--warmup` rounds left out; the figure is the median over the rest. The two frameworks
alternate, `--repeats` times each, and the best repeat of each counts (the machine is shared).
Prints one JSON object.

Flower needs its own environment (its `simulation` extra pins Ray 2.55.1, fedsim's default
environment has a newer Ray), with the CPU torch installed first:

    make bench-flower          # creates .venv-bench (torch==2.13.0, fedsim[bench]), runs this script
    .venv-bench/bin/python benchmarks/flower_compare.py [--rounds 30] [--repeats 2] [--per-round 10 100]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedsim.coordinator import RunOptions, run
from fedsim.data import build_federated_data
from fedsim.models import build_model
from fedsim.scenario import validate
from fedsim.seeding import generator
from fedsim.training import evaluate, minibatches

CLIENTS, SAMPLES, BATCH, LR, SEED = 100, 200, 32, 0.05, 0
DATA = {"dataset": "synthetic", "num_clients": CLIENTS, "samples_per_client": SAMPLES, "synthetic_alpha": 1.0,
        "synthetic_beta": 1.0}


def scenario(per_round: int, rounds: int) -> Any:
    """The workload as a fedsim scenario, every [system] key left at its default."""
    raw = {"name": f"flower-compare-{per_round}", "seed": SEED, "rounds": rounds, "eval_every": 1, "data": DATA,
           "model": {"name": "mlp", "hidden": [200]},
           "algorithm": {"name": "fedavg", "clients_per_round": per_round, "batch_size": BATCH, "local_epochs": 1,
                         "lr": LR}}
    return validate(raw, "<flower_compare>", {})


def fedsim_rounds(per_round: int, rounds: int, out: Path) -> tuple[list[float], dict[str, Any]]:
    run_dir = run(scenario(per_round, rounds), out, RunOptions(progress=False))
    import pandas as pd

    walls = pd.read_csv(run_dir / "metrics.csv")["wall_time"].diff().to_list()[1:]
    summary = json.loads((run_dir / "summary.json").read_text())
    return walls, {"training": summary.get("training"), "final_accuracy": summary["final_accuracy"]}


def flower_rounds(per_round: int, rounds: int) -> tuple[list[float], dict[str, Any]]:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    data = build_federated_data(scenario(per_round, rounds).scenario.data, SEED)  # the arrays fedsim trains on
    init = build_model("mlp", {"hidden": [200]}, data.feature_shape, data.num_classes, SEED).state_dict()
    stamps: list[float] = []
    accuracy: list[float] = []

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        cid = int(context.node_config["partition-id"])
        round_ = int(msg.content["config"]["server-round"])
        model = build_model("mlp", {"hidden": [200]}, data.feature_shape, data.num_classes, SEED)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        x, y = data.client(cid)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        steps = int(np.ceil(len(y) / BATCH))
        total = 0.0
        for idx in minibatches(len(y), BATCH, steps, generator(SEED, "train", cid, round_)):
            opt.zero_grad()
            loss = F.cross_entropy(model(torch.from_numpy(x[idx])), torch.from_numpy(y[idx]))
            loss.backward()
            opt.step()
            total += float(loss)
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "metrics": MetricRecord({"num-examples": len(y), "train_loss": total / steps})})
        return Message(content=content, reply_to=msg)

    server_app = ServerApp()
    model = build_model("mlp", {"hidden": [200]}, data.feature_shape, data.num_classes, SEED)

    def central(round_: int, arrays: ArrayRecord) -> MetricRecord:
        acc, loss = evaluate(model, arrays.to_torch_state_dict(), data.x_test, data.y_test)
        stamps.append(time.perf_counter())
        accuracy.append(acc)
        return MetricRecord({"accuracy": acc, "loss": loss})

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.set_num_threads(1)
        strategy = FedAvg(fraction_train=per_round / CLIENTS, fraction_evaluate=0.0, min_train_nodes=per_round,
                          min_available_nodes=CLIENTS)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(init), num_rounds=rounds,
                       train_config=ConfigRecord({"lr": LR}), evaluate_fn=central)

    cpus = os.cpu_count() or 1
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=CLIENTS,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": cpus, "include_dashboard": False,
                                                 "logging_level": logging.ERROR, "log_to_driver": False}})
    return list(np.diff(stamps)), {"final_accuracy": accuracy[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--per-round", type=int, nargs="+", default=[10, 100])
    args = parser.parse_args()
    try:
        import flwr
    except ImportError:
        raise SystemExit("flower_compare: Flower is not installed here; run `make bench-flower` (see the docstring)")
    from flwr.common.logger import FLOWER_LOGGER

    FLOWER_LOGGER.setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    median = statistics.median
    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON only
        for per_round in args.per_round:
            times: dict[str, list[float]] = {"flower": [], "fedsim": []}
            info: dict[str, Any] = {}
            for _ in range(args.repeats):  # alternating, so that a busy spell hits both
                walls, info["flower"] = flower_rounds(per_round, args.rounds)
                times["flower"].append(median(walls[args.warmup:]))
                walls, info["fedsim"] = fedsim_rounds(per_round, args.rounds, Path(out))
                times["fedsim"].append(median(walls[args.warmup:]))
            flower, fedsim = min(times["flower"]), min(times["fedsim"])
            results.append({
                "clients_per_round": per_round,
                "flower_round_s": round(flower, 5),
                "fedsim_round_s": round(fedsim, 5),
                "flower_over_fedsim": round(flower / fedsim, 2),
                "repeats_s": {k: [round(v, 5) for v in vs] for k, vs in times.items()},
                "final_accuracy": {k: round(v["final_accuracy"], 4) for k, v in info.items()},
                "fedsim_training": info["fedsim"]["training"],
            })
    print(json.dumps({
        "benchmark": "flower_compare",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "flwr": flwr.__version__,
        "load_average_before_after": [[round(x, 2) for x in load_before], [round(x, 2) for x in os.getloadavg()]],
        "rounds_timed": args.rounds - args.warmup,
        "runs": results,
        "target_ratio_min": 10.0,
    }, indent=2))


if __name__ == "__main__":
    main()
