"""Vectorised cohorts: many clients' local SGD as one batched computation.

A chunk of clients that share the model architecture trains together: their parameters are stacked
and `torch.func.vmap` runs forward, backward (and SAM's second gradient) for all of them in one
call per local step, instead of one small call per client. Every client keeps its own minibatch
order (drawn from its own generator, exactly as one-after-another training does), its own step
count, learning rate (per-round decay) and momentum buffer. Minibatches are padded to the trainer's
batch size with masked rows, a fixed shape, so a client's numbers do not depend on which clients
share its chunk, and results agree with the sequential trainer to float rounding.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vmap

from .params import Params
from .stacked_linear import LinearStack
from .training import (
    SGDTrainer,
    TrainJob,
    TrainOutput,
    adds_to_loss,
    checked_after,
    dp_noise_draw,
    dp_noise_generator,
    frozen_at,
    minibatches,
    objective_inputs,
    representer,
    scalar_term,
    shared_part,
    start_weights,
)


def plan(model: nn.Module, trainer: object) -> tuple[SGDTrainer, list[str] | None] | None:
    """How to train with `trainer` vectorised: the SGD settings and the names a client returns
    (None: all), or None when it cannot be. Plain SGD (momentum, weight decay, SAM) qualifies; a
    trainer that wraps SGD (LoRA's, which trains and returns the adapters only) says how through a
    `vectorized(model)` method. Models with buffers do not: BatchNorm statistics would need
    per-client buffer updates inside vmap; nor do models that opt out with a class attribute
    `vectorize = False` (recurrent layers, whose fused kernels vmap runs client by client)."""
    if list(model.buffers()) or getattr(model, "vectorize", True) is False:
        return None
    if type(trainer) is SGDTrainer:  # its local objective, if any, is vectorised with it
        return trainer, None
    hook = getattr(trainer, "vectorized", None)
    return hook(model) if hook is not None else None


def supports(model: nn.Module, trainer: object) -> bool:
    return plan(model, trainer) is not None


def train_chunk(
    model: nn.Module,
    trainer: SGDTrainer,
    params: Sequence[Params],
    data: Sequence[tuple[np.ndarray, np.ndarray]],
    jobs: Sequence[TrainJob],
    rngs: Sequence[np.random.Generator],
    device: torch.device | str = "cpu",
    stack: LinearStack | None = None,
) -> list[TrainOutput]:
    """Train a chunk of clients together; on `device` (a GPU when there is one), results on the CPU.

    Minibatches are gathered on the host from each client's own index stream and moved once per
    step; the stacked parameters, momentum and every step's arithmetic stay on the device. With
    `stack` (the model is a plain MLP) gradients come from its hand-written backward pass, else
    from `vmap(grad(...))`. A trainer's local objective is evaluated inside a vmap either way,
    each client with its own start model and inputs.
    """
    k = len(jobs)
    objective = trainer.objective
    inputs = [objective_inputs(objective, p, job) for p, job in zip(params, jobs)]
    begin = [start_weights(objective, p, i) for p, i in zip(params, inputs)]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    stacked = {n: torch.stack([p[n] for p in begin]).detach().to(device, copy=True) for n in params[0]}
    frozen = {n: t for n, t in stacked.items() if n not in trainable}
    weights = {n: t for n, t in stacked.items() if n in trainable}
    steps = [trainer.num_steps(len(y), job) for (x, y), job in zip(data, jobs)]
    batches = [list(minibatches(len(y), trainer.batch_size, s, rng)) for (x, y), s, rng in zip(data, steps, rngs)]
    lrs = [trainer.lr_at(job.round) for job in jobs]
    lr = torch.tensor(lrs, device=device)
    bs = trainer.batch_size
    # the server's model, which objectives pull towards (a personalised start may differ from it)
    start = {n: torch.stack([p[n] for p in params]).to(device, copy=True) for n in params[0]} if objective is not None else {}
    extra = {n: torch.stack([i[n] for i in inputs]).to(device) for n in inputs[0]} if objective is not None else {}
    batch_term = getattr(objective, "batch_loss", None) if adds_to_loss(objective) else None
    represent_with = representer(model) if batch_term is not None else None

    if batch_term is not None:
        stack = None  # a term on the representation needs the model's own forward pass
    private = trainer.dp_clip is not None
    if private:
        if adds_to_loss(objective) or trainer.sam_rho:
            raise ValueError("local DP-SGD trains plain SGD only (no loss term, no SAM)")
        stack = None  # per-example gradients: vmap over examples inside the vmap over clients
        dp_grad = _private_gradients(model, trainer.dp_clip, trainer.dp_noise)
        noise_gens = [dp_noise_generator(r) for r in rngs]  # after the minibatches, as the sequential path
    if stack is not None:
        term = (vmap(grad_and_value(lambda w, w0, given: scalar_term(objective, objective.loss(w, w0, given))))
                if adds_to_loss(objective) else None)

        def grad_fn(
            w: Params, fixed: Params, xb: torch.Tensor, yb: torch.Tensor, mask: torch.Tensor, w0: Params, given: Params,
        ) -> tuple[Params, torch.Tensor]:
            grads, losses = stack.gradients({**w, **fixed}, xb, yb, mask, trainable)
            if term is not None:
                extra_grads, values = term(w, w0, given)
                for n, g in extra_grads.items():
                    grads[n].add_(g)
                losses = losses + values
            return grads, losses
    else:
        def loss_fn(
            w: Params, fixed: Params, xb: torch.Tensor, yb: torch.Tensor, mask: torch.Tensor, w0: Params, given: Params,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            out = functional_call(model, {**w, **fixed}, (xb,))
            per_example = F.cross_entropy(out, yb, reduction="none") * mask
            loss = per_example.sum() / mask.sum()
            if adds_to_loss(objective):
                loss = loss + scalar_term(objective, objective.loss(w, w0, given))
            if batch_term is not None:  # frozen tensors complete any weights the term passes in
                loss = loss + batch_term(w, w0, given, xb, mask, lambda p, x: represent_with({**fixed, **p}, x))
            return loss, loss

        grad_fn = vmap(grad(loss_fn, has_aux=True))
    # every client's minibatch indices, laid out (client, step, slot) into one concatenation of the
    # chunk's data, so that each step gathers all clients' batches with one indexing operation
    x_all = np.concatenate([x for x, _ in data])
    y_all = np.concatenate([y for _, y in data])
    starts = np.cumsum([0] + [len(y) for _, y in data[:-1]])
    index = np.zeros((k, max(steps), bs), dtype=np.int64)
    valid = np.zeros((k, max(steps), bs), dtype=np.float32)
    for c in range(k):
        for s_, idx in enumerate(batches[c]):
            index[c, s_, : len(idx)] = starts[c] + idx
            valid[c, s_, : len(idx)] = 1.0
    valid[:, :, 0] = np.maximum(valid[:, :, 0], 1.0)  # finished clients: a throwaway step, never applied
    momentum: Params = {}
    totals = torch.zeros(k, dtype=torch.float64)
    # decided by the trainer alone, never by the chunk's make-up: a client's bits must not depend
    # on which clients share its chunk
    fused = (stack is not None and not adds_to_loss(objective) and getattr(objective, "frozen", None) is None
             and not trainer.momentum and not trainer.weight_decay and not trainer.sam_rho)
    if fused:
        weights, frozen = stack.moving(weights), stack.moving(frozen)  # type: ignore[union-attr]
    for s in range(max(steps)):
        active_list = [s < n for n in steps]
        everyone = all(active_list)
        active = torch.tensor(active_list, device=device)
        rows = index[:, s]
        xb = torch.from_numpy(x_all[rows])
        yb = torch.from_numpy(y_all[rows])
        mask = torch.from_numpy(valid[:, s])
        xb, yb, mask = xb.to(device), yb.to(device), mask.to(device)
        step_lr = lr if everyone else lr * active.to(lr.dtype)
        if fused:  # plain SGD: the stack moves the weights as it computes the gradients
            _, losses = stack.gradients({**weights, **frozen}, xb, yb, mask, trainable, step=step_lr)  # type: ignore[union-attr]
            totals += torch.where(active, losses.double(), 0.0).cpu()
            continue
        if private:
            noise = _noise_step(weights, noise_gens, [s < n for n in steps])
            grads, losses = dp_grad(weights, frozen, xb, yb, mask, noise)
        else:
            grads, losses = grad_fn(weights, frozen, xb, yb, mask, start, extra)
        if trainer.sam_rho > 0:
            grads = _sam(grad_fn, weights, frozen, grads, xb, yb, mask, trainer.sam_rho, start, extra)
        totals += torch.where(active, losses.detach().double(), 0.0).cpu()
        frozen_now = frozen_at(objective, s)
        for n, w in weights.items():
            if n in frozen_now:  # as torch's SGD with no gradient: no step, no momentum, no decay
                continue
            d = grads[n]  # a fresh tensor or a buffer of the stack's: ours to modify
            if trainer.weight_decay:
                d.add_(w, alpha=trainer.weight_decay)
            if trainer.momentum:
                buf = momentum.get(n)
                if buf is None:
                    buf = d.clone()
                elif everyone:
                    buf.mul_(trainer.momentum).add_(d)
                else:
                    buf = torch.where(_expand(active, d), trainer.momentum * buf + d, buf)
                momentum[n] = buf
                d = buf
            w.addcmul_(d, _expand(step_lr, w), value=-1.0)
    if fused:
        weights, frozen = stack.standard(weights), stack.standard(frozen)  # type: ignore[union-attr]
    final = {n: (weights[n] if n in weights else frozen[n]).cpu() for n in params[0]}
    finite = torch.ones(k, dtype=torch.bool)
    for t in final.values():  # NaN and infinities reach a row's max or min: two reductions, no mask
        if t.is_floating_point():
            rows = t.reshape(k, -1)
            finite &= torch.isfinite(rows.amax(1)) & torch.isfinite(rows.amin(1))
    out = []
    for c in range(k):
        end = {n: t[c] for n, t in final.items()}  # views into one block per tensor
        result = TrainOutput(shared_part(objective, end), steps[c], float(totals[c] / steps[c]))
        if not finite[c]:
            result.metrics["nonfinite"] = 1.0
        if objective is not None:
            result.state, result.extras = checked_after(objective, objective.after(params[c], end, inputs[c], steps[c], lrs[c]))
        out.append(result)
    return out


def _private_gradients(model: nn.Module, clip: float, noise_multiplier: float):
    """DP-SGD's gradient for every client of a chunk (Abadi et al. 2016, Algorithm 1): per-example
    gradients by a vmap over the minibatch, clipped to `clip` each, padded rows masked out, summed,
    plus noise_multiplier * clip * xi, over the batch's real size; a vmap over the clients around
    it. Returns (gradients, mean loss) per client."""
    from .privacy import clip_per_example

    def one(w: Params, fixed: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, {**w, **fixed}, (x.unsqueeze(0),)), y.unsqueeze(0))

    per_example = vmap(grad_and_value(one), in_dims=(None, None, 0, 0))

    def client(w: Params, fixed: Params, xb: torch.Tensor, yb: torch.Tensor, mask: torch.Tensor, xi: Params):
        grads, losses = per_example(w, fixed, xb, yb)
        clipped = clip_per_example(grads, clip)
        count = mask.sum()
        out = {n: ((g * _expand(mask, g)).sum(0) + noise_multiplier * clip * xi[n]) / count for n, g in clipped.items()}
        return out, (losses * mask).sum() / count

    return vmap(client)


def _noise_step(weights: Params, gens: Sequence[torch.Generator], active: Sequence[bool]) -> Params:
    """One step's noise for each client of the chunk, from its own generator; a client past its
    last step draws nothing (its throwaway step is never applied), as in the sequential path."""
    shapes = {n: w.shape[1:] for n, w in weights.items()}
    dtype = next(iter(weights.values())).dtype
    rows = [dp_noise_draw(shapes, dtype, g) if on else {n: torch.zeros(sh, dtype=dtype) for n, sh in shapes.items()}
            for g, on in zip(gens, active)]
    device = next(iter(weights.values())).device
    return {n: torch.stack([r[n] for r in rows]).to(device) for n in shapes}


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-client vector shaped to broadcast against a stacked tensor."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def _sam(grad_fn, weights: Params, frozen: Params, grads: Params, xb, yb, mask, rho: float, w0: Params, given: Params) -> Params:
    """SAM per client: ascend to w + rho g / ||g|| (norm over all of that client's trainable
    tensors), take the gradient there on the same minibatch."""
    norm = torch.sqrt(sum((g.reshape(g.shape[0], -1) ** 2).sum(1) for g in grads.values()))
    scale = rho / (norm + 1e-12)
    perturbed = {n: w + _expand(scale, w) * grads[n] for n, w in weights.items()}
    second, _ = grad_fn(perturbed, frozen, xb, yb, mask, w0, given)
    return second
