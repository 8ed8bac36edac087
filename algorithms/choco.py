"""CHOCO-SGD (Koloskova, Stich, Jaggi, ICML 2019, Algorithm 2): decentralized SGD whose gossip
sends compressed messages.

Every node keeps public copies x_hat_j of itself and its neighbours; after its local SGD step it
sends q_i = Q(x_i - x_hat_i), the compressed difference between its model and its public copy,
everyone adds the q they receive to their copies, and each node moves by
gamma * sum_j w_ij (x_hat_j - x_hat_i). Since all copies of x_hat_j agree, one stack holds them
(`fedsim.choco_gossip`). The compressor is the scenario's `[compression]` table (top-k, random-k,
QSGD, scaled sign; the identity without one), and each node's message is charged at its exact
compressed size. Checked against the paper's Algorithm 2 and the authors' code
(github.com/epfml/ChocoSGD, `communication.py`: `x_hat += q`, then `x += gamma * (W x_hat - x_hat)`).

With the identity compressor and gamma = 1 it is D-PSGD (x <- W x), up to float rounding.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from fedsim import (
    QSGD,
    DecentralizedConfig,
    GraphRounds,
    Params,
    RunContext,
    ScenarioError,
    SGDTrainer,
    choco_gossip,
    register_algorithm,
)


class ChocoConfig(DecentralizedConfig):
    local_steps: int | None = Field(1, ge=1)
    gamma: float = Field(1.0, gt=0, le=1)  # consensus step size; compressed gossip needs it below 1
    public_init: Literal["model", "zeros"] = "model"  # x_hat at the start: the shared initial model / 0 (the paper)


class RescaledQSGD:
    """QSGD divided by tau = 1 + min(d / s^2, sqrt(d) / s) per tensor (Koloskova et al. 2019,
    Sec. 5 and Assumption 1): CHOCO needs a compressor with E||Q(x) - x||^2 <= (1 - delta) ||x||^2,
    which unbiased QSGD is not when its variance factor exceeds 1 (its copies' error then grows
    every round and the run diverges). The receiver knows tau: the message is QSGD's, same size."""

    def __init__(self, qsgd: QSGD):
        self.qsgd = qsgd

    def __call__(self, update: Params, rng: np.random.Generator) -> tuple[Params, int]:
        out, nbytes = self.qsgd(update, rng)
        s = self.qsgd.levels
        return {n: (t / (1 + min(t.numel() / s**2, t.numel() ** 0.5 / s)) if t.is_floating_point() else t)
                for n, t in out.items()}, nbytes


class ChocoRounds(GraphRounds):
    """GraphRounds whose gossip step is CHOCO's compressed exchange."""

    STATE = ("X", "x_hat")

    def __init__(self, cfg: ChocoConfig, ctx: RunContext):
        super().__init__(ctx, trainer=SGDTrainer.from_config(cfg), gossip_steps=cfg.gossip_steps,
                             init=cfg.init, eval_nodes=cfg.eval_nodes, purpose="choco (compressed gossip)")
        if self.rule is not None:
            raise ScenarioError("CHOCO's gossip step is its own: remove the [aggregator] table", key="aggregator")
        if ctx.failures.active or ctx.net.lossy:
            raise ScenarioError("CHOCO's public copies assume every neighbour receives every message: remove the "
                                "failures and message loss from [system.failures]", key="system.failures")
        compression = ctx.compression_config
        if compression is not None and compression.error_feedback:
            raise ScenarioError("CHOCO corrects compression errors through its public copies: set "
                                "error_feedback = false", key="compression.error_feedback")
        if cfg.public_init == "model" and cfg.init != "shared":
            raise ScenarioError("public_init = \"model\" needs init = \"shared\" (a model every node knows)",
                                key="algorithm.public_init")
        self.compressor = ctx.compressor()
        if isinstance(self.compressor, QSGD):
            self.compressor = RescaledQSGD(self.compressor)
        self.gamma = cfg.gamma
        # every node knows the shared initial model, so copies can start there at no cost
        self.x_hat: Params = {k: (v.clone() if cfg.public_init == "model" else torch.zeros_like(v)) for k, v in self.X.items()}
        self._sizes = np.zeros(ctx.data.num_clients, dtype=np.int64)
        self._step = 0

    def merge(self, W: torch.Tensor, X: Params, round: int) -> Params:
        n = self.ctx.data.num_clients
        rngs = [self.ctx.generator("choco", round, self._step, i) for i in range(n)]
        self._step += 1
        X, self.x_hat, sizes = choco_gossip(X, self.x_hat, W, self.gamma, self.compressor, rngs)
        self._sizes = np.asarray(sizes, dtype=np.int64)
        return X

    def step(self, round: int) -> dict[str, float]:
        self._step = 0
        return super().step(round)

    def gossip_bytes(self, model_bytes: int) -> np.ndarray:
        return self._sizes


@register_algorithm("choco")
def choco(cfg: ChocoConfig, ctx: RunContext) -> ChocoRounds:
    return ChocoRounds(cfg, ctx)
