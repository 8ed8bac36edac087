"""Client-side local training.

A `Trainer` turns (params, a client's data, a job) into new params and metrics. Everything a method
does on the client (momentum, SAM, LoRA-only updates, projections) is an option of its trainer, so
servers and mixing never need to know how the parameters were produced.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from .checkpoint import checkpointable
from .params import Params, from_numpy
from .scenario import AlgorithmConfig


class LocalSGDConfig(AlgorithmConfig):
    """Local training settings shared by every method that trains with minibatch SGD."""

    lr: float = Field(0.05, gt=0)
    lr_decay: float = Field(1.0, gt=0, le=1)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(32, ge=1)
    local_epochs: float = Field(1.0, gt=0)
    local_steps: int | None = Field(None, ge=1)


@checkpointable
@dataclass(frozen=True)
class TrainJob:
    """One client's work in one round.

    `row` selects the client's own model from a stacked parameter set (decentralized methods, where
    every node has its own); None means the shared global model. `steps` overrides the trainer's
    own step count (semi-asynchronous schedulers assign it per client). `inputs` is this client's
    payload besides the model (a method's per-client message); `state` is what the engine keeps
    for the client between its jobs (filled in from the client-state store, never by a flow).
    """

    client_id: int
    round: int
    row: int | None = None
    steps: int | None = None
    inputs: dict[str, Tensor] = field(default_factory=dict)
    state: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class TrainOutput:
    """What a trainer returns: the parameters it shares (or deltas, or nothing), how many local
    steps it took and its mean training loss, and optionally other metrics, `extras` for the
    merge rule (stacked into `UpdateBatch.extras`) and the client's new `state` (kept by the
    engine for the client's next job, never sent)."""

    params: Params
    steps: int
    train_loss: float
    metrics: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    state: Params = field(default_factory=dict)

    @classmethod
    def coerce(cls, value: "TrainOutput | tuple[Params, dict[str, float]]") -> "TrainOutput":
        """Accept the older `(params, metrics)` form, with `steps` and `train_loss` in metrics."""
        if isinstance(value, TrainOutput):
            return value
        params, metrics = value
        metrics = dict(metrics)
        steps, loss = metrics.pop("steps", 0.0), metrics.pop("train_loss", float("nan"))
        return cls(params, int(steps), float(loss), metrics)


@checkpointable
@dataclass
class ClientResult:
    """What reaches the server of a client's job. `extras` carries payloads that are not
    parameters (projected coordinates, for example); `params` may then hold only what the method
    shares, or nothing. `metrics` holds the trainer's other figures and the engine's flags
    (`failed`, `nonfinite`)."""

    client_id: int
    params: Params
    num_examples: int
    metrics: dict[str, float]
    extras: dict[str, Any] = field(default_factory=dict)
    steps: int = 0
    train_loss: float = float("nan")
    state: Params = field(default_factory=dict)


class Trainer(Protocol):
    def train(
        self, model: nn.Module, params: Params, x: np.ndarray, y: np.ndarray, job: TrainJob, rng: np.random.Generator
    ) -> TrainOutput | tuple[Params, dict[str, float]]: ...


class LocalObjective(Protocol):
    """A change to the local loss, stated as a function so that vectorised training can evaluate
    it for every client of a chunk at once (FedProx's proximal term, SCAFFOLD's correction,
    FedDyn's regulariser).

    `loss(w, start, inputs)` is added to each minibatch's loss: `w` the client's trainable
    tensors, `start` the model its job started from, `inputs` the job's inputs (the round's
    payload and the client's own) and the client's state, merged (keys must not collide). It must be pure torch
    (no in-place ops, no data-dependent Python branching): it runs under `torch.func.vmap`.
    `initial_state(start)` gives a client's state before its first job (so that every client of
    a chunk has the same keys). `after(start, end, inputs, steps, lr)` returns the client's new
    state and its extras once it has trained; return `({}, {})` when there is nothing to keep.

    Optional, for methods that need more (both trainers honour them, vectorised or not):
    `personalize(params, inputs)` gives the weights the client starts from when they are not the
    server's (FedPer's own head, FedBN's own batch norm, Ditto's personal model; `start` stays the
    server's model); `shared`, a collection of names, is what the client sends back (default:
    everything; personal tensors then never leave it); `frozen(step)` names the trainable tensors
    not updated at local step `step` (FedRep's head-then-body schedule); and
    `batch_loss(w, start, inputs, x, mask, represent)` is a term of the minibatch `x` (rows where
    `mask` is 0 are padding), with `represent(params, x)` the model's representation layer
    (`fedsim.representation`) evaluated with other weights (MOON's contrastive loss). An
    objective whose terms vanish (it only keeps state, personalises the start or reports extras,
    or its weight is 0) says so with `changes_loss = False`: the trainers then skip its terms and
    may take their fastest path, so that FedProx with mu = 0 trains exactly as FedAvg.
    """

    def loss(self, w: Params, start: Params, inputs: Params) -> Tensor: ...

    def initial_state(self, start: Params) -> Params: ...

    def after(self, start: Params, end: Params, inputs: Params, steps: int, lr: float) -> tuple[Params, dict[str, Any]]: ...


def adds_to_loss(objective: LocalObjective | None) -> bool:
    """Whether a local step must evaluate the objective's terms (see `LocalObjective`)."""
    return objective is not None and bool(getattr(objective, "changes_loss", True))


def objective_inputs(objective: LocalObjective | None, start: Params, job: TrainJob) -> Params:
    """The `inputs` an objective sees for `job`: the job's inputs (the round's payload included)
    and the client's state, or its initial state before its first job."""
    if objective is None:
        return {}
    return {**job.inputs, **(job.state or objective.initial_state(start))}


def start_weights(objective: LocalObjective | None, params: Params, inputs: Params) -> Params:
    """The weights a client trains from: the server's, or its own where the objective says so."""
    hook = getattr(objective, "personalize", None)
    return params if hook is None else hook(params, inputs)


def shared_part(objective: LocalObjective | None, end: Params) -> Params:
    """What a client sends back: the names its objective shares, or everything."""
    names = getattr(objective, "shared", None)
    return end if names is None else {n: end[n] for n in names}


def frozen_at(objective: LocalObjective | None, step: int) -> frozenset[str]:
    """The trainable names not updated at local step `step` (0-based)."""
    hook = getattr(objective, "frozen", None)
    return frozenset(hook(step)) if hook is not None else frozenset()


def representer(model: nn.Module) -> Callable[[Params, Tensor], Tensor]:
    """`represent(params, x)`: the model's representation layer run with `params` (a dict that may
    hold more names than the layer uses; it must hold the layer's)."""
    from .models import representation

    body = representation(model)
    names = list(body.state_dict())
    return lambda params, x: torch.func.functional_call(body, {n: params[n] for n in names}, (x,))


@dataclass(frozen=True)
class SGDTrainer:
    """Minibatch SGD with optional heavy-ball momentum and weight decay (torch.optim.SGD)."""

    lr: float = 0.05
    lr_decay: float = 1.0
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 32
    local_epochs: float = 1.0
    local_steps: int | None = None
    sam_rho: float = 0.0  # > 0: sharpness-aware steps (Foret et al., 2021) with this radius
    objective: LocalObjective | None = None  # a term added to the local loss (FedProx, SCAFFOLD, ...)
    # local DP-SGD (Abadi et al. 2016; [privacy] mode = "local"): per-example gradients clipped to
    # dp_clip, Gaussian noise of std dp_noise * dp_clip added to their sum; None = plain SGD
    dp_clip: float | None = None
    dp_noise: float = 0.0

    @classmethod
    def from_config(cls, cfg: LocalSGDConfig, **changes: Any) -> "SGDTrainer":
        return cls(
            lr=cfg.lr, lr_decay=cfg.lr_decay, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
            batch_size=cfg.batch_size, local_epochs=cfg.local_epochs, local_steps=cfg.local_steps, **changes,
        )

    def num_steps(self, num_examples: int, job: TrainJob | None = None) -> int:
        if job is not None and job.steps is not None:
            return job.steps
        if self.local_steps is not None:
            return self.local_steps
        return max(1, math.ceil(self.local_epochs * math.ceil(num_examples / self.batch_size)))

    def steps_for(self, sizes: np.ndarray) -> np.ndarray:
        """`num_steps` for many clients at once (a million clients in one numpy expression)."""
        if self.local_steps is not None:
            return np.full(len(sizes), self.local_steps, dtype=np.int64)
        batches = np.ceil(np.asarray(sizes) / self.batch_size)
        return np.maximum(1, np.ceil(self.local_epochs * batches)).astype(np.int64)

    def lr_at(self, round: int) -> float:
        return self.lr * self.lr_decay ** (round - 1)

    def train(
        self, model: nn.Module, params: Params, x: np.ndarray, y: np.ndarray, job: TrainJob, rng: np.random.Generator
    ) -> TrainOutput:
        objective = self.objective
        inputs = objective_inputs(objective, params, job)
        load_params(model, start_weights(objective, params, inputs))
        model.train()
        lr = self.lr_at(job.round)
        steps = self.num_steps(len(y), job)
        total = 0.0
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        trainable = list(named.values())
        batch_term = getattr(objective, "batch_loss", None) if adds_to_loss(objective) else None
        represent = representer(model) if batch_term is not None else None

        def loss_fn(xb: Tensor, yb: Tensor) -> Tensor:
            loss = F.cross_entropy(model(xb), yb)
            if adds_to_loss(objective):
                loss = loss + scalar_term(objective, objective.loss(named, params, inputs))
            if batch_term is not None:
                loss = loss + batch_term(named, params, inputs, xb, torch.ones(len(yb)), represent)
            return loss

        buffers: list[Tensor | None] = [None] * len(trainable)
        batches: Any = minibatches(len(y), self.batch_size, steps, rng)
        if self.dp_clip is not None:
            batches = list(batches)  # drawn first, then the noise's seed: as the vectorised path does
            private = PrivateGradient(model, named, self.dp_clip, self.dp_noise, dp_noise_generator(rng))
        for step, idx in enumerate(batches):
            xb, yb = torch.from_numpy(x[idx]), torch.from_numpy(y[idx])
            for p in trainable:
                p.grad = None
            if self.dp_clip is not None:
                loss = private.step(xb, yb)
            else:
                loss = loss_fn(xb, yb)
                loss.backward()
            if self.sam_rho > 0:
                sam_gradient(trainable, lambda: loss_fn(xb, yb), self.sam_rho)
            for name in frozen_at(objective, step):
                named[name].grad = None  # as torch's SGD: no step, no momentum, no decay
            sgd_step(trainable, buffers, lr, self.momentum, self.weight_decay)
            total += float(loss.detach())
        end = get_params(model)
        state, extras = ({}, {})
        if objective is not None:
            state, extras = checked_after(objective, objective.after(params, end, inputs, steps, lr))
        return TrainOutput(shared_part(objective, end), steps, total / steps, extras=extras, state=state)


def scalar_term(objective: Any, term: Any) -> Tensor:
    """A local objective's `loss`, required to be one number: a vector would be summed by some
    paths and refused by others, so it is refused everywhere, naming the objective."""
    if not isinstance(term, Tensor) or term.dim() != 0:
        got = f"a tensor of shape {tuple(term.shape)}" if isinstance(term, Tensor) else f"a {type(term).__name__}"
        raise TypeError(f"{type(objective).__name__}.loss returned {got}; expected a scalar tensor (sum or average it)")
    return term


def checked_after(objective: Any, result: Any) -> tuple[Params, dict[str, Any]]:
    """A local objective's `after`, required to be (state dict, extras dict) when it is returned,
    not found wrong a round later when the state is next read."""
    if not (isinstance(result, tuple) and len(result) == 2 and all(isinstance(r, dict) for r in result)):
        raise TypeError(f"{type(objective).__name__}.after returned {type(result).__name__}; expected a tuple "
                        "(state: dict of tensors, extras: dict)")
    return result


def dp_noise_generator(rng: np.random.Generator) -> torch.Generator:
    """The generator of a client job's DP-SGD noise, seeded from the job's own generator once its
    minibatches are drawn: both training paths draw the same noise, step by step, tensor by
    tensor, from it."""
    return torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))


def dp_noise_draw(shapes: dict[str, torch.Size], dtype: torch.dtype, g: torch.Generator) -> Params:
    """One step's standard normal noise for each trainable tensor, in name order."""
    return {n: torch.randn(shape, generator=g, dtype=dtype) for n, shape in shapes.items()}


class PrivateGradient:
    """One client's DP-SGD steps, one after another: per-example gradients with `torch.func`
    (vmap over the minibatch), clipped, summed, noised and averaged into each parameter's `.grad`
    (`fedsim.privacy.privatize`)."""

    def __init__(self, model: nn.Module, named: dict[str, Tensor], clip: float, noise: float, g: torch.Generator):
        from torch.func import functional_call, grad_and_value, vmap

        self.named, self.clip, self.noise, self.g = named, clip, noise, g
        fixed = {n: t for n, t in model.state_dict().items() if n not in named}

        def one(w: Params, x: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(functional_call(model, {**w, **fixed}, (x.unsqueeze(0),)), y.unsqueeze(0))

        self.per_example = vmap(grad_and_value(one), in_dims=(None, 0, 0))
        self.shapes = {n: p.shape for n, p in named.items()}

    def step(self, xb: Tensor, yb: Tensor) -> Tensor:
        from .privacy import privatize

        w = {n: p.detach() for n, p in self.named.items()}
        grads, losses = self.per_example(w, xb, yb)
        dtype = next(iter(w.values())).dtype
        noisy = privatize(grads, self.clip, self.noise, dp_noise_draw(self.shapes, dtype, self.g))
        for n, p in self.named.items():
            p.grad = noisy[n]
        return losses.mean()


@torch.no_grad()
def sgd_step(params: list[Tensor], buffers: list[Tensor | None], lr: float, momentum: float, weight_decay: float) -> None:
    """One step of torch.optim.SGD (its CPU code path, operation for operation, so the numbers are
    the same) without building an optimizer per client: constructing one costs more than a small
    model's step and, the first time, imports torch._dynamo (seconds of a run's start-up)."""
    for i, p in enumerate(params):
        grad = p.grad
        if grad is None:  # as torch.optim.SGD: a parameter without a gradient is left alone
            continue
        if weight_decay != 0:
            grad = grad.add(p, alpha=weight_decay)
        if momentum != 0:
            buf = buffers[i]
            if buf is None:
                buf = buffers[i] = grad.detach().clone()
            else:
                buf.mul_(momentum).add_(grad, alpha=1)
            grad = buf
        p.add_(grad, alpha=-lr)


def sam_gradient(params: list[torch.Tensor], loss_fn: Callable[[], torch.Tensor], rho: float) -> None:
    """Replace each `p.grad` (the gradient at w) by the gradient at w + rho * g / ||g||.

    The norm is taken over all parameters together and the second gradient uses the same
    minibatch (`loss_fn` re-evaluates it), as in SAM and DFedSAM; the weights are restored before
    the base optimiser steps, so momentum and weight decay apply to the sharpness-aware gradient.
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = rho / (norm + 1e-12)
    with torch.no_grad():
        perturbations = [g * scale for g in grads]
        for p, e in zip(params, perturbations):
            p.add_(e)
    for p in params:
        p.grad = None
    loss_fn().backward()
    with torch.no_grad():
        for p, e in zip(params, perturbations):
            p.sub_(e)


def minibatches(n: int, batch_size: int, steps: int, rng: np.random.Generator):
    """Indices of `steps` minibatches, walking through fresh permutations epoch after epoch."""
    batch_size = min(batch_size, n)
    perm = rng.permutation(n)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = rng.permutation(n), 0
        yield perm[pos : pos + batch_size]
        pos += batch_size


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Compute with exactly n intra-op threads, then restore the caller's setting.

    CPU kernels split reductions by thread count, so the last bits of a result depend on it; fixing
    it is what makes curves identical across executors, worker counts and machines.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_params(model: nn.Module, params: Params) -> None:
    """Copy named tensors into the model in place (missing names keep the model's own values)."""
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name in params:
                tensor.copy_(params[name])


def get_params(model: nn.Module) -> Params:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


@torch.no_grad()
def correct_predictions(model: nn.Module, params: Params, x: np.ndarray, y: np.ndarray, batch_size: int = 2048) -> np.ndarray:
    """1 where `params` classify an example of (x, y) right, else 0 (int64, one per example)."""
    load_params(model, params)
    model.eval()
    hits = [np.zeros(0, dtype=np.int64)]
    for start in range(0, len(y), batch_size):
        batch = from_numpy({"x": np.ascontiguousarray(x[start : start + batch_size]),
                            "y": np.ascontiguousarray(y[start : start + batch_size])})
        hits.append((model(batch["x"]).argmax(1) == batch["y"]).numpy().astype(np.int64))
    return np.concatenate(hits)


EVAL_BATCH = 1024  # fixed, so that the loss sums the same partial sums whatever the thread count
_pool: ThreadPoolExecutor | None = None


def evaluate(model: nn.Module, params: Params, x: np.ndarray, y: np.ndarray, batch_size: int = EVAL_BATCH) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of `params` on (x, y).

    Batches of a fixed size are evaluated on up to two threads (torch ops release the GIL; each
    op runs on its caller's thread under the run's fixed thread count) and their sums added in
    batch order: the numbers do not depend on how many threads there were, and a round's
    evaluation no longer costs a third of a small cohort's training while a core sits idle. The
    loss is logsumexp minus the label's logit, several times faster than cross_entropy's
    log_softmax over a last axis of a few classes on CPU."""
    global _pool
    load_params(model, params)
    model.eval()
    starts = list(range(0, len(y), batch_size))

    def part(start: int) -> tuple[int, float]:
        with torch.no_grad():  # grad mode is per thread
            batch = from_numpy({"x": np.ascontiguousarray(x[start : start + batch_size]),
                                "y": np.ascontiguousarray(y[start : start + batch_size])})
            xb, yb = batch["x"], batch["y"]
            out = model(xb)
            loss = (torch.logsumexp(out, 1) - out.gather(1, yb.unsqueeze(1)).squeeze(1)).sum()
            return int((out.argmax(1) == yb).sum()), float(loss)

    # from the main thread only: off it (an evaluation overlapping training) the other core is busy
    if len(starts) > 1 and (os.cpu_count() or 1) > 1 and threading.current_thread() is threading.main_thread():
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fedsim-eval")
        parts = list(_pool.map(part, starts))
    else:
        parts = [part(s) for s in starts]
    correct = sum(c for c, _ in parts)
    loss = 0.0
    for _, value in parts:
        loss += value
    return correct / len(y), loss / len(y)
