"""A run folder's life on disk: what it holds, who is writing to it, and the sweep index.

- `inspect` says whether a folder holds nothing, a finished run, a run that stopped before its end
  (killed, interrupted, failed) or files fedsim did not write, so that a re-run never destroys
  results: a finished run is skipped, an unfinished one is resumed or re-run only when asked. A
  file under a run's name (metrics.csv, ...) without the scenario.toml every run writes first is
  the user's, and is refused outright: even --rerun would overwrite it.
- `RunLock` is an exclusive `flock` on `RUN/.fedsim.lock` while a run writes there: a second run
  into the same folder is refused in one line. The kernel drops the lock when its process dies
  (SIGKILL included), so a stale lock never blocks anyone; the file also records the local Ray
  processes the run started, so that the next run into the folder can end those a killed run left
  behind (only those, checked by process start time, never anyone else's).
- `RunsIndex` is `OUT/runs.csv`, merged row by row under its own lock, never replaced.
- `scenario_hash` identifies a resolved scenario by its content (not its comments), for
  checkpoints and for telling a finished run of the same scenario from one of another.
- `read_metrics`, `read_summary` read what a run wrote, turning a damaged file into one line.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import signal
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .errors import FedsimError
from .paths import OutputError, PathError, name_problem, write_atomic, writing

LOCK_NAME = ".fedsim.lock"
# every file a run writes in its folder; nothing else there is ever removed or overwritten
RUN_FILES = ("scenario.toml", "metrics.csv", "summary.json", "convergence.png", "checkpoint.pt")
# what experiment trackers keep in a run folder (fedsim.tracking): fedsim's too, never "foreign"
TRACKER_FILES = ("tracking.json", "tensorboard", "wandb")
_TEMPORARY = tuple(f"{name}.tmp" for name in RUN_FILES) + ("metrics.csv.tmp",)
MAX_RUN_FILE_BYTES = 512 * 2**20  # metrics.csv or summary.json: far beyond any real run's


class RunFolderError(FedsimError):
    """A run folder in a state that needs the user's decision (exit code 2)."""


class DamagedFileError(FedsimError):
    """A file fedsim wrote earlier that cannot be read back (exit code 2)."""


# ---------------------------------------------------------------------------------------------
# what a folder holds


@dataclass
class FolderState:
    kind: str  # absent | empty | finished | unfinished | foreign
    path: Path
    foreign: list[str] = field(default_factory=list)  # names fedsim did not write
    has_checkpoint: bool = False
    locked_by: int | None = None  # pid of a live run writing there


def inspect(run_dir: Path) -> FolderState:
    if not run_dir.exists() and not run_dir.is_symlink():
        return FolderState("absent", run_dir)
    if not run_dir.is_dir():
        raise PathError(f"{run_dir} exists and is not a folder: move it away or choose another --out or name")
    try:
        names = sorted(os.listdir(run_dir))
    except OSError as exc:
        raise PathError(f"cannot read the folder {run_dir}: {exc.strerror}") from None
    ours = [n for n in names if n in RUN_FILES]
    if ours and "scenario.toml" not in ours:
        # A run writes its scenario.toml before any other file (coordinator._run_locked) and never
        # removes it, so a metrics.csv (summary.json, ...) without one is the user's own file under
        # a name a run would write: refused even with --rerun, which would overwrite it.
        shown = ", ".join(ours[:3]) + (", ..." if len(ours) > 3 else "")
        raise RunFolderError(f"holds files fedsim did not write ({shown}, without the scenario.toml a run writes "
                             "first); choose another --out or name, or move them away (--rerun would overwrite "
                             "them, so it is refused too)", file=str(run_dir))
    foreign = [n for n in names if n not in RUN_FILES + TRACKER_FILES + _TEMPORARY and n != LOCK_NAME]
    state = FolderState("empty", run_dir, foreign, has_checkpoint="checkpoint.pt" in names,
                        locked_by=lock_holder(run_dir))
    if not ours:
        state.kind = "foreign" if foreign else "empty"
    elif "summary.json" in ours and "metrics.csv" in ours and not state.has_checkpoint:
        state.kind = "finished"
    else:
        state.kind = "unfinished"
    return state


def scenario_hash(resolved: dict[str, Any]) -> str:
    """SHA-256 of a resolved scenario's content (key order and comments do not count)."""
    text = json.dumps(resolved, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def folder_scenario(run_dir: Path) -> dict[str, Any]:
    """The resolved scenario in `run_dir/scenario.toml`, or a one-line error naming it."""
    path = run_dir / "scenario.toml"
    try:
        text = _read_capped(path, 4 * 2**20).decode("utf-8")
        return tomllib.loads(text)
    except FileNotFoundError:
        raise DamagedFileError("no scenario.toml: not a run folder (or one fedsim did not finish creating)",
                               file=str(run_dir)) from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
        raise DamagedFileError(f"cannot be read back ({exc.__class__.__name__}); "
                               "it is damaged: restore it or start over with --rerun", file=str(path)) from None


def changed_keys(a: dict[str, Any], b: dict[str, Any], limit: int = 3) -> list[str]:
    """Dotted keys whose values differ between two resolved scenarios (at most `limit`)."""
    flat_a, flat_b = _flatten(a), _flatten(b)
    keys = sorted(k for k in set(flat_a) | set(flat_b) if flat_a.get(k, None) != flat_b.get(k, None))
    return keys[:limit]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---------------------------------------------------------------------------------------------
# the lock


def lock_holder(run_dir: Path) -> int | None:
    """The pid recorded by a live run holding `run_dir`'s lock, or None when nobody holds it."""
    path = run_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _parse_lock(_read_fd(fd))
            return int(info.get("pid", -1)) if isinstance(info.get("pid"), int) else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunLock:
    """Held while a run writes to its folder (see the module docstring).

    `acquire` creates the folder when it is missing and remembers that it did, so that a run
    refused before it started can leave the folder as it found it (`abandon`).
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.created = False
        self.fd: int | None = None
        self.info: dict[str, Any] = {}

    def acquire(self) -> "RunLock":
        with writing(self.run_dir, started=False):
            if not self.run_dir.exists():
                self.run_dir.mkdir(parents=True)
                self.created = True
            for _ in range(10):  # a holder may unlink the file between our open and our flock
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    info = _parse_lock(_read_fd(fd))
                    os.close(fd)
                    who = f"fedsim run (pid {info['pid']})" if isinstance(info.get("pid"), int) else "fedsim run"
                    raise RunFolderError(f"another {who} is writing to this folder; wait for it to end "
                                         "or choose another --out or name", file=str(self.run_dir)) from None
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            else:  # pragma: no cover - ten lost races in a row
                raise RunFolderError("could not lock the folder", file=str(self.run_dir))
            self.fd = fd
            stale = _parse_lock(_read_fd(fd))
            reap(stale.get("ray", []))
            self.info = {"pid": os.getpid(), "started": time.time(), "ray": []}
            self._write()
        return self

    def record_ray(self, processes: list[dict[str, float]]) -> None:
        """Remember the local Ray processes this run started, for `reap` after a SIGKILL."""
        if self.fd is None or not processes:
            return
        self.info["ray"] = processes
        try:
            self._write()
        except OSError:  # losing this record only costs the clean-up after a SIGKILL
            pass

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def abandon(self) -> None:
        """Release, and remove the folder again if this run created it and wrote nothing else."""
        self.release()
        if self.created:
            try:
                self.run_dir.rmdir()
            except OSError:
                pass

    def _write(self) -> None:
        assert self.fd is not None
        data = json.dumps(self.info).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)


def _read_fd(fd: int) -> bytes:
    try:
        return os.pread(fd, 65536, 0)
    except OSError:
        return b""


def _parse_lock(data: bytes) -> dict[str, Any]:
    try:
        info = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return {}
    return info if isinstance(info, dict) else {}


def reap(processes: Iterable[Any]) -> int:
    """End the Ray processes a killed run of ours left behind; returns how many were ended.

    A process is ended only if it still has the pid *and* the start time recorded when our run
    started it (a pid alone may have been reused by anyone's process since), together with the
    worker processes it started. Records that are malformed are ignored.
    """
    if not processes:
        return 0
    psutil = _psutil()
    if psutil is None:  # pragma: no cover - psutil comes with ray
        return 0
    victims: list[Any] = []
    for item in processes if isinstance(processes, list) else []:
        if not isinstance(item, dict):
            continue
        pid, started = item.get("pid"), item.get("create_time")
        if not isinstance(pid, int) or not isinstance(started, (int, float)) or pid <= 1 or pid == os.getpid():
            continue
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - float(started)) > 0.05:
                continue  # the pid now belongs to another process
            if proc.uids().real != os.getuid() or not _is_ray(proc):
                continue  # a record that names someone else's process: never touched
            victims += proc.children(recursive=True) + [proc]
        except (psutil.Error, OSError):
            continue
    for proc in victims:
        try:
            proc.send_signal(signal.SIGKILL)
        except (psutil.Error, OSError):
            pass
    psutil.wait_procs(victims, timeout=5)
    return len(victims)


def _psutil() -> Any:
    """psutil, which Ray vendors (importing ray puts its copy on the path)."""
    try:
        import psutil
    except ImportError:
        try:
            import ray  # noqa: F401
            import psutil
        except ImportError:
            return None
    return psutil


def _is_ray(proc: Any) -> bool:
    """Whether a process is one of Ray's (GCS, raylet, agents, workers), by its command line."""
    try:
        text = " ".join(proc.cmdline()) + " " + proc.name()
    except Exception:
        return False
    return any(mark in text for mark in ("ray", "gcs_server", "raylet"))


# ---------------------------------------------------------------------------------------------
# the sweep index


INDEX_COLUMNS = ["run_dir", "status", "error", "sweep"]


class RunsIndex:
    """`OUT/runs.csv`: one row per run folder of the sweeps run into OUT. Each update reads the
    file, changes only its own rows and writes it back atomically, all under `OUT/.runs.csv.lock`,
    so two sweeps into one OUT keep each other's rows."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / "runs.csv"
        self.lock_path = self.out / ".runs.csv.lock"

    def update(self, rows: list[dict[str, Any]], *, started: bool = True) -> None:
        with writing(self.path, started=started):
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                existing = self.read()
                by_dir = {row["run_dir"]: row for row in existing}
                order = [row["run_dir"] for row in existing]
                for row in rows:
                    if row["run_dir"] not in by_dir:
                        order.append(row["run_dir"])
                    by_dir[row["run_dir"]] = {**by_dir.get(row["run_dir"], {}), **row}
                columns = list(INDEX_COLUMNS)
                for d in order:
                    columns += [k for k in by_dir[d] if k not in columns]
                buf = io.StringIO()
                writer = csv.DictWriter(buf, columns, restval="", lineterminator="\n")
                writer.writeheader()
                for d in order:
                    writer.writerow({k: _cell(v) for k, v in by_dir[d].items()})
                write_atomic(self.path, buf.getvalue())
            finally:
                os.close(fd)

    def read(self) -> list[dict[str, str]]:
        """The rows, or [] when there is no index yet; a damaged index is a one-line error."""
        if not self.path.exists():
            return []
        return read_index(self.path)


def read_index(path: str | Path) -> list[dict[str, str]]:
    """The rows of a runs.csv (strings); a damaged or crafted one is a one-line error naming it."""
    path = Path(path)
    try:
        text = _read_capped(path, MAX_RUN_FILE_BYTES).decode("utf-8")
        rows = list(csv.DictReader(io.StringIO(text)))
    except FileNotFoundError:
        raise DamagedFileError("not found", file=str(path)) from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DamagedFileError(f"not a runs index fedsim wrote ({exc.__class__.__name__})", file=str(path)) from None
    if not rows or "run_dir" not in rows[0]:
        raise DamagedFileError("not a runs index fedsim wrote (expected a run_dir column)", file=str(path))
    out = []
    for row in rows:
        name = row.get("run_dir") or ""
        if name_problem(name) is not None:  # an index names folders beside it, nothing else
            raise DamagedFileError(f"names a run folder {name[:40]!r} that is not a plain folder name", file=str(path))
        out.append({k: v for k, v in row.items() if k is not None})
    return out


def _cell(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\r", " ").replace("\n", " ")
    return value


# ---------------------------------------------------------------------------------------------
# reading back what a run wrote


def _read_capped(path: Path, limit: int) -> bytes:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit:,} bytes", str(path))
    return data


def read_metrics(path: str | Path) -> Any:
    """metrics.csv as a DataFrame; a damaged or crafted file is one line naming it (exit 2)."""
    import pandas as pd

    path = Path(path)
    try:
        data = _read_capped(path, MAX_RUN_FILE_BYTES)
        df = pd.read_csv(io.BytesIO(data))
    except FileNotFoundError:
        raise DamagedFileError("not found", file=str(path)) from None
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DamagedFileError(f"not a metrics file fedsim wrote ({exc.__class__.__name__})", file=str(path)) from None
    missing = [c for c in ("round", "test_accuracy") if c not in df]
    if missing:
        raise DamagedFileError(f"not a metrics file fedsim wrote (no column {missing[0]})", file=str(path))
    for column in df.columns:
        if column in ("round", "sim_time", "wall_time", "test_accuracy", "test_loss", "train_loss", "bytes_sent"):
            values = pd.to_numeric(df[column], errors="coerce")
            if values.isna().sum() > df[column].isna().sum():
                raise DamagedFileError(f"column {column} holds something that is not a number", file=str(path))
            df[column] = values
    return df


def read_summary(path: str | Path) -> dict[str, Any]:
    """summary.json as a dict; a damaged or crafted file is one line naming it (exit 2)."""
    path = Path(path)
    try:
        data = _read_capped(path, MAX_RUN_FILE_BYTES)
        summary = json.loads(data.decode("utf-8"), parse_constant=lambda c: math.nan)
    except FileNotFoundError:
        raise DamagedFileError("not found", file=str(path)) from None
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise DamagedFileError(f"not a summary fedsim wrote ({exc.__class__.__name__})", file=str(path)) from None
    if not isinstance(summary, dict):
        raise DamagedFileError("not a summary fedsim wrote (expected a JSON object)", file=str(path))
    return summary


__all__ = [
    "DamagedFileError", "FolderState", "LOCK_NAME", "OutputError", "RUN_FILES", "RunFolderError", "RunLock",
    "RunsIndex", "changed_keys", "folder_scenario", "inspect", "lock_holder", "read_index", "read_metrics", "read_summary",
    "reap", "scenario_hash",
]
