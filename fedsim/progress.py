"""What a run shows on the terminal while it works: a bar where the terminal can draw one, one line
per evaluation where it cannot, nothing when the output is not a terminal (or with --no-progress).

A terminal that reports no width (an editor's shell, some CI consoles) gets lines, because a bar
there is redrawn as a new line on every update and buries everything else. In a sweep every run's
bar says which run it is ("run 3/12"), so a long sweep tells how far it is.
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

from tqdm.auto import tqdm


def terminal_width(stream: TextIO) -> int:
    """Columns the terminal behind `stream` reports; 0 when it reports none."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, AttributeError, ValueError):
        return 0


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """Progress of one run: `evaluated(row)` after each evaluation, `advance()` after each round."""

    def __init__(self, name: str, total: int, initial: int = 0, *, enabled: bool = True,
                 position: tuple[int, int] | None = None, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.total = total
        self.label = f"run {position[0]}/{position[1]} {name}" if position and position[1] > 1 else name
        if not enabled or not _is_terminal(self.stream):
            self.mode = "off"
        elif terminal_width(self.stream) > 0:
            self.mode = "bar"
        else:
            self.mode = "lines"
        self.bar: Any = None
        if self.mode == "bar":
            self.bar = tqdm(total=total, initial=initial, desc=self.label, unit="round", file=self.stream,
                            dynamic_ncols=True)

    def evaluated(self, row: dict[str, Any]) -> None:
        accuracy = row.get("test_accuracy", float("nan"))
        if self.mode == "bar":
            self.bar.set_postfix(acc=f"{accuracy:.3f}", refresh=False)
        elif self.mode == "lines":
            print(f"{self.label}: round {row['round']}/{self.total}, accuracy {accuracy:.3f}, "
                  f"simulated {row.get('sim_time', 0.0):.1f} s", file=self.stream, flush=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
