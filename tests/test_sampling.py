"""The hash order that MoDeST's samples and FedAvg's `sampler = "hash"` derive from."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.sampling import hash_order, node_hash, ordered_candidates


def test_hash_order_sorts_nodes_by_their_md5_for_the_round():
    keys = [int.from_bytes(node_hash(i, 4)[:8], "big") for i in range(30)]
    assert hash_order(30, 4).tolist() == sorted(range(30), key=lambda i: keys[i])


def test_a_caller_cannot_corrupt_the_cached_hash_order():
    expected = hash_order(50, 7).copy()
    order = hash_order(50, 7)
    with pytest.raises(ValueError):
        order[0] = order[1]
    with pytest.raises(ValueError):
        order.sort()
    with pytest.raises(ValueError):
        order.flags.writeable = True
    mine = np.array(order)  # a copy is the caller's own to change
    mine[:] = 0
    assert np.array_equal(hash_order(50, 7), expected)
    assert np.array_equal(ordered_candidates(np.ones(50, dtype=bool), 7), expected)
