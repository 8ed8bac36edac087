"""LoRA adapters (Hu et al., ICLR 2022, arXiv 2106.09685) for federated fine-tuning.

A frozen linear layer W0 gets a trainable low-rank correction: y = W0 x + b + (alpha / r) B A x with
A (r x in) drawn at random and B (out x r) zero, so an adapted model starts exactly where the
pretrained one was. Federated LoRA methods train and exchange only the adapter tensors (and any
parameter a model deliberately leaves trainable, such as a fresh classification head), which is
why byte counting here looks at *trainable* tensors, not the whole `state_dict`.

Adapter tensors are plain parameters named `<layer>.lora_A` and `<layer>.lora_B`, so they travel
through fedsim's named `Params` like any other tensor and aggregation rules find a layer's pair by
name alone.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

LORA_A = "lora_A"
LORA_B = "lora_B"


class LoRALinear(nn.Module):
    """An `nn.Linear` with a frozen base and a rank-r adapter beside it (not merged into W0).

    Keeping W0 separate is what LoRA-FAIR's notes assume (clients never merge), and it lets the
    server reason about B A directly.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, *, generator: torch.Generator | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank = int(rank)
        self.scaling = float(alpha) / self.rank
        self.lora_A = nn.Parameter(torch.empty(self.rank, base.in_features, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, self.rank, dtype=base.weight.dtype))
        # PEFT's choice: Kaiming-uniform A (bound 1/sqrt(in)), so the adapter's first steps are of the
        # same scale whatever the layer width; B = 0 keeps the initial forward pass unchanged.
        bound = 1.0 / math.sqrt(base.in_features)
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound, generator=generator)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scaling * ((x @ self.lora_A.t()) @ self.lora_B.t())

    def delta_weight(self) -> Tensor:
        """scale * B A: what the adapter adds to W0 (for checks and for merging a trained model)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"


def is_adapter(name: str) -> bool:
    """True for a LoRA tensor's name (`...lora_A` / `...lora_B`), the unit federated LoRA shares."""
    return name.endswith(LORA_A) or name.endswith(LORA_B)


def adapter_pairs(names: Iterable[str]) -> list[str]:
    """The layer prefixes (`fc1.` for `fc1.lora_A`) that hold an A/B pair, in a stable order."""
    names = set(names)
    prefixes = {n[: -len(LORA_A)] for n in names if n.endswith(LORA_A)}
    prefixes |= {n[: -len(LORA_B)] for n in names if n.endswith(LORA_B)}
    return sorted(prefixes)


def add_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    targets: Sequence[str],
    *,
    trainable: Sequence[str] = (),
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Wrap every `nn.Linear` whose qualified name contains one of `targets` in a `LoRALinear`,
    then freeze every parameter that is not an adapter.

    `trainable` names substrings of parameters that stay trainable all the same (a classification
    head that the pretrained model never had). Raises ValueError when no layer matches, because a
    LoRA run that silently trains nothing is worse than an error.
    """
    matches = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name and any(t in name for t in targets)
    ]
    if not matches:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"no linear layer matches LoRA targets {list(targets)} (linear layers: {', '.join(linear)})")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in matches:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, generator=generator))
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter(name) or any(t in name for t in trainable))
    return model


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters a client trains and therefore sends, in the model's order."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def adapter_names(model_or_params: nn.Module | Mapping[str, Tensor]) -> list[str]:
    names = (
        [n for n, _ in model_or_params.named_parameters()]
        if isinstance(model_or_params, nn.Module) else list(model_or_params)
    )
    return [n for n in names if is_adapter(n)]


def bytes_of(params: Mapping[str, Tensor], names: Iterable[str]) -> int:
    """Bytes on the wire for the named tensors of `params` (missing names count nothing)."""
    return sum(params[n].numel() * params[n].element_size() for n in names if n in params)


def adapter_bytes(params: Mapping[str, Tensor]) -> int:
    """Bytes of the LoRA tensors in `params`: what FedIT-style methods send each way."""
    return bytes_of(params, [n for n in params if is_adapter(n)])


def lora_layer_bytes(in_features: int, out_features: int, rank: int, element_size: int = 4) -> int:
    """r * (in + out) numbers: a layer's adapter message, the figure the LoRA-FAIR notes quote."""
    return rank * (in_features + out_features) * element_size
