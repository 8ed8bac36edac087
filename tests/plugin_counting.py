"""A stateful method with a local objective, written as a plug-in author would; a module of its own
so that Ray workers can import it (`[plugins] modules = ["tests.plugin_counting"]`)."""

from __future__ import annotations

import torch

from fedsim import Aggregator, LocalSGDConfig, RunContext, ServerRounds, SGDTrainer, WeightedMean, register_algorithm

class Counting:
    """A proximal term whose client state counts the client's jobs; the count travels as an extra."""

    def __init__(self, mu: float):
        self.mu = mu

    def loss(self, w, start, inputs):
        return 0.5 * self.mu * sum(((w[n] - start[n]) ** 2).sum() for n in w)

    def initial_state(self, start):
        return {"jobs": torch.zeros(())}

    def after(self, start, end, inputs, steps, lr):
        jobs = inputs["jobs"] + 1
        return {"jobs": jobs}, {"jobs": jobs}


class CountingConfig(LocalSGDConfig):
    clients_per_round: int = 4
    mu: float = 0.0


EXTRAS: list[torch.Tensor] = []


class Recorder(Aggregator):
    def __call__(self, global_params, batch, *, round):
        EXTRAS.append(batch.extras["jobs"].clone())
        return WeightedMean()(global_params, batch, round=round)


@register_algorithm("test_counting")
def counting(cfg: CountingConfig, ctx: RunContext) -> ServerRounds:
    trainer = SGDTrainer.from_config(cfg, objective=Counting(cfg.mu))
    return ServerRounds(ctx, trainer=trainer, aggregator=ctx.rule(Recorder()), clients_per_round=cfg.clients_per_round)


