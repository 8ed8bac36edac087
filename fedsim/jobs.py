"""Client jobs whose inputs are fixed when they start and whose results are needed later.

Event-driven methods (gossip learning, FedAsync, FedBuff, FedCompass) start a job when a node or
client becomes free and apply its result when it finishes in simulated time. Results are computed
lazily and in batches: the first time a result is needed, every job started so far without a
result goes to the executor in one call. Each job's randomness is derived from its own ids, so
how jobs are batched never changes the numbers.
"""

from __future__ import annotations

from typing import Hashable

from .executor import Executor
from .params import Params, identity, stack
from .training import ClientResult, TrainJob


class JobPool:
    STATE = ("_waiting", "_done", "calls")

    def __init__(self, executor: Executor):
        self.executor = executor
        self._waiting: dict[Hashable, tuple[TrainJob, Params]] = {}
        self._done: dict[Hashable, ClientResult] = {}
        self.calls = 0

    def start(self, key: Hashable, job: TrainJob, params: Params) -> None:
        """Register a job; `params` must not be modified afterwards (pass a copy or a fresh dict)."""
        self._waiting[key] = (job, params)

    def cancel(self, key: Hashable) -> None:
        self._waiting.pop(key, None)
        self._done.pop(key, None)

    def result(self, key: Hashable) -> ClientResult:
        if key not in self._done:
            self._run_waiting()
        return self._done.pop(key)

    def __len__(self) -> int:
        return len(self._waiting) + len(self._done)

    def _run_waiting(self) -> None:
        """One executor call for every waiting job. Jobs that started from the same model (the
        same tensors: the server's version at the time, or a node's model) share one row of the
        stacked inputs, so a call carries each distinct model once: between two merges, a
        hundred FedCompass clients start from one or two versions."""
        keys = list(self._waiting)
        row_of: dict[tuple[int, ...], int] = {}
        distinct: list[Params] = []
        rows = []
        for k in keys:
            job, params = self._waiting[k]
            model = identity(params)
            if model not in row_of:
                row_of[model] = len(distinct)
                distinct.append(params)
            # built directly: dataclasses.replace cost a tenth of the per-update bookkeeping
            # (tests/test_jobs.py checks that every other field survives)
            rows.append(TrainJob(job.client_id, job.round, row_of[model], job.steps, job.inputs, job.state))
        inputs = stack(distinct)
        for key, result in zip(keys, self.executor.train(inputs, rows)):
            self._done[key] = result
        self._waiting.clear()
        self.calls += 1
