"""Gossip learning, with plain or variance-corrected model averaging.

Variance correction is from "Vanishing Variance Problem in Fully Decentralized Neural-Network
Systems" (Tian, Al-Ars, Kitsak, Hofstee; arXiv 2404.04616). Averaging n uncorrelated models
divides each layer's weight variance by about n; nodes that start from independent
initialisations then sit on a plateau until the variance recovers. The fix rescales every
averaged tensor, around its own mean, to the mean variance of the models that went into it.

The protocol follows the authors' simulator (DFL_torch, preset 'GL') on fedsim's virtual clock:
every node trains on minibatches (one per job by default), pushes its model to all its neighbours
after every `push_every` jobs, and when its buffer holds `buffer_factor` x degree received models
it merges them, conservatively mixed with its own model (c = 0.5), and keeps training.

Two conventions for the correction (key `correction`):
- "dfl_torch" (default): the authors' maintained simulator (github twoentartian/DFL_torch,
  py_src/model_variance_correct.py `scale_tensor_to_variance`): every floating tensor with more
  than one entry, weights and biases alike, is scaled by sqrt((target + eps) / (var + eps)) with
  eps = 1e-4 (key `eps`). The eps keeps a constant tensor from dividing by zero, but in wide layers,
  whose variance is ~1/(3 fan_in) at initialisation, it also damps the correction: merging eight
  independent models (c = 0.5), a layer reaches 0.67 of its target variance at fan-in 784 and 0.42
  at 4096. The default because it is the code the authors keep running, and it never divides by
  zero.
- "paper": the paper-era code (github twoentartian/DFL2, bin/simulation/
  simulator_opti_model_update.hpp, the variance-corrected averagers, and `scale_variance`): the
  scale is exactly sqrt(target / var), so the merged layer reaches its target, and only weight
  tensors (at least two dimensions; caffe's blobs[0]) are corrected, biases and other vectors keep
  the average. A tensor with zero variance is left as averaged (it has no spread to rescale).
The paper's variance-corrected model averaging (its Algorithm 3, as a third-party reimplementation
numbers it) states the rescaling without an eps.

Deviation: the simulator keeps each node's SGD momentum across ticks; fedsim's trainer starts a
fresh optimiser per job, so the default momentum here is 0 rather than 0.9.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from fedsim import (
    EventLoop,
    JobPool,
    LocalSGDConfig,
    Mean,
    NodeEvaluator,
    Params,
    RunContext,
    SGDTrainer,
    TopologyError,
    TrainJob,
    UpdateBatch,
    initial_nodes,
    layer_variance,
    num_bytes,
    register_algorithm,
    require_connected,
    require_neighbourhoods,
    rule_min_clients,
    stack,
)

NORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _mergeable(name: str, t: torch.Tensor) -> bool:
    return t.is_floating_point() and not name.endswith(NORM_BUFFERS)


def conservative_average(own: Params, combined: Params, c: float) -> Params:
    """c * own + (1 - c) * combined, `combined` what the merge rule made of the received models
    (their plain mean by default); normalisation buffers keep the node's own values."""
    return {
        name: c * own[name] + (1 - c) * combined[name] if _mergeable(name, own[name]) else own[name]
        for name in own
    }


Correction = Literal["dfl_torch", "paper"]


def variance_corrected_average(
    own: Params, combined: Params, received: Params, c: float, eps: float = 1e-4, correction: Correction = "dfl_torch"
) -> Params:
    """The conservative average, each corrected tensor rescaled around its mean to the received
    models' mean variance ("FollowOthers" in the authors' code). Scalars and normalisation buffers
    are left as averaged; with correction = "paper", so are one-dimensional tensors (biases), and
    the scale has no eps (see the module docstring)."""
    out = conservative_average(own, combined, c)
    for name, a in out.items():
        if not _mergeable(name, a) or a.numel() <= 1:
            continue
        if correction == "paper" and a.dim() < 2:
            continue
        m = received[name].shape[0]
        target = received[name].reshape(m, -1).var(dim=1).mean()
        mu, s2 = a.mean(), a.var()
        if correction == "paper":
            if s2 > 0:
                out[name] = (a - mu) * torch.sqrt(target / s2) + mu
        else:
            out[name] = (a - mu) * torch.sqrt((target + eps) / (s2 + eps)) + mu
    return out


class GossipConfig(LocalSGDConfig):
    needs_topology = True
    local_steps: int | None = Field(1, ge=1)
    lr: float = Field(0.01, gt=0)
    merge: Literal["average", "variance_corrected"] = "average"
    correction: Correction = "dfl_torch"  # which variance correction (merge = "variance_corrected")
    conservative: float = Field(0.5, ge=0, lt=1)
    push_every: int = Field(1, ge=1)
    buffer_factor: float = Field(1.0, gt=0)
    eps: float = Field(1e-4, gt=0)
    init: Literal["shared", "independent"] = "independent"
    eval_nodes: int = Field(16, ge=1)
    round_seconds: float | None = Field(None, gt=0)

    def neighbourhood_size(self, degree: int) -> tuple[int, str]:
        """Models in the merge of a node with `degree` neighbours: it merges once it has received
        ceil(buffer_factor x degree) of them (its own is not in the rule's batch)."""
        return max(1, math.ceil(self.buffer_factor * degree)), f"the models it waits for, buffer_factor x {degree}"


class GossipLearning:
    """Event-driven gossip: jobs finish, models travel and merges happen in simulated-time order."""

    STATE = ("X", "buffers", "jobs_done", "loop", "jobs", "merges")

    def __init__(self, cfg: GossipConfig, ctx: RunContext):
        try:
            require_connected(ctx.graph, "gossip learning")
        except TopologyError as exc:
            raise exc.located(key="topology") from None
        require_neighbourhoods(ctx.graph, *rule_min_clients(ctx.spec.scenario), cfg.neighbourhood_size)
        self.cfg, self.ctx = cfg, ctx
        self.trainer = SGDTrainer.from_config(cfg)
        self.rule = ctx.rule(Mean())
        # A fast neighbour may push twice before a merge. The default mean merges every received
        # model; a scenario's [aggregator] (robust rules tolerate f *senders*) gets one model per
        # sender, its latest, so that no Byzantine sender holds two votes.
        self.votes_per_sender = ctx.spec.scenario.aggregator is not None
        self.jobs = JobPool(ctx.executor(self.trainer))
        self.X = initial_nodes(ctx, cfg.init)
        self.nbytes = num_bytes({k: v[0] for k, v in self.X.items()})
        n = ctx.data.num_clients
        self.neighbours = [np.fromiter(ctx.graph.neighbors(i), dtype=np.int64) for i in range(n)]
        self.buffers: list[list[tuple[int, Params]]] = [[] for _ in range(n)]  # (sender, model)
        self.jobs_done = np.zeros(n, dtype=np.int64)
        self.loop = EventLoop(ctx, {"trained": self._trained, "received": self._received})
        self.evaluator = NodeEvaluator(ctx, cfg.eval_nodes)
        sizes = ctx.data.num_examples()
        self.job_steps = np.array([self.trainer.num_steps(int(s)) for s in sizes])
        job_seconds = self.job_steps * ctx.system.step_time
        self.round_seconds = cfg.round_seconds or float(np.median(job_seconds)) * cfg.push_every
        self.merges = 0
        self.losses: list[float] = []
        self._round = 1
        for i in range(n):
            if ctx.net.alive(i, 0.0, 1):
                self._start(i, 0.0)
            else:
                self.loop.idle[i] = True

    def _node(self, i: int) -> Params:
        return {k: v[i].clone() for k, v in self.X.items()}

    def _start(self, i: int, now: float) -> None:
        k = int(self.jobs_done[i])
        self.jobs.start((i, k), TrainJob(i, k + 1), self._node(i))
        seconds = self.ctx.net.compute(i, int(self.job_steps[i]), job=k)
        self.loop.at(now + seconds, "trained", (i, k))

    def step(self, round: int) -> dict[str, float]:
        self._round = round
        self.losses = []
        self.loop.rejoin(round, self._start)
        horizon = round * self.round_seconds
        self.loop.run(horizon)
        self.ctx.clock.advance_to(horizon)
        return {"train_loss": float(np.mean(self.losses)) if self.losses else float("nan"), "merges": float(self.merges)}

    def _received(self, payload: tuple[int, int, Params], now: float) -> None:
        receiver, sender, params = payload
        if self.ctx.net.alive(receiver, now, self._round):
            self.buffers[receiver].append((sender, params))

    def _trained(self, key: tuple[int, int], now: float) -> None:
        i, k = key
        net = self.ctx.net
        result = self.loop.finish(self.jobs, key, i, now, self._round)
        if result is None:  # went down while training: the job is lost
            return
        if not self.ctx.screen([result], self._round):  # failed or dropped: keep training the old model
            self.jobs_done[i] += 1
            self._start(i, now)
            return
        self.losses.append(result.train_loss)
        for name, t in result.params.items():
            self.X[name][i] = t
        self.jobs_done[i] += 1
        # dead neighbours are skipped (a node knows who answers); lost messages still cost bytes
        up = [int(j) for j in self.neighbours[i] if net.alive(int(j), now, self._round)]
        if self.jobs_done[i] % self.cfg.push_every == 0 and up:
            for j, arrives in net.send(i, up, self.nbytes, at=now, purpose="gossip.push", ids=(i, k)):
                self.loop.at(arrives, "received", (j, i, result.params))
        needed = max(1, math.ceil(self.cfg.buffer_factor * len(up)))
        if self.buffers[i] and len(self.buffers[i]) >= needed:
            self._merge(i)
        self._start(i, now)

    def _merge(self, i: int) -> None:
        buffer = self.buffers[i]
        if self.votes_per_sender:  # a configured rule counts senders: each one's latest model only
            latest = {j: params for j, params in buffer}
            buffer = sorted(latest.items())
        senders = [j for j, _ in buffer]
        received = stack([params for _, params in buffer])
        m = len(senders)
        self.buffers[i] = []
        own = self._node(i)
        batch = UpdateBatch(
            params=received, num_examples=torch.ones(m, dtype=torch.int64), client_ids=torch.tensor(senders),
            staleness=torch.zeros(m, dtype=torch.int64), coefficients=torch.full((m,), 1.0 / m, dtype=torch.float64),
        )
        combined = self.ctx.combine(self.rule, own, batch, round=self._round, where=f"node {i}'s gossip merge")
        if self.cfg.merge == "variance_corrected":
            merged = variance_corrected_average(
                own, combined, received, self.cfg.conservative, self.cfg.eps, self.cfg.correction
            )
        else:
            merged = conservative_average(own, combined, self.cfg.conservative)
        for name, t in merged.items():
            self.X[name][i] = t
        self.merges += 1

    def evaluate(self) -> dict[str, float]:
        return {**self.evaluator(self.X), "weight_variance": layer_variance(self.X, self.evaluator.rows)}


@register_algorithm("gossip")
def gossip(cfg: GossipConfig, ctx: RunContext) -> GossipLearning:
    return GossipLearning(cfg, ctx)
