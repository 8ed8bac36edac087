"""Citations a user can follow: nothing a user reads points at notes outside the repository, and
every algorithm's conventions are documented in docs/conventions.md."""

from __future__ import annotations

import re
from pathlib import Path

from fedsim.registry import algorithms

ROOT = Path(__file__).resolve().parents[1]
READ_BY_USERS = ["README.md", "pyproject.toml", "docs", "scenarios", "reports", "algorithms", "topologies", "fedsim", "examples"]
NOT_IN_REPOSITORY = re.compile(r"ALGORITHMS\.md|DESIGN\.md|DATA\.md|shared/|\bthe notes\b")


def _files():
    for entry in READ_BY_USERS:
        path = ROOT / entry
        candidates = [path] if path.is_file() else sorted(path.rglob("*"))
        yield from (p for p in candidates if p.is_file() and p.suffix in {".md", ".py", ".toml", ".sh"})


def test_no_file_cites_notes_that_are_not_in_the_repository():
    offenders = [
        f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
        for p in _files()
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if NOT_IN_REPOSITORY.search(line)
    ]
    assert not offenders, "\n".join(offenders)


def test_every_algorithm_has_its_conventions_documented_and_linked():
    page = (ROOT / "docs" / "conventions.md").read_text()
    assert "(docs/conventions.md)" in (ROOT / "README.md").read_text()
    builtin = [n for n in algorithms.names() if getattr(algorithms.get(n), "__module__", "").startswith("fedsim.algorithms")]
    assert len(builtin) >= 15
    missing = [name for name in builtin if f"`{name}`" not in page]
    assert not missing, f"docs/conventions.md does not cover {missing}"
