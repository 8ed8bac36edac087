"""How non-IID a federation is: per-client label counts and two summary figures.

Two runs that differ in accuracy are only comparable once one knows how different their clients
were; a partition's name and alpha do not say that (alpha = 0.5 on ten classes and on eighty are
very different federations). The figures are the ones the literature reports: the mean Shannon
entropy of the clients' label distributions (Hsu et al., 2019, in bits; log2(C) is IID-balanced)
and the earth mover's distance between each client's label distribution and the global one (Zhao
et al., 2018: with the 0/1 ground distance of unordered classes it is sum_c |p_k(c) - p(c)|, in
[0, 2]; 0 is IID).
"""

from __future__ import annotations

from typing import Any

import numpy as np

MAX_CLIENTS = 1000  # lazily generated federations: figures over a seeded sample of this many
_SAMPLE_PURPOSE = 0x4845_5445  # "HETE"


def label_counts(data: Any, seed: int = 0, max_clients: int = MAX_CLIENTS) -> tuple[np.ndarray, np.ndarray]:
    """(client ids, int64 counts of shape (clients, classes)).

    A materialised federation (`FederatedData`) is counted whole, from its client-sorted labels;
    one generated on demand is counted over a seeded sample of `max_clients` clients, because
    generating a million clients to count their labels would cost more than the run.
    """
    classes = int(data.num_classes)
    n = int(data.num_clients)
    if hasattr(data, "offsets") and hasattr(data, "y"):
        sizes = np.diff(np.asarray(data.offsets)).astype(np.int64)
        owner = np.repeat(np.arange(n, dtype=np.int64), sizes)
        flat = np.bincount(owner * classes + np.asarray(data.y, dtype=np.int64), minlength=n * classes)
        return np.arange(n, dtype=np.int64), flat.reshape(n, classes)
    ids = np.arange(n, dtype=np.int64)
    if n > max_clients:
        ids = np.sort(np.random.default_rng([seed, _SAMPLE_PURPOSE]).choice(n, max_clients, replace=False))
    counts = np.stack([np.bincount(np.asarray(data.client(int(k))[1]), minlength=classes) for k in ids])
    return ids, counts.astype(np.int64)


def _entropy_bits(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(np.where(p > 0, p, 1.0)), 0.0)
    return terms.sum(axis=-1)


def figures(counts: np.ndarray) -> dict[str, float]:
    """Heterogeneity figures of a (clients, classes) count matrix, as summary.json reports them.

    `label_entropy_global` is the entropy of the pooled distribution: the ceiling a client's
    entropy reaches when it looks like the whole federation. The global distribution is that of
    the counted clients (all of them, or the sample).
    """
    counts = np.asarray(counts, dtype=np.float64)
    sizes = counts.sum(axis=1)
    keep = sizes > 0
    p = counts[keep] / sizes[keep, None]
    pooled = counts.sum(axis=0)
    glob = pooled / pooled.sum()
    emd = np.abs(p - glob).sum(axis=1)
    entropy = _entropy_bits(p)
    return {
        "label_entropy_mean": float(entropy.mean()),
        "label_entropy_global": float(_entropy_bits(glob)),
        "label_emd_mean": float(emd.mean()),
        "label_emd_max": float(emd.max()),
        "label_classes_mean": float((counts[keep] > 0).sum(axis=1).mean()),
    }


def heterogeneity(data: Any, seed: int = 0) -> dict[str, float | int]:
    """`figures` of a federation, with how many clients they were measured over."""
    ids, counts = label_counts(data, seed)
    return {**figures(counts), "label_stats_clients": int(ids.shape[0])}
