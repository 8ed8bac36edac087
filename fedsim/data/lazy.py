"""Synthetic federations too large to materialise: each client's data is generated when asked.

LEAF's Synthetic draws client k from its own generator (seed, k), so any worker can rebuild any
client without the data ever being shipped: a million clients cost nothing until sampled. Only
the held-out test set is materialised. Used automatically when a natural Synthetic federation
would hold more than `LAZY_THRESHOLD` training examples, or with `[data] lazy = true`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from ..errors import DataError
from .synthetic import NUM_CLASSES, held_out_test, synthetic_client

LAZY_THRESHOLD = 5_000_000
CACHE_CLIENTS = 1024  # recently generated clients kept, so a round's cohort is generated once


@dataclass(frozen=True, eq=False)
class LazySyntheticData:
    """The `FederatedData` interface over clients generated on demand (with a small cache)."""

    seed: int
    num_clients: int
    per_client: int
    alpha: float
    beta: float
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int = NUM_CLASSES
    _cache: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.x_test.shape[1:])

    def client(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= cid < self.num_clients:
            raise IndexError(f"client {cid} out of range [0, {self.num_clients})")
        if cid not in self._cache:
            if len(self._cache) >= CACHE_CLIENTS:  # keep the most recent clients only
                self._cache.pop(next(iter(self._cache)))
            self._cache[cid] = synthetic_client(self.seed, cid, self.per_client, self.alpha, self.beta)
        return self._cache[cid]

    def num_examples(self) -> np.ndarray:
        return self._sizes

    @cached_property
    def _sizes(self) -> np.ndarray:
        return np.full(self.num_clients, self.per_client, dtype=np.int64)

    def __reduce__(self) -> tuple[Any, ...]:
        """Ship the recipe, not the cache, to Ray actors."""
        return (LazySyntheticData, (self.seed, self.num_clients, self.per_client, self.alpha, self.beta, self.x_test, self.y_test))


def lazy_synthetic(cfg: Any, seed: int) -> LazySyntheticData:
    if cfg.partition not in ("natural", "auto"):
        raise DataError("a lazily generated Synthetic federation only supports partition = \"natural\"")
    x_test, y_test = held_out_test(seed, cfg.num_clients, cfg.test_size, cfg.synthetic_alpha, cfg.synthetic_beta)
    return LazySyntheticData(seed, cfg.num_clients, cfg.samples_per_client, cfg.synthetic_alpha, cfg.synthetic_beta, x_test, y_test)


def wants_lazy(cfg: Any) -> bool:
    lazy = getattr(cfg, "lazy", None)
    if lazy is not None:
        return bool(lazy)
    return cfg.dataset == "synthetic" and cfg.num_clients * cfg.samples_per_client > LAZY_THRESHOLD
