"""How much memory a run needs, estimated before anything is built, and a refusal when it cannot fit.

The estimate is deliberately coarse (it counts the big arrays, not Python objects) and errs on the
large side: a run refused by mistake is one `--force` away, while a run that exhausts the machine's
memory hours in is lost, and may take the machine down with it.

Nothing here generates data or allocates a model: data sizes come from the data set's own
`describe` (file headers, line counts; see `fedsim.data.base.DataInfo`), or for a lazily generated
federation from its held-out set and client cache alone; model sizes from the parameter count of a
model built on PyTorch's "meta" device (shapes without storage), or from a closed-form count for
the built-in models when even that is out of reach. Constants were fitted against measured peaks
(`benchmarks/memory_estimate.py`, which every shipped scenario and benchmark passes within 2x).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from .errors import FedsimError, PluginError, ScenarioError

GiB = 2**30

# bytes of one float32 feature and one int64 label
_FLOAT, _LABEL = 4, 8

# Data sets that cannot describe themselves (a plugin's, vader's): (input shape, classes, train
# examples or None = from the scenario, test examples or None = data.test_size, copies held at the
# peak). Fashion-MNIST keeps its decoded pool cached beside the client-ordered copy, hence two
# copies; the synthetic pool is dropped after reordering but both exist while the federation is
# built.
_DATASETS: dict[str, tuple[tuple[int, ...], int, int | None, int | None, int]] = {
    "synthetic": ((60,), 10, None, None, 2),
    "fashion_mnist": ((1, 28, 28), 10, 60_000, 10_000, 2),
    "mnist_5k": ((1, 28, 28), 10, 4_000, 1_000, 2),
    "vader": ((64,), 2, 10_000, 2_000, 2),
}
# An unknown (plugin) data set: assume MNIST-sized examples, samples_per_client per client.
_GENERIC = ((1, 28, 28), 10, None, None, 2)

# Copies of the model the driver holds whatever the method: global parameters, initial parameters,
# the evaluation model, the aggregate being formed.
_DRIVER_COPIES = 4
# Per sampled client of a server method: its returned parameters, their row in the stacked batch,
# and one temporary of the aggregation rule.
_SERVER_COPIES_PER_CLIENT = 3
# Per node of a graph method: the node stack X, the stack of trained results, the mixing output and
# the numpy copy handed to the executor.
_GRAPH_COPIES_PER_NODE = 4
# Per client of an asynchronous method: the model it trains from and the update it sends back.
_ASYNC_COPIES_PER_CLIENT = 2
# Per worker (Ray actor or the inline worker): model, gradients, optimiser state, job parameters,
# plus the process itself (Python, torch and Ray imported).
_WORKER_COPIES = 4
# A Python process with torch, numpy, pandas (and Ray) imported: the driver always, and each Ray
# actor (measured: 330 MiB after imports, 400-450 MiB once a run is going).
_PROCESS = 400 * 2**20
# Per client, whatever the method: simulated speeds and links, the ledger's counters, busy time,
# sizes, the failure model's and the sampler's arrays (measured on a million clients).
_PER_CLIENT = 160

_MINILM_ENCODER = 22_565_376  # all-MiniLM-L6-v2 without the pooler: embeddings + 6 layers


def estimate(spec: Any, *, executor: str | None = None, workers: int | None = None) -> dict[str, int]:
    """Bytes a run needs, by component, and their `total`.

    `executor` and `workers` override the scenario's [system] values, as `--executor` and
    `--workers` do on the command line.

    Components: `data` (the federation's arrays, at their peak), `model` (one copy of the
    parameters), `clients` (per-client and per-node state: decentralized methods keep one model per
    node), `bookkeeping` (the per-client arrays every run keeps: speeds, links, ledger), `driver` (the coordinator's own copies), `workers` (each worker's model, optimiser and
    process), `object_store` (Ray's shared-memory copies of the data and a round's parameters; zero
    with the inline executor). All values are int bytes.
    """
    s = spec.scenario
    cfg = spec.algorithm_config
    n = int(s.data.num_clients)
    shape, classes, data_bytes, copies = _data(s.data, int(s.seed))
    model_bytes = _model_bytes(s.model.name, s.model.options(), shape, classes, int(s.seed))

    if spec.algorithm.needs_topology:
        held = n
        clients = _GRAPH_COPIES_PER_NODE * n * model_bytes
        shared = n * model_bytes  # the node stack, put once per round
    elif _is_async(cfg):
        held = n
        clients = _ASYNC_COPIES_PER_CLIENT * n * model_bytes
        shared = model_bytes
    else:
        held = min(n, _cohort(cfg, n))
        clients = _SERVER_COPIES_PER_CLIENT * held * model_bytes
        shared = model_bytes

    executor = executor or s.system.executor
    n_workers = 1 if executor == "inline" else _ray_workers(s.system, n, workers)
    # inline, the one worker lives in the driver's process; Ray starts a process per actor
    worker_bytes = n_workers * (_WORKER_COPIES * model_bytes + (0 if executor == "inline" else _PROCESS))
    if executor == "inline":
        object_store = 0
    else:
        # the data set once, the round's shared parameters, and every result on its way back
        object_store = data_bytes // copies + shared + held * model_bytes

    parts = {
        "data": data_bytes,
        "model": model_bytes,
        "clients": clients,
        "bookkeeping": n * _PER_CLIENT,
        "driver": _DRIVER_COPIES * model_bytes + _PROCESS,
        "workers": worker_bytes,
        "object_store": object_store,
    }
    parts["total"] = sum(parts.values())
    return parts


def check(
    spec: Any, *, force: bool, available: int | None = None, executor: str | None = None, workers: int | None = None
) -> dict[str, int]:
    """Refuse a run whose estimate exceeds the memory available (ScenarioError: one line, exit 2);
    returns the estimate.

    `available` defaults to MemAvailable from /proc/meminfo; where that cannot be read the check is
    skipped. With `force`, the estimate is returned and nothing is refused. `executor` and
    `workers` are the command line's overrides, as for `estimate`.
    """
    parts = estimate(spec, executor=executor, workers=workers)
    if force:
        return parts
    if available is None:
        available = mem_available()
        if available is None:
            return parts
    need = parts["total"]
    if need > available:
        raise ScenarioError(
            f"needs about {_gib(need)} GiB but the machine has {_gib(available)} GiB available; "
            f"use --force to run anyway (largest parts: {_breakdown(parts)})",
            file=getattr(spec, "source", None),
            key=_culprit(spec, parts, available),
        )
    return parts


def mem_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes, or None where there is no such file (not Linux)."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            fields = line.split()
            try:
                value = int(fields[1])
            except (IndexError, ValueError):
                return None
            unit = fields[2].lower() if len(fields) > 2 else "b"
            return value * {"kb": 2**10, "mb": 2**20, "gb": 2**30}.get(unit, 1)
    return None


# ---------------------------------------------------------------------------------------------
# components


def _data(data: Any, seed: int = 0) -> tuple[tuple[int, ...], int, int, int]:
    """(input shape, classes, bytes at the peak, copies of the training arrays at the peak) of the
    scenario's data set.

    A lazily generated federation holds only its held-out set and a cache of recently generated
    clients; a data set that describes itself gives its real sizes (a missing file raises its
    one-line DataError here, as loading would); anything else falls back to `_DATASETS`.
    """
    from .data.base import describe
    from .data.lazy import CACHE_CLIENTS, wants_lazy
    from .data.synthetic import NUM_CLASSES, NUM_FEATURES

    if data.dataset == "synthetic" and wants_lazy(data):
        per_example = NUM_FEATURES * _FLOAT + _LABEL
        cached = min(int(data.num_clients), CACHE_CLIENTS) * int(data.samples_per_client)
        return (NUM_FEATURES,), NUM_CLASSES, (int(data.test_size) + cached) * per_example, 1
    info = describe(data, seed)
    if info is not None:
        shape, classes, train, test, copies = info.input_shape, info.num_classes, info.num_train, info.num_test, info.copies
    else:
        shape, classes, train, test, copies = _DATASETS.get(data.dataset, _GENERIC)
    if train is None:
        train = int(data.num_clients) * int(data.samples_per_client)
    if test is None:
        test = int(data.test_size)
    per_example = math.prod(shape) * _FLOAT + _LABEL
    return shape, classes, copies * train * per_example + test * per_example, max(int(copies), 1)


def _model_bytes(name: str, options: dict[str, Any], shape: tuple[int, ...], classes: int, seed: int) -> int:
    """One copy of the model's parameters and buffers, in bytes (float32 where unknown)."""
    from . import registry

    try:
        factory = registry.models.get(name)
    except FedsimError as exc:
        raise exc.located(key="model.name") from None
    closed = _closed_form(name, factory, options, shape, classes)
    if closed is not None:
        return closed * _FLOAT
    meta = _meta_bytes(name, options, shape, classes, seed)
    return 0 if meta is None else meta


def _meta_bytes(name: str, options: dict[str, Any], shape: tuple[int, ...], classes: int, seed: int) -> int | None:
    """Build the model on the meta device (no storage) and count its parameters and buffers."""
    import torch

    from .models import build_model

    try:
        with torch.device("meta"):
            model = build_model(name, options, shape, classes, seed)
        tensors = list(model.parameters()) + list(model.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)
    except PluginError:  # a plugin that needs real tensors to be built: size unknown (the run will say
        return None      # what its factory raised, if it raises with them too)
    except FedsimError:
        raise
    except Exception:
        return None


def _closed_form(name: str, factory: Any, options: dict[str, Any], shape: tuple[int, ...], classes: int) -> int | None:
    """Parameter counts of the built-in models, exact and overflow-free for any width.

    Used only when `name` still resolves to the built-in factory (a plugin may re-register a name).
    """
    from . import models

    width = math.prod(shape)
    if factory is models.logreg:
        return width * classes + classes
    if factory is models.mlp or _is_builtin(factory, "pretrained", "pretrained_mlp"):
        count = 0
        for h in [int(h) for h in options.get("hidden", (200,))]:
            count += width * h + h
            width = h
        return count + width * classes + classes
    if factory is models.cnn:
        if len(shape) != 3:
            return None
        channels = [int(x) for x in options.get("channels", (32, 64))]
        if len(channels) != 2:
            return None
        (c, h, w), (c1, c2) = shape, channels
        hidden = int(options.get("hidden", 512))
        return (c * c1 * 25 + c1) + (c1 * c2 * 25 + c2) + (c2 * (h // 4) * (w // 4) * hidden + hidden) + (hidden * classes + classes)
    if _is_builtin(factory, "minilm", "minilm"):
        rank = int(options.get("rank", 8))
        lora = rank * (384 + 384) * len(options.get("targets", ("q", "k", "v", "o"))) * 6
        return _MINILM_ENCODER + 384 * classes + classes + lora
    return None


def _is_builtin(factory: Any, module: str, name: str) -> bool:
    import importlib

    try:
        return factory is getattr(importlib.import_module(f"fedsim.{module}"), name)
    except Exception:
        return False


def _is_async(cfg: Any) -> bool:
    try:
        from .asynchronous import AsyncConfig
    except Exception:
        return False
    return isinstance(cfg, AsyncConfig)


def _cohort(cfg: Any, n: int) -> int:
    """Clients whose updates a server method holds at once."""
    for field in ("clients_per_round", "sample_size", "buffer_size"):
        value = getattr(cfg, field, None)
        if isinstance(value, int) and value > 0:
            return value
    return n


def _ray_workers(system: Any, n: int, workers: int | None = None) -> int:
    if system.clients_per_actor is not None:
        return math.ceil(n / system.clients_per_actor)
    return int(workers or system.workers or os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------
# the message


def _gib(value: int) -> str:
    gib = value / GiB
    return f"{gib:.3g}" if gib >= 1e5 or gib < 0.1 else f"{gib:.1f}"


def _breakdown(parts: dict[str, int]) -> str:
    biggest = sorted((k for k in parts if k != "total" and parts[k] > 0), key=lambda k: -parts[k])[:2]
    return ", ".join(f"{k} {_gib(parts[k])} GiB" for k in biggest) or "nothing"


def _culprit(spec: Any, parts: dict[str, int], available: int) -> str:
    """The scenario key to change: the model when even one client's worth of copies cannot fit,
    else the one that drives the largest component."""
    s = spec.scenario
    if (_DRIVER_COPIES + _WORKER_COPIES) * parts["model"] > available:
        return "model"
    component = max((k for k in parts if k not in ("total", "model")), key=lambda k: parts[k])
    if component == "data":
        fixed = s.data.dataset in _DATASETS and _DATASETS[s.data.dataset][2] is not None
        return "data.dataset" if fixed else "data.num_clients"
    if component == "workers":
        return "system.workers"
    if component in ("clients", "object_store") and not spec.algorithm.needs_topology and not _is_async(spec.algorithm_config):
        for field in ("clients_per_round", "sample_size", "buffer_size"):
            if getattr(spec.algorithm_config, field, None) is not None:
                return f"algorithm.{field}"
    return "data.num_clients"
