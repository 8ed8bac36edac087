"""Checkpoints that a killed run resumes from, in a format that cannot execute code.

A checkpoint holds the simulation's state only: the flow's declared state attributes (parameters,
per-node models, event queues, pending jobs, scheduler state), the clock, the ledger, the failure
model's message counter and the metrics rows so far. Random draws need no saved state, since each
derives from (seed, purpose, ids). Everything is encoded into plain containers and tensors, so
`torch.load(weights_only=True)` reads it; objects are rebuilt only for the classes registered
here, from their fields, never by unpickling code. A header carries the body's SHA-256 and the hash
of the scenario the run belongs to, so a damaged file or a checkpoint beside an edited scenario is
refused before anything is read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import FedsimError

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


MAGIC = b"fedsim checkpoint 2\n"
_HEADER_BYTES = 256  # a JSON line padded with spaces: sha256, body size, scenario hash


class CheckpointError(FedsimError):
    """A checkpoint that cannot be trusted or read: one line naming it, exit code 2."""


class _HashingWriter(io.RawIOBase):
    """The file object torch.save writes to: bytes go to the file and into a SHA-256 as they pass,
    so the checkpoint is never held twice in memory. An OSError is kept, because torch reports a
    failed write as its own RuntimeError ('unexpected pos ...')."""

    def __init__(self, f: Any):
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        try:
            self.f.write(view)
        except OSError as exc:
            self.error = self.error or exc
            raise
        self.sha.update(view)
        self.size += len(view)
        return len(view)


def save(path: Path, payload: dict[str, Any], *, scenario: str = "") -> None:
    """Write atomically, with a checksum: a reader sees the previous checkpoint or the new one,
    never half of one, and a damaged file is recognised as such.

    The new checkpoint goes to a temporary file (header, then the torch-serialised body, hashed as
    it is written), which is flushed, synced and checked for its full size before it replaces the
    old one. Any failure (a full disk, an I/O error) removes the temporary file, leaves the last
    good checkpoint as it was and raises the OSError. `scenario` is the hash of the scenario the
    run belongs to (see `fedsim.runfolder.scenario_hash`).
    """
    from .paths import commit, replacing

    with replacing(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(MAGIC + b" " * _HEADER_BYTES)
            writer = _HashingWriter(f)
            try:
                torch.save(payload, writer)
            except RuntimeError:
                if writer.error is not None:
                    raise writer.error from None
                raise
            header = json.dumps({"sha256": writer.sha.hexdigest(), "bytes": writer.size, "scenario": scenario})
            f.seek(len(MAGIC))
            f.write(header.encode().ljust(_HEADER_BYTES - 1) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        commit(tmp, path, len(MAGIC) + _HEADER_BYTES + writer.size)


def read(path: Path) -> tuple[dict[str, Any], str]:
    """(payload, scenario hash) of a checkpoint, after checking its header, size and SHA-256.

    Nothing is deserialised before the checksum matches, and then only with
    `torch.load(weights_only=True)`, which rebuilds tensors and plain containers and never runs
    code. Every problem is one `CheckpointError` naming the file.
    """
    where = str(path)
    redo = "start over with --rerun"
    try:
        with open(path, "rb") as f:
            magic = f.read(len(MAGIC))
            if magic != MAGIC:
                raise CheckpointError(f"not a checkpoint of this fedsim version (no '{MAGIC.decode().strip()}' "
                                      f"header); {redo}", file=where)
            try:
                header = json.loads(f.read(_HEADER_BYTES).decode("ascii"))
                digest, size, scenario = header["sha256"], int(header["bytes"]), str(header["scenario"])
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                raise CheckpointError(f"damaged header; {redo}", file=where) from None
            actual = os.fstat(f.fileno()).st_size - len(MAGIC) - _HEADER_BYTES
            if actual != size:
                raise CheckpointError(f"truncated or damaged ({actual} bytes where its header says {size}); {redo}",
                                      file=where)
            body = f.read()
    except FileNotFoundError:
        raise CheckpointError("not found", file=where) from None
    except OSError as exc:
        raise CheckpointError(f"cannot be read: {exc.strerror}", file=where) from None
    if hashlib.sha256(body).hexdigest() != digest:
        raise CheckpointError(f"checksum mismatch: the file is damaged; {redo}", file=where)
    try:
        payload = torch.load(io.BytesIO(body), weights_only=True)
    except Exception as exc:  # UnpicklingError for anything but tensors and containers, and the like
        raise CheckpointError(f"refused to load ({exc.__class__.__name__}: only tensors and plain containers "
                              f"are read, never code); {redo}", file=where) from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"does not hold a run's state; {redo}", file=where)
    return payload, scenario


def load(path: Path) -> dict[str, Any]:
    """The checked payload of a checkpoint (see `read`)."""
    return read(path)[0]
