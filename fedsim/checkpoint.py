"""Checkpoints that a killed run resumes from, in a format that cannot execute code.

A checkpoint holds the simulation's state only: the flow's declared state attributes (parameters,
per-node models, event queues, pending jobs, scheduler state), the clock, the ledger, the failure
model's message counter and the metrics rows so far. Random draws need no saved state, since each
derives from (seed, purpose, ids). Everything is encoded into plain containers and tensors, so
`torch.load(weights_only=True)` reads it; objects are rebuilt only for the classes registered
here, from their fields, never by unpickling code.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

_TYPES: dict[str, type] = {}


def checkpointable(cls: type) -> type:
    """Allow instances of `cls` in checkpoints (rebuilt field by field on load)."""
    _TYPES[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls


def encode(obj: Any) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(obj)).clone(), "dtype": str(obj.dtype)}
    if isinstance(obj, list):
        return [encode(x) for x in obj]
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(x) for x in obj]}
    if isinstance(obj, (set, frozenset)):
        return {"__set__": [encode(x) for x in sorted(obj, key=repr)]}
    if isinstance(obj, dict):
        return {"__dict__": [[encode(k), encode(v)] for k, v in obj.items()]}
    name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if name in _TYPES:
        return {"__obj__": name, "fields": {k: encode(v) for k, v in _fields(obj).items()}}
    raise TypeError(f"cannot checkpoint a {name}; register it with fedsim.checkpoint.checkpointable")


def decode(data: Any) -> Any:
    if isinstance(data, list):
        return [decode(x) for x in data]
    if not isinstance(data, dict):
        return data
    if "__ndarray__" in data:
        return data["__ndarray__"].numpy().astype(data["dtype"], copy=False)
    if "__tuple__" in data:
        return tuple(decode(x) for x in data["__tuple__"])
    if "__set__" in data:
        return {decode(x) for x in data["__set__"]}
    if "__dict__" in data:
        return {_key(decode(k)): decode(v) for k, v in data["__dict__"]}
    cls = _TYPES.get(data.get("__obj__", ""))
    if cls is None:
        raise ValueError(f"checkpoint holds an unknown type {data.get('__obj__')!r}")
    obj = cls.__new__(cls)
    for k, v in data["fields"].items():
        object.__setattr__(obj, k, decode(v))
    return obj


def _key(k: Any) -> Any:
    return tuple(k) if isinstance(k, list) else k


def _fields(obj: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(obj):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    slots = getattr(type(obj), "__slots__", None)
    if slots:
        return {s: getattr(obj, s) for s in slots}
    return dict(vars(obj))


def capture(obj: Any) -> dict[str, Any]:
    """The attributes an object declares in `STATE`, nested into those that declare their own."""
    out = {}
    for name in obj.STATE:
        value = getattr(obj, name)
        out[name] = {"__nested__": capture(value)} if hasattr(value, "STATE") else encode(value)
    return out


def restore(obj: Any, state: dict[str, Any]) -> None:
    for name, value in state.items():
        if isinstance(value, dict) and "__nested__" in value:
            restore(getattr(obj, name), value["__nested__"])
        else:
            setattr(obj, name, decode(value))


def save(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a reader sees the previous checkpoint or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)
