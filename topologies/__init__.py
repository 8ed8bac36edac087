"""Graphs for decentralized learning and their gossip matrices (`fedsim.topologies`).

Importing this package registers the built-in topology names (ring, torus, complete, star,
erdos_renyi, random_regular, small_world, exponential, hypercube, from_file) with
`fedsim.registry.topologies`, which is how scenarios refer to them.
"""

from __future__ import annotations

from .graphs import (
    build,
    complete,
    erdos_renyi,
    exponential,
    from_file,
    hypercube,
    random_regular,
    ring,
    small_world,
    star,
    time_varying_random,
    torus,
)
from .mixing import MIXING_RULES, mixing_matrix, require_connected, sparse_mixing, spectral_gap

__all__ = [
    "MIXING_RULES",
    "build",
    "complete",
    "erdos_renyi",
    "exponential",
    "from_file",
    "hypercube",
    "mixing_matrix",
    "random_regular",
    "require_connected",
    "ring",
    "small_world",
    "sparse_mixing",
    "spectral_gap",
    "star",
    "time_varying_random",
    "torus",
]
