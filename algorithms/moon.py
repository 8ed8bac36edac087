"""MOON (Li, He, Song; "Model-Contrastive Federated Learning", CVPR 2021).

A client pulls the representation its local model gives an input towards the one the global model
gives (the positive pair) and pushes it away from the one its previous local model gave (the
negative pair), correcting drift at the level of representations (Section 3.2, eq. 3):

    l_con = -log( exp(sim(z, z_glob) / tau) / (exp(sim(z, z_glob) / tau) + exp(sim(z, z_prev) / tau)) )

with sim the cosine similarity, and the local objective l_sup + mu * l_con (eq. 4), averaged over
the minibatch. Defaults from the paper (Section 4.1): tau = 0.5; mu = 5 on CIFAR-10
and 1 on CIFAR-100 / Tiny-ImageNet. The official code (QinbinLi/MOON) computes l_con as a
cross-entropy over the logits [sim_glob, sim_prev] / tau with the positive as the label, which is
the expression above; it also allows several previous models as negatives (buffer size, default 1).

Only z depends on the trainable weights: z_glob and z_prev come from frozen models on the same
minibatch. Everything here is out-of-place and branch-free, so the vectorised trainer can run it
for a whole chunk under `torch.func.vmap`; padded rows are excluded by `mask`. `MoonObjective` is
the engine side: a `batch_loss` term (it needs the minibatch) whose representations come from
`fedsim.representation(model)` (the layers before the classifier), with the client's previous
local model in its state under "prev:<name>" (before its first job: the global model it starts
from, so that job's contrastive term has no gradient). Rounds and merge are FedAvg's (any
`[aggregator]` rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from fedsim import (
    LocalSGDConfig,
    Params,
    RunContext,
    ScenarioError,
    ServerRounds,
    SGDTrainer,
    WeightedMean,
    register_algorithm,
    representation,
)

PREV = "prev:"


class MoonConfig(LocalSGDConfig):
    """mu: weight of the contrastive loss; temperature: tau (paper defaults: mu = 5 on CIFAR-10,
    tau = 0.5)."""

    clients_per_round: int = Field(10, ge=1)
    mu: float = Field(5.0, ge=0)
    temperature: float = Field(0.5, gt=0)


def model_contrastive_loss(z: Tensor, z_global: Tensor, z_prev: Tensor, temperature: float, mask: Tensor | None = None) -> Tensor:
    """l_con of eq. 3 for a minibatch of representations (rows), averaged over the rows that
    `mask` keeps (all rows without one). Computed as logsumexp - positive for stability."""
    positive = F.cosine_similarity(z, z_global, dim=-1) / temperature
    negative = F.cosine_similarity(z, z_prev, dim=-1) / temperature
    per_row = torch.logsumexp(torch.stack([positive, negative], dim=-1), dim=-1) - positive
    if mask is None:
        return per_row.mean()
    return (per_row * mask).sum() / mask.sum()


def moon_term(
    represent: Callable[[Params, Tensor], Tensor],
    w: Params,
    x: Tensor,
    w_global: Params,
    w_prev: Params,
    *,
    mu: float,
    temperature: float,
    mask: Tensor | None = None,
) -> Tensor:
    """mu * l_con with the representations computed from parameters: `represent(params, x)` maps
    a model's parameters and a minibatch to its representation (for example a `functional_call`
    of the model up to its projection head). Gradients reach `w` only, as in the paper, where the
    global and previous models are frozen copies."""
    z = represent(w, x)
    z_global = represent(w_global, x).detach()
    z_prev = represent(w_prev, x).detach()
    return mu * model_contrastive_loss(z, z_global, z_prev, temperature, mask)


@dataclass(frozen=True)
class MoonObjective:
    """`fedsim.LocalObjective` for MOON: mu * l_con on each minibatch, the previous local model
    (trainable tensors) in the client's state."""

    mu: float
    temperature: float
    names: tuple[str, ...]

    @property
    def changes_loss(self) -> bool:  # mu = 0: FedAvg's local steps (the state is still kept)
        return self.mu != 0

    def loss(self, w: Params, start: Params, inputs: Params) -> Tensor:
        return torch.zeros(())

    def batch_loss(self, w: Params, start: Params, inputs: Params, x: Tensor, mask: Tensor,
                   represent: Callable[[Params, Tensor], Tensor]) -> Tensor:
        previous = {n: inputs[PREV + n] for n in self.names}
        return moon_term(represent, w, x, start, previous, mu=self.mu, temperature=self.temperature, mask=mask)

    def initial_state(self, start: Params) -> Params:
        return {PREV + n: start[n].clone() for n in self.names}

    def after(self, start: Params, end: Params, inputs: Params, steps: int, lr: float) -> tuple[Params, dict[str, Any]]:
        return {PREV + n: end[n] for n in self.names}, {}


@register_algorithm("moon")
def moon(cfg: MoonConfig, ctx: RunContext) -> ServerRounds:
    if list(ctx.model.buffers()):  # frozen models' batch-norm statistics would move under them
        raise ScenarioError("MOON needs a model without buffers (batch norm)", key="model.name")
    try:
        representation(ctx.model)
    except ValueError as exc:
        raise ScenarioError(str(exc), key="model.name") from None
    names = tuple(n for n, p in ctx.model.named_parameters() if p.requires_grad)
    trainer = SGDTrainer.from_config(cfg, objective=MoonObjective(cfg.mu, cfg.temperature, names))
    return ServerRounds(ctx, trainer=trainer, aggregator=ctx.rule(WeightedMean()), clients_per_round=cfg.clients_per_round)
