"""FedBuff (Nguyen et al., AISTATS 2022, arXiv 2106.06639): buffered asynchronous aggregation.

Clients train from whatever model they last received and send their update Delta = w_start - w_end.
The server buffers updates and, once K have arrived, applies w <- w - eta * sum_j c_j Delta_j. Each
client restarts as soon as it has sent. eta is the server's step: `server_lr` here is shorthand for
`[server_optimizer] name = "sgd", lr = eta`, and any other server optimiser (FedAdam on FedBuff's
buffer) goes in that table. Two conventions for the per-update weight c_j (key `weighting`):

- "paper" (default): c_j = s(tau_j) * p_j / sum_buffer p, the paper's Algorithm 1 (the server step
  eta_g times the mean of the K buffered updates), with the staleness discount
  s(tau) = (tau + 1)^(-a) and p_j the clients' weights normalised over the buffer (1/K with equal
  weights). With K = number of clients, zero staleness and eta = 1 one buffer flush is exactly
  FedAvg's round. The default because it is the method as its authors define it.
- "appfl": c_j = s(tau_j) * p_j with p_j = 1/N over all N clients (n_j / n with
  `weights = "examples"`), not renormalised over the buffer: APPFL's FedBuffAggregator
  (github APPFL/APPFL, src/appfl/algorithm/aggregator/fedbuff_aggregator.py, `compute_steps`,
  which sums K steps of alpha * s(tau) * p_j), the code the FedCompass paper's baselines ran
  (github APPFL/FedCompass, examples/config/server_fedbuff.yaml: K = 3, alpha = eta = 0.9,
  polynomial a = 0.5). Each update then weighs eta/N instead of eta/K: 7.4x less in
  scenarios/fedcompass.toml (N = 20, K = 3, eta 0.9 against 1.0).

Defaults from the FedCompass repository's baseline config: K = 3, polynomial staleness a = 0.5;
eta (`server_lr`) defaults to 1, the paper's server step (set 0.9 to match APPFL's config).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from fedsim import Arrival, AsyncConfig, AsyncServer, RunContext, ScenarioError, ServerSGD, SGDTrainer, register_algorithm


class FedBuffConfig(AsyncConfig):
    buffer_size: int = Field(3, ge=1)
    server_lr: float = Field(1.0, gt=0)
    local_steps: int | None = Field(20, ge=1)
    weighting: Literal["paper", "appfl"] = "paper"

    def smallest_merge(self) -> tuple[int, str, str]:
        return self.buffer_size, "algorithm.buffer_size", f"algorithm.buffer_size = {self.buffer_size}"


def buffer_coefficients(cfg: FedBuffConfig, p: np.ndarray, staleness_weights: np.ndarray) -> np.ndarray:
    """c_j for the buffered updates, given their clients' weights p_j (over all clients) and
    staleness discounts s(tau_j); the server's step eta multiplies them (`server_lr`)."""
    share = p if cfg.weighting == "appfl" else p / p.sum()
    return share * staleness_weights


class FedBuff(AsyncServer):
    STATE = AsyncServer.STATE + ("buffer",)

    def __init__(self, cfg: FedBuffConfig, ctx: RunContext):
        super().__init__(ctx, cfg, SGDTrainer.from_config(cfg))
        if cfg.buffer_size > ctx.data.num_clients:
            raise ScenarioError(f"expected at most data.num_clients = {ctx.data.num_clients}", key="algorithm.buffer_size")
        self.buffer: list[Arrival] = []
        if cfg.server_lr != 1.0:  # the server's step size is one knob, whichever table sets it
            if ctx.server_optimizer is not None:
                raise ScenarioError("set the server's step in one place: algorithm.server_lr or [server_optimizer]",
                                    key="algorithm.server_lr")
            self.server_optimizer = ServerSGD(lr=cfg.server_lr)

    def on_arrival(self, arrival: Arrival, now: float) -> None:
        self.buffer.append(arrival)
        if len(self.buffer) >= self.cfg.buffer_size:
            taus = [self.version - a.version for a in self.buffer]
            p = self.p[[a.client for a in self.buffer]]
            coefficients = buffer_coefficients(self.cfg, p, self.weight(np.array(taus)))
            self.merge(self.deltas(self.buffer), coefficients, [a.client for a in self.buffer], taus)
            self.applied_staleness += taus
            self.buffer = []
        self.dispatch(arrival.client, now, int(self.steps[arrival.client]))


@register_algorithm("fedbuff")
def fedbuff(cfg: FedBuffConfig, ctx: RunContext) -> FedBuff:
    return FedBuff(cfg, ctx)
