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


def require_state(flow: Any, name: str) -> None:
    """Refuse, when the flow is built, a flow that no checkpoint could save.

    Without a declaration the first checkpoint crashes with a traceback deep into a run, and a
    declared name the flow lacks does the same; one line at build time names what to fix. (A
    declaration that leaves out an attribute the flow needs is what `fedsim.testing.check_flow`
    finds.)
    """
    from .errors import FedsimError

    def fail(message: str) -> None:
        raise FedsimError(f"algorithm '{name}': its flow {type(flow).__name__} {message}", key="algorithm.name")

    state = getattr(flow, "STATE", None)
    if state is None:
        if not _has_state_methods(flow):
            fail("declares no state: list the attributes a checkpoint must keep in STATE = (...), "
                 "or define state_dict() and load_state_dict()")
        return
    if isinstance(state, str) or not isinstance(state, (tuple, list)) or not all(isinstance(a, str) for a in state):
        fail(f"must declare STATE as a tuple of attribute names, got {state!r}")
    for attr in state:
        if not hasattr(flow, attr):
            fail(f"declares {attr!r} in STATE but has no such attribute")
        value = getattr(flow, attr)
        if hasattr(value, "STATE"):  # a part with its own declaration (an event queue, a job pool)
            require_state(value, name)


def _has_state_methods(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def _declares_state(obj: Any) -> bool:
    return hasattr(obj, "STATE")


def capture(obj: Any) -> dict[str, Any]:
    """The attributes an object declares in `STATE`, nested into those that declare their own;
    or, for an object without `STATE`, what its `state_dict()` returns."""
    if not _declares_state(obj):
        return {"__state_dict__": encode(obj.state_dict())}
    out = {}
    for name in obj.STATE:
        value = getattr(obj, name)
        nested = _declares_state(value) or _has_state_methods(value)
        out[name] = {"__nested__": capture(value)} if nested else encode(value)
    return out


def restore(obj: Any, state: dict[str, Any]) -> None:
    if "__state_dict__" in state:
        obj.load_state_dict(decode(state["__state_dict__"]))
        return
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
