"""Data containers shared by every loader, partition scheme and worker.

A loader returns a `DataPool` (one pooled training set); a partition scheme turns it into index
lists; `build_federated_data` reorders the pool so that each client's examples are contiguous.
Contiguity is the point: a client's data is then a zero-copy slice, and the whole federation is a
handful of plain numpy arrays that Ray's object store can share between processes without copying.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import DataError, FedsimError, PluginError

# Constants that separate the random streams drawn from one seed (see `np.random.default_rng`).
PARTITION_PURPOSE = 0x5041_5254  # "PART"
CLIENT_TEST_PURPOSE = 0x4354_5354  # "CTST": which of a client's examples are held out


@dataclass(frozen=True, eq=False)
class DataPool:
    """One data set as a loader returns it, before it is split among clients.

    `groups` holds the natural client of each training example (the writer, the generating
    client, ...) for the 'natural' partition; None when the data set has no such notion.
    Arrays are coerced to float32 features and int64 labels, so a plugin loader may hand over
    any numeric dtype without every consumer having to re-check.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name, dtype in (("x_train", np.float32), ("y_train", np.int64),
                            ("x_test", np.float32), ("y_test", np.int64)):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=dtype))
        if self.groups is not None:
            object.__setattr__(self, "groups", np.asarray(self.groups, dtype=np.int64))
        object.__setattr__(self, "num_classes", int(self.num_classes))
        self._validate()

    def _validate(self) -> None:
        _check_split("training", self.x_train, self.y_train, self.num_classes)
        _check_split("test", self.x_test, self.y_test, self.num_classes)
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(
                f"training features have shape {self.x_train.shape[1:]} but test features "
                f"{self.x_test.shape[1:]}"
            )
        if self.groups is not None and self.groups.shape != self.y_train.shape:
            raise DataError(
                f"{self.groups.shape[0] if self.groups.ndim else 0} group ids for "
                f"{self.y_train.shape[0]} training examples"
            )

    @property
    def num_train(self) -> int:
        return int(self.y_train.shape[0])


def _check_split(which: str, x: np.ndarray, y: np.ndarray, num_classes: int) -> None:
    """Reject a malformed loader result here, not as a shape error deep inside training."""
    if y.ndim != 1 or x.ndim < 1 or x.shape[0] != y.shape[0]:
        raise DataError(
            f"{which} set has {x.shape[0] if x.ndim else 0} examples but "
            f"{y.shape[0] if y.ndim else 0} labels"
        )
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(
            f"{which} labels range over [{y.min()}, {y.max()}] but the data set declares "
            f"{num_classes} classes"
        )


@dataclass(frozen=True, eq=False)
class FederatedData:
    """The training set sorted by client, plus the shared test set.

    Client `k` owns rows `offsets[k]:offsets[k+1]` of `x` and `y`. Keeping one array instead of
    one per client lets Ray put the whole federation into shared memory once and lets any worker
    take any client's data as a view.
    """

    x: np.ndarray
    y: np.ndarray
    offsets: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    # `[data] client_test_fraction`: every client's held-out examples, laid out like x and y
    client_x_test: np.ndarray | None = None
    client_y_test: np.ndarray | None = None
    client_test_offsets: np.ndarray | None = None

    @property
    def num_clients(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x.shape[1:])

    def client(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        """Views, not copies, so a worker never duplicates the federation's memory."""
        if not 0 <= cid < self.num_clients:
            raise IndexError(f"client {cid} out of range [0, {self.num_clients})")
        lo, hi = int(self.offsets[cid]), int(self.offsets[cid + 1])
        return self.x[lo:hi], self.y[lo:hi]

    def num_examples(self) -> np.ndarray:
        """Per-client sizes, the weights of sample-weighted aggregation."""
        return np.diff(self.offsets).astype(np.int64)

    @property
    def has_client_tests(self) -> bool:
        return self.client_test_offsets is not None

    def client_test(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        """Client `cid`'s own held-out examples (views), for per-client evaluation."""
        if self.client_test_offsets is None:
            raise ValueError("no per-client test data: set [data] client_test_fraction")
        lo, hi = int(self.client_test_offsets[cid]), int(self.client_test_offsets[cid + 1])
        return self.client_x_test[lo:hi], self.client_y_test[lo:hi]  # type: ignore[index]


@dataclass(frozen=True)
class DataInfo:
    """What a data set will be for a scenario, found without building it: the sizes the memory
    estimate needs and what `fedsim validate` checks a partition against.

    `natural_clients` is the number of clients the 'natural' partition yields for this scenario
    (None: the data set has no natural clients). `copies` is how many copies of the training
    arrays exist at the peak of loading (a cached decode beside the client-ordered copy, ...).
    """

    input_shape: tuple[int, ...]
    num_classes: int
    num_train: int
    num_test: int
    natural_clients: int | None = None
    copies: int = 2


def describes(describe: Callable[[Any, int], DataInfo]) -> Callable[[Any], Any]:
    """Attach `describe(cfg, seed) -> DataInfo` to a loader. Describing must be cheap (read
    headers, count lines, never decode the data) and must raise the loader's own DataError when
    a file is missing, so that `validate` reports exactly what `run` would."""

    def attach(loader: Any) -> Any:
        loader.describe = describe
        return loader

    return attach


def describe(cfg: Any, seed: int) -> DataInfo | None:
    """The scenario's DataInfo, or None when its loader (a plugin) cannot describe itself."""
    from .. import registry

    loader = registry.datasets.get(cfg.dataset)
    fn = getattr(loader, "describe", None)
    if fn is None:
        return None
    info = fn(cfg, seed)
    if not isinstance(info, DataInfo):
        raise DataError(f"data set '{cfg.dataset}': describe returned {type(info).__name__}, not a DataInfo")
    return info


def federate(pool: DataPool, parts: Sequence[np.ndarray]) -> FederatedData:
    """Reorder the pool's training set so that `parts[k]` becomes client k's contiguous block."""
    parts = [np.asarray(p, dtype=np.int64) for p in parts]
    sizes = np.array([p.shape[0] for p in parts], dtype=np.int64)
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    order = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    # Fancy indexing copies into fresh C-contiguous arrays: plain buffers Ray can share zero-copy.
    return FederatedData(
        x=np.ascontiguousarray(pool.x_train[order]),
        y=np.ascontiguousarray(pool.y_train[order]),
        offsets=offsets,
        x_test=np.ascontiguousarray(pool.x_test),
        y_test=np.ascontiguousarray(pool.y_test),
        num_classes=pool.num_classes,
    )


def build_federated_data(cfg: Any, seed: int) -> FederatedData:
    """Load `cfg.dataset`, split it with `cfg.partition`, and lay clients out contiguously.

    The partition draws from its own stream `(seed, PARTITION_PURPOSE)`, so changing how a loader
    consumes randomness never changes which client gets which example, and vice versa.
    """
    from .. import registry
    from .lazy import lazy_synthetic, wants_lazy
    from .partition import partition

    if wants_lazy(cfg):
        if getattr(cfg, "client_test_fraction", 0.0):
            raise DataError("client_test_fraction needs the federation in memory; set [data] lazy = false")
        return lazy_synthetic(cfg, seed)  # type: ignore[return-value]  (same interface, generated on demand)
    loader = registry.datasets.get(cfg.dataset)
    try:
        pool = loader(cfg, seed)
    except FedsimError:  # a missing or malformed file, said by the loader itself
        raise
    except Exception as exc:  # a plugin's bug: one line naming it
        raise PluginError(f"data set loader '{cfg.dataset}' raised {exc!r}") from exc
    if not isinstance(pool, DataPool):
        raise DataError(
            f"data set loader '{cfg.dataset}' returned {type(pool).__name__}, not a fedsim.DataPool"
        )
    rng = np.random.default_rng([seed, PARTITION_PURPOSE])
    parts = partition(pool, cfg, rng)
    fraction = float(getattr(cfg, "client_test_fraction", 0.0) or 0.0)
    if fraction <= 0:
        return federate(pool, parts)
    train, test = hold_out(parts, fraction, np.random.default_rng([seed, CLIENT_TEST_PURPOSE]))
    data = federate(pool, train)
    order = np.concatenate(test)
    offsets = np.zeros(len(test) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in test], out=offsets[1:])
    return replace(data, client_x_test=np.ascontiguousarray(pool.x_train[order]),
                   client_y_test=np.ascontiguousarray(pool.y_train[order]), client_test_offsets=offsets)


def hold_out(parts: Sequence[np.ndarray], fraction: float, rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split each client's examples at random into (train, test), round(fraction * n) of them held
    out, at least one each way: personalised methods are judged on data like the client's own,
    which the pooled test set is not. The split draws from its own stream, so the partition (which
    examples a client owns) is the same with or without it."""
    train, test = [], []
    for k, part in enumerate(parts):
        n = len(part)
        if n < 2:
            raise DataError(f"client {k} has {n} example(s): client_test_fraction needs at least 2 per client")
        n_test = min(n - 1, max(1, int(round(fraction * n))))
        shuffled = part[rng.permutation(n)]
        test.append(np.sort(shuffled[:n_test]))
        train.append(np.sort(shuffled[n_test:]))
    return train, test
