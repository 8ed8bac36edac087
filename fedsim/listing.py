"""`fedsim list`: what each registered name is and which keys it takes, read from the code itself
(docstrings, pydantic schemas, type hints), so the listing cannot drift from what validation does.
"""

from __future__ import annotations

import inspect
import sys
import textwrap
import typing
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from .errors import FedsimError

WIDTH = 100
_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


# Words that end with a full stop inside a sentence: "(Wang et al. 2021)", "Sec. 4", "with prob. p".
ABBREVIATIONS = frozenset({
    "al", "e.g", "i.e", "cf", "vs", "sec", "secs", "fig", "figs", "eq", "eqs", "prob", "approx", "resp",
    "alg", "thm", "def", "ref", "refs", "ch", "app", "no", "pp", "vol",
})


def one_line(obj: Any, name: str | None = None) -> str:
    """The first sentence of the first paragraph of the docstring that describes `obj`."""
    doc = summary_doc(obj, name)
    if not doc:
        return ""
    return first_sentence(" ".join(doc.split("\n\n")[0].split()))


def first_sentence(paragraph: str) -> str:
    """Up to the first full stop that ends a sentence: not one after an abbreviation or an initial,
    and not one followed by a lower-case word ("with prob. p")."""
    start = 0
    while True:
        end = paragraph.find(". ", start)
        if end < 0:
            return paragraph
        word = paragraph[:end].rsplit(None, 1)[-1].lstrip("([{\"'`") if paragraph[:end].strip() else ""
        following = paragraph[end + 2:].lstrip()
        initial = len(word) == 1 and word.isupper()
        if word.lower() not in ABBREVIATIONS and not initial and not following[:1].islower():
            return paragraph[: end + 1]
        start = end + 2


def summary_doc(obj: Any, name: str | None = None) -> str | None:
    """The docstring that says what `obj` is.

    Its own, unless it only describes one of its keys ("batch_norm: ...") or it is a private
    wrapper registered for a public function of the same name (`_from_file_topology` for
    `from_file`), whose docstring is then the one that describes it. Without one of its own, its
    module's, but only when that names it: a module of many entries (fedsim.models) describes
    none of them in particular, and a wrong summary is worse than none.
    """
    module = sys.modules.get(getattr(obj, "__module__", "") or "", None)
    own = inspect.getdoc(obj) if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__doc__ else None
    own_name = getattr(obj, "__name__", "")
    if name and module is not None and own_name.startswith("_") and own_name != name:
        public = getattr(module, name, None)
        if public is not obj and callable(public) and getattr(public, "__doc__", None):
            return inspect.getdoc(public)
    if own and not _describes_a_key(own, obj):
        return own
    doc = inspect.getdoc(module) if module is not None else None
    if doc and any(_plain(n) in _plain(doc) for n in (name, own_name) if n and not n.startswith("_")):
        return doc
    return None


def _plain(text: str) -> str:
    return "".join(c for c in text.lower() if c.isalnum())


def _describes_a_key(doc: str, obj: Any) -> bool:
    """Whether a docstring starts by describing one of the object's parameters (`key: ...`)."""
    head = doc.split(":", 1)[0].strip().strip("`")
    if not head.isidentifier() or head == doc.strip():
        return False
    try:
        target = obj.__init__ if inspect.isclass(obj) else obj
        return head in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False


def _algorithm(obj: Any) -> Any:
    from .scenario import algorithm_spec

    return algorithm_spec(obj)


def own_keys(kind: str, obj: Any) -> list[str]:
    """The keys that belong to this name: a method's own settings (not the shared local-SGD ones),
    a factory's keyword arguments."""
    if kind == "algorithms":
        from .training import LocalSGDConfig

        fields = _algorithm(obj).config.model_fields
        return [k for k in fields if k != "name" and k not in LocalSGDConfig.model_fields]
    return [name for name, _ in factory_params(kind, obj)]


def factory_params(kind: str, obj: Any) -> list[tuple[str, inspect.Parameter]]:
    if kind == "datasets":
        return []  # loaders read the [data] table, whose keys the README lists
    target = obj.__init__ if inspect.isclass(obj) else obj
    if inspect.isclass(obj) and obj.__init__ is object.__init__:
        return []
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return []
    return [(p.name, p) for p in params if p.name != "self" and (
        p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and p.default is not p.empty))]


def summaries(kind: str, registry: Any) -> str:
    """Every name of a kind with its one-line summary and keys."""
    names = registry.names()
    width = max(map(len, names), default=0) + 2
    lines = [f"{kind} (fedsim list {kind} NAME: its keys, defaults and allowed values)"]
    for name in names:
        obj = registry.get(name)
        summary = one_line(obj, name) or "(no description)"
        lines += textwrap.wrap(summary, WIDTH, initial_indent=f"  {name:<{width}}", subsequent_indent=" " * (width + 2),
                               break_on_hyphens=False)
        keys = own_keys(kind, obj)
        if kind == "algorithms":
            # needs_topology says whether the method runs on a [topology] graph; False is not a
            # server (MoDeST samples peers without one, `local` never communicates)
            where = "graph ([topology] needed)" if _algorithm(obj).needs_topology else "no graph (no [topology] table)"
            text = f"{where}; keys: {', '.join(keys) if keys else 'the shared local-training ones'}"
        else:
            text = f"keys: {', '.join(keys)}" if keys else ""
        if text:
            lines += textwrap.wrap(text, WIDTH, initial_indent=" " * (width + 2), subsequent_indent=" " * (width + 4),
                                   break_on_hyphens=False)
    return "\n".join(lines)


def describe(kind: str, registry: Any, name: str) -> str:
    """One name: its summary, then every key with its default and allowed values."""
    try:
        obj = registry.get(name)
    except FedsimError as exc:
        raise exc.located(key=kind) from None
    lines = [f"{name}: {one_line(obj, name) or '(no description)'}"]
    if kind == "algorithms":
        from .training import LocalSGDConfig

        spec = _algorithm(obj)
        lines.append("runs on a graph: needs a [topology] table" if spec.needs_topology
                     else "runs without a graph: no [topology] table")
        fields = {k: f for k, f in spec.config.model_fields.items() if k != "name"}
        own = {k: f for k, f in fields.items() if k not in LocalSGDConfig.model_fields}
        shared = {k: f for k, f in fields.items() if k in LocalSGDConfig.model_fields}
        lines.append(f"[algorithm] keys of {name}:" if own else f"{name} has no keys of its own")
        lines += [_field_line(k, f) for k, f in own.items()]
        if shared:
            lines.append("shared local-training keys:")
            lines += [_field_line(k, f) for k, f in shared.items()]
        return "\n".join(lines)
    params = factory_params(kind, obj)
    table = {"aggregators": "[aggregator]", "topologies": "[topology]", "models": "[model]"}.get(kind, "[data]")
    if not params:
        lines.append(f"no keys besides name in {table}" if kind != "datasets" else "reads the [data] table's keys")
        return "\n".join(lines)
    try:
        hints = typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj, include_extras=True)
    except Exception:
        hints = {}
    lines.append(f"{table} keys:")
    for pname, param in params:
        default = "required" if param.default is param.empty else _value(param.default)
        hint = _type_text(hints.get(pname)) if pname in hints else ""
        lines.append(_row(pname, default, hint))
    return "\n".join(lines)


def _row(name: str, default: str, allowed: str) -> str:
    left = f"  {name} = {default}"
    return f"{left:<36}{allowed}".rstrip()


def _field_line(name: str, field: FieldInfo) -> str:
    if field.default is PydanticUndefined:
        default = "required"
    else:
        default = _value(field.default)
    allowed = _type_text(field.annotation)
    bounds = [f"{_BOUNDS[a]} {getattr(m, a)}" for m in field.metadata for a in _BOUNDS if getattr(m, a, None) is not None]
    if bounds:
        allowed = f"{allowed} {', '.join(bounds)}".strip()
    return _row(name, default, allowed)


def _value(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple):
        return repr(list(value))
    return repr(value)


def _type_text(annotation: Any) -> str:
    """A type as a user writes it in TOML: 'an integer', 'one of "a", "b"', ..."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        inner = _type_text(args[0])
        bounds = [f"{_BOUNDS[a]} {getattr(m, a)}" for m in args[1:] for a in _BOUNDS if getattr(m, a, None) is not None]
        return f"{inner} {', '.join(bounds)}".strip()
    if origin is typing.Literal:
        return "one of " + ", ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        parts = [_type_text(a) for a in args if a is not type(None)]
        text = " or ".join(p for p in parts if p)
        return f"{text} (optional)" if type(None) in args else text
    if origin in (list, tuple, typing.Sequence) or (origin is not None and getattr(origin, "__name__", "") == "Sequence"):
        inner = _type_text(args[0]) if args else ""
        return f"a list ({inner})" if inner else "a list"
    names = {int: "integer", float: "number", str: "string", bool: "true or false"}
    if annotation in names:
        return names[annotation]
    return ""
