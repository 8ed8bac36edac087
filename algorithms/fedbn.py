"""FedBN (Li, Jiang, Zhang, Kamp, Dou; "FedBN: Federated Learning on Non-IID Features via Local
Batch Normalization", ICLR 2021).

Clients whose inputs differ in distribution (feature shift) keep their batch-normalisation layers
local and average everything else (Algorithm 1: the server's average skips BN parameters). That
covers the affine weight and bias *and* the running statistics: the statistics are exactly the
per-client feature distribution FedBN means to keep. Not registered yet: the build function needs
client state and a BatchNorm-capable model from issue 11/12.
"""

from __future__ import annotations

from torch import nn


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
