"""FedOpt (Reddi, Charles, Zaheer, Garrett, Rush, Konecny, Kumar, McMahan; "Adaptive Federated
Optimization", ICLR 2021) and FedAvgM (Hsu, Qi, Brown; "Measuring the Effects of Non-Identical
Data Distribution for Federated Visual Classification", 2019).

Each is FedAvg's rounds with a server optimiser on the pseudo-gradient Delta = combined - x
(`fedsim.server_optim`): `fedadam`, `fedyogi`, `fedadagrad` (Algorithm 2) and `fedavgm` (server
heavy-ball momentum). The optimiser steps after whichever rule merged the round, so they combine
with any `[aggregator]` (coordinate median, then Adam). `server_lr` (and `server_momentum` for
FedAvgM) set the method's default optimiser; a `[server_optimizer]` table replaces it whole (betas,
tau), and setting both is an error. The optimiser's moments are checkpointed with the run.

The defaults (server_lr 0.01 for Adam and Yogi, 0.1 for Adagrad, tau = 1e-3; FedAvgM lr 1 with
momentum 0.9) are starting points, not tuned values: the paper tunes the server learning rate per
task over a grid of powers of ten, and so should a comparison.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

from pydantic import Field

from fedsim import (
    FedAdagrad,
    FedAdam,
    FedYogi,
    LocalSGDConfig,
    RunContext,
    ScenarioError,
    ServerRounds,
    ServerSGD,
    SGDTrainer,
    WeightedMean,
    register_algorithm,
)


class FedOptConfig(LocalSGDConfig):
    clients_per_round: int = Field(10, ge=1)
    deadline: float | None = Field(None, gt=0)  # simulated seconds; late clients are dropped
    sampler: Literal["uniform", "hash"] = "uniform"
    server_lr: float = Field(0.01, gt=0)


class FedAdagradConfig(FedOptConfig):
    server_lr: float = Field(0.1, gt=0)


class FedAvgMConfig(FedOptConfig):
    server_lr: float = Field(1.0, gt=0)
    server_momentum: float = Field(0.9, ge=0, lt=1)


def fedopt_rounds(cfg: FedOptConfig, ctx: RunContext, default: Callable[[], Any]) -> ServerRounds:
    """FedAvg's rounds whose server steps with `default()` unless the scenario names its own."""
    mine = {"server_lr", "server_momentum"} & cfg.model_fields_set
    if ctx.server_optimizer is not None and mine:
        raise ScenarioError(f"set the server optimiser in one place: algorithm.{sorted(mine)[0]} or [server_optimizer]",
                            key=f"algorithm.{sorted(mine)[0]}")
    ctx.use_server_optimizer(default())
    return ServerRounds(ctx, trainer=SGDTrainer.from_config(cfg), aggregator=ctx.rule(WeightedMean()),
                        clients_per_round=cfg.clients_per_round, deadline=cfg.deadline, sampler=cfg.sampler)


@register_algorithm("fedadam")
def fedadam(cfg: FedOptConfig, ctx: RunContext) -> ServerRounds:
    return fedopt_rounds(cfg, ctx, lambda: FedAdam(lr=cfg.server_lr))


@register_algorithm("fedyogi")
def fedyogi(cfg: FedOptConfig, ctx: RunContext) -> ServerRounds:
    return fedopt_rounds(cfg, ctx, lambda: FedYogi(lr=cfg.server_lr))


@register_algorithm("fedadagrad")
def fedadagrad(cfg: FedAdagradConfig, ctx: RunContext) -> ServerRounds:
    return fedopt_rounds(cfg, ctx, lambda: FedAdagrad(lr=cfg.server_lr))


@register_algorithm("fedavgm")
def fedavgm(cfg: FedAvgMConfig, ctx: RunContext) -> ServerRounds:
    return fedopt_rounds(cfg, ctx, lambda: ServerSGD(lr=cfg.server_lr, momentum=cfg.server_momentum))
