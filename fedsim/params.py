"""Named parameters and stacked client updates: the currency between clients and servers.

Parameters are `dict[str, Tensor]` like a `state_dict`, never positional lists, so that LoRA and
partial sharing can select tensors by name. A cohort's results are stacked along a leading client
dimension so that an aggregation rule is one vectorised expression over dim 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import warnings
from typing import Any, Mapping

import numpy as np

import torch
from torch import Tensor

Params = dict[str, Tensor]


@dataclass
class UpdateBatch:
    """The results of one cohort of clients, stacked along dim 0.

    `params[name]` has shape `(num_clients, *shape)`. `staleness` counts the global versions that
    passed since each client read its model (0 in synchronous rounds). `extras` carries method
    payloads that are not parameters (projected coordinates, for example).
    """

    params: Params
    num_examples: Tensor
    client_ids: Tensor
    staleness: Tensor
    metrics: list[dict[str, float]] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.client_ids.numel())

    def weights(self) -> Tensor:
        """Example-count weights that sum to one (float64 for an exact sum)."""
        n = self.num_examples.to(torch.float64)
        return n / n.sum()


def stack(items: list[Params]) -> Params:
    """Stack per-client parameter dicts into one dict with a leading client dimension."""
    return {name: torch.stack([p[name] for p in items]) for name in items[0]}


def unstack(stacked: Params, index: int) -> Params:
    return {name: t[index] for name, t in stacked.items()}


def weighted_sum(stacked: Params, weights: Tensor) -> Params:
    """sum_i weights[i] * stacked[name][i] for every tensor, computed in the tensor's own dtype."""
    out = {}
    for name, t in stacked.items():
        if not t.is_floating_point():  # counters such as BatchNorm's num_batches_tracked
            out[name] = t[0].clone()
            continue
        w = weights.to(t.dtype).reshape(-1, *([1] * (t.dim() - 1)))
        out[name] = (w * t).sum(0)
    return out


def clone(params: Mapping[str, Tensor]) -> Params:
    return {name: t.detach().clone() for name, t in params.items()}


def num_bytes(params: Mapping[str, Tensor]) -> int:
    """Bytes a message carrying these tensors puts on the wire."""
    return sum(t.numel() * t.element_size() for t in params.values())


def num_parameters(params: Mapping[str, Tensor]) -> int:
    return sum(t.numel() for t in params.values())


def is_finite(params: Mapping[str, Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in params.values() if t.is_floating_point())


def to_numpy(params: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
    return {name: t.detach().cpu().numpy() for name, t in params.items()}


def from_numpy(arrays: Mapping[str, np.ndarray]) -> Params:
    """Zero-copy tensors over arrays that may be read-only (views into Ray's object store, cached
    data sets). fedsim only reads such tensors, so torch's warning about them is silenced here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return {name: torch.from_numpy(a) for name, a in arrays.items()}
