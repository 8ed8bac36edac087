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
    """What one merge point hands its rule: a cohort's tensors stacked along dim 0.

    `params[name]` has shape `(num_clients, *shape)`: client models (`relative = False`: server
    rounds, graph neighbourhoods, gossip and MoDeST merges) or client updates
    Delta = w_start - w_end (`relative = True`: FedAsync, FedBuff and FedCompass, whose clients
    trained from different global versions). A rule returns a tensor of the same kind; a rule that
    needs a centre takes `center(global_params)`. `staleness` counts the global versions that
    passed since each client read its model (0 in synchronous rounds). `coefficients`, when the
    merge point sets them, are the weights a plain weighted sum would use (mixing weights on
    graphs; event-driven servers fold the staleness discount in, so they need not sum to one);
    otherwise the weights are the clients' example counts. `extras` carries what a trainer
    returned besides parameters, stacked when they are tensors.
    """

    params: Params
    num_examples: Tensor
    client_ids: Tensor
    staleness: Tensor
    metrics: list[dict[str, float]] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    coefficients: Tensor | None = None
    relative: bool = False

    def __len__(self) -> int:
        return int(self.client_ids.numel())

    def weights(self) -> Tensor:
        """The merge point's coefficients, or example-count weights that sum to one (float64)."""
        if self.coefficients is not None:
            return self.coefficients.to(torch.float64)
        n = self.num_examples.to(torch.float64)
        return n / n.sum()

    def center(self, global_params: Params) -> Params:
        """The point the stacked tensors are spread around when all clients agree: the global
        model for models, zero for updates."""
        if not self.relative:
            return global_params
        return {k: torch.zeros_like(v[0]) for k, v in self.params.items()}


def stack(items: list[Params]) -> Params:
    """Stack per-client parameter dicts into one dict with a leading client dimension."""
    return {name: torch.stack([p[name] for p in items]) for name in items[0]}


def identity(params: Mapping[str, Tensor]) -> tuple[int, ...]:
    """Which tensors a parameter dict holds, as a hashable key: two dicts with the same key are the
    same model (a version's dict copied per job shares its tensors), whatever the dicts' own ids.
    Valid while both dicts are alive, as ids are."""
    return tuple(id(t) for t in params.values())


def unstack(stacked: Params, index: int) -> Params:
    return {name: t[index] for name, t in stacked.items()}


def weighted_sum(stacked: Params, weights: Tensor) -> Params:
    """sum_i weights[i] * stacked[name][i] for every tensor, computed in the tensor's own dtype."""
    out = {}
    for name, t in stacked.items():
        if not t.is_floating_point():  # counters such as BatchNorm's num_batches_tracked
            out[name] = t[0].clone()
            continue
        # a matrix-vector product: no (clients x size) temporary, a fraction of the time
        out[name] = (weights.to(t.dtype) @ t.reshape(len(t), -1)).reshape(t.shape[1:])
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


def inner_product(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """sum over a's names of <a[name], b[name]>, a scalar tensor.

    Local objectives (SCAFFOLD's correction, FedDyn's linear term) are inner products over a
    client's trainable tensors; iterating over `a`'s names lets `b` carry more (buffers, frozen
    weights). Out-of-place and without data-dependent branches, so it runs under `torch.func.vmap`.
    """
    return sum((a[n] * b[n]).sum() for n in a)


def squared_distance(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """||a - b||^2 over a's names, a scalar tensor (FedProx's and Ditto's proximal terms)."""
    return sum(((a[n] - b[n]) ** 2).sum() for n in a)
