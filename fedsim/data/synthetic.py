"""Synthetic(alpha, beta) of LEAF / FedProx (Li et al., 2020): heterogeneity with two dials.

alpha controls how much the clients' models differ, beta how much their inputs differ. Every
client draws from its own generators seeded by (seed, purpose, k), so any worker can rebuild any
client's data, training or held-out, without generating the others.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import DataError
from ..registry import register_dataset
from .base import DataInfo, DataPool, describes

NUM_FEATURES = 60
NUM_CLASSES = 10

_PARAMS_PURPOSE = 0x5359_4E50  # the client's distribution: u_k, B_k, W_k, b_k, v_k
_TRAIN_PURPOSE = 0x5359_4E54  # its training examples
_TEST_PURPOSE = 0x5359_4E48  # its held-out examples: a separate stream, so never a training copy

# Sigma_jj = j^(-1.2), j = 1..60: later features carry less variance, as in the paper.
_FEATURE_STD = np.arange(1, NUM_FEATURES + 1, dtype=np.float64) ** -0.6


def _client_distribution(
    seed: int, k: int, alpha: float, beta: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw client k's (W_k, b_k, v_k); alpha and beta are variances, hence the square roots."""
    rng = np.random.default_rng([seed, _PARAMS_PURPOSE, k])
    u = rng.normal(0.0, np.sqrt(alpha))
    big_b = rng.normal(0.0, np.sqrt(beta))
    w = rng.normal(u, 1.0, size=(NUM_FEATURES, NUM_CLASSES))
    b = rng.normal(u, 1.0, size=NUM_CLASSES)
    v = rng.normal(big_b, 1.0, size=NUM_FEATURES)
    return w, b, v


def synthetic_client(
    seed: int, k: int, n: int, alpha: float, beta: float, *, held_out: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Client k's n examples (float32 (n, 60), int64 (n,)), rebuilt from (seed, k) alone.

    `held_out=True` draws from the same client distribution with a separate stream, giving
    test examples that are not copies of training ones.
    """
    w, b, v = _client_distribution(seed, k, alpha, beta)
    purpose = _TEST_PURPOSE if held_out else _TRAIN_PURPOSE
    rng = np.random.default_rng([seed, purpose, k])
    x = (v + _FEATURE_STD * rng.standard_normal((n, NUM_FEATURES))).astype(np.float32)
    # Label the float32 features a model will see, so rounding cannot flip a label.
    y = np.argmax(x.astype(np.float64) @ w + b, axis=1)
    return x, y.astype(np.int64)


def held_out_test(
    seed: int, num_clients: int, test_size: int, alpha: float, beta: float
) -> tuple[np.ndarray, np.ndarray]:
    """Test example i comes from client i mod K, so any prefix covers the clients evenly."""
    x = np.empty((test_size, NUM_FEATURES), dtype=np.float32)
    y = np.empty(test_size, dtype=np.int64)
    for k in range(min(num_clients, test_size)):
        count = test_size // num_clients + (k < test_size % num_clients)
        x[k::num_clients], y[k::num_clients] = synthetic_client(
            seed, k, count, alpha, beta, held_out=True
        )
    return x, y


def _describe(cfg: Any, seed: int) -> DataInfo:
    num_clients = int(cfg.num_clients)
    return DataInfo((NUM_FEATURES,), NUM_CLASSES, num_clients * int(getattr(cfg, "samples_per_client", 200)),
                    int(getattr(cfg, "test_size", 2000)), natural_clients=num_clients, copies=2)


@register_dataset("synthetic")
@describes(_describe)
def load_synthetic(cfg: Any, seed: int) -> DataPool:
    """Exactly `samples_per_client` examples per client, so size skew stays a partition choice."""
    num_clients = int(cfg.num_clients)
    per_client = int(getattr(cfg, "samples_per_client", 200))
    alpha = float(getattr(cfg, "synthetic_alpha", 0.5))
    beta = float(getattr(cfg, "synthetic_beta", 0.5))
    test_size = int(getattr(cfg, "test_size", 2000))
    if num_clients < 1 or per_client < 1 or test_size < 0:
        raise DataError(
            f"synthetic needs num_clients >= 1, samples_per_client >= 1 and test_size >= 0; "
            f"got {num_clients}, {per_client} and {test_size}"
        )
    clients = [synthetic_client(seed, k, per_client, alpha, beta) for k in range(num_clients)]
    x_test, y_test = held_out_test(seed, num_clients, test_size, alpha, beta)
    return DataPool(
        x_train=np.concatenate([x for x, _ in clients]),
        y_train=np.concatenate([y for _, y in clients]),
        x_test=x_test,
        y_test=y_test,
        num_classes=NUM_CLASSES,
        groups=np.repeat(np.arange(num_clients, dtype=np.int64), per_client),
    )
