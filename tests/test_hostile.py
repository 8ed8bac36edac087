"""Hostile and unlucky inputs (issue 17): run folders stay under --out, every operating-system
failure is one line, nothing hangs, a checkpoint is never lost or trusted blindly, and crafted
files are one-line errors that never execute code.

Each test checks what fedsim did (files on disk, exit code, the one line it printed), not only
that it ran. Ray end-to-end checks are marked slow.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import torch

from fedsim import checkpoint
from fedsim.cli import main
from fedsim.history import History
from fedsim.training import SGDTrainer
from tests.conftest import SMALL

ROOT = Path(__file__).resolve().parents[1]


def cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("fedsim: error: "), err
    return lines[0]


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def interrupt_at(monkeypatch, round_: int) -> None:
    """Make the next run stop (as if killed) right after writing the row of `round_`."""
    append = History.append

    def stop(self, row):
        append(self, row)
        if row["round"] == round_:
            raise KeyboardInterrupt

    monkeypatch.setattr(History, "append", stop)


def metrics(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "metrics.csv").drop(columns="wall_time")


# ---------------------------------------------------------------------------------------------
# 2. every path fedsim writes lies under --out


ESCAPES = [
    ("file", 'name = "../../escaped"', "contains '/'"),
    ("file", 'name = ".."', "'..'"),
    ("file", 'name = "."', "'..'"),
    ("file", 'name = "{abs}"', "contains '/'"),
    ("file", 'name = ""', "is empty"),
    ("file", 'name = "   "', "blank"),
    ("file", 'name = "a\\u0000b"', "control character"),
    ("file", 'name = "line\\nbreak"', "control character"),
    ("file", 'name = "back\\\\slash"', "contains '\\'"),
    ("file", f'name = "{"x" * 300}"', "300 bytes long"),
    ("file", f'name = "{"é" * 120}"', "240 bytes long"),
    ("set", "name=../viaset", "contains '/'"),
    ("set", "name=..", "'..'"),
    ("set", 'name="{abs}"', "contains '/'"),
]


@pytest.mark.parametrize("route,change,words", ESCAPES, ids=[f"{r}:{c[:24]}" for r, c, _ in ESCAPES])
@pytest.mark.parametrize("command", ["run", "validate"])
def test_names_that_would_escape_out_are_refused_before_anything_is_written(
    tmp_path, write_scenario, capsys, route, change, words, command
):
    absolute = tmp_path / "absolute-escape"  # (old fedsim wrote there; keep it inside the test's folder)
    change = change.replace("{abs}", str(absolute))
    text, extra = (SMALL.replace('name = "small"', change), []) if route == "file" else (SMALL, ["--set", change])
    path = write_scenario(text)
    before = tree(tmp_path)
    out = tmp_path / "a" / "b" / "out"
    args = [command, str(path), *extra] + (["--out", str(out), "--no-progress"] if command == "run" else [])
    code, err = cli(capsys, *args)
    line = one_line(err)
    assert code == 2 and ": name: " in line and words in line, line
    assert tree(tmp_path) == before  # not even --out was created
    assert not absolute.exists()


def test_sweep_labels_cannot_escape_and_every_folder_lies_under_out(tmp_path, write_scenario, capsys):
    text = SMALL.replace("rounds = 4", "rounds = 1") + (
        '\n[sweep]\ncases = [{ label = "../../../swept" }, { label = "/etc/x", seed = 5 }]\n'
    )
    out = tmp_path / "deep" / "out"
    assert main(["run", str(write_scenario(text)), "--out", str(out), "--no-progress"]) == 0
    outside = {p for p in tree(tmp_path) if not p.startswith("deep")} - {"scenario.toml"}
    assert outside == set()
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(folders) == 2 and all("/" not in f for f in folders)
    for folder in folders:
        assert (out / folder).resolve().parent == out.resolve()


def test_a_label_that_makes_the_run_name_too_long_is_refused_at_validate(tmp_path, write_scenario, capsys):
    text = SMALL.replace('name = "small"', f'name = "{"n" * 195}"') + '\n[sweep]\nseed = [1, 2]\n'
    code, err = cli(capsys, "validate", str(write_scenario(text)))
    line = one_line(err)
    assert code == 2 and "202 bytes long" in line and ": sweep: " in line  # the name alone was fine


def test_a_run_folder_that_links_outside_out_is_refused(tmp_path, write_scenario, capsys):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "small").symlink_to(elsewhere)
    code, err = cli(capsys, "run", str(write_scenario()), "--out", str(out), "--no-progress")
    line = one_line(err)
    assert code == 2 and "leads outside --out" in line
    assert list(elsewhere.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# 3. operating-system failures while writing: one line, rows and the last checkpoint kept


def test_out_that_is_a_file_or_lies_under_one_is_one_line_exit_2(tmp_path, write_scenario, capsys):
    path = write_scenario()
    a_file = tmp_path / "afile"
    a_file.write_text("mine")
    code, err = cli(capsys, "run", str(path), "--out", str(a_file), "--no-progress")
    assert code == 2 and "is a file, not a folder" in one_line(err)
    code, err = cli(capsys, "run", str(path), "--out", str(a_file / "below"), "--no-progress")
    line = one_line(err)
    assert code == 2 and "ENOTDIR" in line and str(a_file / "below") in line
    assert a_file.read_text() == "mine"


def test_a_path_too_long_for_the_file_system_is_one_line(tmp_path, write_scenario, capsys):
    out = tmp_path / "/".join(["d" * 250] * 20)  # 5,000 characters: beyond PATH_MAX
    code, err = cli(capsys, "run", str(write_scenario()), "--out", str(out), "--no-progress")
    line = one_line(err)
    assert code == 2 and "ENAMETOOLONG" in line and "shorter" in line


@contextlib.contextmanager
def small_file_system(where: Path, size: str, *, read_only: bool = False):
    """A tmpfs of `size` mounted at `where` when this process may mount one (root with
    CAP_SYS_ADMIN, as on the project's machines); yields whether it is mounted."""
    where.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True
    ).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_read_only_out_is_one_line_exit_2_and_writes_nothing(tmp_path, write_scenario, capsys, monkeypatch):
    ro = tmp_path / "ro"
    with small_file_system(ro, "1m", read_only=True) as mounted:
        if not mounted:
            if os.geteuid() != 0:
                ro.chmod(0o555)  # permissions bind every user but root
            else:  # root without a mount: the file system's answer, simulated at the one call that meets it
                real_open = os.open

                def read_only_open(path, flags, *args, **kwargs):
                    if str(path).startswith(str(ro)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                        raise OSError(errno.EROFS, "Read-only file system", str(path))
                    return real_open(path, flags, *args, **kwargs)

                real_mkdir = Path.mkdir

                def read_only_mkdir(self, *args, **kwargs):
                    if str(self).startswith(str(ro) + os.sep):
                        raise OSError(errno.EROFS, "Read-only file system", str(self))
                    return real_mkdir(self, *args, **kwargs)

                monkeypatch.setattr(os, "open", read_only_open)
                monkeypatch.setattr(Path, "mkdir", read_only_mkdir)
        code, err = cli(capsys, "run", str(write_scenario()), "--out", str(ro / "out"), "--no-progress")
        line = one_line(err)
        assert code == 2 and ("EROFS" in line or "EACCES" in line) and str(ro) in line, line
        assert "choose another --out" in line or "choose a folder you can write to" in line
        assert not (ro / "out").exists()
        ro.chmod(0o755) if not mounted and os.geteuid() != 0 else None


def _full_disk_after(monkeypatch, nth: int) -> list[int]:
    """From the `nth` checkpoint on, the disk is full half-way through writing it: torch.save
    writes half of the bytes and then the file system says ENOSPC (what torch reports as its own
    'unexpected pos' RuntimeError on a real full disk)."""
    real_save = torch.save
    calls = [0]

    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] < nth:
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as handle:
                handle.write(data[: len(data) // 2])
        else:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save)
    return calls


def test_a_full_disk_mid_checkpoint_keeps_the_last_good_one_and_the_rows(tmp_path, write_scenario, capsys, monkeypatch):
    text = SMALL.replace("rounds = 4", "rounds = 8\ncheckpoint_every = 2")
    path = write_scenario(text)
    assert main(["run", str(path), "--out", str(tmp_path / "whole"), "--no-progress"]) == 0
    capsys.readouterr()
    _full_disk_after(monkeypatch, 2)  # the checkpoint at round 4 fails half-way
    code, err = cli(capsys, "run", str(path), "--out", str(tmp_path / "cut"), "--no-progress")
    line = one_line(err)
    run_dir = tmp_path / "cut" / "small"
    assert code == 1 and "ENOSPC" in line and "checkpoint.pt" in line and "--resume" in line, line
    assert checkpoint.load(run_dir / "checkpoint.pt")["round"] == 2  # the last good one, intact
    assert not (run_dir / "checkpoint.pt.tmp").exists()
    assert list(metrics(run_dir)["round"]) == [0, 1, 2, 3, 4]  # every row written is kept
    monkeypatch.undo()  # space freed
    assert main(["run", "--resume", str(run_dir), "--no-progress"]) == 0
    pd.testing.assert_frame_equal(metrics(run_dir), metrics(tmp_path / "whole" / "small"), check_exact=True)


def test_a_really_full_small_file_system(tmp_path, write_scenario, capsys, monkeypatch):
    """The same on a real 400 KiB tmpfs where this process may mount one (else the writer is
    made to fail as above): checkpoints of about 290 KB, so the second cannot be written beside
    the first."""
    text = SMALL.replace("hidden = [32]", "hidden = [1000]").replace("rounds = 4", "rounds = 6\ncheckpoint_every = 2")
    path = write_scenario(text)
    disk = tmp_path / "disk"
    with small_file_system(disk, "400k") as mounted:
        if not mounted:
            _full_disk_after(monkeypatch, 2)
        code, err = cli(capsys, "run", str(path), "--out", str(disk), "--no-progress")
        line = one_line(err)
        run_dir = disk / "small"
        assert code == 1 and "ENOSPC" in line, line
        assert checkpoint.load(run_dir / "checkpoint.pt")["round"] == 2
        assert not (run_dir / "checkpoint.pt.tmp").exists()
        rows = list(metrics(run_dir)["round"])
        assert rows == list(range(len(rows))) and rows[-1] >= 4


def test_an_io_error_while_appending_a_row_keeps_whole_rows_and_exits_1(tmp_path, write_scenario, capsys, monkeypatch):
    real_open = Path.open

    class Failing:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def tell(self):
            return self.handle.tell()

        def truncate(self, size):
            return self.handle.truncate(size)

        def write(self, text):
            self.handle.write(text[:7])  # part of the row reaches the disk
            self.handle.flush()
            raise OSError(errno.EIO, "Input/output error")

        def flush(self):
            self.handle.flush()

    def open_(self, mode="r", *args, **kwargs):
        handle = real_open(self, mode, *args, **kwargs)
        if self.name == "metrics.csv" and mode == "a" and len(pd.read_csv(self)) >= 3:
            return Failing(handle)
        return handle

    monkeypatch.setattr(Path, "open", open_)
    path = write_scenario()
    code, err = cli(capsys, "run", str(path), "--out", str(tmp_path), "--no-progress")
    line = one_line(err)
    assert code == 1 and "EIO" in line and "metrics.csv" in line, line
    monkeypatch.undo()
    text = (tmp_path / "small" / "metrics.csv").read_text()
    assert text.endswith("\n") and list(pd.read_csv(io.StringIO(text))["round"]) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# 4. no hang: dead cluster addresses, huge sweeps, huge input files, deep TOML


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fedsim(*args: str, cwd: Path | None = None, timeout: float = 120) -> tuple[int, str, float]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "fedsim", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)
    return proc.returncode, proc.stderr, time.monotonic() - start


def test_an_address_where_nothing_listens_fails_fast_in_one_line(tmp_path, write_scenario):
    path = write_scenario(SMALL.replace('executor = "inline"', 'executor = "ray"'))
    port = _closed_port()
    code, err, took = _fedsim("run", str(path), "--out", str(tmp_path / "out"), "--address", f"127.0.0.1:{port}",
                              "--no-progress", timeout=60)
    line = one_line(err)
    assert code == 2 and took < 30 and f"127.0.0.1:{port}" in line and "system.address" in line, err
    assert not (tmp_path / "out").exists()  # refused: no half-made folder, not even an empty --out


@pytest.mark.slow
def test_an_address_that_accepts_but_never_answers_fails_within_30_seconds(tmp_path, write_scenario):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.5)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        path = write_scenario(SMALL.replace('executor = "inline"', 'executor = "ray"'))
        port = listener.getsockname()[1]
        code, err, took = _fedsim("run", str(path), "--out", str(tmp_path / "out"), "--address",
                                  f"127.0.0.1:{port}", "--no-progress", timeout=90)
    finally:
        stop.set()
        thread.join()
        for s in held:
            s.close()
        listener.close()
    line = one_line(err)
    assert code == 2 and took < 45 and "within 30 s" in line, (took, err)


def test_huge_sweeps_are_refused_before_expansion_and_the_limit_can_be_raised(tmp_path, write_scenario, capsys):
    seeds = ", ".join(str(i) for i in range(1000))
    lrs = ", ".join(f"0.{i + 1:04d}" for i in range(1000))
    path = write_scenario(SMALL + f'\n[sweep]\nseed = [{seeds}]\n"algorithm.lr" = [{lrs}]\n')
    try:  # in a process of its own: expanding a million points would take this one down for hours
        code, err, took = _fedsim("validate", str(path), timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("validate was still expanding the sweep after 60 s")
    line = one_line(err)
    assert code == 2 and took < 30
    assert "1,000,000 runs (1000 x 1000)" in line and "--max-runs" in line and ": sweep: " in line
    small = write_scenario(SMALL + "\n[sweep]\nseed = [1, 2, 3]\n\"algorithm.lr\" = [0.1, 0.2, 0.3]\n", "s.toml")
    code, err = cli(capsys, "validate", str(small), "--max-runs", "8")
    assert code == 2 and "9 runs (3 x 3)" in one_line(err)
    code, err = cli(capsys, "validate", str(small), "--max-runs", "9")
    assert code == 0 and err == ""


def _graph_scenario(graph: Path) -> str:
    return (SMALL.replace('name = "fedavg"\nclients_per_round = 4', 'name = "dpsgd"')
            + f'\n[topology]\nname = "from_file"\npath = "{graph}"\n')


def test_an_edge_list_of_one_huge_line_is_refused_without_reading_it_whole(tmp_path, write_scenario, capsys):
    graph = tmp_path / "huge.edges"
    graph.write_text("a " * 3_000_000)  # one 6 MB line
    code, err = cli(capsys, "run", str(write_scenario(_graph_scenario(graph))), "--out", str(tmp_path / "o"),
                    "--no-progress")
    line = one_line(err)
    assert code == 2 and "line 1 is longer than 1,048,576 characters" in line and str(graph) in line
    assert not (tmp_path / "o" / "small").exists()


def test_input_files_beyond_the_size_limit_are_refused(tmp_path, write_scenario, capsys, monkeypatch):
    monkeypatch.setenv("FEDSIM_MAX_INPUT_BYTES", "2000")
    ring = "".join(f"{i} {(i + 1) % 12}\n" for i in range(12)) + "# padding\n" * 300
    graph = tmp_path / "ring.edges"
    graph.write_text(ring)
    code, err = cli(capsys, "run", str(write_scenario(_graph_scenario(graph))), "--out", str(tmp_path / "o"),
                    "--no-progress")
    line = one_line(err)
    assert code == 2 and "larger than the limit of 2,000 bytes" in line and "FEDSIM_MAX_INPUT_BYTES" in line
    graphml = tmp_path / "g.graphml"
    graphml.write_text("<graphml>" + " " * 5000 + "</graphml>")
    code, err = cli(capsys, "run", str(write_scenario(_graph_scenario(graphml))), "--out", str(tmp_path / "o"),
                    "--no-progress")
    assert code == 2 and "larger than the limit" in one_line(err)
    trace = tmp_path / "trace.csv"
    trace.write_text("client,step_time\n" + "".join(f"{i % 12},0.1\n" for i in range(400)))
    text = SMALL.replace("[system]", f'[system]\ntrace = "{trace}"')
    code, err = cli(capsys, "run", str(write_scenario(text)), "--out", str(tmp_path / "o"), "--no-progress")
    line = one_line(err)
    assert code == 2 and "system.trace" in line and "larger than the limit" in line


def test_a_trace_that_is_a_folder_or_has_a_huge_line_is_one_line(tmp_path, write_scenario, capsys):
    folder = tmp_path / "trace_dir"
    folder.mkdir()
    text = SMALL.replace("[system]", f'[system]\ntrace = "{folder}"')
    code, err = cli(capsys, "run", str(write_scenario(text)), "--out", str(tmp_path / "o"), "--no-progress")
    assert code == 2 and "is a folder" in one_line(err)
    long = tmp_path / "long.csv"
    long.write_text("client,step_time\n0," + "1" * 2_000_000 + "\n")
    text = SMALL.replace("[system]", f'[system]\ntrace = "{long}"')
    code, err = cli(capsys, "run", str(write_scenario(text)), "--out", str(tmp_path / "o"), "--no-progress")
    line = one_line(err)
    assert code == 2 and "line 2 is longer than" in line and "system.trace" in line


def test_an_idx_file_that_decompresses_beyond_the_limit_is_refused(tmp_path, monkeypatch):
    from fedsim.data.fashion_mnist import read_idx
    from fedsim.errors import DataError

    monkeypatch.setenv("FEDSIM_MAX_INPUT_BYTES", str(2**20))
    bomb = tmp_path / "bomb-idx3-ubyte.gz"
    header = bytes([0, 0, 8, 3]) + (1000).to_bytes(4, "big") + (64).to_bytes(4, "big") + (64).to_bytes(4, "big")
    bomb.write_bytes(gzip.compress(header + bytes(1000 * 64 * 64), compresslevel=9))
    assert bomb.stat().st_size < 50_000
    with pytest.raises(DataError, match="decompresses to more than the limit of 1,048,576 bytes"):
        read_idx(bomb)


def test_deep_or_enormous_toml_is_one_line(tmp_path, write_scenario, capsys):
    deep = write_scenario("x = " + "[" * 200 + "1" + "]" * 200 + "\n", "deep.toml")
    code, err = cli(capsys, "validate", str(deep))
    assert code == 2 and "nested more than 128 deep" in one_line(err)
    code, err = cli(capsys, "validate", str(write_scenario()), "--set", "algorithm.lr=" + "[" * 200 + "]" * 200)
    assert code == 2 and "--set value's tables and arrays nested more than 128 deep" in one_line(err)
    code, err = cli(capsys, "validate", str(write_scenario()), "--set", "algorithm.lr=" + "[" * 600 + "]" * 600)
    assert code == 2 and "--set value nested too deeply to read" in one_line(err)  # was a RecursionError
    big = tmp_path / "big.toml"
    big.write_text(SMALL + "\n# " + "x" * (5 * 2**20) + "\n")
    code, err = cli(capsys, "validate", str(big))
    assert code == 2 and "larger than 4 MiB" in one_line(err)


# ---------------------------------------------------------------------------------------------
# 6. concurrency and identity


def test_the_command_lines_workers_and_executor_go_through_the_memory_check(tmp_path, write_scenario, capsys, monkeypatch):
    ran = []
    monkeypatch.setattr("fedsim.coordinator.run_all", lambda specs, *a, **k: ran.append(specs) or [])
    path = write_scenario(SMALL.replace('executor = "inline"', 'executor = "ray"'))
    code, err = cli(capsys, "run", str(path), "--out", str(tmp_path), "--workers", "100000")
    line = one_line(err)
    assert code == 2 and "GiB" in line and "system.workers" in line and ran == []
    # the scenario's own 100,000 workers do not count when --executor inline runs it
    path = write_scenario(SMALL.replace('executor = "inline"', 'executor = "ray"\nworkers = 100000'))
    code, err = cli(capsys, "run", str(path), "--out", str(tmp_path), "--executor", "inline")
    assert code == 0 and len(ran) == 1, err


def test_a_folder_being_written_is_locked_against_a_second_run(tmp_path, write_scenario, capsys):
    from fedsim.runfolder import RunLock

    lock = RunLock(tmp_path / "small").acquire()
    try:
        code, err = cli(capsys, "run", str(write_scenario()), "--out", str(tmp_path), "--no-progress")
        line = one_line(err)
        assert code == 2 and f"pid {os.getpid()}" in line and "writing to this folder" in line
        assert sorted(p.name for p in (tmp_path / "small").iterdir()) == [".fedsim.lock"]
    finally:
        lock.release()
    assert main(["run", str(write_scenario()), "--out", str(tmp_path), "--no-progress"]) == 0
    assert list(metrics(tmp_path / "small")["round"]) == [0, 1, 2, 3, 4]
    assert not (tmp_path / "small" / ".fedsim.lock").exists()


def test_two_processes_into_one_folder_never_interleave_rows(tmp_path, write_scenario):
    text = SMALL.replace("rounds = 4", "rounds = 30").replace("clients_per_round = 4", "clients_per_round = 12")
    path = write_scenario(text)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "fedsim", "run", str(path), "--out", str(tmp_path), "--no-progress"]
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 0], [0, 2]), results
    if codes == [0, 2]:  # the second found the first writing
        assert "writing to this folder" in next(err for code, err in results if code == 2)
    assert list(metrics(tmp_path / "small")["round"]) == list(range(31))


def test_a_second_sweep_merges_into_runs_csv(tmp_path, write_scenario, capsys):
    one = SMALL.replace("rounds = 4", "rounds = 1") + "\n[sweep]\nseed = [0, 1]\n"
    two = SMALL.replace("rounds = 4", "rounds = 1").replace('name = "small"', 'name = "other"') + (
        '\n[sweep]\n"algorithm.lr" = [0.05, 0.2]\n')
    assert main(["run", str(write_scenario(one, "one.toml")), "--out", str(tmp_path), "--no-progress"]) == 0
    assert main(["run", str(write_scenario(two, "two.toml")), "--out", str(tmp_path), "--no-progress"]) == 0
    index = pd.read_csv(tmp_path / "runs.csv")
    assert list(index["run_dir"]) == ["small-seed=0", "small-seed=1", "other-lr=0.05", "other-lr=0.2"]
    assert list(index["status"]) == ["done"] * 4 and set(index["sweep"]) == {"small.sweep.toml", "other.sweep.toml"}


@pytest.mark.slow
def test_a_folder_named_fedsim_in_the_working_directory_does_not_break_ray_runs(tmp_path, write_scenario):
    (tmp_path / "fedsim").mkdir()  # a user's folder that happens to share the package's name
    text = SMALL.replace("rounds = 4", "rounds = 2").replace('executor = "inline"', 'executor = "ray"\nworkers = 1')
    path = write_scenario(text)
    exe = Path(sys.executable).with_name("fedsim")  # the console script of this (editable) install
    proc = subprocess.run([str(exe), "run", str(path), "--out", str(tmp_path / "out"), "--no-progress"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert list(metrics(tmp_path / "out" / "small")["round"]) == [0, 1, 2]


def _killed_at(tmp_path, write_scenario, monkeypatch, text: str, round_: int) -> Path:
    path = write_scenario(text)
    interrupt_at(monkeypatch, round_)
    assert main(["run", str(path), "--out", str(tmp_path / "cut"), "--no-progress"]) == 130
    monkeypatch.undo()
    return tmp_path / "cut" / "small"


def test_a_damaged_checkpoint_is_refused_by_its_checksum(tmp_path, write_scenario, capsys, monkeypatch):
    run_dir = _killed_at(tmp_path, write_scenario, monkeypatch, SMALL.replace("rounds = 4", "rounds = 6\ncheckpoint_every = 2"), 3)
    ckpt = run_dir / "checkpoint.pt"
    before = checkpoint.load(ckpt)
    data = bytearray(ckpt.read_bytes())
    data[len(data) * 2 // 3] ^= 0x10  # one bit, deep inside the tensors
    ckpt.write_bytes(bytes(data))
    capsys.readouterr()
    code, err = cli(capsys, "run", "--resume", str(run_dir), "--no-progress")
    line = one_line(err)
    assert code == 2 and "checksum mismatch" in line and str(ckpt) in line
    assert before["round"] == 2 and list(metrics(run_dir)["round"]) == [0, 1, 2, 3]  # nothing changed


def test_a_checkpoint_beside_an_edited_scenario_is_refused(tmp_path, write_scenario, capsys, monkeypatch):
    run_dir = _killed_at(tmp_path, write_scenario, monkeypatch, SMALL.replace("rounds = 4", "rounds = 6\ncheckpoint_every = 2"), 3)
    scenario = run_dir / "scenario.toml"
    scenario.write_text(scenario.read_text().replace("lr = 0.1", "lr = 0.2"))
    capsys.readouterr()
    code, err = cli(capsys, "run", "--resume", str(run_dir), "--no-progress")
    line = one_line(err)
    assert code == 2 and "belongs to another scenario than the scenario.toml beside it" in line
    assert list(metrics(run_dir)["round"]) == [0, 1, 2, 3]
    # comments are not the scenario: editing them is fine
    scenario.write_text(scenario.read_text().replace("lr = 0.2", "lr = 0.1") + "# a note\n")
    assert main(["run", "--resume", str(run_dir), "--no-progress"]) == 0


# ---------------------------------------------------------------------------------------------
# 7. a run killed before its first checkpoint


def test_a_run_killed_before_its_first_checkpoint_resumes_by_starting_over(tmp_path, write_scenario, capsys, monkeypatch):
    text = SMALL.replace("rounds = 4", "rounds = 4\ncheckpoint_every = 10")
    assert main(["run", str(write_scenario(text)), "--out", str(tmp_path / "whole"), "--no-progress"]) == 0
    run_dir = _killed_at(tmp_path, write_scenario, monkeypatch, text, 2)
    assert not (run_dir / "checkpoint.pt").exists() and list(metrics(run_dir)["round"]) == [0, 1, 2]
    capsys.readouterr()
    code, err = cli(capsys, "run", "--resume", str(run_dir), "--no-progress")
    assert code == 0
    assert "no checkpoint (killed before its first one): starting over; its 3 rows are discarded" in err
    pd.testing.assert_frame_equal(metrics(run_dir), metrics(tmp_path / "whole" / "small"), check_exact=True)


# ---------------------------------------------------------------------------------------------
# 9. crafted or corrupted files: one line naming the file, never code


class _Pwn:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _with_header(body: bytes) -> bytes:
    import hashlib

    header = json.dumps({"sha256": hashlib.sha256(body).hexdigest(), "bytes": len(body), "scenario": "x"})
    return checkpoint.MAGIC + header.encode().ljust(255) + b"\n" + body


@pytest.mark.parametrize("craft", ["plain-pickle", "pickle-with-valid-header", "torch-zip-with-code", "wrong-structure",
                                   "truncated", "empty"])
def test_crafted_checkpoints_are_one_line_and_never_run_code(tmp_path, write_scenario, capsys, monkeypatch, craft):
    run_dir = _killed_at(tmp_path, write_scenario, monkeypatch, SMALL.replace("rounds = 4", "rounds = 6\ncheckpoint_every = 2"), 3)
    ckpt = run_dir / "checkpoint.pt"
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"round": _Pwn(marker)})
    if craft == "plain-pickle":
        ckpt.write_bytes(evil)
    elif craft == "pickle-with-valid-header":
        ckpt.write_bytes(_with_header(evil))
    elif craft == "torch-zip-with-code":
        buf = io.BytesIO()
        torch.save({"round": _Pwn(marker)}, buf)  # a torch file whose pickle calls os.system
        ckpt.write_bytes(_with_header(buf.getvalue()))
    elif craft == "wrong-structure":
        buf = io.BytesIO()
        torch.save({"round": "soon", "flow": [1, 2], "history": {"__obj__": "os.system"}}, buf)
        ckpt.write_bytes(_with_header(buf.getvalue()))
    elif craft == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    else:
        ckpt.write_bytes(b"")
    capsys.readouterr()
    code, err = cli(capsys, "run", "--resume", str(run_dir), "--no-progress")
    line = one_line(err)
    assert code == 2 and str(ckpt) in line, line
    assert not marker.exists()
    assert list(metrics(run_dir)["round"]) == [0, 1, 2, 3]


CRAFTED_RUN_FILES = {
    "metrics-binary": ("metrics.csv", b"\x00\xff\xfe garbage \x00" * 100),
    "metrics-not-numbers": ("metrics.csv", b"round,test_accuracy\n0,abc\n1,0.5\n"),
    "metrics-no-columns": ("metrics.csv", b"a,b\n1,2\n"),
    "metrics-empty": ("metrics.csv", b""),
    "metrics-ragged": ("metrics.csv", b'round,test_accuracy\n0,0.1\n1,"unterminated\n'),
    "summary-not-json": ("summary.json", b"{\"swept\": "),
    "summary-deep": ("summary.json", b"[" * 100_000 + b"]" * 100_000),
    "summary-list": ("summary.json", b"[1, 2]"),
    "summary-binary": ("summary.json", b"\xff\xfe\x00"),
    "scenario-binary": ("scenario.toml", b"\xff\xfe\x00\x01"),
    "index-escape": ("../runs.csv", b"run_dir,status\n../../etc,done\n"),
    "index-garbage": ("../runs.csv", b"\x00\x01\x02"),
}


@pytest.mark.parametrize("case", list(CRAFTED_RUN_FILES))
def test_crafted_run_files_are_one_line_naming_the_file(tmp_path, write_scenario, capsys, case):
    text = SMALL.replace("rounds = 4", "rounds = 1") + '\n[sweep]\ncases = [{ label = "a" }]\n'
    assert main(["run", str(write_scenario(text)), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    run_dir = tmp_path / "out" / "small-case=a"
    name, content = CRAFTED_RUN_FILES[case]
    target = (run_dir / name).resolve()
    target.write_bytes(content)
    capsys.readouterr()
    source = str(tmp_path / "out" / "runs.csv") if name.startswith("..") else str(run_dir)
    code, err = cli(capsys, "plot", source, "--by", "cases", "-o", str(tmp_path / "p.png"))
    line = one_line(err)
    assert code == 2 and str(target) in line, line
    assert not (tmp_path / "p.png").exists()


# ---------------------------------------------------------------------------------------------
# 8. validate --no-plugins; broken rules are one line


def _plugin(tmp_path: Path, monkeypatch, name: str, body: str) -> Path:
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path / f"{name}.py"


def test_validate_no_plugins_imports_nothing_the_scenario_names(tmp_path, write_scenario, capsys, monkeypatch):
    marker = tmp_path / "imported"
    _plugin(tmp_path, monkeypatch, "h17_evil_rules",
            f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
            "from fedsim import Aggregator\nclass Rule(Aggregator):\n"
            "    def __init__(self, k: int = 1):\n        self.k = k\n"
            "    def __call__(self, g, b, *, round):\n        return g\n")
    text = SMALL + '\n[aggregator]\nname = "h17_evil_rules:Rule"\nk = "not an int"\n'
    path = write_scenario(text)
    code = main(["validate", str(path), "--no-plugins"])
    out = capsys.readouterr().out
    assert code == 0 and not marker.exists()
    assert "not imported (--no-plugins)" in out and "aggregator.name = 'h17_evil_rules:Rule'" in out
    # everything else is still checked
    code, err = cli(capsys, "validate", str(write_scenario(text.replace("lr = 0.1", "lr = -1"), "b.toml")), "--no-plugins")
    assert code == 2 and "algorithm.lr" in one_line(err) and not marker.exists()
    # without the flag the module is imported (and its keys checked), as the README says
    code, err = cli(capsys, "validate", str(path))
    assert code == 2 and "aggregator.k" in one_line(err) and marker.exists()


RULES = """
from fedsim import Aggregator, register_aggregator

class Raises(Aggregator):
    def __call__(self, g, b, *, round):
        raise ValueError("rule bug")

class WrongShape(Aggregator):
    def __call__(self, g, b, *, round):
        return {k: v.flatten()[:1] for k, v in g.items()}

class NotADict(Aggregator):
    def __call__(self, g, b, *, round):
        return 3

class Doubles(Aggregator):
    def __call__(self, g, b, *, round):
        return {k: v.double() for k, v in g.items()}

class Arrays(Aggregator):
    def __call__(self, g, b, *, round):
        return {k: v.numpy() for k, v in g.items()}

@register_aggregator("h17_not_callable")
class NotCallable:
    pass
"""


@pytest.mark.parametrize("rule,code,words", [
    ("Raises", 1, ["rule Raises raised ValueError('rule bug')", "in round 1"]),
    ("WrongShape", 1, ["rule WrongShape returned", "with shape", "in round 1"]),
    ("NotADict", 1, ["rule NotADict returned an int at the server's merge in round 1"]),
    ("Doubles", 1, ["rule Doubles returned", "as torch.float64", "in round 1; expected torch.float32"]),
    ("Arrays", 1, ["rule Arrays returned", "as a ndarray", "expected a torch tensor of shape"]),
    ("h17_not_callable", 2, ["NotCallable built a NotCallable, which cannot be called", ": aggregator.name: "]),
])
def test_a_broken_rule_is_one_line_naming_it(tmp_path, write_scenario, capsys, monkeypatch, rule, code, words):
    _plugin(tmp_path, monkeypatch, "h17_broken_rules", RULES)
    import importlib

    importlib.import_module("h17_broken_rules")
    name = rule if rule.startswith("h17") else f"h17_broken_rules:{rule}"
    path = write_scenario(SMALL + f'\n[aggregator]\nname = "{name}"\n')
    got, err = cli(capsys, "run", str(path), "--out", str(tmp_path / "out"), "--no-progress")
    line = one_line(err)
    assert got == code and all(w in line for w in words), line
    if code == 1:
        assert list(metrics(tmp_path / "out" / "small")["round"]) == [0]  # the row before is kept
    else:
        assert not (tmp_path / "out" / "small").exists()
        got, err = cli(capsys, "validate", str(path))
        assert got == 2 and "cannot be called" in one_line(err)  # validate finds it too


# ---------------------------------------------------------------------------------------------
# 5. Ray faults: a retry budget per job; no Ray process left behind by a killed run


def _sleeper(tmp_path: Path, argv0: str) -> subprocess.Popen:
    """A process of ours that looks like a Ray helper (or not) by its command line."""
    script = tmp_path / f"{argv0}.py"
    script.write_text("import time\ntime.sleep(600)\n")
    return subprocess.Popen([sys.executable, str(script)])


def test_the_next_run_into_a_folder_ends_the_ray_processes_a_killed_run_left(tmp_path, write_scenario, capsys):
    from fedsim.runfolder import LOCK_NAME, _psutil

    psutil = _psutil()
    helper = _sleeper(tmp_path, "ray_dashboard_agent")  # 'ray' in its command line, like Ray's agents
    other = _sleeper(tmp_path, "someone_elses_job")  # recorded, but not a Ray process
    reused = _sleeper(tmp_path, "ray_reused_pid")  # a Ray-looking process whose start time differs
    try:
        time.sleep(0.2)
        record = [
            {"pid": helper.pid, "create_time": psutil.Process(helper.pid).create_time()},
            {"pid": other.pid, "create_time": psutil.Process(other.pid).create_time()},
            {"pid": reused.pid, "create_time": psutil.Process(reused.pid).create_time() - 100.0},
            {"pid": "1", "create_time": 0}, {"pid": 1, "create_time": "x"}, "junk",
        ]
        run_dir = tmp_path / "out" / "small-seed=1"
        run_dir.mkdir(parents=True)
        (run_dir / LOCK_NAME).write_text(json.dumps({"pid": 999999, "ray": record}))  # a SIGKILLed run's
        (run_dir / "scenario.toml").write_text("x = 1\n")
        path = write_scenario(SMALL.replace("rounds = 4", "rounds = 1") + "\n[sweep]\nseed = [1]\n")
        assert main(["run", str(path), "--out", str(tmp_path / "out"), "--no-progress", "--rerun"]) == 0
        helper.wait(timeout=10)  # ended by the run (psutil may have collected its status first)
        assert other.poll() is None and reused.poll() is None  # never anyone else's
        assert not (run_dir / LOCK_NAME).exists()
    finally:
        for proc in (helper, other, reused):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.slow
def test_repeated_actor_deaths_within_the_budget_change_nothing_and_beyond_it_are_one_line(ray_session, tmp_path, write_scenario):
    from fedsim.coordinator import RunContext, RunOptions
    from fedsim.executor import MAX_ACTOR_RESTARTS, ActorsDiedError, InlineExecutor, RayExecutor, WorkerSpec
    from fedsim.scenario import load
    from fedsim.training import TrainJob
    from tests.ray_plugins import DyingTrainer  # importable by Ray's workers (the repository is their cwd)

    spec = load(write_scenario())[0]
    ctx = RunContext(spec, RunOptions(executor="inline"))
    s = spec.scenario

    def worker_spec(trainer):
        return WorkerSpec(s.model.name, s.model.options(), ctx.data.feature_shape, ctx.data.num_classes, s.seed,
                          trainer, vectorize=False)

    jobs = [TrainJob(c, 2) for c in range(6)]
    expected = InlineExecutor(ctx.data, worker_spec(SGDTrainer(lr=0.1, batch_size=16))).train(ctx.init_params, jobs)
    tally = tmp_path / "deaths"
    tally.mkdir()
    dying = DyingTrainer(lr=0.1, batch_size=16, victim=3, deaths=MAX_ACTOR_RESTARTS, tally=str(tally))
    executor = RayExecutor(ctx.data, worker_spec(dying), workers=2)
    try:
        got = executor.train(ctx.init_params, jobs)
        assert executor.replaced == MAX_ACTOR_RESTARTS and len(os.listdir(tally)) == MAX_ACTOR_RESTARTS
        for a, b in zip(expected, got):
            assert a.client_id == b.client_id
            assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    finally:
        executor.close()
    for f in tally.iterdir():
        f.unlink()
    always = DyingTrainer(lr=0.1, batch_size=16, victim=3, deaths=1000, tally=str(tally))
    executor = RayExecutor(ctx.data, worker_spec(always), workers=2)
    try:
        with pytest.raises(ActorsDiedError) as info:
            executor.train(ctx.init_params, jobs)
    finally:
        executor.close()
    message = str(info.value)
    assert info.value.exit_code == 1 and "\n" not in message
    assert f"training client 3 in round 2 died {MAX_ACTOR_RESTARTS + 1} times" in message and "--workers" in message
    assert len(os.listdir(tally)) == MAX_ACTOR_RESTARTS + 1


@pytest.mark.slow
def test_a_sigkilled_ray_run_leaves_no_ray_process_after_the_next_run(tmp_path, write_scenario):
    from tests.test_cluster import child_env, kill_marked, marked_pids

    marker, again = f"h17-{uuid.uuid4().hex}", f"h17-{uuid.uuid4().hex}"
    text = SMALL.replace("rounds = 4", "rounds = 100000").replace('executor = "inline"', 'executor = "ray"\nworkers = 1')
    path = write_scenario(text)
    run_dir = tmp_path / "out" / "small"
    proc = subprocess.Popen([sys.executable, "-m", "fedsim", "run", str(path), "--out", str(tmp_path / "out"),
                             "--no-progress"], env=child_env(marker), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        recorded: list = []
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                recorded = json.loads((run_dir / ".fedsim.lock").read_text()).get("ray", [])
                rows = (run_dir / "metrics.csv").read_text().count("\n")
            except (OSError, ValueError):
                recorded, rows = [], 0
            if recorded and rows >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None and len(recorded) >= 3, "the run never got going"
        ray_pids = {item["pid"] for item in recorded}
        proc.kill()
        proc.wait()
        # the next run into the folder (a short one) finds the lock file of the killed run
        done = subprocess.run([sys.executable, "-m", "fedsim", "run", str(path), "--out", str(tmp_path / "out"),
                               "--rerun", "--set", "rounds=1", "--executor", "inline", "--no-progress"],
                              env=child_env(again), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert marked_pids(marker) == []  # every process of the killed run's cluster is gone
        assert ray_pids  # (it had recorded them in the folder's lock file)
    finally:
        kill_marked(marker)
        kill_marked(again)
