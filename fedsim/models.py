"""Built-in models, each a plain factory `name(input_shape, num_classes, **options) -> nn.Module`.

The factories are registered like any plugin; their keyword arguments are the `[model]` keys a
scenario may set, and their type hints are the schema those keys are validated against.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from pydantic import PositiveInt
from torch import nn

from .errors import ScenarioError
from .registry import models, register_model


@register_model("logreg")
def logreg(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


@register_model("mlp")
def mlp(input_shape: tuple[int, ...], num_classes: int, *, hidden: Sequence[PositiveInt] = (200,)) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@register_model("cnn")
def cnn(input_shape: tuple[int, ...], num_classes: int, *, channels: Sequence[PositiveInt] = (32, 64), hidden: PositiveInt = 512) -> nn.Module:
    """The two-conv network of McMahan et al. (2017) for 28x28 images, width configurable."""
    if len(input_shape) != 3:
        raise ValueError("the cnn needs image inputs (channels, height, width)")
    if len(channels) != 2:
        raise ValueError("channels takes two widths, one per convolution")
    c, h, w = input_shape
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(c, c1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * (h // 4) * (w // 4), hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def build_model(name: str, options: dict[str, Any], input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """Build a model whose initial weights depend only on `seed`.

    torch's initialisers draw from its global generator; forking it keeps the draw reproducible
    without leaking state into the rest of the process.
    """
    factory = models.get(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return factory(tuple(input_shape), num_classes, **options)
        except ValueError as exc:  # settings that do not fit this model or this data's shape
            raise ScenarioError(f"cannot build model '{name}' for inputs {tuple(input_shape)}: {exc}") from None
