"""FedAvg (McMahan et al., AISTATS 2017): local SGD on sampled clients, example-weighted average.

Its aggregation rule is registered as "fedavg" through the same decorator a user has, so any server
method can name it in `[aggregator]`, and FedAvg itself can run with any other rule.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedsim import (
    LocalSGDConfig,
    Mean,
    RunContext,
    ServerRounds,
    SGDTrainer,
    WeightedMean,
    register_aggregator,
    register_algorithm,
)


# sum_k (n_k / n) w_k in server rounds: the engine's weighted mean, under the name scenarios use
register_aggregator("fedavg")(WeightedMean)
register_aggregator("mean")(Mean)


class FedAvgConfig(LocalSGDConfig):
    clients_per_round: int = Field(10, ge=1)
    deadline: float | None = Field(None, gt=0)  # simulated seconds; late clients are dropped
    sampler: Literal["uniform", "hash"] = "uniform"


@register_algorithm("fedavg")
def fedavg(cfg: FedAvgConfig, ctx: RunContext) -> ServerRounds:
    return ServerRounds(
        ctx,
        trainer=SGDTrainer.from_config(cfg),
        aggregator=ctx.rule(WeightedMean()),
        clients_per_round=cfg.clients_per_round,
        deadline=cfg.deadline,
        sampler=cfg.sampler,
    )
