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
    trained and uploaded its result. Bytes are counted per message: the model down to each sampled
    client and its update back up.
    """

    def __init__(self, ctx: "RunContext", *, trainer: Trainer, aggregator: Aggregator, clients_per_round: int):
        self.ctx = ctx
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
        up = [num_bytes(r.params) for r in results]
        self.ctx.ledger.transfer(SERVER, clients, down)
        for c, nbytes in zip(clients, up):
            self.ctx.ledger.transfer(int(c), SERVER, nbytes)
        durations = [
            self.ctx.system.job_time(int(c), int(r.metrics["steps"]), down, u)
            for c, r, u in zip(clients, results, up)
        ]
        self.ctx.clock.advance_to(self.ctx.clock.now + max(durations))
        batch = make_batch(results)
        self.params = self.aggregator(self.params, batch, round=round)
        weights = batch.weights().numpy()
        return {"train_loss": float(sum(w * m["train_loss"] for w, m in zip(weights, batch.metrics)))}

    def evaluate(self) -> dict[str, float]:
        acc, loss = self.ctx.evaluate(self.params)
        return {"test_accuracy": acc, "test_loss": loss}
