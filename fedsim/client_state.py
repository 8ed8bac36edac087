"""Per-client state that lives with the engine, not with whichever worker ran the client.

Methods such as SCAFFOLD (control variates), FedDyn (gradient correction), Ditto (a personal
model) and error-feedback compression keep something for each client between its jobs. The store
is on the driver: each job carries its client's state to the worker and each result brings the new
state back, so a client's state never depends on the executor, the actor or the worker count, and
it is checkpointed with the run.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from .params import Params
from .training import ClientResult, TrainJob


class ClientStates:
    STATE = ("states",)

    def __init__(self) -> None:
        self.states: dict[int, Params] = {}

    def get(self, client: int) -> Params:
        return self.states.get(client, {})

    def __len__(self) -> int:
        return len(self.states)


class StatefulExecutor:
    """Wraps an executor: jobs leave with their client's state, results bring the new state home.
    A failed job returns no state and leaves the stored one as it was."""

    def __init__(self, inner, store: ClientStates):  # noqa: ANN001 (any Executor)
        self.inner = inner
        self.store = store

    def train(self, shared: Params, jobs: Sequence[TrainJob], payload: Params | None = None) -> list[ClientResult]:
        jobs = [replace(j, state=self.store.get(j.client_id)) if j.client_id in self.store.states else j for j in jobs]
        results = self.inner.train(shared, jobs, payload)
        for r in results:
            if r.state and not r.metrics.get("failed"):
                self.store.states[r.client_id] = r.state
        return results

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str):  # noqa: ANN204 (the wrapped executor's other attributes)
        return getattr(self.inner, name)
