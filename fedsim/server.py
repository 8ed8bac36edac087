"""Server rounds: sample clients, train them from the global model, aggregate, repeat."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .aggregation import Aggregator, make_batch
from .ledger import SERVER
from .params import Params, clone, num_bytes
from .training import TrainJob, Trainer

if TYPE_CHECKING:
    from .coordinator import RunContext


class ServerRounds:
    """The synchronous server loop shared by FedAvg-style methods.

    A round lasts, in simulated time, until the slowest sampled client has downloaded the model,
    trained and uploaded its result, or until `deadline` simulated seconds when one is set: clients
    still busy then are dropped from the round and counted as failures. Bytes are counted per
    message: the model down to each sampled client and each on-time update back up.
    """

    def __init__(
        self, ctx: "RunContext", *, trainer: Trainer, aggregator: Aggregator, clients_per_round: int,
        deadline: float | None = None,
    ):
        self.ctx = ctx
        self.deadline = deadline
        self.executor = ctx.executor(trainer)
        self.aggregator = aggregator
        self.clients_per_round = clients_per_round
        self.params: Params = clone(ctx.init_params)

    def sample(self, round: int) -> np.ndarray:
        rng = self.ctx.generator("sample", round)
        n = self.ctx.data.num_clients
        return np.sort(rng.choice(n, size=self.clients_per_round, replace=False))

    def step(self, round: int) -> dict[str, float]:
        clients = self.sample(round)
        results = self.executor.train(self.params, [TrainJob(int(c), round) for c in clients])
        down = num_bytes(self.params)
        self.ctx.ledger.transfer(SERVER, clients, down)
        durations = np.array([
            self.ctx.system.job_time(int(c), int(r.metrics["steps"]), down, num_bytes(r.params), job=round)
            for c, r in zip(clients, results)
        ])
        on_time = durations <= (self.deadline if self.deadline is not None else np.inf)
        for c, r, ok, d in zip(clients, results, on_time, durations):
            self.ctx.busy[c] += min(d, self.deadline or d)
            if ok:
                self.ctx.ledger.transfer(int(c), SERVER, num_bytes(r.params))
        self.ctx.clock.advance_to(self.ctx.clock.now + float(durations.max() if on_time.all() else self.deadline))
        kept = [r for r, ok in zip(results, on_time) if ok]
        metrics = {"failures": float(len(results) - len(kept))}
        if not kept:
            return {"train_loss": float("nan"), **metrics}
        batch = make_batch(kept)
        self.params = self.aggregator(self.params, batch, round=round)
        weights = batch.weights().numpy()
        metrics["train_loss"] = float(sum(w * m["train_loss"] for w, m in zip(weights, batch.metrics)))
        return metrics

    def evaluate(self) -> dict[str, float]:
        acc, loss = self.ctx.evaluate(self.params)
        return {"test_accuracy": acc, "test_loss": loss}
