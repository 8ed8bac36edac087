"""Conformance checks any aggregation rule can run, like scikit-learn's `check_estimator`.

`check_aggregator(rule)` raises AssertionError naming the first property the rule breaks:
keys, shapes and dtypes kept; the same output for any order of clients; identity when every
client sends the same parameters; finite output; the same output when called twice.

A rule that needs a minimum cohort (Krum: 2f + 3, Bulyan: 4f + 3) says so in a `min_clients`
attribute, and the checks use a batch at least that large.
"""

from __future__ import annotations

import torch

from .aggregation import Aggregator
from .params import Params, UpdateBatch


def example_batch(num_clients: int = 5, seed: int = 0) -> tuple[Params, UpdateBatch]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"layer.weight": (4, 3), "layer.bias": (4,), "head.weight": (2, 4)}
    global_params = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    stacked = {k: torch.randn((num_clients, *s), generator=g) for k, s in shapes.items()}
    batch = UpdateBatch(
        params=stacked,
        num_examples=torch.randint(5, 50, (num_clients,), generator=g),
        client_ids=torch.arange(num_clients),
        staleness=torch.zeros(num_clients, dtype=torch.int64),
        metrics=[{"train_loss": 1.0} for _ in range(num_clients)],
    )
    return global_params, batch


def _permute(batch: UpdateBatch, order: torch.Tensor) -> UpdateBatch:
    return UpdateBatch(
        params={k: v[order] for k, v in batch.params.items()},
        num_examples=batch.num_examples[order],
        client_ids=batch.client_ids[order],
        staleness=batch.staleness[order],
        metrics=[batch.metrics[i] for i in order.tolist()],
        extras=dict(batch.extras),
    )


def check_aggregator(rule: Aggregator, *, atol: float = 1e-6) -> None:
    name = getattr(rule, "__name__", type(rule).__name__)
    global_params, batch = example_batch(max(5, int(getattr(rule, "min_clients", 1))))

    out = rule(global_params, batch, round=1)
    assert set(out) == set(global_params), f"{name}: output keys {sorted(out)} != input keys {sorted(global_params)}"
    for key, value in out.items():
        ref = global_params[key]
        assert value.shape == ref.shape, f"{name}: {key} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}"
        assert value.dtype == ref.dtype, f"{name}: {key} has dtype {value.dtype}, expected {ref.dtype}"
        assert torch.isfinite(value).all(), f"{name}: {key} is not finite"

    again = rule(global_params, batch, round=1)
    for key in out:
        assert torch.equal(out[key], again[key]), f"{name}: two calls on the same input differ ({key})"

    order = torch.arange(len(batch)).roll(1)  # every client moves
    shuffled = rule(global_params, _permute(batch, order), round=1)
    for key in out:
        assert torch.allclose(out[key], shuffled[key], atol=atol), f"{name}: result depends on client order ({key})"

    same = {k: v[:1].expand_as(v).clone() for k, v in batch.params.items()}
    identical = UpdateBatch(same, batch.num_examples, batch.client_ids, batch.staleness, batch.metrics)
    fixed = rule(global_params, identical, round=1)
    for key in out:
        assert torch.allclose(fixed[key], same[key][0], atol=atol), (
            f"{name}: clients that all send the same parameters must get them back ({key})"
        )
