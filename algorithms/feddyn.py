"""FedDyn (Acar, Zhao, Matas, Mattina, Whatmough, Saligrama; "Federated Learning Based on Dynamic
Regularization", ICLR 2021), Algorithm 1.

Each client's local minimiser should be a stationary point of the *global* objective. Client k
keeps g_k, its last local gradient (nabla L_k(theta_k^{t-1}); zero at the start), and solves

    theta_k^t = argmin_theta  L_k(theta) - <g_k, theta> + alpha/2 ||theta - theta^{t-1}||^2

then updates g_k <- g_k - alpha (theta_k^t - theta^{t-1}), the first-order condition of that
problem at its minimiser. The server keeps h (zero at the start), the average of all m clients'
g_k, and moves the model past the average of the returned models by h's correction:

    h^t     = h^{t-1} - alpha (1/m) sum_{k in P_t} (theta_k^t - theta^{t-1})
    theta^t = (1/|P_t|) sum_{k in P_t} theta_k^t - h^t / alpha

The average of the returned models is the merge step, so any `[aggregator]` rule can replace it
(`server_model(combined, h, alpha)`). Algorithm 1 is followed as written; the official code
(alpemreacar/FedDyn, `train_FedDyn`) stores -g_k / alpha instead of g_k (the same model) and
divides alpha by each client's data share relative to the mean (a change for unbalanced clients).

`FedDynObjective` is the client side for the engine: g_k lives in the client's state under
"grad:<name>" and the job's start model is theta^{t-1}. `FedDynRounds` merges the returned models
with the rule (Algorithm 1's plain mean by default: `fedsim.Mean`, not FedAvg's example weights),
then, in `after_merge`, updates h and moves the model by -h / alpha; h is in its `STATE`, so
checkpoints keep it. A `[server_optimizer]` steps before that correction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from fedsim import (
    LocalSGDConfig,
    Mean,
    Params,
    RunContext,
    ServerRounds,
    SGDTrainer,
    UpdateBatch,
    inner_product,
    register_algorithm,
    squared_distance,
)

GRAD = "grad:"


class FedDynConfig(LocalSGDConfig):
    """alpha: the regulariser weight, tuned per data set; 0.01 in the official example_cifar_10.py."""

    clients_per_round: int = Field(10, ge=1)
    alpha: float = Field(0.01, gt=0)


def dyn_term(w: Params, w_global: Params, grad_state: Params, alpha: float) -> Tensor:
    """-<g_k, theta> + alpha/2 ||theta - theta^{t-1}||^2 (Algorithm 1's local objective minus
    L_k); its gradient is -g_k + alpha (theta - theta^{t-1})."""
    return alpha / 2 * squared_distance(w, w_global) - inner_product(w, grad_state)


def client_state_update(grad_state: Params, w_local: Params, w_global: Params, alpha: float) -> Params:
    """g_k <- g_k - alpha (theta_k^t - theta^{t-1}): the local gradient at the client's new model
    when that model minimises its objective exactly (the stationarity condition)."""
    return {n: g - alpha * (w_local[n] - w_global[n]) for n, g in grad_state.items()}


def server_state_update(h: Params, w_global: Params, stacked_models: Params, alpha: float, num_clients: int) -> Params:
    """h - alpha (1/m) sum_{k in P_t} (theta_k^t - theta^{t-1}), m = all clients: h stays the mean of
    every client's g_k, sampled or not."""
    return {n: t - alpha / num_clients * (stacked_models[n] - w_global[n]).sum(0) for n, t in h.items()}


def server_model(combined: Params, h: Params, alpha: float) -> Params:
    """theta^t = combined - h^t / alpha, combined being the merge of the returned models (their mean
    in Algorithm 1). Tensors h does not cover (non-floating counters) pass through."""
    return {n: (t - h[n] / alpha) if n in h else t for n, t in combined.items()}


@dataclass(frozen=True)
class FedDynObjective:
    """`fedsim.LocalObjective` for FedDyn: the dynamic regulariser against the job's start model,
    with g_k (zero before a client's first job) in the client's state."""

    alpha: float

    def loss(self, w: Params, start: Params, inputs: Params) -> Tensor:
        return dyn_term(w, start, {n: inputs[GRAD + n] for n in w}, self.alpha)

    def initial_state(self, start: Params) -> Params:
        return {GRAD + n: torch.zeros_like(t) for n, t in start.items() if t.is_floating_point()}

    def after(self, start: Params, end: Params, inputs: Params, steps: int, lr: float) -> tuple[Params, dict[str, Any]]:
        names = [k[len(GRAD):] for k in inputs if k.startswith(GRAD)]
        new = client_state_update({n: inputs[GRAD + n] for n in names}, end, start, self.alpha)
        return {GRAD + n: new[n] for n in names}, {}


class FedDynRounds(ServerRounds):
    """FedAvg's rounds plus the server's h (the mean of every client's g_k)."""

    STATE = ServerRounds.STATE + ("h",)

    def __init__(self, cfg: FedDynConfig, ctx: RunContext):
        super().__init__(
            ctx, trainer=SGDTrainer.from_config(cfg, objective=FedDynObjective(cfg.alpha)), aggregator=ctx.rule(Mean()),
            clients_per_round=cfg.clients_per_round, after_merge=self.correct,
        )
        self.alpha = cfg.alpha
        self.h: Params = {n: torch.zeros_like(t) for n, t in ctx.init_params.items() if t.is_floating_point()}
        self.previous: Params = self.params

    def step(self, round: int) -> dict[str, float]:
        self.previous = self.params  # theta^{t-1}, which h's update needs once the model has moved
        return super().step(round)

    def correct(self, batch: UpdateBatch, round: int) -> None:
        self.h = server_state_update(self.h, self.previous, batch.params, self.alpha, self.ctx.data.num_clients)
        self.params = server_model(self.params, self.h, self.alpha)


@register_algorithm("feddyn")
def feddyn(cfg: FedDynConfig, ctx: RunContext) -> FedDynRounds:
    return FedDynRounds(cfg, ctx)
