"""Plug-in modules named on the command line (`--plugin my_rules`) or in a scenario
(`[plugins] modules = ["my_rules"]`): imported before any name is looked up, so that what they
register with `@register_aggregator("median")` and friends can be named like a built-in.

Importing a module runs its code, so the same line is drawn as for `module:Name` in a scenario
(registry._import_object): a standard-library module is refused, because a shared scenario could
otherwise reach `os` or `subprocess`; anything else is the user's own code, imported on their word.
The module is looked up in the working directory too, as `python -m` would, so a file beside the
scenario works without installing anything. Ray workers import the same modules from the same
folders (WorkerSpec.plugins), since a registered model or trainer is looked up there too.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Iterable

from .errors import UnknownNameError
from .registry import refuse_standard_library


def search_dirs() -> tuple[str, ...]:
    """Where plug-in modules are looked up besides sys.path: the working directory."""
    return (os.getcwd(),)


def import_modules(names: Iterable[str], dirs: Iterable[str] = ()) -> list[str]:
    """Import each module once (a module already imported is not run again); returns their names.

    Raises UnknownNameError naming the module: not a module path, a standard-library module, or
    an import that failed (with what it raised), so the user gets one line and exit code 2.
    """
    imported = []
    for folder in [*dirs, *search_dirs()]:
        if folder not in sys.path:
            sys.path.append(folder)
    for name in names:
        if not isinstance(name, str) or not name or not all(part.isidentifier() for part in name.split(".")):
            raise UnknownNameError(f"expected a module path such as 'my_rules' or 'mypkg.rules', got {name!r}")
        refuse_standard_library(name, f"plug-in module '{name}'")
        try:
            importlib.import_module(name)
        except Exception as exc:  # ImportError, or whatever the module raised while importing
            raise UnknownNameError(f"cannot import plug-in module '{name}': {exc!r}") from None
        imported.append(name)
    return imported


def module_dirs(names: Iterable[str]) -> tuple[str, ...]:
    """The folders the imported modules came from, for workers in other processes (or on other
    machines sharing the file system) to find them the same way."""
    dirs: list[str] = []
    for name in names:
        module = sys.modules.get(name.split(".")[0])
        file = getattr(module, "__file__", None)
        if file:
            root = Path(file).parent if Path(file).name != "__init__.py" else Path(file).parent.parent
            if str(root) not in dirs:
                dirs.append(str(root))
    return tuple(dirs)
