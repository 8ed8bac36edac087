"""What a whole `fedsim run` round costs against its training: evaluation, metrics.csv, ledger,
checkpoints, result transport and the progress bar on top of the executor's own time.

The workload is the issue's: 100 clients of Synthetic(1, 1), an MLP 60-200-10, 200 examples per
client, batch 32, one local epoch (7 SGD steps), lr 0.05, evaluation every round, 10 and then 100
clients per round. Each is one `fedsim.coordinator.run` (the function behind `fedsim run`) whose
executor's `train` is timed from the inside: a round's cost is the difference between consecutive
`wall_time`s of metrics.csv (everything between two evaluations), the executor's is the time its
`train` call took for that round's jobs. Rounds before `--warmup` (start-up, calibration) are left
out; the figures are medians over the rest. A breakdown says where the rest went: waiting for an
evaluation (it overlaps the next round's training on a second thread; `evaluate` is its own
time), metrics.csv, checkpoints, and "other", the flow's own bookkeeping (sampling, the network,
the rule) and the progress bar.

    python benchmarks/run_overhead.py [--rounds 120] [--warmup 20] [--executor inline|ray] [--per-round 10 100]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd
import torch

from fedsim import coordinator, executor as executors
from fedsim.coordinator import RunOptions
from fedsim.history import History
from fedsim.scenario import validate

SCENARIO: dict[str, Any] = {
    "name": "run-overhead",
    "seed": 0,
    "eval_every": 1,
    "data": {"dataset": "synthetic", "num_clients": 100, "samples_per_client": 200, "synthetic_alpha": 1.0,
             "synthetic_beta": 1.0},
    "model": {"name": "mlp", "hidden": [200]},
    "algorithm": {"name": "fedavg", "batch_size": 32, "local_epochs": 1, "lr": 0.05},
    "system": {},
}


@contextmanager
def timing(owner: Any, name: str, log: list[float]) -> Iterator[None]:
    """Append the duration of every call of owner.name to `log` while inside the block."""
    original = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            log.append(time.perf_counter() - start)

    setattr(owner, name, timed)
    try:
        yield
    finally:
        setattr(owner, name, original)


def one_run(per_round: int, rounds: int, warmup: int, executor: str | None, out: Path) -> dict[str, Any]:
    raw = json.loads(json.dumps(SCENARIO))
    raw.update(name=f"run-overhead-{per_round}", rounds=rounds)
    raw["algorithm"]["clients_per_round"] = per_round
    if executor:
        raw["system"]["executor"] = executor
    spec = validate(raw, "<benchmark>", {})
    logs: dict[str, list[float]] = {k: [] for k in ("train", "evaluate", "wait", "history", "checkpoint")}
    patches: list[tuple[Any, str, list[float]]] = [
        (executors.InlineExecutor, "train", logs["train"]),
        (executors.RayExecutor, "train", logs["train"]),
        (coordinator.RunContext, "evaluate", logs["evaluate"]),
        (getattr(coordinator, "_Pending", None), "finish", logs["wait"]),
        (History, "append", logs["history"]),
        (coordinator, "save_checkpoint", logs["checkpoint"]),
    ]
    with ExitStack() as stack:
        for owner, name, log in patches:
            if hasattr(owner, name):  # an older fedsim (to measure "before") may lack one
                stack.enter_context(timing(owner, name, log))
        run_dir = coordinator.run(spec, out, RunOptions(progress=True))
    walls = pd.read_csv(run_dir / "metrics.csv")["wall_time"].diff().to_numpy()[1:]  # round r: rows r-1 -> r
    summary = json.loads((run_dir / "summary.json").read_text())
    keep = slice(warmup, rounds)
    median = statistics.median
    round_s = median(walls[keep])
    train_s = median(logs["train"][keep])
    evaluate_s = median(logs["evaluate"][1:][keep])  # [0] is round 0's
    history_s = median(logs["history"][1:][keep])
    wait_s = median(logs["wait"][keep]) if logs["wait"] else evaluate_s  # without overlap: the evaluation
    checkpoint_s = sum(logs["checkpoint"]) / rounds
    return {
        "clients_per_round": per_round,
        "run_round_s": round(round_s, 5),
        "executor_train_s": round(train_s, 5),
        "ratio_run_to_executor": round(round_s / train_s, 3),
        "breakdown_s": {
            "evaluation_wait_and_row": round(wait_s, 5),
            "metrics_csv": round(history_s, 6),
            "checkpoint_per_round": round(checkpoint_s, 6),
            "other": round(round_s - train_s - wait_s - checkpoint_s, 5),
        },
        "evaluate_s_overlapped": round(evaluate_s, 5),
        "training": summary.get("training"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--executor", choices=["inline", "ray"], default=None, help="default: the scenario default")
    parser.add_argument("--per-round", type=int, nargs="+", default=[10, 100])
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON only
        for per_round in args.per_round:
            results.append(one_run(per_round, args.rounds, args.warmup, args.executor, Path(out)))
    print(json.dumps({
        "benchmark": "run_overhead",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "executor": args.executor or "scenario default",
        "rounds_timed": args.rounds - args.warmup,
        "runs": results,
        "target_ratio_max": 1.15,
    }, indent=2))


if __name__ == "__main__":
    main()
