"""Compressed updates counted to the byte: top-k, random-k, QSGD, scaled sign, error feedback and
CHOCO-SGD's compressed gossip, as pure functions the engine calls where a message is sent.

A compressor maps one client's update (named tensors) and a numpy Generator to the update the
receiver reconstructs and the exact size of the message that carries it. The sizes are those of a
plain wire format, stated per scheme:

- `identity`: every tensor as it is, numel x element size;
- `top_k`: the k largest-magnitude coordinates over all floating tensors jointly (Stich, Cordonnier,
  Jaggi, NeurIPS 2018): k values in their tensors' dtypes plus k indices into the concatenated
  vector, each in the fewest of 1, 2, 4 or 8 bytes that address d coordinates;
- `random_k`: k coordinates drawn uniformly without replacement (same paper): k values plus one
  8-byte seed from which the receiver draws the same indices (shared randomness, no indices sent);
  `unbiased = true` scales them by d / k;
- `qsgd`: s levels per tensor (Alistarh et al., NeurIPS 2017, Sec. 3.1): a float32 norm plus, per
  coordinate, a sign bit and ceil(log2(s + 1)) bits for the level, packed: 4 + ceil(numel (1 +
  ceil(log2(s + 1))) / 8) bytes (fixed-width codes, not the paper's Elias coding, which is smaller
  for small s);
- `sign`: scaled sign (Karimireddy, Rebjock, Stich, Jaggi, ICML 2019, "EF-SignSGD"): per tensor a
  float32 scale ||v||_1 / numel plus one bit per coordinate, 4 + ceil(numel / 8) bytes (a zero
  coordinate is sent as +).

Integer tensors always travel uncompressed. Compressors hold settings only; their randomness comes
from the generator the caller derives from (seed, purpose, client, round).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping, Protocol, Sequence

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from .params import Params
from .scenario import Section


class Compressor(Protocol):
    def __call__(self, update: Mapping[str, Tensor], rng: np.random.Generator) -> tuple[Params, int]: ...


def index_bytes(d: int) -> int:
    """Bytes of one index into d coordinates: the smallest of 1, 2, 4, 8 that addresses them."""
    for width in (1, 2, 4, 8):
        if d <= 256**width:
            return width
    raise ValueError(f"{d} coordinates cannot be indexed in 8 bytes")


def _raw_bytes(update: Mapping[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in update.values() if not t.is_floating_point())


def _floating(update: Mapping[str, Tensor]) -> list[str]:
    return [name for name, t in update.items() if t.is_floating_point()]


def _torch_generator(rng: np.random.Generator) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))


def _count(ratio: float | None, k: int | None, d: int) -> int:
    if k is not None:
        return min(k, d)
    assert ratio is not None
    return min(d, max(1, round(ratio * d)))


def _sparse(update: Mapping[str, Tensor], names: list[str], flat_index: Tensor, values: Tensor) -> Params:
    """Scatter values at positions of the concatenated floating tensors back into named tensors."""
    out = {name: t.clone() for name, t in update.items() if not t.is_floating_point()}
    start = 0
    for name in names:
        t = update[name]
        stop = start + t.numel()
        mask = (flat_index >= start) & (flat_index < stop)
        dense = torch.zeros(t.numel(), dtype=t.dtype)
        dense[flat_index[mask] - start] = values[mask].to(t.dtype)
        out[name] = dense.reshape(t.shape)
        start = stop
    return {name: out[name] for name in update}


def _value_bytes(update: Mapping[str, Tensor], names: list[str], flat_index: Tensor) -> int:
    total, start = 0, 0
    for name in names:
        t = update[name]
        stop = start + t.numel()
        total += int(((flat_index >= start) & (flat_index < stop)).sum()) * t.element_size()
        start = stop
    return total


def _concat(update: Mapping[str, Tensor], names: list[str]) -> Tensor:
    dtype = torch.float32
    for name in names:
        dtype = torch.promote_types(dtype, update[name].dtype)
    if not names:
        return torch.zeros(0, dtype=dtype)
    return torch.cat([update[name].reshape(-1).to(dtype) for name in names])


@dataclass(frozen=True)
class Identity:
    """No compression: the message is the tensors themselves."""

    def __call__(self, update: Mapping[str, Tensor], rng: np.random.Generator) -> tuple[Params, int]:
        return {name: t.clone() for name, t in update.items()}, sum(t.numel() * t.element_size() for t in update.values())


@dataclass(frozen=True)
class TopK:
    """Keep the k = round(ratio * d) (or `k`) largest-magnitude coordinates of the whole update."""

    ratio: float | None = 0.01
    k: int | None = None

    def __call__(self, update: Mapping[str, Tensor], rng: np.random.Generator) -> tuple[Params, int]:
        names = _floating(update)
        flat = _concat(update, names)
        d = flat.numel()
        k = _count(self.ratio, self.k, d)
        index = flat.abs().topk(k, sorted=False).indices if k else torch.zeros(0, dtype=torch.int64)
        nbytes = _value_bytes(update, names, index) + k * index_bytes(max(d, 1)) + _raw_bytes(update)
        return _sparse(update, names, index, flat[index]), nbytes


@dataclass(frozen=True)
class RandomK:
    """Keep k coordinates drawn uniformly without replacement; indices follow from an 8-byte seed
    both ends share. `unbiased` scales the kept values by d / k so that E[C(v)] = v."""

    ratio: float | None = 0.01
    k: int | None = None
    unbiased: bool = False

    def __call__(self, update: Mapping[str, Tensor], rng: np.random.Generator) -> tuple[Params, int]:
        names = _floating(update)
        flat = _concat(update, names)
        d = flat.numel()
        k = _count(self.ratio, self.k, d)
        index = torch.randperm(d, generator=_torch_generator(rng))[:k]
        values = flat[index] * (d / k if self.unbiased and k else 1.0)
        nbytes = _value_bytes(update, names, index) + 8 + _raw_bytes(update)
        return _sparse(update, names, index, values), nbytes


@dataclass(frozen=True)
class QSGD:
    """Stochastic quantisation to s levels per tensor (Alistarh et al. 2017, Sec. 3.1):
    Q_s(v_i) = ||v|| sign(v_i) xi_i, xi_i = l / s or (l + 1) / s with l = floor(s |v_i| / ||v||),
    rounding up with probability s |v_i| / ||v|| - l, so that E[Q_s(v)] = v."""

    levels: int = 16

    def __call__(self, update: Mapping[str, Tensor], rng: np.random.Generator) -> tuple[Params, int]:
        g = _torch_generator(rng)
        bits = 1 + math.ceil(math.log2(self.levels + 1))
        out, nbytes = {}, _raw_bytes(update)
        for name, t in update.items():
            if not t.is_floating_point():
                out[name] = t.clone()
                continue
            norm = t.to(torch.float64).norm().to(torch.float32).to(t.dtype)  # sent as float32
            nbytes += 4 + math.ceil(t.numel() * bits / 8)
            if float(norm) == 0:
                out[name] = torch.zeros_like(t)
                continue
            scaled = t.abs() / norm * self.levels
            low = scaled.floor().clamp(max=self.levels)
            up = torch.rand(t.shape, generator=g, dtype=t.dtype) < (scaled - low)
            level = (low + up.to(t.dtype)).clamp(max=self.levels)
            out[name] = norm * torch.where(t < 0, -1.0, 1.0).to(t.dtype) * level / self.levels
        return out, nbytes


@dataclass(frozen=True)
class ScaledSign:
    """(||v||_1 / d) sign(v) per tensor (Karimireddy et al. 2019, Sec. 3): signSGD with the scale
    that makes it a contraction, meant to run with error feedback."""

    def __call__(self, update: Mapping[str, Tensor], rng: np.random.Generator) -> tuple[Params, int]:
        out, nbytes = {}, _raw_bytes(update)
        for name, t in update.items():
            if not t.is_floating_point():
                out[name] = t.clone()
                continue
            scale = (t.abs().sum() / max(t.numel(), 1)).to(torch.float32).to(t.dtype)  # sent as float32
            out[name] = torch.where(t < 0, -scale, scale)
            nbytes += 4 + math.ceil(t.numel() / 8)
        return out, nbytes


class CompressionConfig(Section):
    """Settings of an upload (or download) compressor, for a `[compression]` table."""

    name: Literal["identity", "top_k", "random_k", "qsgd", "sign"] = "identity"
    ratio: float = Field(0.01, gt=0, le=1)
    unbiased: bool = False
    levels: int = Field(16, ge=1)
    error_feedback: bool = False


def build_compressor(cfg: CompressionConfig) -> Compressor:
    if cfg.name == "top_k":
        return TopK(ratio=cfg.ratio)
    if cfg.name == "random_k":
        return RandomK(ratio=cfg.ratio, unbiased=cfg.unbiased)
    if cfg.name == "qsgd":
        return QSGD(levels=cfg.levels)
    if cfg.name == "sign":
        return ScaledSign()
    return Identity()


def compress_stacked(
    compressor: Compressor, stacked: Mapping[str, Tensor], rngs: Sequence[np.random.Generator],
) -> tuple[Params, list[int]]:
    """Compress each row (client or node) of a stacked update with its own generator; returns the
    stacked reconstructions and each row's message size."""
    n = next(iter(stacked.values())).shape[0]
    if len(rngs) != n:
        raise ValueError(f"{n} rows need {n} generators, got {len(rngs)}")
    rows, sizes = [], []
    for i in range(n):
        out, size = compressor({name: t[i] for name, t in stacked.items()}, rngs[i])
        rows.append(out)
        sizes.append(size)
    return {name: torch.stack([r[name] for r in rows]) for name in stacked}, sizes


def error_feedback(
    compressor: Compressor, update: Mapping[str, Tensor], memory: Mapping[str, Tensor] | None,
    rng: np.random.Generator,
) -> tuple[Params, int, Params]:
    """One step of error feedback (Stich et al. 2018, Algorithm 1; Karimireddy et al. 2019,
    Algorithm 2): e <- e + u; c = C(e); e <- e - c. Returns (c, its size in bytes, the new memory);
    what compression dropped is sent in later rounds instead of being lost. The memory is the
    client's state (None before its first round)."""
    acc = {name: (t + memory[name]) if memory is not None and t.is_floating_point() else t.clone()
           for name, t in update.items()}
    sent, nbytes = compressor(acc, rng)
    left = {name: acc[name] - sent[name] for name in acc if acc[name].is_floating_point()}
    return sent, nbytes, left


def choco_gossip(
    x: Mapping[str, Tensor], x_hat: Mapping[str, Tensor], W: Tensor, gamma: float, compressor: Compressor,
    rngs: Sequence[np.random.Generator],
) -> tuple[Params, Params, list[int]]:
    """CHOCO-Gossip's exchange (Koloskova, Stich, Jaggi, ICML 2019, Algorithm 1, lines 4-8), over
    stacked node models `x` (after their local step, x^(t+1/2)) and the public copies `x_hat`
    every node keeps of itself and its neighbours (all copies of x_hat_j agree, so one stack holds
    them):

        q_i = Q(x_i - x_hat_i)                       each node sends q_i to its neighbours
        x_hat_j <- x_hat_j + q_j                     everyone updates the copies it keeps
        x_i <- x_i + gamma sum_j w_ij (x_hat_j - x_hat_i)

    `W` is the (sparse) mixing matrix. Returns the new models, the new public copies and each
    node's message size (sent once per neighbour). With the identity compressor, gamma = 1 and a
    row-stochastic W this is plain mixing X <- W X."""
    diff = {name: x[name] - x_hat[name] for name in x}
    q, sizes = compress_stacked(compressor, diff, rngs)
    W = W.coalesce() if W.is_sparse else W
    rowsum = torch.sparse.sum(W, dim=1).to_dense() if W.is_sparse else W.sum(1)
    new_x, new_hat = {}, {}
    for name, t in x.items():
        if not t.is_floating_point():
            new_x[name], new_hat[name] = t.clone(), x_hat[name].clone()
            continue
        hat = x_hat[name] + q[name]
        flat = hat.reshape(hat.shape[0], -1)
        Wt = W.to(t.dtype)
        mixed = (torch.sparse.mm(Wt, flat) if W.is_sparse else Wt @ flat).reshape(t.shape)
        r = rowsum.to(t.dtype).reshape(-1, *([1] * (t.dim() - 1)))
        new_x[name] = t + gamma * (mixed - r * hat)
        new_hat[name] = hat
    return new_x, new_hat, sizes
