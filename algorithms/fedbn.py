"""FedBN (Li, Jiang, Zhang, Kamp, Dou; "FedBN: Federated Learning on Non-IID Features via Local
Batch Normalization", ICLR 2021).

Clients whose inputs differ in distribution (feature shift) keep their batch-normalisation layers
local and average everything else (Algorithm 1: the server's average skips BN parameters). That
covers the affine weight and bias *and* the running statistics: the statistics are exactly the
per-client feature distribution FedBN means to keep. Registered as `fedbn`, on
`fedsim.keep_local_rounds`: the batch-norm tensors live in the client's state and never travel;
any `[aggregator]` rule merges the rest. The model needs batch norm (`cnn_bn`, or `mlp` with
`batch_norm = true`); its running statistics are buffers, so clients train one after another.
"""

from __future__ import annotations

from pydantic import Field
from torch import nn

from fedsim import LocalSGDConfig, RunContext, ScenarioError, ServerRounds, keep_local_rounds, register_algorithm


class FedBNConfig(LocalSGDConfig):
    clients_per_round: int = Field(10, ge=1)


def batchnorm_names(model: nn.Module) -> list[str]:
    """Every state-dict name that belongs to a batch-norm module (BatchNorm1d/2d/3d, their lazy and
    synchronised variants): weight, bias, running_mean, running_var and num_batches_tracked, in
    state-dict order. Other normalisations (LayerNorm, GroupNorm) are not FedBN's and are shared."""
    owned = set()
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for name, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                owned.add(f"{prefix}.{name}" if prefix else name)
    return [name for name in model.state_dict() if name in owned]


@register_algorithm("fedbn")
def fedbn(cfg: FedBNConfig, ctx: RunContext) -> ServerRounds:
    local = batchnorm_names(ctx.model)
    if not local:
        raise ScenarioError("FedBN keeps batch-norm layers local and this model has none: use cnn_bn, or mlp with "
                            "batch_norm = true", key="model.name")
    return keep_local_rounds(ctx, cfg, local)
