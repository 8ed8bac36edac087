"""Federated LoRA fine-tuning: LoRA-FAIR and the FedIT, FFA-LoRA and FlexLoRA baselines.

- LoRA-FAIR: Bian, Wang, Zhang, Xu, "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and
  Initialization Refinement", ICCV 2025, arXiv 2411.14961.
- FedIT: Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning",
  ICASSP 2024, arXiv 2305.05644 (average A and B separately).
- FFA-LoRA: Sun, Li, Ding, Liu, "Improving LoRA in Privacy-preserving Federated Learning",
  ICLR 2024, arXiv 2403.12313 (A frozen at its random initialisation; only B trains and travels).
- FlexLoRA: Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks
  and Client Resources", NeurIPS 2024, arXiv 2402.11505 (SVD of the averaged product back to rank r).

Averaging A and B separately gives B_avg A_avg, not the ideal sum_k p_k B_k A_k (server-side
aggregation bias); SVD re-factorisation fixes the product but moves the clients' starting point
(initialisation lag). LoRA-FAIR keeps A_avg and adds a small residual dB to B_avg so that
(B_avg + dB) A_avg points the way the ideal update does, with lambda ||dB|| keeping the restart
close to the plain average.

Readings of the paper that no official code could confirm (none was available):
- the dissimilarity is 1 - cos(vec(dW*), vec((B_avg + dB) A_avg)) and the norm is Frobenius;
- the solver is proximal gradient descent from dB = 0 (the Frobenius penalty is not differentiable
  at 0; its proximal step is an exact group shrinkage, which also makes dB exactly 0 when the
  average is already ideal). The step is `server_lr * s^2` with s = ||B A||_F / ||A||_2, the scale
  at which B lives, so one setting works whatever the magnitude of the adapters; the paper gives
  neither the step size nor the number of steps (defaults here: 0.5 and 50);
- FlexLoRA's split of the truncated SVD U S V^T into B = U sqrt(S), A = sqrt(S) V^T (balanced);
- every layer's weights p_k are proportional to the clients' example counts.

Parameters other than adapters that a model leaves trainable (a fresh classification head) are
averaged FedAvg-style by every rule here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from fedsim import (
    LORA_A,
    LORA_B,
    LocalSGDConfig,
    Params,
    RunContext,
    ScenarioError,
    ServerRounds,
    SGDTrainer,
    TrainJob,
    UpdateBatch,
    adapter_pairs,
    bytes_of,
    is_adapter,
    num_bytes,
    register_aggregator,
    register_algorithm,
    trainable_names,
)

# ---------------------------------------------------------------------------------------------
# client side


@dataclass(frozen=True)
class LoRATrainer:
    """Local SGD on the trainable tensors only, returning only those: the message a client sends.

    `freeze_A` is FFA-LoRA: A stays at the shared random initialisation, so it need not travel.
    """

    sgd: SGDTrainer = field(default_factory=SGDTrainer)
    freeze_A: bool = False

    def train(
        self, model: nn.Module, params: Params, x: np.ndarray, y: np.ndarray, job: TrainJob, rng: np.random.Generator
    ) -> tuple[Params, dict[str, float]]:
        self._freeze(model)
        out = self.sgd.train(model, params, x, y, job, rng)
        out.params = {name: out.params[name] for name in trainable_names(model)}
        return out

    def vectorized(self, model: nn.Module) -> tuple[SGDTrainer, list[str]]:
        """fedsim's vectorised cohorts run the same SGD on the trainable tensors and return these."""
        self._freeze(model)
        return self.sgd, trainable_names(model)

    def _freeze(self, model: nn.Module) -> None:
        if self.freeze_A:
            for name, p in model.named_parameters():
                if name.endswith(LORA_A):
                    p.requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# server side


def _cos(a: Tensor, b: Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return float("nan")
    return float((a * b).sum()) / (na * nb)


def fair_residual(ideal: Tensor, b_avg: Tensor, a_avg: Tensor, lam: float, steps: int = 50, lr: float = 0.5) -> Tensor:
    """dB minimising 1 - cos(vec(ideal), vec((b_avg + dB) a_avg)) + lam * ||dB||_F, from dB = 0.

    Proximal gradient descent: a gradient step on the cosine term, then the exact proximal step of
    the Frobenius penalty (shrink the whole matrix towards 0 by step * lam, to exactly 0 if it is
    shorter). Returns zeros when the average already points exactly along the ideal update.

    Everything runs in B's (out x r) space: with X = b_avg + dB, <ideal, X A> = <ideal A^T, X> and
    ||X A||^2 = <X (A A^T), X>, so a step costs O(out * r^2) instead of O(out * in * r).
    """
    d_b = torch.zeros_like(b_avg)
    n_ideal = float(ideal.norm())
    if n_ideal == 0.0 or steps == 0:
        return d_b
    e = (ideal @ a_avg.T) / n_ideal  # <unit ideal, X A> = <e, X>
    gram = a_avg @ a_avg.T

    def cosine(x: Tensor) -> tuple[float, float, Tensor]:
        xg = x @ gram
        sq = float((xg * x).sum())
        n_m = math.sqrt(sq) if sq > 0 else 0.0
        return (float((e * x).sum()) / n_m if n_m > 0 else float("nan")), n_m, xg

    c0, n_m0, _ = cosine(b_avg)
    if not math.isfinite(c0) or c0 >= 1.0 - 1e-12:
        return d_b
    a_sq = float(torch.linalg.eigvalsh(gram)[-1])  # ||A||_2^2
    if a_sq <= 0.0:
        return d_b
    step = lr * n_m0 * n_m0 / a_sq  # lr * s^2, s = ||B A|| / ||A||_2: the magnitude B lives at
    # Keep the best iterate: the objective at dB = 0 bounds it, so the returned residual never
    # gives a lower cosine than the plain average, whatever the step size does.
    best, best_obj = d_b, 1.0 - c0
    c, n_m, xg = c0, n_m0, b_avg @ gram
    for _ in range(steps):
        grad = -(e / n_m - (c / (n_m * n_m)) * xg)  # d(1 - cos)/dX
        x = d_b - step * grad
        n_x = float(x.norm())
        shrink = max(0.0, 1.0 - step * lam / n_x) if n_x > 0 else 0.0
        d_b = x * shrink
        c, n_m, xg = cosine(b_avg + d_b)
        if not math.isfinite(c):
            break
        obj = 1.0 - c + lam * float(d_b.norm())
        if obj < best_obj:
            best, best_obj = d_b, obj
    return best


def truncated_product_svd(a: Tensor, b: Tensor, w: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The rank-r truncated SVD of sum_k w_k B_k A_k, split as (sqrt(S) V^T, U sqrt(S)).

    The sum has rank at most K r, so it is factored through QR of the stacked factors and an SVD
    of a (K r x K r) core, instead of an SVD of the full (out x in) matrix.
    """
    n, r, inp = a.shape
    out = b.shape[1]
    if n * r >= min(out, inp):
        u, s, vh = torch.linalg.svd(torch.einsum("k,kor,kri->oi", w, b, a), full_matrices=False)
    else:
        stacked_b = (w[:, None, None] * b).permute(1, 0, 2).reshape(out, n * r)
        stacked_a = a.reshape(n * r, inp)
        q1, r1 = torch.linalg.qr(stacked_b)
        q2, r2 = torch.linalg.qr(stacked_a.T)
        uc, s, vch = torch.linalg.svd(r1 @ r2.T)
        u, vh = q1 @ uc, vch @ q2.T
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]


class _LoRARule:
    """Weighted means for plain tensors, a per-layer `_combine` for each (A, B) pair.

    Records the round's fidelity in `stats_` (attributes ending in `_` are learnt state):
    `ideal_cos` (cosine between the product clients restart from and sum_k p_k B_k A_k, mean over
    layers), `avg_cos` (the same for the plain average B_avg A_avg, i.e. FedIT's), `delta_b_norm`
    (||dB||_F over all layers) and `b_cos` (cosine between the new B and B_avg).
    """

    def _combine(
        self, a: Tensor, b: Tensor, w: Tensor, ideal: Tensor, a_avg: Tensor, b_avg: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(A, B) the clients restart from; a, b stacked over clients, in float64."""
        raise NotImplementedError

    def __call__(self, global_params: Params, batch: UpdateBatch, *, round: int) -> Params:
        w = batch.weights()
        out = dict(global_params)
        pairs = [p for p in adapter_pairs(batch.params) if p + LORA_B in batch.params]
        done: set[str] = set()
        cos_new, cos_avg, b_cos, db_sq = [], [], [], 0.0
        for prefix in pairs:
            a_name, b_name = prefix + LORA_A, prefix + LORA_B
            b = batch.params[b_name].to(torch.float64)
            if a_name in batch.params:
                a = batch.params[a_name].to(torch.float64)
            else:  # A frozen (FFA-LoRA): every client holds the global one
                a = global_params[a_name].to(torch.float64).expand(len(batch), *global_params[a_name].shape)
            ideal = torch.einsum("k,kor,kri->oi", w, b, a)
            a_avg = torch.einsum("k,kri->ri", w, a)
            b_avg = torch.einsum("k,kor->or", w, b)
            if bool(torch.isfinite(ideal).all()):
                a_new, b_new = self._combine(a, b, w, ideal, a_avg, b_avg)
            else:  # a diverged client: propagate it as FedAvg would, rather than crash in an SVD
                a_new, b_new = a_avg, b_avg
            cos_new.append(_cos(ideal, b_new @ a_new))
            cos_avg.append(_cos(ideal, b_avg @ a_avg))
            b_cos.append(_cos(b_new, b_avg))
            if a_name in batch.params:
                out[a_name] = a_new.to(batch.params[a_name].dtype)
                done.add(a_name)
            out[b_name] = b_new.to(batch.params[b_name].dtype)
            done.add(b_name)
            db_sq += float((b_new - b_avg).norm() ** 2) if a_new is a_avg else 0.0
        for name, t in batch.params.items():
            if name in done:
                continue
            if not t.is_floating_point():
                out[name] = t[0].clone()
                continue
            out[name] = (w.to(t.dtype).reshape(-1, *([1] * (t.dim() - 1))) * t).sum(0)
        self.stats_ = {
            "ideal_cos": _nanmean(cos_new),
            "avg_cos": _nanmean(cos_avg),
            "delta_b_norm": math.sqrt(db_sq),
            "b_cos": _nanmean(b_cos),
        } if pairs else {}
        return out


def _nanmean(xs: list[float]) -> float:
    vals = [x for x in xs if not math.isnan(x)]
    return sum(vals) / len(vals) if vals else float("nan")


@register_aggregator("fedit")
class FedIT(_LoRARule):
    """A_avg and B_avg, each the example-weighted mean of the clients' factors."""

    def _combine(self, a, b, w, ideal, a_avg, b_avg):  # type: ignore[override]
        return a_avg, b_avg


@register_aggregator("ffa_lora")
class FFALoRA(FedIT):
    """With A frozen and shared, the mean of B gives exactly the mean product: no bias to fix."""


@register_aggregator("flexlora")
class FlexLoRA(_LoRARule):
    """The rank-r truncated SVD of sum_k p_k B_k A_k, split evenly between B and A."""

    def _combine(self, a, b, w, ideal, a_avg, b_avg):  # type: ignore[override]
        return truncated_product_svd(a, b, w, a.shape[1])


@register_aggregator("lora_fair")
class LoRAFair(_LoRARule):
    """A_avg and B_avg + dB, dB from `fair_residual` (see the module docstring for the reading)."""

    def __init__(self, lam: float = 0.01, steps: int = 50, lr: float = 0.5):
        self.lam = lam
        self.steps = steps
        self.lr = lr

    def _combine(self, a, b, w, ideal, a_avg, b_avg):  # type: ignore[override]
        return a_avg, b_avg + fair_residual(ideal, b_avg, a_avg, self.lam, self.steps, self.lr)


class LoRAConfig(LocalSGDConfig):
    clients_per_round: int = Field(10, ge=1)


class FlexLoRAConfig(LoRAConfig):
    accepts_aggregator = False  # the SVD of the averaged product is the method


class LoRAFairConfig(LoRAConfig):
    accepts_aggregator = False  # the residual correction is the method
    lam: float = Field(0.01, ge=0)  # weight of ||dB||_F
    server_steps: int = Field(50, ge=0)  # proximal gradient steps per layer and round
    server_lr: float = Field(0.5, gt=0)  # step, in units of the adapter's own scale


def shared_names(model: nn.Module, *, freeze_A: bool = False) -> list[str]:
    """What a client trains and sends; refuses a model without adapters (set [model] rank)."""
    names = trainable_names(model)
    if freeze_A:
        names = [n for n in names if not n.endswith(LORA_A)]
    if not any(is_adapter(n) for n in names):
        raise ScenarioError(
            "this method fine-tunes LoRA adapters, but the model has none: set a rank > 0 in [model] "
            "(e.g. name = \"pretrained_mlp\", rank = 8)",
            key="model.rank",
        )
    return names


def lora_rounds(
    cfg: LoRAConfig, ctx: RunContext, rule: Callable, *, freeze_A: bool = False, replaceable: bool = True,
) -> ServerRounds:
    """Server rounds over the adapters. Where the method's server step is the method (FlexLoRA's
    SVD, LoRA-FAIR's correction), `replaceable = False` keeps it, and `[aggregator]` is refused."""
    names = shared_names(ctx.model, freeze_A=freeze_A)
    return ServerRounds(
        ctx,
        trainer=LoRATrainer(SGDTrainer.from_config(cfg), freeze_A=freeze_A),
        aggregator=ctx.rule(rule) if replaceable else rule,
        clients_per_round=cfg.clients_per_round,
        download_bytes=lambda params: bytes_of(params, names),
        upload_bytes=lambda result: num_bytes(result.params),
    )


@register_algorithm("fedit")
def fedit(cfg: LoRAConfig, ctx: RunContext) -> ServerRounds:
    return lora_rounds(cfg, ctx, FedIT())


@register_algorithm("ffa_lora")
def ffa_lora(cfg: LoRAConfig, ctx: RunContext) -> ServerRounds:
    return lora_rounds(cfg, ctx, FFALoRA(), freeze_A=True)


@register_algorithm("flexlora")
def flexlora(cfg: FlexLoRAConfig, ctx: RunContext) -> ServerRounds:
    return lora_rounds(cfg, ctx, FlexLoRA(), replaceable=False)


@register_algorithm("lora_fair")
def lora_fair(cfg: LoRAFairConfig, ctx: RunContext) -> ServerRounds:
    return lora_rounds(cfg, ctx, LoRAFair(lam=cfg.lam, steps=cfg.server_steps, lr=cfg.server_lr), replaceable=False)
