"""Name -> implementation registries for every pluggable kind.

Three routes lead to one registry entry, and built-ins use the same public route as users:
1. the decorator (`@register_aggregator("median")`) in any imported module;
2. the entry-point group `fedsim.<kind>s` of an installed package;
3. `"package.module:Name"` written directly in a scenario, the escape hatch that needs no install.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from importlib import metadata
from typing import Any, Callable, Generic, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")

_BUILTIN_MODULES = ("fedsim.algorithms", "fedsim.topologies", "fedsim.data", "fedsim.models", "fedsim.pretrained")


class Registry(Generic[T]):
    """A named table of implementations of one kind (aggregator, algorithm, data set, ...)."""

    def __init__(self, kind: str, plural: str):
        self.kind = kind
        self.plural = plural
        self.group = f"fedsim.{plural}"
        self._items: dict[str, T] = {}
        self._entry_points_loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            self._items[name] = obj
            return obj

        return decorator

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        try:
            self.get(name)
        except UnknownNameError:
            return False
        return True

    def get(self, name: str) -> T:
        if ":" in name:
            return _import_object(name, self.kind, self)
        self._load()
        if name in self._items:
            return self._items[name]
        close = difflib.get_close_matches(name, self._items, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UnknownNameError(
            f"unknown {self.kind} '{name}'{hint} (known: {', '.join(sorted(self._items))}; "
            f"or 'package.module:Name')"
        )

    def _load(self) -> None:
        """Import the built-ins and installed plugins once, so their decorators run."""
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in metadata.entry_points(group=self.group):
            if ep.name not in self._items:
                self._items[ep.name] = ep.load()


def _import_object(spec: str, kind: str, registry: "Registry[Any]") -> Any:
    """Import `package.module:Name`, looking in the working directory too (as `python -m` would),
    so a plugin file beside the scenario works without installing anything.

    A scenario is data that people share, so this route must never reach an arbitrary callable
    (`os:system` with the table's keys as arguments would run a shell command). The module may not
    belong to the standard library, and the object must declare itself a fedsim plug-in of this
    kind (see `_declares`) before anything is called with the scenario's keys.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or module_name.startswith(".") or not attr or not attr.isidentifier():
        raise UnknownNameError(f"'{spec}' is not 'package.module:Name' (an absolute module and a name)")
    refuse_standard_library(module_name, f"'{spec}'", f"holds no fedsim {kind}")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises while importing
        raise UnknownNameError(f"cannot import {kind} module '{module_name}': {exc!r}") from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise UnknownNameError(f"module '{module_name}' has no {kind} '{attr}'")
    if not _declares(obj, kind, registry):
        raise UnknownNameError(
            f"'{spec}' is not a fedsim {kind}: register it (@register_{kind}(\"name\"))"
            + (" or subclass fedsim.Aggregator" if kind == "aggregator" else "")
            + (" or annotate its first parameter with an AlgorithmConfig subclass" if kind == "algorithm" else "")
        )
    return obj


def refuse_standard_library(module_name: str, what: str, why: str = "holds no fedsim plug-in") -> None:
    """A scenario (or a shared command line) naming a standard-library module is refused: such a
    module is never a fedsim plug-in, and importing or calling into it (`os`, `subprocess`) is how
    a shared file would run commands."""
    top = module_name.split(".")[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        raise UnknownNameError(f"{what} names the standard library module '{top}', which {why}; "
                               "a plug-in lives in your own module")


def _declares(obj: Any, kind: str, registry: "Registry[Any]") -> bool:
    """Whether `obj` says it is a fedsim plug-in of `kind`: registered (by decorator, under any
    name), a subclass of fedsim's base for the kind, or an algorithm build function whose first
    parameter is annotated with an `AlgorithmConfig` subclass. Decided without calling `obj`."""
    if any(item is obj for item in registry._items.values()):
        return True
    if kind == "aggregator":
        from .aggregation import Aggregator

        return isinstance(obj, type) and Aggregator in obj.__mro__
    if kind == "algorithm":
        from .scenario import AlgorithmSpec, declared_config

        return isinstance(obj, AlgorithmSpec) or declared_config(obj) is not None
    return False


aggregators: Registry[Any] = Registry("aggregator", "aggregators")
algorithms: Registry[Any] = Registry("algorithm", "algorithms")
topologies: Registry[Any] = Registry("topology", "topologies")
datasets: Registry[Any] = Registry("dataset", "datasets")
models: Registry[Any] = Registry("model", "models")

register_aggregator = aggregators.register
register_algorithm = algorithms.register
register_topology = topologies.register
register_dataset = datasets.register
register_model = models.register
