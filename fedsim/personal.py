"""Personalised federated learning, engine side: which tensors stay on a client, and how the
per-client accuracies of the models clients would actually use are summarised.

Personalised methods (FedPer, FedRep, FedBN, Ditto) are judged by how well each client's own model
does on that client's held-out data, not by one global model on a pooled test set; the mean hides
the clients left behind, so the tail (10th percentile, worst) is reported beside it; Ditto (Li et
al., ICML 2021) measures fairness by the accuracy of the worst clients in the same spirit.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch


def split_by_prefix(names: Iterable[str], prefixes: Sequence[str]) -> tuple[list[str], list[str]]:
    """(names under one of `prefixes`, the others), each in the given order.

    A prefix names a module: it matches the name itself or names below it at a dot, so "fc" takes
    "fc.weight" but not "fc2.weight", and "3" takes "3.bias" but not "30.bias". A prefix that matches
    nothing is an error naming it: a misspelt head must not silently share everything.
    """
    names = list(names)

    def under(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    for prefix in prefixes:
        if not any(under(n, prefix) for n in names):
            raise ValueError(f"prefix {prefix!r} matches no parameter; names are {', '.join(names)}")
    chosen = [n for n in names if any(under(n, p) for p in prefixes)]
    rest = [n for n in names if n not in set(chosen)]
    return chosen, rest


def summarize_client_accuracy(accuracies: Sequence[float] | np.ndarray | torch.Tensor) -> dict[str, float]:
    """Mean, 10th percentile and worst of per-client accuracies, each client counting once.

    The percentile interpolates linearly between order statistics (numpy's default), so it is
    defined for any number of clients; with 10 clients it lies between the worst and second worst.
    """
    acc = np.asarray(accuracies.detach().cpu() if isinstance(accuracies, torch.Tensor) else accuracies, dtype=np.float64).reshape(-1)
    if acc.size == 0:
        raise ValueError("per-client accuracy: no clients were evaluated")
    if not np.isfinite(acc).all():
        raise ValueError(f"per-client accuracy: non-finite values {acc[~np.isfinite(acc)].tolist()}")
    return {
        "client_accuracy_mean": float(acc.mean()),
        "client_accuracy_p10": float(np.percentile(acc, 10)),
        "client_accuracy_worst": float(acc.min()),
    }
