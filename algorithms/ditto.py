"""Ditto (Li, Hu, Beirami, Smith; "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML 2021).

Every client keeps a personal model v_k next to the global model w, regularised towards it
(eq. 2):  min_v  F_k(v) + lambda/2 ||v - w*||^2. The global model trains exactly as FedAvg (any
`[aggregator]` rule); in each round a selected client also takes personal steps (Algorithm 1,
line 7)

    v_k <- v_k - eta (grad F_k(v_k) + lambda (v_k - w^t))

against the round's global model w^t, and is judged by v_k on its own data. lambda = 0 is local
training only; lambda -> infinity forces v_k = w, FedAvg. The regulariser is stated as a
local-objective term so the vectorised trainer runs the personal steps for a chunk; `personal_step`
is the paper's update spelled out, for plain SGD. v_k lives in client state and never leaves the
client: `DittoRounds` is FedAvg's round (same bytes, same global model, any `[aggregator]` rule)
after which the round's clients take their personal steps against the w^t they downloaded, on the
same executor (`DittoObjective` tells the passes apart); the personal models are never sent. The personal steps come after the upload, so
they add no simulated time to the round. A client's v_k starts as the global model of its first
round (the paper's v_k = w^0 would leave a client first sampled late with an untrained model), and
per-client accuracy is of v_k (of the global model for a client never sampled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from fedsim import (
    LocalSGDConfig,
    Params,
    RunContext,
    ServerRounds,
    SGDTrainer,
    TrainJob,
    UpdateBatch,
    WeightedMean,
    register_algorithm,
    squared_distance,
)

PERSONAL = "v:"
PERSONAL_PASS = "ditto:personal"


class DittoConfig(LocalSGDConfig):
    """lam: lambda, tuned per data set in the paper (its appendix lists the values chosen).
    personal_steps: local steps on v_k per round (default: as many as on the global model)."""

    clients_per_round: int = Field(10, ge=1)
    lam: float = Field(0.1, ge=0)
    personal_steps: int | None = Field(None, ge=1)


def ditto_term(v: Params, w_global: Params, lam: float) -> Tensor:
    """lambda/2 ||v - w^t||^2 over the personal model's trainable tensors (eq. 2)."""
    return 0.5 * lam * squared_distance(v, w_global)


def personal_step(v: Params, grads: Params, w_global: Params, lr: float, lam: float) -> Params:
    """One personal SGD step, Algorithm 1: v - eta (grad F_k(v) + lambda (v - w^t))."""
    return {n: v[n] - lr * (grads[n] + lam * (v[n] - w_global[n])) for n in v}


@dataclass(frozen=True)
class DittoObjective:
    """`fedsim.LocalObjective` for both of a round's passes, told apart by the personal pass's
    payload key (`PERSONAL_PASS`), so that one executor (one pool of workers) serves both. The
    global pass trains w exactly as FedAvg does (no term, v_k untouched). The personal pass starts
    from v_k (the client's state), pulls towards the round's global model (`start`) and keeps the
    result as v_k; the model it returns is dropped by the flow, never sent or counted."""

    lam: float

    def loss(self, w: Params, start: Params, inputs: Params) -> Tensor:
        if PERSONAL_PASS not in inputs:
            return torch.zeros(())
        return ditto_term(w, start, self.lam)

    def initial_state(self, start: Params) -> Params:
        return {PERSONAL + n: t.clone() for n, t in start.items()}

    def personalize(self, params: Params, inputs: Params) -> Params:
        if PERSONAL_PASS not in inputs:
            return params
        return {n: inputs[PERSONAL + n] for n in params}

    def after(self, start: Params, end: Params, inputs: Params, steps: int, lr: float) -> tuple[Params, dict[str, Any]]:
        if PERSONAL_PASS not in inputs:
            return {}, {}
        return {PERSONAL + n: t for n, t in end.items()}, {}


class DittoRounds(ServerRounds):
    def __init__(self, cfg: DittoConfig, ctx: RunContext):
        super().__init__(ctx, trainer=SGDTrainer.from_config(cfg, objective=DittoObjective(cfg.lam)),
                         aggregator=ctx.rule(WeightedMean()), clients_per_round=cfg.clients_per_round,
                         after_merge=self.personal_steps, client_model=self.personal_model)
        self.personal_step_count = cfg.personal_steps
        self.downloaded: Params = self.params

    def step(self, round: int) -> dict[str, float]:
        self.downloaded = self.params  # w^t, which the personal steps are regularised towards
        return super().step(round)

    def personal_steps(self, batch: UpdateBatch, round: int) -> None:
        jobs = [TrainJob(int(c), round, steps=self.personal_step_count) for c in batch.client_ids]
        results = self.executor.train(self.downloaded, jobs, {PERSONAL_PASS: torch.ones(())})
        self.ctx.screen(results, round)  # v_k is kept by the engine; the returned models go nowhere

    def personal_model(self, client: int) -> Params:
        state = self.ctx.client_states.get(client)
        return {n: state[PERSONAL + n] for n in self.params} if state else self.params


@register_algorithm("ditto")
def ditto(cfg: DittoConfig, ctx: RunContext) -> DittoRounds:
    return DittoRounds(cfg, ctx)
