"""Aggregation rules: how a batch of client tensors combines into one, at every merge point.

Rules follow scikit-learn's constructor rule: `__init__` only stores settings; anything a rule learns
across rounds lives in attributes ending with `_`. Given its inputs a rule is deterministic. How the
server then steps (learning rate, momentum, Adam) is not the rule's business: see `server_step`.
Every merge point of every method (server rounds, event-driven buffers, gossip and graph
neighbourhoods, MoDeST aggregators) calls its rule through `combine`, which checks what came back.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch
from torch import Tensor

from .params import Params, UpdateBatch, stack, weighted_sum
from .errors import PluginError, ScenarioError
from .registry import aggregators
from .training import ClientResult


class Aggregator(Protocol):
    """rule(global_params, batch, *, round) -> combined tensors of the batch's kind. Subclass it
    (or register the rule) so that a scenario may name the class by `module:Name`."""

    def __call__(self, global_params: Params, batch: UpdateBatch, *, round: int) -> Params: ...


class WeightedMean:
    """sum_k w_k x_k with the batch's weights: example counts over the cohort (FedAvg), mixing
    weights on graphs, staleness-discounted coefficients in event-driven servers."""

    def __call__(self, global_params: Params, batch: UpdateBatch, *, round: int) -> Params:
        return weighted_sum(batch.params, batch.weights())


class Mean:
    """The plain mean over the batch (gossip learning's merge of received models)."""

    def __call__(self, global_params: Params, batch: UpdateBatch, *, round: int) -> Params:
        return {k: v.mean(0) if v.is_floating_point() else v[0].clone() for k, v in batch.params.items()}


class ServerOptimizer(Protocol):
    """How the server steps once a rule has combined a batch: from `global_params` towards
    `combined` (FedOpt's pseudo-gradient is combined - global_params). Its state lives in
    attributes ending with `_`, checkpointed like a rule's."""

    def step(self, global_params: Params, combined: Params, *, round: int) -> Params: ...


def make_batch(
    results: Sequence[ClientResult], staleness: Sequence[int] | None = None, *,
    coefficients: Sequence[float] | Tensor | None = None, relative: bool = False,
) -> UpdateBatch:
    """Stack a cohort's results in the order given; tensor extras are stacked, others listed."""
    n = len(results)
    extra_keys = sorted({k for r in results for k in r.extras})
    extras: dict[str, Any] = {}
    for k in extra_keys:
        values = [r.extras.get(k) for r in results]
        if all(isinstance(v, torch.Tensor) for v in values) and len({tuple(v.shape) for v in values}) == 1:
            extras[k] = torch.stack(values)
        else:
            extras[k] = values
    return UpdateBatch(
        params=stack([r.params for r in results]) if results[0].params else {},
        num_examples=torch.tensor([r.num_examples for r in results], dtype=torch.int64),
        client_ids=torch.tensor([r.client_id for r in results], dtype=torch.int64),
        staleness=torch.tensor(staleness if staleness is not None else [0] * n, dtype=torch.int64),
        metrics=[dict(r.metrics) for r in results],
        extras=extras,
        coefficients=None if coefficients is None else torch.as_tensor(coefficients, dtype=torch.float64),
        relative=relative,
    )


def rule_name(rule: Any) -> str:
    return getattr(rule, "__name__", type(rule).__name__)


def combine(rule: Aggregator, global_params: Params, batch: UpdateBatch, *, round: int, where: str) -> Params:
    """Call `rule` and check what it returned, so that a broken rule stops the run with one line
    naming it, the merge point and the round (exit 1) instead of a traceback or a frozen model.

    The result must have every parameter of the batch (it may add keys of `global_params`, as
    rules that return the whole model do), each tensor of the right shape, and finite when its inputs were.
    """
    name = rule_name(rule)
    try:
        out = rule(global_params, batch, round=round)
    except Exception as exc:
        raise PluginError(f"aggregation rule {name} raised {exc!r} at {where} in round {round}") from exc
    if not isinstance(out, dict):
        raise PluginError(f"aggregation rule {name} returned {_a(type(out).__name__)} at {where} in round {round}; "
                          "expected a dict of named tensors")
    shapes = {k: tuple(v.shape) for k, v in global_params.items()}
    shapes.update({k: tuple(v.shape[1:]) for k, v in batch.params.items()})
    dtypes = {k: v.dtype for k, v in global_params.items()}
    dtypes.update({k: v.dtype for k, v in batch.params.items()})
    # every parameter of the batch must come back; payloads that are not parameters (Ferret's
    # coordinates) may be consumed
    missing = sorted((set(batch.params) & set(global_params)) - set(out))
    extra = sorted(set(out) - set(shapes))
    if missing or extra:
        raise PluginError(f"aggregation rule {name} returned other keys at {where} in round {round}: "
                          f"missing {missing}, unexpected {extra}")
    for key, value in out.items():
        want = shapes[key]
        if not isinstance(value, Tensor):
            raise PluginError(f"aggregation rule {name} returned {key} as {_a(type(value).__name__)} at {where} in "
                              f"round {round}; expected a torch tensor of shape {want}")
        if tuple(value.shape) != want:
            raise PluginError(f"aggregation rule {name} returned {key} with shape {tuple(value.shape)} at {where} in "
                              f"round {round}; expected {want}")
        if value.dtype != dtypes[key]:  # another precision would silently change every later message's bytes
            raise PluginError(f"aggregation rule {name} returned {key} as {value.dtype} at {where} in round {round}; "
                              f"expected {dtypes[key]}, as the model holds it")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()) and _finite(batch, global_params):
            raise PluginError(f"aggregation rule {name} returned non-finite values in {key} at {where} in round {round}")
    return out


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _finite(batch: UpdateBatch, global_params: Params) -> bool:
    """Whether the rule's inputs were finite: a non-finite client update is divergence (exit 3,
    reported at the next evaluation), not the rule's fault."""
    tensors = [*batch.params.values(), *global_params.values()]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def build_aggregator(name: str, options: dict[str, Any]) -> Aggregator:
    """Instantiate a registered (or `module:Name`) rule with its scenario settings."""
    factory = aggregators.get(name)
    try:
        rule = factory(**options)
    except Exception as exc:  # the rule's constructor rejected its settings: bad input
        raise ScenarioError(f"rule {rule_name(factory)} rejected its settings: {exc}", key="aggregator") from None
    if not callable(rule):  # registered, but not a rule: found now rather than as a TypeError mid-run
        raise ScenarioError(f"rule {rule_name(factory)} built a {type(rule).__name__}, which cannot be called; "
                            "a rule defines __call__(global_params, batch, *, round)", key="aggregator.name")
    return rule
