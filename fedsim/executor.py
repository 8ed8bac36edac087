"""Executors run client jobs: inline in this process, or on a pool of long-lived Ray actors.

Both go through the same `Worker`, so they cannot drift apart. A worker is built once per run and
keeps the model, the trainer and a view of every client's data; each job carries only ids. The data
set enters Ray's object store once (actors read zero-copy views) and the parameters that a round
shares are put there once per round, never once per client.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from .data import FederatedData
from .models import build_model
from .params import Params, from_numpy, to_numpy
from .seeding import generator
from .training import ClientResult, TrainJob, Trainer, torch_threads


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs besides the data; small, pickled once per actor."""

    model_name: str
    model_options: dict[str, Any]
    input_shape: tuple[int, ...]
    num_classes: int
    seed: int
    trainer: Trainer
    threads: int = 1


class Worker:
    """Hosts virtual clients: trains any of them on request, in the order given."""

    def __init__(self, data: FederatedData, spec: WorkerSpec):
        self.data = data
        self.spec = spec
        self.model = build_model(spec.model_name, spec.model_options, spec.input_shape, spec.num_classes, spec.seed)

    def run(self, shared: dict[str, np.ndarray], jobs: Sequence[TrainJob]) -> list[ClientResult]:
        tensors = from_numpy(shared)
        results = []
        with torch_threads(self.spec.threads):
            for job in jobs:
                params = tensors if job.row is None else {k: v[job.row] for k, v in tensors.items()}
                x, y = self.data.client(job.client_id)
                rng = generator(self.spec.seed, "train", job.client_id, job.round)
                new, metrics = self.spec.trainer.train(self.model, params, x, y, job, rng)
                results.append(ClientResult(job.client_id, new, len(y), metrics))
        return results


    def pid(self) -> int:
        """The hosting process's id: to measure its memory, or to kill it in fault tests."""
        return os.getpid()

    def run_numpy(self, shared: dict[str, np.ndarray], jobs: Sequence[TrainJob]) -> list[ClientResult]:
        """`run` with numpy results, which Ray moves without pickling tensor storages."""
        results = self.run(shared, jobs)
        for result in results:
            result.params = to_numpy(result.params)  # type: ignore[assignment]
        return results


class Executor(Protocol):
    def train(self, shared: Params, jobs: Sequence[TrainJob]) -> list[ClientResult]: ...

    def close(self) -> None: ...


class InlineExecutor:
    """Runs every job in this process: for tests, debugging and small federations."""

    def __init__(self, data: FederatedData, spec: WorkerSpec):
        self.worker = Worker(data, spec)

    def train(self, shared: Params, jobs: Sequence[TrainJob]) -> list[ClientResult]:
        return self.worker.run(to_numpy(shared), jobs)

    def close(self) -> None:
        pass


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start Ray once per process (dashboard off), or join the cluster at `address`."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, **kwargs)


class RayExecutor:
    """A fixed pool of Ray actors, each hosting many virtual clients.

    With `clients_per_actor` set, client c always runs on actor c // clients_per_actor (so 1 gives
    one actor per client); otherwise each round's jobs are split evenly across `workers` actors.
    Either way results come back in job order, and each job's randomness is derived from its own
    ids, so the assignment never changes the numbers.
    """

    def __init__(
        self,
        data: FederatedData,
        spec: WorkerSpec,
        *,
        workers: int | None = None,
        clients_per_actor: int | None = None,
        address: str | None = None,
    ):
        import ray

        ensure_ray(address, num_cpus=workers)
        cpus = max(1, int(ray.available_resources().get("CPU", 1)))
        self.clients_per_actor = clients_per_actor
        if clients_per_actor is not None:
            n_actors = math.ceil(data.num_clients / clients_per_actor)
        else:
            n_actors = workers or cpus
        remote = ray.remote(Worker).options(num_cpus=min(1.0, cpus / n_actors))
        data_ref = ray.put(data)
        self.actors = [remote.remote(data_ref, spec) for _ in range(n_actors)]

    def _assign(self, jobs: Sequence[TrainJob]) -> list[list[int]]:
        groups: list[list[int]] = [[] for _ in self.actors]
        for i, job in enumerate(jobs):
            if self.clients_per_actor is not None:
                actor = job.client_id // self.clients_per_actor
            else:
                actor = i * len(self.actors) // len(jobs)
            groups[actor].append(i)
        return groups

    def train(self, shared: Params, jobs: Sequence[TrainJob]) -> list[ClientResult]:
        import ray

        shared_ref = ray.put(to_numpy(shared))
        groups = self._assign(jobs)
        calls = [
            (idx, actor.run_numpy.remote(shared_ref, [jobs[i] for i in idx]))
            for actor, idx in zip(self.actors, groups)
            if idx
        ]
        results: list[ClientResult | None] = [None] * len(jobs)
        for idx, ref in calls:
            for i, result in zip(idx, ray.get(ref)):
                result.params = from_numpy(result.params)  # type: ignore[arg-type]
                results[i] = result
        return results  # type: ignore[return-value]

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
