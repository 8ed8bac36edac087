"""Personalised federated learning, engine side: which tensors stay on a client, and how the
per-client accuracies of the models clients would actually use are summarised.

Personalised methods (FedPer, FedRep, FedBN, Ditto) are judged by how well each client's own model
does on that client's held-out data, not by one global model on a pooled test set; the mean hides
the clients left behind, so the tail (10th percentile, worst) is reported beside it; Ditto (Li et
al., ICML 2021) measures fairness by the accuracy of the worst clients in the same spirit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from .params import Params

if TYPE_CHECKING:
    from .coordinator import RunContext
    from .server import ServerRounds


def split_by_prefix(names: Iterable[str], prefixes: Sequence[str]) -> tuple[list[str], list[str]]:
    """(names under one of `prefixes`, the others), each in the given order.

    A prefix names a module: it matches the name itself or names below it at a dot, so "fc" takes
    "fc.weight" but not "fc2.weight", and "3" takes "3.bias" but not "30.bias". A prefix that matches
    nothing is an error naming it: a misspelt head must not silently share everything.
    """
    names = list(names)

    def under(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    for prefix in prefixes:
        if not any(under(n, prefix) for n in names):
            raise ValueError(f"prefix {prefix!r} matches no parameter; names are {', '.join(names)}")
    chosen = [n for n in names if any(under(n, p) for p in prefixes)]
    rest = [n for n in names if n not in set(chosen)]
    return chosen, rest


def summarize_client_accuracy(accuracies: Sequence[float] | np.ndarray | torch.Tensor) -> dict[str, float]:
    """Mean, 10th percentile and worst of per-client accuracies, each client counting once.

    The percentile interpolates linearly between order statistics (numpy's default), so it is
    defined for any number of clients; with 10 clients it lies between the worst and second worst.
    """
    acc = np.asarray(accuracies.detach().cpu() if isinstance(accuracies, torch.Tensor) else accuracies, dtype=np.float64).reshape(-1)
    if acc.size == 0:
        raise ValueError("per-client accuracy: no clients were evaluated")
    if not np.isfinite(acc).all():
        raise ValueError(f"per-client accuracy: non-finite values {acc[~np.isfinite(acc)].tolist()}")
    return {
        "client_accuracy_mean": float(acc.mean()),
        "client_accuracy_p10": float(np.percentile(acc, 10)),
        "client_accuracy_worst": float(acc.min()),
    }


LOCAL = "local:"


@dataclass(frozen=True)
class KeepLocal:
    """`fedsim.LocalObjective` for methods whose clients keep some tensors to themselves: FedPer's
    and FedRep's head, FedBN's batch-norm layers, everything for local-only training.

    A client trains from the server's model with its own `local` tensors put in (their values at
    its last job, kept in its state; the server's values before its first), sends back only the
    `shared` ones, and keeps the rest: personal tensors never leave it, so neither the bytes on the
    wire nor the server's model contain them. With `local_first = k`, the first k local steps
    train only the local tensors and the rest only the shared ones (FedRep's head, then body).
    """

    local: tuple[str, ...]
    shared: tuple[str, ...]
    local_first: int = 0

    def loss(self, w: Params, start: Params, inputs: Params) -> Tensor:
        return torch.zeros(())

    def initial_state(self, start: Params) -> Params:
        return {LOCAL + n: start[n].clone() for n in self.local}

    def personalize(self, params: Params, inputs: Params) -> Params:
        return {**params, **{n: inputs[LOCAL + n] for n in self.local}}

    def frozen(self, step: int) -> tuple[str, ...]:
        if not self.local_first:
            return ()
        return self.shared if step < self.local_first else self.local

    def after(self, start: Params, end: Params, inputs: Params, steps: int, lr: float) -> tuple[Params, dict[str, Any]]:
        return {LOCAL + n: end[n] for n in self.local}, {}

    def model_for(self, params: Params, state: Params) -> Params:
        """The model a client uses: the server's with its own local tensors (state = {}: none yet)."""
        return self.personalize(params, state or self.initial_state(params))


def keep_local_rounds(ctx: "RunContext", cfg: Any, local: Sequence[str], *, local_first: int = 0, merge: bool = True) -> "ServerRounds":
    """FedAvg's rounds in which every client keeps the tensors named in `local` (FedPer, FedRep,
    FedBN; all of them: local-only training). The server sends and merges the others only, so the
    bytes counted are theirs, with the scenario's `[aggregator]` rule when `merge`; per-client
    accuracy is of each client's own combination (`KeepLocal.model_for`). With `local_first = k`
    a client takes k steps on its local tensors before its usual steps (`cfg.local_epochs` or
    `cfg.local_steps`) on the shared ones (FedRep)."""
    from .aggregation import WeightedMean
    from .params import num_bytes
    from .server import ServerRounds
    from .training import SGDTrainer

    local = list(local)
    shared = tuple(n for n in ctx.init_params if n not in set(local))
    objective = KeepLocal(tuple(local), shared, local_first)
    trainer = SGDTrainer.from_config(cfg, objective=objective)
    sizes = ctx.data.num_examples()
    flow = ServerRounds(
        ctx, trainer=trainer, aggregator=ctx.rule(WeightedMean()) if merge else WeightedMean(),
        clients_per_round=cfg.clients_per_round,
        download_bytes=lambda params: num_bytes({n: params[n] for n in shared}),
        steps=(lambda client, round: local_first + trainer.num_steps(int(sizes[client]))) if local_first else None,
        client_model=lambda client: objective.model_for(flow.params, ctx.client_states.get(client)),
    )
    return flow
