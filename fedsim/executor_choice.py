"""`executor = "auto"`: inline where starting Ray would dominate, Ray where more workers pay.

Ray costs about ten seconds to start on a small machine (the quickstart spent 10-13 s of its
19-25 s there, and inline took 6-8 s with identical curves); spread over W workers it saves at most
(1 - 1/W) of the training time. So the choice is a comparison of two estimates: the run's local
training time on one core, from the number of local steps and the model's size, and Ray's start-up.
The estimate only has to be right within a factor of a few, since the two executors give the same
curves bit for bit: a wrong guess costs time, never results. Explicit requests always win: an
address or a worker count means Ray, `executor = "inline"` or `"ray"` means that executor.

A plain MLP (what `fedsim.stacked_linear` trains) is the exception to the comparison: inline, its
stacked chunks already train on one thread per core, at several times the rate of one client at a
time, so Ray's workers would share out nothing and only add their start-up (the quickstart at 600
rounds: 9.7 s inline against 24.8 s on Ray, when the estimate above chose Ray).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from .errors import FedsimError

RAY_STARTUP_S = 10.0  # seconds to start Ray and its actors on a 2-core machine
FLOPS_PER_S = 5e9  # one core, small-batch SGD, one client at a time (well below matmul peak)
STEP_OVERHEAD_S = 3e-4  # Python and optimiser overhead of one local step, whatever the model
FLOPS_PER_PARAM_EXAMPLE = 6  # forward + backward: about 6 FLOPs per parameter per example


@dataclass(frozen=True)
class Choice:
    """The executor a run uses and why, in one line for the terminal."""

    kind: str  # "inline" or "ray"
    workers: int | None
    reason: str

    def line(self) -> str:
        workers = f", {self.workers} workers" if self.kind == "ray" and self.workers else ""
        return f"executor: {self.kind}{workers} ({self.reason})"


def check_options(system: Any, executor: str | None, workers: int | None, address: str | None) -> None:
    """`--workers` or `--address` with the inline executor is a mistake, not something to ignore."""
    kind = executor or system.executor
    if kind == "inline":
        given = [flag for flag, value in (("--workers", workers), ("--address", address)) if value is not None]
        if given:
            where = "--executor inline" if executor == "inline" else "system.executor = \"inline\""
            raise FedsimError(f"{' and '.join(given)} apply to the Ray executor, not with {where} "
                              "(drop them, or use --executor ray or auto)")


def training_seconds(spec: Any, num_params: int, mean_examples: float, num_clients: int) -> float:
    """Local training time of the whole run on one core: steps x (FLOPs per step / rate + overhead)."""
    s = spec.scenario
    cfg = spec.algorithm_config
    per_round = getattr(cfg, "clients_per_round", None) or num_clients
    batch = getattr(cfg, "batch_size", 32)
    steps = getattr(cfg, "local_steps", None)
    if steps is None:
        epochs = getattr(cfg, "local_epochs", 1.0)
        steps = max(1, math.ceil(epochs * mean_examples / batch))
    total_steps = s.rounds * min(per_round, num_clients) * steps
    flops = FLOPS_PER_PARAM_EXAMPLE * num_params * min(batch, max(mean_examples, 1))
    return total_steps * (flops / FLOPS_PER_S + STEP_OVERHEAD_S)


def choose(spec: Any, executor: str | None, workers: int | None, address: str | None, *,
           num_params: int, mean_examples: float, num_clients: int, cpus: int | None = None,
           stacked: bool = False) -> Choice:
    """The executor for this run (see the module docstring for the rule)."""
    system = spec.scenario.system
    kind = executor or system.executor
    workers = workers or system.workers
    address = address or system.address
    if kind != "auto":
        return Choice(kind, workers, "as asked")
    if address:
        return Choice("ray", workers, "a cluster address was given")
    if workers or system.clients_per_actor:
        return Choice("ray", workers, "a worker count was given")
    cpus = cpus or os.cpu_count() or 1
    if stacked and cpus > 1 and system.vectorize is not False:
        return Choice("inline", None, f"the MLP trains in stacked chunks on all {cpus} cores inline; Ray would only "
                                      f"add its start-up, about {RAY_STARTUP_S:.0f} s; set system.executor or "
                                      "--executor to choose")
    seconds = training_seconds(spec, num_params, mean_examples, num_clients)
    saved = seconds * (1 - 1 / cpus)
    if cpus > 1 and saved > RAY_STARTUP_S:
        return Choice("ray", cpus, f"about {seconds:.0f} s of local training, {saved:.0f} s saved on {cpus} "
                                   f"workers > {RAY_STARTUP_S:.0f} s to start Ray")
    why = "one CPU" if cpus == 1 else f"starting Ray, about {RAY_STARTUP_S:.0f} s, would dominate"
    return Choice("inline", None, f"about {seconds:.0f} s of local training; {why}; "
                                  "set system.executor or --executor to choose")
