"""Every random draw comes from a generator derived from (seed, purpose, ids...).

Deriving instead of sharing one stream makes a draw independent of the order in which clients are
processed, of the executor and of the number of workers: that is what makes runs bit-identical.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def purpose_id(purpose: str) -> int:
    return zlib.crc32(purpose.encode())


def generator(seed: int, purpose: str, *ids: int) -> np.random.Generator:
    return np.random.default_rng([seed, purpose_id(purpose), *map(int, ids)])


def torch_generator(seed: int, purpose: str, *ids: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(generator(seed, purpose, *ids).integers(2**63 - 1)))
    return g
