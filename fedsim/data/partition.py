"""Ways of splitting one pooled training set among clients.

Each scheme returns one int64 index array per client into the pool's training set, and every
example lands in exactly one client (none is dropped: 'shards' makes shard sizes differ by at most
one instead of discarding a remainder; the one exception is 'label_quantity' with fewer clients
than classes, where the classes nobody holds are left out, as in NIID-Bench). The schemes are separate small functions of plain arrays so
that a notebook or a test can call one without building a config.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import DataError, ScenarioError

MAX_DIRICHLET_TRIES = 100
SCHEMES = ("auto", "dirichlet", "dirichlet_sizes", "iid", "label_quantity", "natural", "quantity", "shards")


def resolve(scheme: str, has_groups: bool) -> str:
    """'auto': the data set's own clients when it has them, else Dirichlet label skew, so a data
    set without writers or roles still runs with the default instead of failing on 'natural'."""
    if scheme == "auto":
        return "natural" if has_groups else "dirichlet"
    return scheme


def precheck(cfg: Any, num_train: int, num_classes: int, natural_clients: int | None) -> None:
    """The checks a partition can make from sizes alone, before any data is loaded.

    `partition` runs them first, and `fedsim validate` runs them from the data set's `describe`,
    so both report a split that cannot work with the same line. (Whether a Dirichlet draw leaves
    every client `min_examples` is only known by drawing.)
    """
    num_clients = int(cfg.num_clients)
    scheme = resolve(getattr(cfg, "partition", "iid"), natural_clients is not None)
    base = max(int(getattr(cfg, "min_examples", 2)), 1)
    if num_clients < 1:
        raise DataError(f"need at least one client, got num_clients={num_clients}")
    if num_clients > num_train:
        raise DataError(
            f"more clients ({num_clients}) than training examples ({num_train}); use fewer clients"
        )
    if scheme == "natural":
        if natural_clients is None:
            natural(None, num_clients)  # raises its 'no natural clients' line
        elif natural_clients != num_clients:
            raise DataError(
                f"the data set has {natural_clients} natural clients but num_clients={num_clients}; "
                f"set num_clients to {natural_clients}"
            )
    elif scheme == "shards":
        per = int(getattr(cfg, "shards_per_client", 2))
        if num_clients * per > num_train:
            raise DataError(
                f"{num_clients * per} shards ({num_clients} clients x {per}) but only "
                f"{num_train} examples; use fewer clients or shards_per_client"
            )
    elif scheme in ("quantity", "dirichlet_sizes") and base * num_clients > num_train:
        raise DataError(
            f"{num_clients} clients with at least {base} examples each need {base * num_clients} "
            f"examples, but there are {num_train}; use fewer clients"
        )
    elif scheme == "label_quantity" and int(getattr(cfg, "classes_per_client", 2)) > num_classes:
        raise DataError(
            f"label_quantity needs 1 <= classes_per_client <= {num_classes} (the classes "
            f"present), got {int(getattr(cfg, 'classes_per_client', 2))}"
        )


def partition(pool: Any, cfg: Any, rng: np.random.Generator) -> list[np.ndarray]:
    """Split `pool`'s training set among `cfg.num_clients` clients with scheme `cfg.partition`."""
    num_clients = int(cfg.num_clients)
    n = int(pool.y_train.shape[0])
    scheme = resolve(getattr(cfg, "partition", "iid"), pool.groups is not None)
    min_examples = int(getattr(cfg, "min_examples", 2))
    natural_clients = None if pool.groups is None else int(np.unique(pool.groups).shape[0])
    precheck(cfg, n, int(np.unique(pool.y_train).shape[0]), natural_clients)
    if scheme == "iid":
        parts = iid(n, num_clients, rng)
    elif scheme == "dirichlet":
        parts = dirichlet(pool.y_train, num_clients, float(getattr(cfg, "alpha", 0.5)),
                          min_examples, rng)
    elif scheme == "shards":
        parts = shards(pool.y_train, num_clients, int(getattr(cfg, "shards_per_client", 2)), rng)
    elif scheme == "quantity":
        parts = quantity(n, num_clients, float(getattr(cfg, "quantity_sigma", 1.0)),
                         min_examples, rng)
    elif scheme == "dirichlet_sizes":
        parts = dirichlet_sizes(pool.y_train, num_clients, float(getattr(cfg, "alpha", 0.5)),
                                float(getattr(cfg, "size_alpha", 1.0)), min_examples, rng)
    elif scheme == "label_quantity":
        parts = label_quantity(pool.y_train, num_clients, int(getattr(cfg, "classes_per_client", 2)),
                               int(pool.num_classes), rng)
    elif scheme == "natural":
        parts = natural(pool.groups, num_clients)
    else:
        raise ScenarioError(
            f"unknown partition '{scheme}' (known: {', '.join(SCHEMES)})"
        )
    _check_min_examples(parts, min_examples, scheme)
    return parts


def _check_min_examples(parts: list[np.ndarray], min_examples: int, scheme: str) -> None:
    """A client with (almost) no data breaks batching and weighting, so refuse it up front."""
    smallest = min(p.shape[0] for p in parts)
    if smallest < min_examples:
        raise DataError(
            f"partition '{scheme}' gives a client only {smallest} examples, fewer than "
            f"min_examples={min_examples}; use fewer clients or lower min_examples"
        )


def iid(num_examples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random equal split: the baseline every non-IID result is compared against."""
    return [np.sort(p) for p in np.array_split(rng.permutation(num_examples), num_clients)]


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    min_examples: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Label skew: each class is spread over clients with proportions drawn from Dir(alpha).

    As in NIID-Bench (Li et al., 2022), a client that already holds its fair share N/K gets no
    more of later classes; without that cap a small alpha hands whole classes to a few clients
    and leaves others empty almost every time. Draws are repeated until every client has
    `min_examples`.
    """
    if alpha <= 0:
        raise DataError(f"dirichlet alpha must be positive, got {alpha}")
    labels = np.asarray(labels)
    for _ in range(MAX_DIRICHLET_TRIES):
        parts = _dirichlet_once(labels, num_clients, alpha, rng)
        if min(p.shape[0] for p in parts) >= min_examples:
            return parts
    raise DataError(
        f"dirichlet partition with alpha={alpha} left a client with fewer than "
        f"min_examples={min_examples} examples in {MAX_DIRICHLET_TRIES} draws; "
        f"use a larger alpha or fewer clients"
    )


def _dirichlet_once(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    fair_share = labels.shape[0] / num_clients
    sizes = np.zeros(num_clients, dtype=np.int64)
    chunks: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        share = rng.dirichlet(np.full(num_clients, alpha)) * (sizes < fair_share)
        # Some client is below its fair share while examples remain, so the sum is positive,
        # but a Dirichlet draw can underflow to all zeros on the open clients for tiny alpha.
        total = share.sum()
        share = share / total if total > 0 else (sizes < fair_share) / (sizes < fair_share).sum()
        cuts = (np.cumsum(share)[:-1] * members.shape[0]).astype(np.int64)
        for k, piece in enumerate(np.split(members, cuts)):
            chunks[k].append(piece)
            sizes[k] += piece.shape[0]
    return [np.sort(np.concatenate(ch)) if ch else np.zeros(0, np.int64) for ch in chunks]


def dirichlet_sizes(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    size_alpha: float,
    min_examples: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Skew in both label mix and size: sizes from Dir(size_alpha), each client's label mix from
    Dir(alpha).

    'dirichlet' ties a client's size to how its class draws happen to fall; here the two are
    separate dials, as in FedLab's unbalanced Dirichlet partition (Zeng et al., 2023). Sizes are
    `min_examples` plus a Dir(size_alpha) share of the rest (so they sum exactly to N); clients then
    fill their quota class by class from their own Dir(alpha) mix, and a class that runs out
    hands its share to the classes still available, so every example lands somewhere.
    """
    if alpha <= 0 or size_alpha <= 0:
        raise DataError(f"dirichlet_sizes needs alpha > 0 and size_alpha > 0, got {alpha} and {size_alpha}")
    labels = np.asarray(labels)
    n = labels.shape[0]
    base = max(min_examples, 1)
    if base * num_clients > n:
        raise DataError(
            f"{num_clients} clients with at least {base} examples each need {base * num_clients} "
            f"examples, but there are {n}; use fewer clients"
        )
    sizes = base + _apportion(n - base * num_clients, rng.dirichlet(np.full(num_clients, size_alpha)))
    classes = np.unique(labels)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    used = np.zeros(classes.shape[0], dtype=np.int64)
    total = np.array([p.shape[0] for p in pools], dtype=np.int64)
    mixes = rng.dirichlet(np.full(classes.shape[0], alpha), size=num_clients)
    parts: list[np.ndarray] = [np.zeros(0, np.int64)] * num_clients
    for k in rng.permutation(num_clients):
        need, taken = int(sizes[k]), []
        while need > 0:
            left = total - used
            p = mixes[k] * (left > 0)
            p = p / p.sum() if p.sum() > 0 else left / left.sum()
            want = np.minimum(rng.multinomial(need, p), left)
            for c in np.flatnonzero(want):
                taken.append(pools[c][used[c] : used[c] + want[c]])
                used[c] += want[c]
            need -= int(want.sum())
        parts[k] = np.sort(np.concatenate(taken)).astype(np.int64)
    return parts


def label_quantity(
    labels: np.ndarray,
    num_clients: int,
    classes_per_client: int,
    num_classes: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Label-quantity skew #C=k of NIID-Bench (Li et al., 2022): each client holds k classes.

    Client i always holds class i mod C (so every class is held once there are at least C
    clients) plus k - 1 others drawn at random; each class's examples are then split evenly
    among the clients that hold it.
    """
    present = np.unique(labels)
    if not 1 <= classes_per_client <= present.shape[0]:
        raise DataError(
            f"label_quantity needs 1 <= classes_per_client <= {present.shape[0]} (the classes "
            f"present), got {classes_per_client}"
        )
    labels = np.asarray(labels)
    held: list[list[int]] = []
    for i in range(num_clients):
        mine = [int(present[i % present.shape[0]])]
        others = [int(c) for c in rng.permutation(present) if c != mine[0]]
        held.append(mine + others[: classes_per_client - 1])
    chunks: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in present:
        owners = [i for i, h in enumerate(held) if int(c) in h]
        if not owners:
            continue
        for i, piece in zip(owners, np.array_split(rng.permutation(np.flatnonzero(labels == c)), len(owners))):
            chunks[i].append(piece)
    return [np.sort(np.concatenate(ch)).astype(np.int64) for ch in chunks]


def shards(
    labels: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Pathological label skew of McMahan et al. (2017): few label-sorted shards per client.

    The examples are sorted by label (ties in random order) and cut into
    num_clients * shards_per_client shards whose sizes differ by at most one, so nothing is
    dropped. A shard covers one label when shard boundaries fall on class boundaries (balanced
    classes and a shard size dividing the class size, as in the paper); otherwise a shard may
    straddle two labels.
    """
    if shards_per_client < 1:
        raise DataError(f"shards_per_client must be at least 1, got {shards_per_client}")
    labels = np.asarray(labels)
    num_shards = num_clients * shards_per_client
    if num_shards > labels.shape[0]:
        raise DataError(
            f"{num_shards} shards ({num_clients} clients x {shards_per_client}) but only "
            f"{labels.shape[0]} examples; use fewer clients or shards_per_client"
        )
    shuffled = rng.permutation(labels.shape[0])
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    pieces = np.array_split(by_label, num_shards)
    owner = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in owner]


def quantity(
    num_examples: int,
    num_clients: int,
    sigma: float,
    min_examples: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Quantity skew: IID labels, client sizes proportional to lognormal(0, sigma) draws.

    Every client first gets `min_examples`; the rest is shared in proportion to the draws, with
    rounding leftovers going to the largest fractional parts so the sizes sum exactly to N.
    """
    if sigma < 0:
        raise DataError(f"quantity_sigma must be non-negative, got {sigma}")
    base = max(min_examples, 1)
    if base * num_clients > num_examples:
        raise DataError(
            f"{num_clients} clients with at least {base} examples each need "
            f"{base * num_clients} examples, but there are {num_examples}; use fewer clients"
        )
    weights = rng.lognormal(0.0, sigma, size=num_clients)
    sizes = base + _apportion(num_examples - base * num_clients, weights)
    cuts = np.cumsum(sizes)[:-1]
    return [np.sort(p) for p in np.split(rng.permutation(num_examples), cuts)]


def _apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers proportional to `weights` that sum exactly to `total` (largest remainder)."""
    exact = weights / weights.sum() * total
    sizes = np.floor(exact).astype(np.int64)
    leftover = int(total - sizes.sum())
    if leftover:
        sizes[np.argsort(sizes - exact, kind="stable")[:leftover]] += 1
    return sizes


def natural(groups: np.ndarray | None, num_clients: int) -> list[np.ndarray]:
    """Keep the data set's own clients (writers, generating clients): the realistic split."""
    if groups is None:
        raise DataError(
            "this data set has no natural clients; choose partition auto, iid, dirichlet, "
            "dirichlet_sizes, label_quantity, shards or quantity"
        )
    ids, inverse, counts = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    if ids.shape[0] != num_clients:
        raise DataError(
            f"the data set has {ids.shape[0]} natural clients but num_clients={num_clients}; "
            f"set num_clients to {ids.shape[0]}"
        )
    order = np.argsort(inverse, kind="stable")
    return np.split(order.astype(np.int64), np.cumsum(counts)[:-1])
