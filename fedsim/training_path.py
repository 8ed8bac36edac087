"""Vectorised or one client after another: whichever is faster for this model, trainer and machine.

Batching clients wins by a wide margin for small models (an MLP's step is mostly per-call overhead
that a batch pays once) and loses for convolutional networks on a CPU, whose single-client
convolutions already run near the machine's peak while a batch of them becomes a grouped
convolution that runs at half that. Rather than a rule of thumb, a worker times both paths on its
first real jobs (a few clients, two local steps each, alternating, best of three) and keeps the
faster one for the run.

The two paths agree to float rounding (1e-5), not bit for bit, so the choice is remembered: per
machine, in `calibration.json` under `$FEDSIM_CACHE` (default `~/.cache/fedsim`), keyed by
everything it depends on (fedsim and torch versions, device, threads, model, trainer, chunk). A
resumed run, a rerun and every worker of a run therefore take the same path; another machine
may choose the other one, and `system.vectorize = true | false` forces either.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .params import Params
from .training import TrainJob

if TYPE_CHECKING:
    from .executor import Worker

CLIENTS = 8  # clients in the calibration sample (or fewer: the first jobs' count, the chunk size)
STEPS = 2  # local steps each
REPEATS = 3  # timed alternations after one warm-up of each path; the best of each counts


@dataclass(frozen=True)
class TrainingPath:
    """How a worker trains its clients, and why."""

    vectorize: bool
    reason: str
    engine: str = ""  # a vectorised path's gradient computation ("stacked MLP backward" or "vmap")
    vectorised_ms: float | None = None  # measured per client step, when calibrated
    sequential_ms: float | None = None

    def line(self) -> str:
        how = f"vectorised ({self.engine})" if self.vectorize else "one client after another"
        return f"fedsim: clients train {how}: {self.reason}"

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and v != ""}


def calibrate(worker: "Worker", tensors: Params, jobs: Sequence[TrainJob]) -> TrainingPath:
    """Time both paths on the first few of `jobs` (results discarded), or reuse the choice made
    for the same key on this machine before."""
    sample = [replace(j, steps=STEPS) for j in jobs[: max(1, min(CLIENTS, worker.spec.chunk_size))]]
    key = _key(worker, len(sample))
    cached = _load().get(key)
    if cached is not None:
        return TrainingPath(**{**cached, "reason": cached["reason"] + " (measured before on this machine)"})
    cpu_clock = worker.device.type == "cpu" and worker.spec.threads == 1
    clock = time.thread_time if cpu_clock else time.perf_counter  # CPU time: blind to other processes' load
    if worker.device.type == "cuda":
        torch.cuda.synchronize()

    def timed(vectorize: bool) -> float:
        start = clock()
        if vectorize:  # on this thread only: the clock is this thread's CPU time
            worker._run_vectorized(tensors, sample, parallel=False)
        else:
            worker._run_sequential(tensors, sample)
        if worker.device.type == "cuda":
            torch.cuda.synchronize()
        return clock() - start

    try:
        timed(True), timed(False)  # warm-up: first calls allocate, import and pick kernels
        vec, seq = [], []
        for _ in range(REPEATS):
            seq.append(timed(False))
            vec.append(timed(True))
    except Exception as exc:  # a trainer that raises will say so on the real jobs; do not decide on it
        return TrainingPath(True, f"calibration failed ({type(exc).__name__}); vectorised by default", worker.engine)
    if worker.cannot_vectorize is not None:  # what was timed as vectorised was the fallback: not cached
        return worker.path  # type: ignore[return-value]
    per_step = 1e3 / (len(sample) * STEPS)
    v, s = min(vec) * per_step, min(seq) * per_step
    faster = v <= s
    what = "CPU time" if cpu_clock else "wall time"
    reason = (f"{v:.3g} ms vectorised vs {s:.3g} ms one after another per client step "
              f"({what}, {len(sample)} clients x {STEPS} steps)")
    path = TrainingPath(faster, reason, worker.engine, round(v, 4), round(s, 4))
    _store(key, path)
    return path


def _signature(value: Any) -> Any:
    """A JSON-able description of a trainer's settings: dataclass fields, primitives, type names."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _signature(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"type": type(value).__qualname__, **fields}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_signature(v) for v in value]
    return type(value).__qualname__


def _key(worker: "Worker", clients: int) -> str:
    from . import __version__

    spec = worker.spec
    device = torch.cuda.get_device_name(worker.device) if worker.device.type == "cuda" else platform.machine()
    return json.dumps([
        __version__, torch.__version__, device, os.cpu_count(), spec.threads, spec.model_name, spec.model_options,
        list(spec.input_shape), spec.num_classes, _signature(spec.trainer), worker.engine, clients,
    ], sort_keys=True, default=str)


def _path() -> Path:
    return Path(os.environ.get("FEDSIM_CACHE", Path.home() / ".cache" / "fedsim")) / "calibration.json"


def _load() -> dict[str, dict[str, Any]]:
    try:
        return json.loads(_path().read_text())
    except (OSError, ValueError):
        return {}


def _store(key: str, path: TrainingPath) -> None:
    """Add one choice to the file (written to a temporary file and renamed, so that concurrent
    runs never read half a file; the last writer wins, which only drops a cached measurement)."""
    target = _path()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        choices = _load()
        choices[key] = dataclasses.asdict(path)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(choices, indent=1, sort_keys=True))
        os.replace(tmp, target)
    except OSError:
        pass  # a read-only home: the choice is simply made again next time
