"""The server-side contract: an aggregation rule maps (global params, a stacked batch) to new params.

Rules follow scikit-learn's constructor rule: `__init__` only stores settings; anything a rule learns
across rounds lives in attributes ending with `_`. Given its inputs a rule is deterministic.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch

from .params import Params, UpdateBatch, stack
from .registry import aggregators
from .training import ClientResult


class Aggregator(Protocol):
    def __call__(self, global_params: Params, batch: UpdateBatch, *, round: int) -> Params: ...


def make_batch(results: Sequence[ClientResult], staleness: Sequence[int] | None = None) -> UpdateBatch:
    """Stack a cohort's results in the order given; `extras[key]` lists each client's payload."""
    n = len(results)
    extra_keys = sorted({k for r in results for k in r.extras})
    return UpdateBatch(
        params=stack([r.params for r in results]) if results[0].params else {},
        num_examples=torch.tensor([r.num_examples for r in results], dtype=torch.int64),
        client_ids=torch.tensor([r.client_id for r in results], dtype=torch.int64),
        staleness=torch.tensor(staleness if staleness is not None else [0] * n, dtype=torch.int64),
        metrics=[dict(r.metrics) for r in results],
        extras={k: [r.extras.get(k) for r in results] for k in extra_keys},
    )


def build_aggregator(name: str, options: dict[str, Any]) -> Aggregator:
    """Instantiate a registered (or `module:Name`) rule with its scenario settings."""
    return aggregators.get(name)(**options)
