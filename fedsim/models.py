"""Built-in models, each a plain factory `name(input_shape, num_classes, **options) -> nn.Module`.

The factories are registered like any plugin; their keyword arguments are the `[model]` keys a
scenario may set, and their type hints are the schema those keys are validated against.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from pydantic import NonNegativeInt, PositiveInt
from torch import nn

from .errors import FedsimError, PluginError, ScenarioError
from .registry import models, register_model


@register_model("logreg")
def logreg(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multinomial logistic regression: one linear layer on the flattened input (the FedProx
    paper's model for Synthetic data)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


@register_model("mlp")
def mlp(input_shape: tuple[int, ...], num_classes: int, *, hidden: Sequence[PositiveInt] = (200,), batch_norm: bool = False) -> nn.Module:
    """A multilayer perceptron with ReLU: `hidden` widths, one per layer (McMahan et al.'s 2NN is
    [200, 200]). `batch_norm` adds a BatchNorm1d after each hidden layer (for FedBN at MLP cost;
    its statistics are buffers, so clients then train one after another)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), *([nn.BatchNorm1d(h)] if batch_norm else []), nn.ReLU()]
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


class CharRNN(nn.Module):
    """Embedding, a stacked LSTM or GRU, and a linear head on the last step's output: LEAF's
    next-character model for Shakespeare (embedding 8, two LSTM layers of 256)."""

    # torch.func.vmap has no batching rule for the fused recurrent kernels: it would run clients
    # one by one through a slow fallback, so this model trains one client after another.
    vectorize = False

    def __init__(self, vocabulary: int, num_classes: int, embedding: int, hidden: int, layers: int, cell: str):
        super().__init__()
        self.embed = nn.Embedding(vocabulary, embedding)
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn(embedding, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(x.long()))
        return self.head(out[:, -1])


def _char_rnn(cell: str, input_shape: tuple[int, ...], num_classes: int, embedding: int, hidden: int, layers: int,
              vocabulary: int) -> nn.Module:
    if len(input_shape) != 1:
        raise ValueError(f"char_{cell} needs sequences of character ids (one dimension), not {tuple(input_shape)}")
    return CharRNN(vocabulary or num_classes, num_classes, embedding, hidden, layers, cell)


@register_model("char_lstm")
def char_lstm(input_shape: tuple[int, ...], num_classes: int, *, embedding: PositiveInt = 8, hidden: PositiveInt = 64,
              layers: PositiveInt = 2, vocabulary: NonNegativeInt = 0) -> nn.Module:
    """LEAF's Shakespeare LSTM; `hidden = 256` is the paper's size, 64 keeps a 2-core laptop
    interactive. Inputs are character ids in [0, vocabulary) (0: as many as classes)."""
    return _char_rnn("lstm", input_shape, num_classes, embedding, hidden, layers, vocabulary)


@register_model("char_gru")
def char_gru(input_shape: tuple[int, ...], num_classes: int, *, embedding: PositiveInt = 8, hidden: PositiveInt = 64,
             layers: PositiveInt = 2, vocabulary: NonNegativeInt = 0) -> nn.Module:
    """As `char_lstm` with GRU cells: three gates instead of four, a quarter fewer parameters."""
    return _char_rnn("gru", input_shape, num_classes, embedding, hidden, layers, vocabulary)


@register_model("cnn_bn")
def cnn_bn(input_shape: tuple[int, ...], num_classes: int, *, channels: Sequence[PositiveInt] = (32, 64), hidden: PositiveInt = 512) -> nn.Module:
    """`cnn` with batch normalisation after each convolution and the hidden layer (FedBN's setting,
    Li et al. 2021). Its running statistics are buffers, so clients train one after another."""
    if len(input_shape) != 3:
        raise ValueError("the cnn_bn needs image inputs (channels, height, width)")
    if len(channels) != 2:
        raise ValueError("channels takes two widths, one per convolution")
    c, h, w = input_shape
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(c, c1, 5, padding=2), nn.BatchNorm2d(c1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5, padding=2), nn.BatchNorm2d(c2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * (h // 4) * (w // 4), hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def representation(model: nn.Module) -> nn.Module:
    """The part of `model` that maps an input to its representation (what the classifier reads),
    as a module whose tensors carry the model's own state-dict names.

    MOON (Li et al. 2021) compares representations of one input under several models. A
    `nn.Sequential` ending in a linear classifier has one already: its layers before that
    classifier (slicing keeps the layer names). Any other model says which by defining
    `representation(self) -> nn.Module` over its own submodules.
    """
    hook = getattr(model, "representation", None)
    if callable(hook):
        return hook()
    if isinstance(model, nn.Sequential) and len(model) > 1 and isinstance(model[-1], nn.Linear):
        body = model[:-1]
        if any(True for _ in body.parameters()):
            return body
    raise ValueError(f"{type(model).__name__} exposes no representation layer: a model needs a layer before its "
                     "classifier (logreg has none), or a representation() method")


def build_model(name: str, options: dict[str, Any], input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """Build a model whose initial weights depend only on `seed`.

    torch's initialisers draw from its global generator; forking it keeps the draw reproducible
    without leaking state into the rest of the process.
    """
    factory = models.get(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = factory(tuple(input_shape), num_classes, **options)
        except ValueError as exc:  # settings that do not fit this model or this data's shape
            raise ScenarioError(f"cannot build model '{name}' for inputs {tuple(input_shape)}: {exc}") from None
        except FedsimError:
            raise
        except Exception as exc:  # a plugin's bug: named in one line, not a traceback
            raise PluginError(f"model '{name}' raised {exc!r} when built for inputs {tuple(input_shape)}") from exc
    if not isinstance(model, nn.Module):
        raise PluginError(f"model '{name}' returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def check_outputs(model: nn.Module, name: str, example: Any, num_classes: int) -> None:
    """Require one logit per class for one example (`example`: a batch of one, as the data holds
    it). A wrong width would otherwise surface as an index error deep inside the loss or the first
    evaluation, far from the model that caused it."""
    require_logits(output_of_one(model, name, example), name, num_classes)


def output_of_one(model: nn.Module, name: str, example: Any) -> Any:
    """The model's output for one example, in eval mode, so that batch normalisation neither fails
    on one example nor updates its statistics; what the forward pass raises, as a PluginError."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(torch.as_tensor(example))
    except Exception as exc:
        raise PluginError(f"model '{name}' raised {exc!r} on one example of shape {tuple(example.shape[1:])}") from exc
    finally:
        model.train(was_training)


def require_logits(out: Any, name: str, num_classes: int) -> None:
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        raise PluginError(f"model '{name}' returned {got} for one example; expected a tensor of shape "
                          f"(1, {num_classes}): one logit per class")
