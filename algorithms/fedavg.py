"""FedAvg (McMahan et al., AISTATS 2017): local SGD on sampled clients, example-weighted average.

Its aggregation rule is registered as "fedavg" through the same decorator a user has, so any server
method can name it in `[aggregator]`, and FedAvg itself can run with any other rule.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedsim import (
    LocalSGDConfig,
    Params,
    RunContext,
    ServerRounds,
    SGDTrainer,
    UpdateBatch,
    register_aggregator,
    register_algorithm,
    weighted_sum,
)


@register_aggregator("fedavg")
class WeightedMean:
    """sum_k (n_k / n) w_k: the average of the clients' models weighted by their example counts."""

    def __call__(self, global_params: Params, batch: UpdateBatch, *, round: int) -> Params:
        return weighted_sum(batch.params, batch.weights())


class FedAvgConfig(LocalSGDConfig):
    clients_per_round: int = Field(10, ge=1)
    deadline: float | None = Field(None, gt=0)  # simulated seconds; late clients are dropped
    sampler: Literal["uniform", "hash"] = "uniform"


@register_algorithm("fedavg")
def fedavg(cfg: FedAvgConfig, ctx: RunContext) -> ServerRounds:
    return ServerRounds(
        ctx,
        trainer=SGDTrainer.from_config(cfg),
        aggregator=ctx.aggregator or WeightedMean(),
        clients_per_round=cfg.clients_per_round,
        deadline=cfg.deadline,
        sampler=cfg.sampler,
    )
