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
client. Not registered yet: the build function needs client state and per-client evaluation from
issue 11/12.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from fedsim import LocalSGDConfig, Params, squared_distance


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
