"""Differential privacy: DP-FedAvg at the server, adaptive clipping, local DP-SGD, and the privacy
spent, each a pure function so the engine can call it at the point it belongs.

- DP-FedAvg (McMahan, Ramage, Talwar, Zhang, ICLR 2018, Algorithm 1): every sampled client's update
  is clipped to norm C over all its tensors jointly (`clip_updates`); the server sums the clipped
  updates, divides by the *expected* cohort size qN (the fixed-denominator estimator f~_f, so one
  client's influence is bounded whether sampling is Poisson or fixed-size) and adds Gaussian noise
  of std z C / (qN) (`dp_fedavg_aggregate`). Clients are weighted equally, as in the paper's
  user-level analysis (w_k = 1).
- Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021, Algorithm 1): C follows a
  target quantile of the update norms through a geometric step driven by a noisy count
  (`adaptive_clip_norm`); the update noise is raised so that the two releases together cost what
  a single noise multiplier z would (`update_noise_multiplier`, their Theorem 1).
- Local DP-SGD (Abadi et al., CCS 2016, Algorithm 1): per-example gradients with `torch.func`,
  clipped per example and noised, written without data-dependent control flow so that it runs
  inside `vmap` over examples and, around that, over the clients of a vectorised chunk.
- The accountant is Google's dp-accounting (RDP accountant, Mironov 2017; Mironov, Talwar, Zhang
  2019 for the sampled Gaussian): it needs no torch, and it analyses both Poisson sampling
  (add/remove-one neighbours) and fixed-size sampling without replacement (replace-one).

Every random draw comes from a numpy Generator the caller derives from (seed, purpose, ids), as
everywhere in fedsim; the noise itself is drawn by a torch generator seeded from it.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Literal, Mapping

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from .errors import FedsimError
from .params import Params
from .scenario import Section

Sampling = Literal["poisson", "fixed"]


class PrivacyConfig(Section):
    """Settings of DP-FedAvg (server-side) and local DP-SGD, for a `[privacy]` table.

    `mode = "server"`: DP-FedAvg, user-level privacy against anyone who sees the released models
    (the server is trusted with the clipped updates); `mode = "local"`: DP-SGD inside each
    client's training, example-level privacy of each client's data against everyone else
    (`clip_norm` then bounds per-example gradients; `sampling`, `adaptive` and its keys do not
    apply). Defaults follow the papers: Andrew et al.'s target quantile 0.5, clip learning rate
    0.2 and count noise sigma_b = expected cohort / 20 (when `count_noise_std` is left unset).
    """

    mode: Literal["server", "local"] = "server"
    clip_norm: float = Field(1.0, gt=0)
    noise_multiplier: float = Field(1.0, ge=0)
    sampling: Sampling = "poisson"
    delta: float = Field(1e-5, gt=0, lt=1)
    adaptive: bool = False
    target_quantile: float = Field(0.5, ge=0, le=1)
    clip_lr: float = Field(0.2, gt=0)
    count_noise_std: float | None = Field(None, gt=0)


def _torch_generator(rng: np.random.Generator) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))


def _shrink(factor: Tensor, dtype: torch.dtype) -> Tensor:
    """A clip factor a few units in the last place below min(1, C / norm) where it clips: rounding
    the scaled coordinates can otherwise put the norm a hair above C, and the privacy analysis
    assumes it never is."""
    margin = 8 * torch.finfo(dtype).eps
    return torch.where(factor < 1, factor * (1 - margin), factor)


# ----------------------------------------------------------------------------------------------
# DP-FedAvg


def update_norms(stacked: Mapping[str, Tensor]) -> Tensor:
    """||Delta_k|| over all floating tensors of each client jointly, float64, shape (n,)."""
    n = next(iter(stacked.values())).shape[0]
    total = torch.zeros(n, dtype=torch.float64)
    for t in stacked.values():
        if t.is_floating_point():
            total += t.reshape(n, t[0].numel() if n else 0).to(torch.float64).pow(2).sum(1)  # n = 0: an empty cohort
    return total.sqrt()


def clip_updates(stacked: Mapping[str, Tensor], clip_norm: float) -> tuple[Params, Tensor]:
    """Scale each client's update (dim 0) to norm at most `clip_norm`, all tensors jointly
    (McMahan et al. 2018, Algorithm 1, "flat clipping"). Returns the clipped updates and the norms
    before clipping."""
    norms = update_norms(stacked)
    out = {}
    for name, t in stacked.items():
        if not t.is_floating_point():
            out[name] = t.clone()
            continue
        factor = _shrink(torch.clamp(clip_norm / norms, max=1.0), t.dtype).to(t.dtype)
        out[name] = t * factor.reshape(-1, *([1] * (t.dim() - 1)))
    return out, norms


def gaussian_noise_like(params: Mapping[str, Tensor], std: float, rng: np.random.Generator) -> Params:
    """N(0, std^2) in every coordinate of every floating tensor, drawn from `rng`."""
    g = _torch_generator(rng)
    return {name: std * torch.randn(t.shape, generator=g, dtype=t.dtype) if t.is_floating_point() else torch.zeros_like(t)
            for name, t in params.items()}


def dp_fedavg_aggregate(
    deltas: Mapping[str, Tensor], *, clip_norm: float, noise_multiplier: float, expected_clients: float,
    rng: np.random.Generator,
) -> tuple[Params, Tensor]:
    """The server's noisy average of the cohort's updates (McMahan et al. 2018, Algorithm 1 with
    the estimator f~_f and w_k = 1):

        Delta = sum_k clip(Delta_k, C) / (qN) + N(0, (z C / (qN))^2 I),

    qN = `expected_clients` (the cohort size under fixed-size sampling, q times the population
    under Poisson sampling). Returns the noisy mean update and the unclipped norms (adaptive
    clipping counts them)."""
    if expected_clients <= 0:
        raise ValueError(f"expected_clients must be > 0, got {expected_clients!r}")
    clipped, norms = clip_updates(deltas, clip_norm)
    std = noise_multiplier * clip_norm / expected_clients
    noise = gaussian_noise_like({name: t[0] if len(t) else t.sum(0) for name, t in clipped.items()}, std, rng)  # one row's shape
    out = {}
    for name, t in clipped.items():
        if t.is_floating_point():
            out[name] = t.sum(0) / expected_clients + noise[name]
        else:
            out[name] = t[0].clone() if len(t) else torch.zeros(t.shape[1:], dtype=t.dtype)
    return out, norms


def poisson_sample(num_clients: int, q: float, rng: np.random.Generator) -> np.ndarray:
    """Each client independently with probability q (the sampling the Poisson analysis assumes);
    the cohort size varies from round to round and may be zero."""
    return np.flatnonzero(rng.random(num_clients) < q).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Adaptive clipping


def default_count_noise_std(expected_clients: float) -> float:
    """Andrew et al. 2021, Sec. 3: sigma_b = m / 20 for an expected cohort of m clients."""
    return expected_clients / 20.0


def update_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """Andrew et al. 2021, Theorem 1: releasing the clipped sum with multiplier z_Delta and the
    clipped count (sensitivity 1/2 after centring) with std sigma_b costs as much as one Gaussian
    release with z, when z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2). Needs sigma_b > z / 2."""
    if noise_multiplier == 0:
        return 0.0
    rest = noise_multiplier**-2 - (2 * count_noise_std) ** -2
    if rest <= 0:
        raise ValueError(f"count noise std {count_noise_std} must exceed noise_multiplier / 2 = {noise_multiplier / 2}")
    return rest**-0.5


def adaptive_clip_norm(
    clip_norm: float, norms: Tensor, *, target_quantile: float, lr: float, count_noise_std: float,
    expected_clients: float, rng: np.random.Generator,
) -> float:
    """The next round's clip norm (Andrew et al. 2021, Algorithm 1, geometric update):

        b~ = (sum_k 1[||Delta_k|| <= C] + N(0, sigma_b^2)) / m,    C <- C * exp(-lr * (b~ - gamma)),

    so C grows while fewer than a gamma fraction of the updates fit and shrinks otherwise."""
    count = float((norms <= clip_norm).sum())
    noisy = (count + rng.normal(0.0, count_noise_std)) / expected_clients
    return float(clip_norm * math.exp(-lr * (noisy - target_quantile)))


# ----------------------------------------------------------------------------------------------
# Accounting


def epsilon(
    q: float, noise_multiplier: float, steps: int, delta: float, *, sampling: Sampling = "poisson",
    population: int | None = None,
) -> float:
    """The epsilon spent at `delta` after `steps` rounds of the sampled Gaussian mechanism with
    sampling rate q and noise multiplier sigma, by dp-accounting's RDP accountant.

    sampling = "poisson": each client with probability q (add/remove-one neighbours);
    sampling = "fixed": round(q * population) clients without replacement (replace-one neighbours,
    the relation a fixed-size sample can be analysed under)."""
    return PrivacyAccountant(delta, sampling=sampling, population=population).step(q, noise_multiplier, steps).epsilon()


class PrivacyAccountant:
    """The privacy spent so far by a run whose rounds may change q or sigma (a checkpoint keeps
    the list of (q, sigma, steps) it composed, in plain containers)."""

    def __init__(self, delta: float, *, sampling: Sampling = "poisson", population: int | None = None):
        if sampling not in ("poisson", "fixed"):
            raise ValueError(f"sampling must be 'poisson' or 'fixed', got {sampling!r}")
        if sampling == "fixed" and not population:
            raise ValueError("fixed-size sampling needs the population size")
        self.delta = delta
        self.sampling = sampling
        self.population = population
        self.events: list[tuple[float, float, int]] = []

    def step(self, q: float, noise_multiplier: float, steps: int = 1) -> "PrivacyAccountant":
        if self.events and self.events[-1][:2] == (q, noise_multiplier):
            self.events[-1] = (q, noise_multiplier, self.events[-1][2] + steps)
        else:
            self.events.append((q, noise_multiplier, steps))
        return self

    def epsilon(self) -> float:
        try:
            import dp_accounting
            from dp_accounting.rdp import RdpAccountant
        except ImportError:
            raise FedsimError("privacy accounting needs dp-accounting: pip install 'fedsim[privacy]'") from None

        # the library warns, for each fractional RDP order whose series it drops, on every call
        quiet = logging.getLogger("absl")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            return self._epsilon(dp_accounting, RdpAccountant)
        finally:
            quiet.setLevel(level)

    def _epsilon(self, dp_accounting: Any, RdpAccountant: Any) -> float:
        relation = dp_accounting.NeighboringRelation
        if self.sampling == "poisson":
            accountant = RdpAccountant(neighboring_relation=relation.ADD_OR_REMOVE_ONE)
        else:
            accountant = RdpAccountant(neighboring_relation=relation.REPLACE_ONE)
        for q, sigma, steps in self.events:
            if sigma == 0 and q > 0:
                return math.inf
            gaussian = dp_accounting.GaussianDpEvent(sigma)
            if self.sampling == "poisson":
                event = dp_accounting.PoissonSampledDpEvent(q, gaussian)
            else:
                assert self.population is not None
                event = dp_accounting.SampledWithoutReplacementDpEvent(
                    self.population, int(round(q * self.population)), gaussian)
            accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
        return float(accountant.get_epsilon(self.delta))

    def state_dict(self) -> dict[str, Any]:
        return {"events": [list(e) for e in self.events]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.events = [(float(q), float(s), int(k)) for q, s, k in state["events"]]


# ----------------------------------------------------------------------------------------------
# Local DP-SGD


def per_example_gradients(
    loss_fn: Callable[[Params, Tensor, Tensor], Tensor], params: Params, x: Tensor, y: Tensor,
) -> Params:
    """d loss(params, x_i, y_i) / d params for every example i, stacked (B, *shape):
    `vmap(grad(loss_fn))` over the examples. `loss_fn` sees one example (no batch dimension)."""
    from torch.func import grad, vmap

    return vmap(grad(loss_fn), in_dims=(None, 0, 0))(params, x, y)


def clip_per_example(grads: Mapping[str, Tensor], max_norm: float) -> Params:
    """Scale each example's gradient (dim 0) to norm at most C over all tensors jointly (Abadi et
    al. 2016, Algorithm 1, "clip gradient"); branch-free, so it runs under vmap."""
    n = next(iter(grads.values())).shape[0]
    sq = sum(g.reshape(n, -1).pow(2).sum(1) for g in grads.values())
    first = next(iter(grads.values()))
    factor = _shrink(torch.clamp(max_norm / sq.sqrt(), max=1.0), first.dtype)
    return {name: g * factor.reshape(-1, *([1] * (g.dim() - 1))) for name, g in grads.items()}


def privatize(grads: Mapping[str, Tensor], max_norm: float, noise_multiplier: float, noise: Mapping[str, Tensor]) -> Params:
    """Abadi et al. 2016, Algorithm 1, "add noise": (sum_i clip(g_i) + sigma C xi) / B with
    xi ~ N(0, I) given as `noise` (drawn outside, so vmap over clients stays deterministic and each
    client's noise comes from its own seeded generator)."""
    clipped = clip_per_example(grads, max_norm)
    out = {}
    for name, g in clipped.items():
        out[name] = (g.sum(0) + noise_multiplier * max_norm * noise[name]) / g.shape[0]
    return out


def dp_sgd_gradient(
    loss_fn: Callable[[Params, Tensor, Tensor], Tensor], params: Params, x: Tensor, y: Tensor,
    noise: Mapping[str, Tensor], *, max_norm: float, noise_multiplier: float,
) -> Params:
    """One private minibatch gradient: per-example gradients, clipped, summed, noised, averaged.
    Composable with `torch.func.vmap` over a chunk of clients (params, x, y and noise stacked)."""
    return privatize(per_example_gradients(loss_fn, params, x, y), max_norm, noise_multiplier, noise)


def standard_normal_like(params: Mapping[str, Tensor], rng: np.random.Generator) -> Params:
    """xi ~ N(0, I) shaped like `params`, for `privatize` and `dp_sgd_gradient`."""
    return gaussian_noise_like(params, 1.0, rng)
