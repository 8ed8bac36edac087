"""FedNova (Wang, Liu, Liang, Joshi, Poor; "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization", NeurIPS 2020): normalised averaging.

When clients run different numbers of local steps tau_i, FedAvg's average of their models
weights client i's progress by tau_i, so the federation minimises a surrogate objective weighted
by p_i tau_i instead of p_i (the paper's Theorem 1). FedNova divides each client's change by its
step count before averaging and rescales by an effective step count (Section 4, eqs. 6-7):

    a_i     = ||a_i||_1 = tau_i                                   (plain local SGD)
            = [tau_i - rho (1 - rho^tau_i) / (1 - rho)] / (1 - rho)  (heavy-ball momentum rho, Section 4)
    d_i     = (w_global - w_i) / a_i                              (the normalised update, eta folded in)
    tau_eff = sum_i p_i a_i                                       (the paper's choice, Section 4)
    w_new   = w_global - tau_eff * sum_i p_i d_i

The official implementation (JYWa/FedNova, `FedNova` optimizer) accumulates the same a_i as a
running `local_normalizing_vec`. The merge needs each client's step count, which `UpdateBatch`
does not carry: `ReportSteps` (a local objective that adds nothing to the loss) puts it in the
client's extras, where `FedNovaRule` reads it.

Registered as `fednova`: FedAvg's rounds whose clients run unequal numbers of steps: by default as
many as their data take (`local_epochs`), with `local_steps_range = [low, high]` a uniform draw per
client and round, or with `step_budget` (simulated seconds) as many as the client's simulated speed
allows (the system model). Any `[aggregator]` rule merges: the round hands it each client's model
rescaled to the common effective step count, w_g + (tau_eff / a_i)(w_i - w_g)
(`normalised_batch`), so the weighted mean of that batch is FedNova's update and a robust rule
(median, trimmed mean) is FedNova on normalised updates. With equal steps the batch is left as it
came and FedNova is FedAvg bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import replace
from typing import Annotated, Any, Callable, Sequence

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor

from fedsim import (
    LocalSGDConfig,
    Params,
    RunContext,
    ServerRounds,
    SGDTrainer,
    UpdateBatch,
    WeightedMean,
    register_algorithm,
    weighted_sum,
)


class FedNovaConfig(LocalSGDConfig):
    """Where unequal steps come from: the clients' data sizes (default), `local_steps_range` (a
    uniform integer draw per client and round, both ends included; the paper draws local epochs
    from [2, 5]), or `step_budget` (simulated seconds of local compute per round: a client takes
    as many steps as its speed allows, at least one). Local momentum is `momentum` (FedNova's rho)."""

    clients_per_round: int = Field(10, ge=1)
    local_steps_range: list[Annotated[int, Field(ge=1)]] | None = Field(None, min_length=2, max_length=2)
    step_budget: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> "FedNovaConfig":
        if self.local_steps_range is not None and self.step_budget is not None:
            raise ValueError("give local_steps_range or step_budget, not both")
        if self.local_steps_range is not None and self.local_steps_range[0] > self.local_steps_range[1]:
            raise ValueError(f"local_steps_range must be [low, high] with low <= high, got {self.local_steps_range}")
        return self


def normalizing_factors(local_steps: Sequence[int] | Tensor, momentum: float = 0.0) -> Tensor:
    """||a_i||_1 for each client (float64): tau_i for plain SGD, the momentum sum otherwise.

    With momentum rho, step k of local SGD moves the model by eta (1 - rho^k) / (1 - rho) times
    the gradient it saw, so a client's total weight on its gradients is the sum of those factors.
    """
    tau = torch.as_tensor(local_steps, dtype=torch.float64)
    if bool((tau < 1).any()):
        raise ValueError(f"FedNova: every client must report at least one local step, got {tau.tolist()}")
    if momentum == 0.0:
        return tau
    if not 0.0 < momentum < 1.0:
        raise ValueError(f"FedNova: momentum must be in [0, 1), got {momentum}")
    rho = momentum
    return (tau - rho * (1 - rho**tau) / (1 - rho)) / (1 - rho)


def fednova_combine(
    global_params: Params,
    stacked_models: Params,
    local_steps: Sequence[int] | Tensor,
    weights: Tensor,
    momentum: float = 0.0,
) -> Params:
    """w_global - tau_eff * sum_i p_i (w_global - w_i) / a_i, for every floating tensor.

    `weights` are the p_i and must sum to one (`UpdateBatch.weights()`). Written as
    (1 - sum_i c_i) w_global + sum_i c_i w_i with c_i = p_i tau_eff / a_i, one weighted sum per
    tensor. When every client ran as many steps as the others, tau_eff / a_i = sum_j p_j = 1 exactly
    and FedNova *is* FedAvg: the c_i are then the p_i themselves and the w_global term is dropped,
    so the result is FedAvg's weighted mean bit for bit rather than to rounding. Non-floating
    tensors (counters) are taken from the first client, as `weighted_sum` does.
    """
    p = torch.as_tensor(weights, dtype=torch.float64)
    a = normalizing_factors(local_steps, momentum)
    if p.shape != a.shape or p.shape[0] != next(iter(stacked_models.values())).shape[0]:
        raise ValueError(f"FedNova: expected one weight and one step count per client, got {tuple(p.shape)} weights and {tuple(a.shape)} step counts")
    if abs(float(p.sum()) - 1.0) > 1e-9:
        raise ValueError(f"FedNova: the client weights must sum to one, got {float(p.sum())}")
    if bool((a == a[0]).all()):
        return weighted_sum(stacked_models, p)
    tau_eff = (p * a).sum()
    c = p * tau_eff / a
    keep = 1.0 - c.sum()  # the global model's own coefficient: <= 0, FedNova extrapolates
    mixed = weighted_sum(stacked_models, c)
    return {
        name: (t + keep.to(t.dtype) * global_params[name]) if t.is_floating_point() else t
        for name, t in mixed.items()
    }


@dataclass(frozen=True)
class ReportSteps:
    """`fedsim.LocalObjective` that changes nothing in training and reports the client's local
    step count in its extras ("steps"), for FedNova's merge."""

    changes_loss = False

    def loss(self, w: Params, start: Params, inputs: Params) -> Tensor:
        return torch.zeros(())

    def initial_state(self, start: Params) -> Params:
        return {}

    def after(self, start: Params, end: Params, inputs: Params, steps: int, lr: float) -> tuple[Params, dict[str, Any]]:
        return {}, {"steps": torch.tensor(steps, dtype=torch.int64)}


class FedNovaRule:
    """The server's merge for FedNova: each client's step count from the batch's extras ("steps",
    see `ReportSteps`), its weight p_i from the batch's weights (example counts by default).
    `momentum` must be the clients' local momentum rho."""

    def __init__(self, momentum: float = 0.0):
        self.momentum = momentum

    def __call__(self, global_params: Params, batch: UpdateBatch, *, round: int) -> Params:
        steps = batch.extras.get("steps")
        if not isinstance(steps, Tensor) or steps.shape != (len(batch),):
            raise ValueError("FedNova: every client result must report its local step count in extras['steps'] "
                             "(train with the ReportSteps objective)")
        return fednova_combine(global_params, batch.params, steps, batch.weights(), self.momentum)


def normalised_batch(global_params: Params, batch: UpdateBatch, momentum: float = 0.0) -> UpdateBatch:
    """The batch with each client's model moved to w_g + (tau_eff / a_i)(w_i - w_g), tau_eff =
    sum_i p_i a_i with the batch's weights p_i: its weighted mean is `fednova_combine`'s result. A
    batch whose clients all ran the same number of steps comes back as it is (FedAvg exactly)."""
    steps = batch.extras.get("steps")
    if not isinstance(steps, Tensor) or steps.shape != (len(batch),):
        raise ValueError("FedNova: every client result must report its local step count in extras['steps'] "
                         "(train with the ReportSteps objective)")
    a = normalizing_factors(steps, momentum)
    if bool((a == a[0]).all()):
        return batch
    scale = (batch.weights() * a).sum() / a
    params = {}
    for name, t in batch.params.items():
        if not t.is_floating_point():
            params[name] = t
            continue
        g = global_params[name]
        params[name] = g + scale.to(t.dtype).reshape(-1, *([1] * g.dim())) * (t - g)
    return replace(batch, params=params)


def step_schedule(cfg: FedNovaConfig, ctx: RunContext) -> Callable[[int, int], int | None] | None:
    """Each client's local steps in a round, from the settings (None: from its data size)."""
    if cfg.local_steps_range is not None:
        low, high = cfg.local_steps_range
        return lambda client, round: int(ctx.generator("fednova.steps", round, client).integers(low, high + 1))
    if cfg.step_budget is not None:
        budget = np.maximum(1, np.floor(cfg.step_budget / ctx.system.step_time)).astype(np.int64)
        return lambda client, round: int(budget[client])
    return None


@register_algorithm("fednova")
def fednova(cfg: FedNovaConfig, ctx: RunContext) -> ServerRounds:
    return ServerRounds(
        ctx, trainer=SGDTrainer.from_config(cfg, objective=ReportSteps()), aggregator=ctx.rule(WeightedMean()),
        clients_per_round=cfg.clients_per_round, steps=step_schedule(cfg, ctx),
        prepare=lambda params, batch, round: normalised_batch(params, batch, cfg.momentum),
    )
