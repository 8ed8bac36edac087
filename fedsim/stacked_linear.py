"""Many clients' MLPs trained at once with a hand-written backward pass.

`torch.func.vmap(grad(...))` pays functorch's per-operator dispatch and allocates every
intermediate afresh at each step; for the small models of most federated benchmarks (an MLP
60-200-10 trains in microseconds per client) that overhead, and the page faults of fresh
multi-megabyte allocations, cost more than the arithmetic. A model that is a chain of `Linear`
layers and element-wise activations has a backward pass short enough to write down, so this
module does: batched matrix products (`baddbmm`/`bmm`, one matrix per client) into buffers that
live as long as the worker, activations kept in a (client, feature, example) layout so that the
softmax reduces over a strided axis (several times faster on CPU than over a last axis of ten
classes). Each client's numbers are computed by its own matrix products and reductions, so they
do not depend on which clients share its chunk, and they agree with autograd to float rounding.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .params import Params

# element-wise activations and their derivatives written in terms of the activation's output
_ACTIVATIONS = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}


@dataclass(frozen=True)
class _Layer:
    weight: str
    bias: str | None
    activation: str | None  # applied after this layer, or None
    shape: tuple[int, int] = (0, 0)  # (out_features, in_features)

    @property
    def wide(self) -> bool:
        """More outputs than inputs: stored transposed while weights move in place (`moving`)."""
        return self.shape[0] > self.shape[1]


class LinearStack:
    """Forward and backward of `Sequential(Flatten?, Linear, act?, Linear, act?, ..., Linear)` for
    K clients at once; see the module's docstring for why."""

    def __init__(self, layers: list[_Layer]):
        self.layers = layers
        self._local = threading.local()  # buffers per thread: chunks may train on several at once

    @classmethod
    def of(cls, model: nn.Module, input_shape: tuple[int, ...]) -> "LinearStack | None":
        """The stack for `model` on inputs of `input_shape` (one example's), or None when it is
        anything else than a plain chain of linear layers and ReLU/Tanh/Sigmoid (any other module,
        a subclassed Sequential, buffers, image inputs without a leading Flatten)."""
        if type(model) is not nn.Sequential or list(model.buffers()):
            return None
        layers: list[_Layer] = []
        seen_linear = False
        flat = len(input_shape) == 1
        for name, module in model.named_children():
            kind = type(module)
            if kind is nn.Flatten and not seen_linear and module.start_dim == 1 and module.end_dim == -1:
                flat = True
                continue
            if kind is nn.Identity:
                continue
            if kind is nn.Linear:
                bias = f"{name}.bias" if module.bias is not None else None
                layers.append(_Layer(f"{name}.weight", bias, None, (module.out_features, module.in_features)))
                seen_linear = True
                continue
            if kind in _ACTIVATIONS and layers and layers[-1].activation is None:
                last = layers[-1]
                layers[-1] = _Layer(last.weight, last.bias, _ACTIVATIONS[kind], last.shape)
                continue
            return None
        if not layers or layers[-1].activation is not None or not flat:
            return None  # the last layer's output must be the logits; Linear must see whole examples
        return cls(layers)

    def moving(self, weights: Params) -> Params:
        """The layout in which `gradients(..., step=...)` moves weights: a wide layer's matrix
        transposed to (in, out), so that the update's product writes rows of `out` numbers (an
        MLP's first layer, 60 -> 200: half the time of writing rows of 60)."""
        wide = {layer.weight for layer in self.layers if layer.wide}
        return {n: (t.transpose(1, 2).contiguous() if n in wide else t) for n, t in weights.items()}

    def standard(self, weights: Params) -> Params:
        """`moving` undone: every matrix (out, in) again, as the model names it."""
        wide = {layer.weight for layer in self.layers if layer.wide}
        return {n: (t.transpose(1, 2).contiguous() if n in wide else t) for n, t in weights.items()}

    def _scratch(self, weights: Params, k: int, b: int) -> dict[str, Tensor]:
        """Buffers for a chunk of k clients and b examples each, reused across steps and chunks."""
        first = weights[self.layers[0].weight]
        key = (k, b, first.device, first.dtype)
        buffers = self._local.__dict__.setdefault("buffers", {})
        buf = buffers.get(key)
        if buf is None:
            if len(buffers) >= 4:  # a worker's chunks come in a few shapes; keep the latest
                buffers.pop(next(iter(buffers)))
            buf = {}
            for i, layer in enumerate(self.layers):
                out = layer.shape[0]
                buf[f"z{i}"] = torch.empty(k, out, b, device=first.device, dtype=first.dtype)
                buf[f"dz{i}"] = torch.empty(k, out, b, device=first.device, dtype=first.dtype)
                if layer.activation is not None:
                    buf[f"a{i}"] = torch.empty(k, out, b, device=first.device, dtype=first.dtype)
            for layer in self.layers:
                buf[f"g:{layer.weight}"] = torch.empty(k, *layer.shape, device=first.device, dtype=first.dtype)
                if layer.bias is not None:
                    buf[f"g:{layer.bias}"] = torch.empty(k, layer.shape[0], device=first.device, dtype=first.dtype)
            buffers[key] = buf
        return buf

    def gradients(
        self, weights: Params, x: Tensor, y: Tensor, mask: Tensor, trainable: set[str], step: Tensor | None = None,
    ) -> tuple[Params, Tensor]:
        """Per-client gradients of the masked mean cross-entropy, and the per-client losses.

        `weights[name]` is (k, *shape); `x` is (k, b, ...) (flattened here), `y` (k, b) labels,
        `mask` (k, b) 1 for real examples and 0 for padding. Gradients and activations live in
        buffers reused by the next call: use (or modify) the gradients before calling again.

        With `step` (plain SGD: each client's learning rate, 0 for a client that has finished),
        `weights` are in the `moving` layout and no gradient is returned: each trainable tensor
        moves by -step x its gradient inside the product that computes it (W <- W - (step dZ) A^T
        in one `baddbmm`), once the layer below has read the old weights. That saves writing
        every gradient and reading it back, a quarter of a wide MLP's step. A client's numbers
        still depend on nothing but its own.
        """
        k, b = y.shape
        x = x.reshape(k, b, -1)
        buf = self._scratch(weights, k, b)
        n = len(self.layers)
        inputs: list[Tensor] = []  # each layer's input, (k, in, b)
        h = x.transpose(1, 2)
        for i, layer in enumerate(self.layers):
            inputs.append(h)
            z = buf[f"z{i}"]
            w = weights[layer.weight]
            if step is not None and layer.wide:
                w = w.transpose(1, 2)  # (out, in) view of the (in, out) matrix
            if layer.bias is not None:
                torch.baddbmm(weights[layer.bias].unsqueeze(-1), w, h, out=z)
            else:
                torch.bmm(w, h, out=z)
            if layer.activation is not None:
                h = _activate(layer.activation, z, buf[f"a{i}"])
            else:
                h = z
        # softmax cross-entropy over the class axis (dim 1), per example, masked per client
        logits = h
        count = mask.sum(1)
        top = logits.amax(1, keepdim=True)
        d = buf[f"dz{n - 1}"]
        torch.sub(logits, top, out=d)
        d.exp_()
        total = d.sum(1, keepdim=True)
        d.div_(total)  # softmax
        labels = y.unsqueeze(1)
        per_example = (total.log_() + top - logits.gather(1, labels)).squeeze(1)
        losses = (per_example * mask).sum(1) / count
        d.scatter_add_(1, labels, torch.full_like(labels, -1.0, dtype=d.dtype))  # softmax - onehot
        d.mul_((mask / count.unsqueeze(1)).unsqueeze(1))
        grads: Params = {}
        for i in range(n - 1, -1, -1):
            layer = self.layers[i]
            d = buf[f"dz{i}"]
            w = weights[layer.weight]
            moved_wide = step is not None and layer.wide
            if i > 0:  # the error one layer down, from this layer's weights before they move
                upstream = buf[f"dz{i - 1}"]
                torch.bmm(w if moved_wide else w.transpose(1, 2), d, out=upstream)
                _activation_backward(self.layers[i - 1].activation, upstream, inputs[i])
            if step is not None:
                d.mul_(step.view(k, 1, 1))
            if layer.weight in trainable:
                if step is None:
                    grads[layer.weight] = torch.bmm(d, inputs[i].transpose(1, 2), out=buf[f"g:{layer.weight}"])
                elif moved_wide:  # (in, out) -= A (step dZ)^T
                    w.baddbmm_(inputs[i], d.transpose(1, 2), alpha=-1.0)
                else:
                    w.baddbmm_(d, inputs[i].transpose(1, 2), alpha=-1.0)
            if layer.bias is not None and layer.bias in trainable:
                g = torch.sum(d, 2, out=buf[f"g:{layer.bias}"])
                if step is None:
                    grads[layer.bias] = g
                else:
                    weights[layer.bias].sub_(g)
        return grads, losses


def _activate(kind: str, z: Tensor, out: Tensor) -> Tensor:
    if kind == "relu":
        return torch.clamp_min(z, 0, out=out)
    if kind == "tanh":
        return torch.tanh(z, out=out)
    return torch.sigmoid(z, out=out)


def _activation_backward(kind: str | None, grad: Tensor, output: Tensor) -> None:
    """grad <- grad * act'(z), in place, from the activation's output."""
    if kind == "relu":
        torch.ops.aten.threshold_backward.grad_input(grad, output, 0, grad_input=grad)
    elif kind == "tanh":
        torch.ops.aten.tanh_backward.grad_input(grad, output, grad_input=grad)
    elif kind == "sigmoid":
        torch.ops.aten.sigmoid_backward.grad_input(grad, output, grad_input=grad)
