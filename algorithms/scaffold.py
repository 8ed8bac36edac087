"""SCAFFOLD (Karimireddy, Kale, Mohri, Reddi, Stich, Suresh; "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning", ICML 2020), Algorithm 1 with option II.

Client drift comes from each client following its own gradient; SCAFFOLD corrects every local step
by the difference between the server's control variate c (an estimate of the global gradient) and
the client's own c_i (an estimate of its local gradient):

    y_i <- y_i - eta_l (g_i(y_i) - c_i + c)                                  (Algorithm 1, line 10)
    c_i+ = c_i - c + (x - y_i) / (K eta_l)                                   (line 12, option II)
    send (Delta y_i, Delta c_i) = (y_i - x, c_i+ - c_i); keep c_i <- c_i+    (lines 13-14)
    server: x <- x + eta_g mean_i Delta y_i; c <- c + (|S| / N) mean_i Delta c_i   (lines 16-17)

The correction is stated as a local-objective term: adding <w, c - c_i> to the loss adds exactly
c - c_i to every gradient, so the vectorised trainer applies it to a whole chunk through autograd
(momentum and weight decay then act on the corrected gradient, as they do in FL-bench). The server's
model step is `fedsim.ServerSGD(lr=eta_g)` after any rule; the control-variate step is
`server_control_update`. K is the number of local steps the client actually ran and eta_l its
learning rate that round. c and every c_i start at zero (Algorithm 1's input).

`ScaffoldObjective` is the client side for the engine: c arrives in the round's payload under
"c:<name>" (`server_payload(c)`), c_i lives in the client's state under "c_i:<name>", and each
client returns Delta c_i in its extras under "delta_c:<name>" (`control_deltas(batch)` reads them
back, stacked). `ScaffoldRounds` is FedAvg's round sending c with the model (bytes counted by the
round), counting Delta c_i in each upload, merging the models with any `[aggregator]` rule and then
moving c in `after_merge`; c is in its `STATE`, so checkpoints keep it. eta_g is the server
optimiser's step: `global_lr` is shorthand for `[server_optimizer] name = "sgd", lr = eta_g`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from fedsim import (
    ClientResult,
    LocalSGDConfig,
    Params,
    RunContext,
    ScenarioError,
    ServerRounds,
    ServerSGD,
    SGDTrainer,
    UpdateBatch,
    WeightedMean,
    inner_product,
    num_bytes,
    register_algorithm,
)

SERVER, CLIENT, DELTA = "c:", "c_i:", "delta_c:"


class ScaffoldConfig(LocalSGDConfig):
    """global_lr: eta_g; 1 in the paper's experiments (Section 7)."""

    clients_per_round: int = Field(10, ge=1)
    global_lr: float = Field(1.0, gt=0)


def correction_term(w: Params, c: Params, c_i: Params) -> Tensor:
    """<w, c - c_i> summed over the client's trainable tensors: its gradient is c - c_i, the
    drift correction of Algorithm 1, line 10. Its value is meaningless; only its gradient acts."""
    return inner_product(w, {n: c[n] - c_i[n] for n in w})


def client_control_update(c_i: Params, c: Params, x: Params, y: Params, steps: int, lr: float) -> Params:
    """Option II: c_i+ = c_i - c + (x - y_i) / (K eta_l), reusing the local run instead of an
    extra full-gradient pass (option I). With the correction above, c_i+ is the mean of the raw
    local gradients the client saw during its K steps."""
    scale = 1.0 / (steps * lr)
    return {n: c_i[n] - c[n] + (x[n] - y[n]) * scale for n in c_i}


def server_control_update(c: Params, stacked_deltas: Params, num_clients: int) -> Params:
    """c + (|S| / N) mean_{i in S} Delta c_i = c + (1 / N) sum_{i in S} Delta c_i (line 17): clients
    not sampled keep their c_i, so the server's average over all N moves by the sampled changes."""
    return {n: c[n] + d.sum(0) / num_clients for n, d in stacked_deltas.items()}


def _take(inputs: Params, prefix: str, names: Any) -> Params:
    return {n: inputs[prefix + n] for n in names}


def server_payload(c: Params) -> Params:
    """The round's payload carrying the server variate, keyed apart from the client's state."""
    return {SERVER + n: t for n, t in c.items()}


def control_deltas(batch: UpdateBatch) -> Params:
    """The sampled clients' Delta c_i, stacked along dim 0, from the batch's extras."""
    return {k[len(DELTA):]: v for k, v in batch.extras.items() if k.startswith(DELTA)}


@dataclass(frozen=True)
class ScaffoldObjective:
    """`fedsim.LocalObjective` for SCAFFOLD (option II). Variates cover the floating tensors of the
    model a client starts from; the correction acts on the trainable ones."""

    def loss(self, w: Params, start: Params, inputs: Params) -> Tensor:
        return correction_term(w, _take(inputs, SERVER, w), _take(inputs, CLIENT, w))

    def initial_state(self, start: Params) -> Params:
        return {CLIENT + n: torch.zeros_like(t) for n, t in start.items() if t.is_floating_point()}

    def after(self, start: Params, end: Params, inputs: Params, steps: int, lr: float) -> tuple[Params, dict[str, Any]]:
        names = [k[len(CLIENT):] for k in inputs if k.startswith(CLIENT)]
        old = _take(inputs, CLIENT, names)
        new = client_control_update(old, _take(inputs, SERVER, names), start, end, steps, lr)
        return {CLIENT + n: new[n] for n in names}, {DELTA + n: new[n] - old[n] for n in names}


def upload_bytes(result: ClientResult) -> int:
    """A client sends its model and its Delta c_i (Algorithm 1, line 13)."""
    return num_bytes(result.params) + num_bytes({k: v for k, v in result.extras.items() if k.startswith(DELTA)})


class ScaffoldRounds(ServerRounds):
    """FedAvg's rounds plus the server variate c, sent with the model and moved after each merge."""

    STATE = ServerRounds.STATE + ("c",)

    def __init__(self, cfg: ScaffoldConfig, ctx: RunContext):
        super().__init__(
            ctx, trainer=SGDTrainer.from_config(cfg, objective=ScaffoldObjective()), aggregator=ctx.rule(WeightedMean()),
            clients_per_round=cfg.clients_per_round, upload_bytes=upload_bytes,
            payload=lambda round: server_payload(self.c), after_merge=self.update_control,
        )
        self.c: Params = {n: torch.zeros_like(t) for n, t in ctx.init_params.items() if t.is_floating_point()}
        if "global_lr" in cfg.model_fields_set:  # eta_g is one knob, whichever table sets it
            if ctx.server_optimizer is not None:
                raise ScenarioError("set eta_g in one place: algorithm.global_lr or [server_optimizer] lr",
                                    key="algorithm.global_lr")
            ctx.use_server_optimizer(ServerSGD(lr=cfg.global_lr))

    def update_control(self, batch: UpdateBatch, round: int) -> None:
        self.c = server_control_update(self.c, control_deltas(batch), self.ctx.data.num_clients)


@register_algorithm("scaffold")
def scaffold(cfg: ScaffoldConfig, ctx: RunContext) -> ScaffoldRounds:
    return ScaffoldRounds(cfg, ctx)
