"""Convergence curves, one row per evaluation, on disk as soon as they exist.

Rows are appended and flushed at every evaluation, so a run killed mid-way keeps every row it
wrote. A row with a column the file has not seen yet rewrites the file (atomically) with the wider
header, which happens at most a few times per run. A write that fails half-way (a full disk) is cut
back to the last whole row before the error goes up, so the file never ends in half a row.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable, Protocol

import pandas as pd

from .paths import write_atomic

BASE_COLUMNS = ["round", "sim_time", "wall_time", "test_accuracy", "test_loss", "train_loss", "bytes_sent"]


class RowObserver(Protocol):
    """Hears every row once it is on disk (experiment trackers, progress lines): the one place
    where everything a run records passes, so observers never need hooks in the algorithms."""

    def row(self, row: dict[str, Any]) -> None: ...


class History:
    def __init__(self, path: str | Path, rows: list[dict[str, Any]] | None = None,
                 observers: Iterable[RowObserver] = ()):
        """A new file, or (resuming) one holding exactly `rows`. Observers hear only new rows."""
        self.path = Path(path)
        self.observers = list(observers)
        self.rows: list[dict[str, Any]] = list(rows or [])
        self._encoded: list[str] = []  # JSON of rows[:len(_encoded)], for checkpoints
        self.columns: list[str] = list(BASE_COLUMNS)
        for row in self.rows:
            self.columns += [k for k in row if k not in self.columns]
        self._write_all()

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        new = [key for key in row if key not in self.columns]
        if new:
            self.columns += new
            self._write_all()
        else:
            buf = io.StringIO()
            csv.DictWriter(buf, self.columns).writerow(_clean(row))
            with self.path.open("a", newline="") as f:
                size = f.tell()
                try:
                    f.write(buf.getvalue())
                    f.flush()
                except OSError:
                    # a full disk may take half a row: cut it off, so the file keeps whole rows only
                    try:
                        f.truncate(size)
                    except OSError:
                        pass
                    raise
        for observer in self.observers:
            observer.row(row)

    def encoded(self) -> str:
        """All rows as one JSON text, for a checkpoint. Each row is encoded once, when first
        checkpointed, and the checkpoint stores one string instead of a container per value, so
        checkpointing stays cheap however long the run (floats keep every bit: JSON writes their
        repr; NaN and infinities included)."""
        self._encoded += [json.dumps(row, default=_plain) for row in self.rows[len(self._encoded):]]
        return "[" + ",".join(self._encoded) + "]"

    @staticmethod
    def decoded(text: str) -> list[dict[str, Any]]:
        return json.loads(text)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=self.columns)

    def _write_all(self) -> None:
        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, self.columns)
        writer.writeheader()
        writer.writerows(_clean(row) for row in self.rows)
        write_atomic(self.path, buf.getvalue(), fsync=False)


def _plain(value: Any) -> Any:
    """numpy scalars as Python ones (JSON knows only the latter)."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot record a {type(value).__name__} in metrics")


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    """Floats written with repr precision so that a re-read is bit-identical."""
    return {k: (repr(v) if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()}
