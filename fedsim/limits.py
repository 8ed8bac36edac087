"""Size limits on what fedsim reads, so that a hostile or mistaken input is refused in one line
instead of exhausting memory or running for hours.

A scenario file, a graph file, a trace or an IDX file that exceeds a limit is a `DataError` (exit
code 2) naming the file and the limit. The limits are far above any real input; the one a large
but legitimate input can meet, the size of an input file, can be raised with the environment
variable FEDSIM_MAX_INPUT_BYTES. A sweep's number of runs has its own limit (`--max-runs`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Iterator

from .errors import DataError

MAX_RUNS = 10_000  # sweep points, unless --max-runs says otherwise
MAX_SCENARIO_BYTES = 4 * 2**20  # a scenario (TOML) file
MAX_TOML_DEPTH = 128  # tables and arrays nested in a scenario or a --set value (real ones: 4)
MAX_LINE_BYTES = 2**20  # one line of an edge list or a trace
DEFAULT_MAX_INPUT_BYTES = 2 * 2**30  # a graph file, a trace, an IDX file (decompressed)


def max_input_bytes() -> int:
    value = os.environ.get("FEDSIM_MAX_INPUT_BYTES")
    if value is None:
        return DEFAULT_MAX_INPUT_BYTES
    try:
        return max(1, int(value))
    except ValueError:
        raise DataError(f"FEDSIM_MAX_INPUT_BYTES: expected a number of bytes, got {value!r}") from None


def check_file_size(path: str | Path, what: str, limit: int | None = None) -> int:
    """The size of `path` in bytes; a DataError when it exceeds `limit` (default: the input limit)."""
    limit = max_input_bytes() if limit is None else limit
    size = os.stat(path).st_size
    if size > limit:
        hint = "" if limit != max_input_bytes() else " (raise it with FEDSIM_MAX_INPUT_BYTES)"
        raise DataError(f"{path}: {what} of {size:,} bytes is larger than the limit of {limit:,} bytes{hint}")
    return size


def lines(handle: IO[str], path: str | Path, limit: int = MAX_LINE_BYTES) -> Iterator[tuple[int, str]]:
    """(number, line) for each line of a text file, refusing a line longer than `limit`
    characters before reading the rest of it (a file of one huge line would otherwise be read
    into memory whole)."""
    number = 0
    while True:
        line = handle.readline(limit + 1)
        if not line:
            return
        number += 1
        if len(line) > limit:
            raise DataError(f"{path}: line {number} is longer than {limit:,} characters; not a file fedsim reads")
        yield number, line


def depth(value: object, limit: int = MAX_TOML_DEPTH) -> int:
    """How deeply tables and arrays nest in `value` (a scalar is 0), counting no further than
    `limit + 1`; iterative, so it cannot itself overflow the stack."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            children = list(node.values())
        elif isinstance(node, list):
            children = list(node)
        else:
            continue
        level += 1
        deepest = max(deepest, level)
        if deepest > limit:
            return deepest
        stack.extend((child, level) for child in children)
    return deepest
