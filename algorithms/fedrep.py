"""FedRep (Collins, Hassani, Mokhtari, Shakkottai; "Exploiting Shared Representations for
Personalized Federated Learning", ICML 2021) and FedPer (Arivazhagan et al. 2019): a shared body
(the representation) and a personal head.

The model's parameters split by name into a head, which never leaves the client, and a body, which
the server averages (any `[aggregator]` rule). FedPer trains both together at every local step;
FedRep (Algorithm 1) first trains the head for tau_h steps with the body frozen, then the body for
tau_phi steps with the head frozen, so the body learns from heads already fitted to each client.
The official code (lgcollins/FedRep) spends local_ep - local_rep_ep epochs on the head, then
local_rep_ep (1 by default) on the body. By default the head is
the model's last linear layer, the paper's choice.

Registered as `fedper` and `fedrep`, on `fedsim.keep_local_rounds`: the head lives in the client's
state, only the body is downloaded, uploaded and merged, and per-client accuracy is of the shared
body with the client's own head. FedRep's client takes `head_steps` steps on the head, then its
usual local steps (`local_epochs` or `local_steps`) on the body.
"""

from __future__ import annotations

from typing import Sequence

from pydantic import Field
from torch import nn

from fedsim import LocalSGDConfig, RunContext, ScenarioError, ServerRounds, keep_local_rounds, register_algorithm, split_by_prefix


class FedPerConfig(LocalSGDConfig):
    """head: module names of the personal head (default: the last linear layer)."""

    clients_per_round: int = Field(10, ge=1)
    head: list[str] | None = None


class FedRepConfig(FedPerConfig):
    """head_steps: tau_h, local steps on the head before the body's steps."""

    head_steps: int = Field(10, ge=1)


def last_linear(model: nn.Module) -> str:
    """The module name of the model's last `nn.Linear` in definition order: the classifier."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no linear layer to serve as the head; name the head's modules")
    return names[-1]


def head_and_body(model: nn.Module, head: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """(head names, body names) over the model's trainable parameters; `head` lists module
    prefixes (default: the last linear layer). An empty body or head is an error: then nothing, or
    everything, would be personal."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    head_names, body_names = split_by_prefix(names, list(head) if head else [last_linear(model)])
    if not body_names:
        raise ValueError(f"the head {list(head or [])} covers every parameter; nothing would be shared")
    return head_names, body_names


def fedrep_trainable(step: int, head_steps: int, head: Sequence[str], body: Sequence[str]) -> list[str]:
    """The names FedRep trains at local step `step` (0-based): the head for the first `head_steps`
    steps, the body after (Algorithm 1, lines 5-8)."""
    return list(head) if step < head_steps else list(body)


def head_rounds(cfg: FedPerConfig, ctx: RunContext, head_steps: int) -> ServerRounds:
    try:
        head, _ = head_and_body(ctx.model, cfg.head)
    except ValueError as exc:
        raise ScenarioError(str(exc), key="algorithm.head") from None
    return keep_local_rounds(ctx, cfg, head, local_first=head_steps)


@register_algorithm("fedper")
def fedper(cfg: FedPerConfig, ctx: RunContext) -> ServerRounds:
    return head_rounds(cfg, ctx, 0)


@register_algorithm("fedrep")
def fedrep(cfg: FedRepConfig, ctx: RunContext) -> ServerRounds:
    return head_rounds(cfg, ctx, cfg.head_steps)
