"""FedAvg followed by local fine-tuning (FedAvg-FT): the simple personalisation baseline that
personalised methods are measured against (Wang et al. 2019, "Federated Evaluation of On-device
Personalization").

Training is FedAvg's, bytes and global model included (any `[aggregator]` rule). At each
evaluation every client fine-tunes the current global model on its own training data for
`finetune_steps` SGD steps (the training settings: `lr`, decayed to that round, `momentum`, ...)
and per-client accuracy is of that
fine-tuned model on its held-out examples (`[data] client_test_fraction`). Fine-tuning is part of
evaluating, so it costs no simulated time or bytes; it draws its minibatches from the client's
stream for that round.
"""

from __future__ import annotations

from pydantic import Field

from fedsim import LocalSGDConfig, Params, RunContext, ServerRounds, SGDTrainer, TrainJob, WeightedMean, register_algorithm


class FineTuneConfig(LocalSGDConfig):
    clients_per_round: int = Field(10, ge=1)
    finetune_steps: int = Field(5, ge=1)


class FineTunedRounds(ServerRounds):
    def __init__(self, cfg: FineTuneConfig, ctx: RunContext):
        super().__init__(ctx, trainer=SGDTrainer.from_config(cfg), aggregator=ctx.rule(WeightedMean()),
                         clients_per_round=cfg.clients_per_round, client_model=self.tuned_model)
        self.finetune_steps = cfg.finetune_steps
        self.last_round = 0
        self.tuned: dict[int, Params] = {}

    def step(self, round: int) -> dict[str, float]:
        self.last_round = round
        return super().step(round)

    def evaluate(self) -> dict[str, float]:
        if getattr(self.ctx.data, "has_client_tests", False):  # the round's own executor: no second pool of workers
            jobs = [TrainJob(c, self.last_round, steps=self.finetune_steps) for c in range(self.ctx.data.num_clients)]
            self.tuned = {r.client_id: r.params for r in self.executor.train(self.params, jobs)}
        try:
            return super().evaluate()
        finally:
            self.tuned = {}

    def tuned_model(self, client: int) -> Params:
        return self.tuned[client]


@register_algorithm("fedavg_ft")
def fedavg_ft(cfg: FineTuneConfig, ctx: RunContext) -> FineTunedRounds:
    return FineTunedRounds(cfg, ctx)
