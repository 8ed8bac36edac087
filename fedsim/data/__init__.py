"""Data sets, partitions and the client-sorted layout that workers share.

Importing this package imports every built-in loader so that its `@register_dataset` decorator
runs; the registry relies on that to find 'synthetic', 'fashion_mnist', 'mnist_5k',
'shakespeare' and 'folder'.
"""

from __future__ import annotations

from . import fashion_mnist, folder, shakespeare, synthetic  # noqa: F401  (registration side effect)
from .base import DataPool, FederatedData, build_federated_data, federate
from .fashion_mnist import read_idx
from .synthetic import synthetic_client

__all__ = [
    "DataPool",
    "FederatedData",
    "build_federated_data",
    "federate",
    "read_idx",
    "synthetic_client",
]
