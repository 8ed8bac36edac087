"""Client samples every party can compute alone: the order of nodes by a hash of (id, round).

MoDeST derives each round's trainers and aggregators this way, with no coordinator; FedAvg can use
the same order (`sampler = "hash"`) so that the two can be compared on identical samples.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np


def node_hash(node: int, round: int) -> bytes:
    """MD5(node id || "-" || round), as the MoDeST/Plexus sample manager does with peer keys."""
    return hashlib.md5(f"{node}-{round}".encode()).digest()


@lru_cache(maxsize=8)
def _hash_order(num_nodes: int, round: int) -> np.ndarray:
    keys = np.array([int.from_bytes(node_hash(i, round)[:8], "big") for i in range(num_nodes)], dtype=np.uint64)
    order = np.argsort(keys, kind="stable")
    order.flags.writeable = False
    return order


def hash_order(num_nodes: int, round: int) -> np.ndarray:
    """All node ids sorted by their hash for this round.

    Cached, since every node of a round asks for it, so what callers get is a read-only view of
    the cached array: a caller that wrote into it would change the round's sample for every later
    caller. The view cannot be made writeable again (its base is read-only); copy it to modify it.
    """
    return _hash_order(num_nodes, round).view()


def ordered_candidates(candidates: np.ndarray, round: int) -> np.ndarray:
    """The round's hash order restricted to a boolean mask of candidates."""
    order = hash_order(len(candidates), round)
    return order[candidates[order]]
