"""Built-in algorithms are written against the public API a user has (`import fedsim`), so that
what a built-in needs is exported and documented rather than reached for in private modules."""

from __future__ import annotations

import ast
from pathlib import Path

import fedsim

ALGORITHMS = sorted(Path(__file__).resolve().parents[1].joinpath("algorithms").glob("*.py"))


def private_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedsim."):
            found.append(f"{path.name}:{node.lineno} from {node.module}")
        elif isinstance(node, ast.Import):
            found += [f"{path.name}:{node.lineno} import {a.name}" for a in node.names if a.name.startswith("fedsim.")]
    return found


def test_algorithms_import_only_the_public_api():
    assert ALGORITHMS, "no algorithm modules found"
    offenders = [hit for path in ALGORITHMS for hit in private_imports(path)]
    assert not offenders, "private fedsim imports in algorithms/: " + "; ".join(offenders)


def test_every_public_name_is_exported_and_exists():
    missing = [name for name in fedsim.__all__ if not hasattr(fedsim, name)]
    assert not missing
    assert len(set(fedsim.__all__)) == len(fedsim.__all__)


def test_the_check_sees_a_private_import(tmp_path):
    """The scan itself works: a module that reaches into fedsim.jobs is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("from fedsim.jobs import JobPool\nimport fedsim.params\nfrom fedsim import stack\n")
    assert private_imports(bad) == ["bad.py:1 from fedsim.jobs", "bad.py:2 import fedsim.params"]
