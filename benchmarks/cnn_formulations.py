"""Convolutional clients trained together: which formulation of a vectorised step wins, here.

fedsim's calibration (`fedsim.training_path`) chooses per run between training clients one after
another and its vectorised path (`torch.func.vmap`); on this project's 2-core CPU it chooses the
former for every CNN. The performance issue asked for convolutional models to win vectorised,
for example as grouped convolutions; this script times every formulation we tried on fedsim's
`cnn` (McMahan et al.'s two convolutions, width configurable), so that the finding can be checked
again on another machine or a GPU instead of being taken on trust:

- `sequential_nchw` / `sequential_channels_last`: one client after another, autograd on a module
  (fedsim's sequential path is the channels-last one);
- `vmap`: fedsim's vectorised path, `vmap(grad(loss))` over stacked weights (vmap turns each
  convolution into a grouped one);
- `grouped_nchw` / `grouped_channels_last`: clients as channel groups of one `conv2d` call,
  dense layers as batched matrix products, autograd;
- `unfold_bmm`: convolutions as `unfold` and one batched matrix product per layer, autograd;
- `per_client_convs_stacked_dense`: a hand-written backward pass, each client's convolutions by
  oneDNN's own kernels (`convolution_backward`), the dense layers and the loss batched.

Every formulation takes the same SGD steps from the same weights on the same minibatches, and
its final weights must match the first formulation's (to `--tolerance`) before its time counts.
Times are per client step: the thread's CPU time on a CPU (blind to other processes' load), wall
time after a synchronise on CUDA; the best of `--repeat`. Prints one JSON object.

    python benchmarks/cnn_formulations.py [--device cpu|cuda] [--clients 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from fedsim.models import build_model
from fedsim.training import torch_threads

Weights = dict[str, Tensor]
Train = Callable[[Weights, Tensor, Tensor, float], Weights]  # (stacked weights, xs, ys, lr) -> weights

# fedsim's `cnn`: Conv(0) ReLU Pool Conv(3) ReLU Pool Flatten Linear(7) ReLU Linear(9)
CONV1, CONV2, FC1, FC2 = "0", "3", "7", "9"


def sequential(model: nn.Module, channels_last: bool) -> Train:
    """Each client in turn through all its steps, on a module whose weights are loaded once."""
    module = copy.deepcopy(model)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    module.to(memory_format=fmt)
    params = dict(module.named_parameters())

    def train(w: Weights, xs: Tensor, ys: Tensor, lr: float) -> Weights:
        out = {n: torch.empty_like(t) for n, t in w.items()}
        for g in range(xs.shape[1]):
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(w[n][g])
            for s in range(xs.shape[0]):
                for p in params.values():
                    p.grad = None
                F.cross_entropy(module(xs[s, g].contiguous(memory_format=fmt)), ys[s, g]).backward()
                with torch.no_grad():
                    for p in params.values():
                        p.sub_(p.grad, alpha=lr)
            with torch.no_grad():
                for n, p in params.items():
                    out[n][g].copy_(p)
        return out

    return train


def vmapped(model: nn.Module) -> Train:
    def loss(w: Weights, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, w, (x,)), y)

    gradients = vmap(grad(loss))

    def train(w: Weights, xs: Tensor, ys: Tensor, lr: float) -> Weights:
        w = {n: t.clone() for n, t in w.items()}
        for s in range(xs.shape[0]):
            for n, g in gradients(w, xs[s], ys[s]).items():
                w[n].sub_(g, alpha=lr)
        return w

    return train


def _dense_and_loss(w: Weights, features: Tensor, y: Tensor) -> Tensor:
    """Dense layers as batched products, and the sum over clients of each client's mean loss
    (whose gradient for a client's weights is that client's own)."""
    h = torch.baddbmm(w[f"{FC1}.bias"].unsqueeze(1), features, w[f"{FC1}.weight"].transpose(1, 2)).relu()
    logits = torch.baddbmm(w[f"{FC2}.bias"].unsqueeze(1), h, w[f"{FC2}.weight"].transpose(1, 2))
    k, b, c = logits.shape
    return F.cross_entropy(logits.reshape(k * b, c), y.reshape(-1), reduction="sum") / b


def _autograd_train(loss: Callable[[Weights, Tensor, Tensor], Tensor]) -> Train:
    def train(w: Weights, xs: Tensor, ys: Tensor, lr: float) -> Weights:
        w = {n: t.clone().requires_grad_() for n, t in w.items()}
        for s in range(xs.shape[0]):
            grads = torch.autograd.grad(loss(w, xs[s], ys[s]), list(w.values()))
            with torch.no_grad():
                for t, g in zip(w.values(), grads):
                    t.sub_(g, alpha=lr)
        return {n: t.detach() for n, t in w.items()}

    return train


def grouped(channels_last: bool) -> Train:
    """Clients as the groups of one convolution: (k, b, c, h, w) inputs become (b, k*c, h, w)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def conv(w: Weights, name: str, x: Tensor, k: int) -> Tensor:
        weight = w[f"{name}.weight"]
        y = F.conv2d(x, weight.reshape(-1, *weight.shape[2:]), w[f"{name}.bias"].reshape(-1), padding=2, groups=k)
        return F.max_pool2d(y.relu(), 2)

    def loss(w: Weights, x: Tensor, y: Tensor) -> Tensor:
        k, b = y.shape
        h = x.transpose(0, 1).reshape(b, -1, *x.shape[3:]).contiguous(memory_format=fmt)
        h = conv(w, CONV2, conv(w, CONV1, h, k), k)
        return _dense_and_loss(w, h.reshape(b, k, -1).transpose(0, 1), y)

    return _autograd_train(loss)


def unfold_bmm() -> Train:
    """Each convolution as `unfold` (im2col) and one batched product with every client's matrix."""

    def conv(w: Weights, name: str, x: Tensor) -> Tensor:
        k, b, c, height, width = x.shape
        weight = w[f"{name}.weight"]
        columns = F.unfold(x.reshape(k * b, c, height, width), weight.shape[-1], padding=2)
        y = torch.matmul(weight.reshape(k, 1, weight.shape[1], -1), columns.reshape(k, b, *columns.shape[1:]))
        y = (y + w[f"{name}.bias"].reshape(k, 1, -1, 1)).relu().reshape(k * b, -1, height, width)
        y = F.max_pool2d(y, 2)
        return y.reshape(k, b, *y.shape[1:])

    def loss(w: Weights, x: Tensor, y: Tensor) -> Tensor:
        h = conv(w, CONV2, conv(w, CONV1, x))
        return _dense_and_loss(w, h.flatten(2), y)

    return _autograd_train(loss)


def per_client_convs_stacked_dense() -> Train:
    """A hand-written step: every client's convolutions by the same oneDNN kernels as the
    sequential path, the dense layers and softmax cross-entropy as batched products, no autograd
    graph, SGD applied as the gradients come."""
    backward = torch.ops.aten.convolution_backward
    pool_backward = torch.ops.aten.max_pool2d_with_indices_backward

    def block(x: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a = F.conv2d(x, weight, bias, padding=2).relu_()
        pooled, where = F.max_pool2d_with_indices(a, 2)
        return a, pooled, where

    def block_backward(d: Tensor, x: Tensor, a: Tensor, where: Tensor, weight: Tensor, bias: Tensor, lr: float,
                       need_input: bool) -> Tensor | None:
        d = pool_backward(d, a, [2, 2], [2, 2], [0, 0], [1, 1], False, where)
        d.mul_(a > 0)
        dx, dw, db = backward(d, x, weight, [bias.shape[0]], [1, 1], [2, 2], [1, 1], False, [0, 0], 1,
                              [need_input, True, True])
        weight.sub_(dw, alpha=lr)
        bias.sub_(db, alpha=lr)
        return dx

    def train(w: Weights, xs: Tensor, ys: Tensor, lr: float) -> Weights:
        w = {n: t.clone() for n, t in w.items()}
        w1, b1, w2, b2 = (w[f"{CONV1}.weight"], w[f"{CONV1}.bias"], w[f"{CONV2}.weight"], w[f"{CONV2}.bias"])
        l1, c1, l2, c2 = (w[f"{FC1}.weight"], w[f"{FC1}.bias"], w[f"{FC2}.weight"], w[f"{FC2}.bias"])
        k = xs.shape[1]
        for s in range(xs.shape[0]):
            saved, features = [], []
            for g in range(k):
                x = xs[s, g]
                a1, p1, i1 = block(x, w1[g], b1[g])
                a2, p2, i2 = block(p1, w2[g], b2[g])
                saved.append((x, a1, p1, i1, a2, i2))
                features.append(p2.flatten(1))
            f = torch.stack(features)  # (k, b, features)
            b = f.shape[1]
            h = torch.baddbmm(c1.unsqueeze(1), f, l1.transpose(1, 2)).relu_()
            d = torch.softmax(torch.baddbmm(c2.unsqueeze(1), h, l2.transpose(1, 2)), -1)
            d.scatter_add_(2, ys[s].unsqueeze(2), torch.full((k, b, 1), -1.0, device=d.device)).div_(b)
            dh = torch.bmm(d, l2).mul_(h > 0)
            df = torch.bmm(dh, l1)
            l2.sub_(torch.bmm(d.transpose(1, 2), h), alpha=lr)
            c2.sub_(d.sum(1), alpha=lr)
            l1.sub_(torch.bmm(dh.transpose(1, 2), f), alpha=lr)
            c1.sub_(dh.sum(1), alpha=lr)
            for g, (x, a1, p1, i1, a2, i2) in enumerate(saved):
                dp1 = block_backward(df[g].reshape(a2.shape[0], a2.shape[1], *i2.shape[2:]), p1, a2, i2, w2[g], b2[g],
                                     lr, True)
                block_backward(dp1, x, a1, i1, w1[g], b1[g], lr, False)
        return w

    return train


FORMULATIONS: dict[str, Callable[[nn.Module], Train]] = {
    "sequential_nchw": lambda m: sequential(m, channels_last=False),
    "sequential_channels_last": lambda m: sequential(m, channels_last=True),
    "vmap": vmapped,
    "grouped_nchw": lambda m: grouped(channels_last=False),
    "grouped_channels_last": lambda m: grouped(channels_last=True),
    "unfold_bmm": lambda m: unfold_bmm(),
    "per_client_convs_stacked_dense": lambda m: per_client_convs_stacked_dense(),
}


def measure(channels: tuple[int, int], hidden: int, clients: int, batch: int, steps: int, repeat: int,
            device: torch.device, tolerance: float) -> dict:
    model = build_model("cnn", {"channels": list(channels), "hidden": hidden}, (1, 28, 28), 10, 0).to(device)
    gen = torch.Generator().manual_seed(0)
    start = {n: torch.stack([p.detach().cpu() + 0.01 * torch.randn(p.shape, generator=gen) for _ in range(clients)])
             .to(device) for n, p in model.named_parameters()}
    xs = torch.rand(steps, clients, batch, 1, 28, 28, generator=gen).to(device)
    ys = torch.randint(0, 10, (steps, clients, batch), generator=gen).to(device)
    lr = 0.05

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return time.thread_time()

    reference: Weights | None = None
    out: dict[str, dict] = {}
    for name, make in FORMULATIONS.items():
        train = make(model)
        result = train(start, xs, ys, lr)  # warm-up, and the numbers checked
        if reference is None:
            reference = result
        error = max(float((result[n] - reference[n]).abs().max()) for n in reference)
        scale = max(float(reference[n].abs().max()) for n in reference)
        best = float("inf")
        for _ in range(repeat):
            begin = clock()
            train(start, xs, ys, lr)
            best = min(best, clock() - begin)
        out[name] = {"ms_per_client_step": round(best / (steps * clients) * 1e3, 3),
                     "max_abs_difference": float(f"{error:.2g}"), "agrees": error <= tolerance * (1 + scale)}
    fastest_sequential = min(out["sequential_nchw"]["ms_per_client_step"], out["sequential_channels_last"]["ms_per_client_step"])
    for row in out.values():
        row["time_vs_best_sequential"] = round(row["ms_per_client_step"] / fastest_sequential, 2)
    return {"channels": list(channels), "hidden": hidden, "formulations": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args()
    device = torch.device(args.device)
    models = [((8, 16), 64), ((16, 32), 128), ((32, 64), 512)]  # the last is McMahan et al.'s
    with torch_threads(args.threads):
        runs = [measure(c, h, args.clients, args.batch, args.steps, args.repeat, device, args.tolerance) for c, h in models]
    print(json.dumps({
        "benchmark": "cnn_formulations",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": args.threads, "clients": args.clients, "batch": args.batch, "steps": args.steps,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "models": runs,
    }, indent=2))


if __name__ == "__main__":
    main()
