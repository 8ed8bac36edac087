"""FedProx (Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith; "Federated Optimization in Heterogeneous
Networks", MLSys 2020): FedAvg whose clients minimise a proximal objective.

Each client approximately solves (Algorithm 2, eq. 2)

    min_w  h_k(w; w^t) = F_k(w) + mu/2 ||w - w^t||^2

starting from the global model w^t, which bounds how far heterogeneous clients drift. The server
merges like FedAvg, so any `[aggregator]` rule applies; mu = 0 is FedAvg exactly. The paper's
"tolerate partial work" (stragglers send what they have) is the engine's deadline.

The proximal term is stated as a pure local-objective term: a function of one client's trainable
tensors and the round's global model, out-of-place and branch-free, so the vectorised trainer can
evaluate it for a whole chunk with `torch.func.vmap`; `ProxObjective` hands it to the engine
(`SGDTrainer(objective=ProxObjective(mu))`), and the rounds are FedAvg's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field
from torch import Tensor

from fedsim import LocalSGDConfig, Params, RunContext, ServerRounds, SGDTrainer, WeightedMean, register_algorithm, squared_distance


class FedProxConfig(LocalSGDConfig):
    """mu: the proximal weight; the paper tunes it per data set, between 0.001 and 1 (Section 5)."""

    clients_per_round: int = Field(10, ge=1)
    mu: float = Field(0.01, ge=0)
    deadline: float | None = Field(None, gt=0)  # simulated seconds; late clients are dropped


def prox_term(w: Params, w_global: Params, mu: float) -> Tensor:
    """mu/2 ||w - w_global||^2 over the client's trainable tensors (eq. 2); its gradient is
    mu (w - w_global), the pull towards the round's global model."""
    return 0.5 * mu * squared_distance(w, w_global)


@dataclass(frozen=True)
class ProxObjective:
    """`fedsim.LocalObjective` for FedProx: the job's start model is the round's global model."""

    mu: float

    @property
    def changes_loss(self) -> bool:  # mu = 0: FedAvg's local steps, on FedAvg's fastest path
        return self.mu != 0

    def loss(self, w: Params, start: Params, inputs: Params) -> Tensor:
        return prox_term(w, start, self.mu)

    def initial_state(self, start: Params) -> Params:
        return {}

    def after(self, start: Params, end: Params, inputs: Params, steps: int, lr: float) -> tuple[Params, dict[str, Any]]:
        return {}, {}


@register_algorithm("fedprox")
def fedprox(cfg: FedProxConfig, ctx: RunContext) -> ServerRounds:
    trainer = SGDTrainer.from_config(cfg, objective=ProxObjective(cfg.mu))
    return ServerRounds(ctx, trainer=trainer, aggregator=ctx.rule(WeightedMean()), clients_per_round=cfg.clients_per_round,
                        deadline=cfg.deadline)
