"""Where fedsim may write, and what it says when the operating system refuses a write.

A scenario is data that people share, and the names in it (`name`, sweep labels, `--set
name=...`) become folder names. So every name is checked before it is used (not empty, not `.` or
`..`, no `/`, NUL or control character, at most `NAME_MAX_BYTES` bytes) and every path fedsim
writes is resolved and checked to lie under `--out`: a shared scenario cannot write anywhere else.

Writing can still fail for reasons outside fedsim (a read-only or full disk, a file where a folder
should be, a name the file system finds too long). `writing(path, started=...)` turns each into one
line naming the path and what to do: exit code 2 when nothing has run yet (the user fixes the input
and runs again), 1 once the run has started (rows already written stay on disk).
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import FedsimError, ScenarioError

# Most file systems allow 255 bytes per name; fedsim adds suffixes (`.tmp`, `.sweep.toml`) to some.
NAME_MAX_BYTES = 200


class PathError(ScenarioError):
    """A name or output path that fedsim refuses to write to (exit code 2)."""


class OutputError(FedsimError):
    """The operating system refused a write: exit code 2 before the run started, 1 during it."""

    def __init__(self, message: str, *, exit_code: int = 2, file: str | None = None):
        super().__init__(message, file=file)
        self.exit_code = exit_code


def name_problem(name: object) -> str | None:
    """Why `name` cannot be a folder or file name under --out, or None when it can."""
    if not isinstance(name, str):
        return f"expected a string, got {type(name).__name__}"
    if not name.strip():
        return "is empty" if not name else "is only blank space"
    if name in (".", ".."):
        return "is '.' or '..', which name a folder that is not the run's own"
    for ch in name:
        if ch in "/\\":
            return f"contains '{ch}' (a name may not reach into other folders)"
        if ord(ch) < 32 or ord(ch) == 127:
            return f"contains the control character {ch!r}"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid Unicode text"
    if size > NAME_MAX_BYTES:
        return f"is {size} bytes long, more than the {NAME_MAX_BYTES} a folder name may have here"
    return None


def check_name(name: object, what: str = "run name") -> str:
    """`name` itself, or a PathError saying why it cannot be used."""
    problem = name_problem(name)
    if problem is not None:
        shown = repr(name) if not isinstance(name, str) or len(name) <= 60 else repr(name[:57] + "...")
        raise PathError(f"{what} {shown} {problem}")
    return name  # type: ignore[return-value]


def inside(out: str | Path, name: str, what: str = "run name") -> Path:
    """`out/name`, after checking that the name is a plain folder name and that the resolved path
    (symbolic links followed) still lies directly under `out`."""
    check_name(name, what)
    base = Path(out)
    try:
        root = base.resolve()
        target = (root / name).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # symlink loops, bad bytes
        raise PathError(f"cannot resolve {base / name}: {exc}") from None
    if target.parent != root:
        raise PathError(f"{base / name} leads outside --out {base} (to {target}); "
                        "remove that link or choose another --out")
    return base / name


# what a user can do about each failure; `started` adds how to carry on
_ADVICE = {
    errno.EROFS: "the file system is read-only: choose another --out",
    errno.EACCES: "permission denied: choose a folder you can write to (--out)",
    errno.EPERM: "operation not permitted: choose a folder you can write to (--out)",
    errno.ENOTDIR: "a file stands where a folder is needed: move it away or choose another --out",
    errno.EEXIST: "a file stands where a folder is needed: move it away or choose another --out",
    errno.EISDIR: "a folder stands where a file is needed: move it away or choose another --out",
    errno.ENOSPC: "the disk is full: free some space",
    errno.EDQUOT: "the disk quota is used up: free some space",
    errno.EIO: "input/output error: check the disk",
    errno.ENAMETOOLONG: "the path is too long for the file system: use a shorter --out or run name",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
}


def output_error(exc: OSError, path: str | Path, *, started: bool, run_dir: str | Path | None = None) -> OutputError:
    """One line for an OS error while writing `path`."""
    code = exc.errno if exc.errno is not None else -1
    what = exc.strerror or exc.__class__.__name__
    advice = _ADVICE.get(code, "check the disk and the folder's permissions")
    if started:
        where = f"`fedsim run --resume {run_dir}`" if run_dir is not None else "--resume"
        advice += f"; the rows written so far are kept, continue with {where}"
    name = errno.errorcode.get(code, "")
    shown = exc.filename if isinstance(exc.filename, str) and exc.filename else str(path)
    if len(shown) > 160:
        shown = shown[:60] + "..." + shown[-90:]
    return OutputError(f"cannot write {shown}: {what}{f' ({name})' if name else ''}; {advice}",
                       exit_code=1 if started else 2)


@contextmanager
def writing(path: str | Path, *, started: bool, run_dir: str | Path | None = None) -> Iterator[None]:
    """Turn an OSError raised while writing `path` into one `OutputError` line."""
    try:
        yield
    except OutputError:
        raise
    except OSError as exc:
        raise output_error(exc, path, started=started, run_dir=run_dir) from None


def make_out(out: str | Path) -> Path:
    """Create the --out folder (and its parents) or say in one line why it cannot be."""
    out = Path(out)
    with writing(out, started=False):
        if out.exists() and not out.is_dir():
            raise OutputError(f"--out {out} is a file, not a folder: choose another --out")
        out.mkdir(parents=True, exist_ok=True)
    return out


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` for the block to write and then `commit`: a reader (or a
    crash) sees the old file or the new one, never half of one. The temporary file is removed
    when anything fails, and the error propagates."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def commit(tmp: Path, path: Path, expected: int) -> None:
    """Rename the written temporary file over `path`, once it holds all `expected` bytes (a full
    disk can leave a short file without an error on write)."""
    size = tmp.stat().st_size
    if size != expected:
        raise OSError(errno.EIO, f"short write ({size} of {expected} bytes)", str(tmp))
    os.replace(tmp, path)


def write_atomic(path: Path, data: bytes | str, *, fsync: bool = True) -> None:
    """Write `data` to `path` atomically (see `replacing`), flushed and, with `fsync`, synced."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with replacing(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        commit(tmp, path, len(payload))
