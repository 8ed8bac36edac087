"""Re-runs never destroy results (issue 14, item 3), and a refused run leaves no folder (item 4).

- a folder holding a finished run of the same scenario is skipped (its files untouched);
  `--rerun` runs it again; a finished run of another scenario is refused;
- a folder holding a run that did not finish says to use --resume (exit 2) unless --rerun;
- `fedsim run --resume OUT` finishes a killed sweep: finished points kept, the killed one
  resumed, missing ones run, to the curves of an uninterrupted sweep;
- a failing sweep point is recorded in runs.csv with its error while the others run, and the
  exit code says it failed.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pandas as pd

from fedsim.cli import main
from fedsim.history import History
from tests.conftest import SMALL

SWEEP = SMALL.replace("rounds = 4", "rounds = 4\ncheckpoint_every = 2") + "\n[sweep]\nseed = [1, 2, 3]\n"
POINTS = ["small-seed=1", "small-seed=2", "small-seed=3"]


def cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def stamps(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def metrics(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "metrics.csv").drop(columns="wall_time")


def stop_in(monkeypatch, run_name: str, round_: int) -> None:
    """The run whose metrics.csv lives in `run_name` stops (as if killed) after row `round_`."""
    append = History.append

    def stop(self, row):
        append(self, row)
        if self.path.parent.name == run_name and row["round"] == round_:
            raise KeyboardInterrupt

    monkeypatch.setattr(History, "append", stop)


def test_a_finished_run_is_skipped_untouched_and_rerun_runs_it_again(tmp_path, write_scenario, capsys):
    path = write_scenario()
    assert main(["run", str(path), "--out", str(tmp_path), "--no-progress"]) == 0
    run_dir = tmp_path / "small"
    before = stamps(run_dir)
    capsys.readouterr()
    code, err = cli(capsys, "run", str(path), "--out", str(tmp_path), "--no-progress")
    assert code == 0 and f"{run_dir}: finished already; skipped (--rerun runs it again)" in err
    assert stamps(run_dir) == before
    code, err = cli(capsys, "run", str(path), "--out", str(tmp_path), "--no-progress", "--rerun")
    assert code == 0 and "skipped" not in err
    after = stamps(run_dir)
    assert set(after) == set(before) and all(after[k] > before[k] for k in before)


def test_a_finished_run_of_another_scenario_is_refused(tmp_path, write_scenario, capsys):
    path = write_scenario()
    assert main(["run", str(path), "--out", str(tmp_path), "--no-progress"]) == 0
    before = stamps(tmp_path / "small")
    capsys.readouterr()
    code, err = cli(capsys, "run", str(path), "--out", str(tmp_path), "--no-progress", "--set", "algorithm.lr=0.2")
    assert code == 2 and err.count("\n") == 1
    assert "holds a finished run of another scenario (differs in algorithm.lr)" in err and "--rerun" in err
    assert stamps(tmp_path / "small") == before


def test_a_killed_run_is_not_overwritten_without_being_asked(tmp_path, write_scenario, capsys, monkeypatch):
    path = write_scenario(SMALL.replace("rounds = 4", "rounds = 4\ncheckpoint_every = 1"))
    stop_in(monkeypatch, "small", 2)
    assert main(["run", str(path), "--out", str(tmp_path), "--no-progress"]) == 130
    monkeypatch.undo()
    run_dir = tmp_path / "small"
    before = stamps(run_dir)
    capsys.readouterr()
    code, err = cli(capsys, "run", str(path), "--out", str(tmp_path), "--no-progress")
    assert code == 2 and err.count("\n") == 1
    assert f"holds a run that did not finish; continue it with `fedsim run --resume {run_dir}`" in err
    assert "or start it over with --rerun" in err
    assert stamps(run_dir) == before
    code, err = cli(capsys, "run", str(path), "--out", str(tmp_path), "--no-progress", "--rerun")
    assert code == 0 and list(metrics(run_dir)["round"]) == [0, 1, 2, 3, 4]
    assert not (run_dir / "checkpoint.pt").exists()


def test_a_folder_of_someone_elses_files_is_refused(tmp_path, write_scenario, capsys):
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "notes.txt").write_text("mine")
    code, err = cli(capsys, "run", str(write_scenario()), "--out", str(tmp_path), "--no-progress")
    assert code == 2 and "holds files fedsim did not write (notes.txt)" in err
    assert [p.name for p in (tmp_path / "small").iterdir()] == ["notes.txt"]


def test_a_killed_sweep_resumes_whole_to_the_uninterrupted_curves(tmp_path, write_scenario, capsys, monkeypatch):
    path = write_scenario(SWEEP)
    assert main(["run", str(path), "--out", str(tmp_path / "whole"), "--no-progress"]) == 0
    out = tmp_path / "cut"
    stop_in(monkeypatch, "small-seed=2", 3)  # seed 1 done, seed 2 killed after its round-2 checkpoint
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 130
    monkeypatch.undo()
    index = pd.read_csv(out / "runs.csv").set_index("run_dir")
    assert list(index["status"]) == ["done", "interrupted", "pending"]
    assert not (out / POINTS[2]).exists()
    first = stamps(out / POINTS[0])
    capsys.readouterr()
    code, err = cli(capsys, "run", str(path), "--out", str(out), "--no-progress")
    assert code == 2 and "small-seed=2" in err and "--resume" in err  # not without being asked
    assert main(["run", "--resume", str(out), "--no-progress"]) == 0
    assert stamps(out / POINTS[0]) == first  # the finished point was kept as it was
    for point in POINTS:
        pd.testing.assert_frame_equal(metrics(out / point), metrics(tmp_path / "whole" / point), check_exact=True)
    assert list(pd.read_csv(out / "runs.csv")["status"]) == ["done"] * 3


def test_a_sweep_point_killed_before_its_first_checkpoint_starts_over_on_resume(tmp_path, write_scenario, capsys, monkeypatch):
    text = SWEEP.replace("checkpoint_every = 2", "checkpoint_every = 10")
    path = write_scenario(text)
    out = tmp_path / "cut"
    stop_in(monkeypatch, "small-seed=1", 1)
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    code, err = cli(capsys, "run", "--resume", str(out), "--no-progress")
    assert code == 0 and "small-seed=1: no checkpoint (killed before its first one): starting over; its 2 rows" in err
    assert main(["run", str(path), "--out", str(tmp_path / "whole"), "--no-progress"]) == 0
    for point in POINTS:
        pd.testing.assert_frame_equal(metrics(out / point), metrics(tmp_path / "whole" / point), check_exact=True)
    assert json.loads((out / POINTS[0] / "summary.json").read_text())["swept"] == {"seed": 1}  # still a point


def test_a_failing_sweep_point_is_recorded_and_the_others_still_run(tmp_path, write_scenario, capsys):
    path = write_scenario(SMALL + '\n[sweep]\n"algorithm.lr" = [0.1, 50.0, 0.05]\n')
    code, err = cli(capsys, "run", str(path), "--out", str(tmp_path), "--no-progress")
    assert code == 3  # the failed point's own exit code (divergence)
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "small-lr=50.0" in lines[0] and "diverged" in lines[0]
    assert "1 of 3 runs failed (first: small-lr=50.0)" in lines[1] and "runs.csv" in lines[1]
    index = pd.read_csv(tmp_path / "runs.csv", keep_default_na=False).set_index("run_dir")
    assert index.loc["small-lr=0.1", "status"] == "done" and index.loc["small-lr=0.05", "status"] == "done"
    assert index.loc["small-lr=50.0", "status"] == "failed" and "diverged" in index.loc["small-lr=50.0", "error"]
    for name in ("small-lr=0.1", "small-lr=0.05"):
        assert (tmp_path / name / "summary.json").is_file()
    assert list(metrics(tmp_path / "small-lr=50.0")["round"])[-1] < 4  # its rows are kept too
    # plotting the sweep's index leaves the failed point out
    assert main(["plot", str(tmp_path / "runs.csv"), "--by", "algorithm.lr", "-o", str(tmp_path / "p.png")]) == 0


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_refused_run_leaves_no_half_made_folder(tmp_path, write_scenario, capsys):
    text = SMALL.replace('dataset = "synthetic"', f'dataset = "fashion_mnist"\ndata_dir = "{tmp_path}/none"')
    path = write_scenario(text.replace('name = "mlp"\nhidden = [32]', 'name = "logreg"'))
    out = tmp_path / "out"
    code, err = cli(capsys, "run", str(path), "--out", str(out), "--no-progress")
    assert code == 2 and "apt-get install dataset-fashion-mnist" in err
    assert not (out / "small").exists()
    # refused while the run is being built (its folder already locked): the folder goes again
    address = f"127.0.0.1:{_closed_port()}"
    good = write_scenario(SMALL, "good.toml")
    code, err = cli(capsys, "run", str(good), "--out", str(out), "--no-progress", "--executor", "ray", "--address", address)
    assert code == 2 and f"nothing answers at {address}" in err and err.count("\n") == 1
    assert not out.exists()  # the --out folder it made is gone again: nothing was written
    # and a refused --rerun leaves the earlier run's files as they were, with no lock left behind
    assert main(["run", str(good), "--out", str(out), "--no-progress"]) == 0
    before = stamps(out / "small")
    code, err = cli(capsys, "run", str(good), "--out", str(out), "--no-progress", "--rerun", "--executor", "ray",
                    "--address", address)
    assert code == 2 and stamps(out / "small") == before
    assert ".fedsim.lock" not in os.listdir(out / "small")


def test_an_address_is_checked_even_when_this_process_already_uses_a_cluster(ray_session, tmp_path, write_scenario, capsys):
    # a notebook (or this test session) that already started Ray must not silently train on that
    # cluster when a run names another one
    address = f"127.0.0.1:{_closed_port()}"
    good = write_scenario(SMALL, "good.toml")
    code, err = cli(capsys, "run", str(good), "--out", str(tmp_path / "out"), "--no-progress", "--executor", "ray",
                    "--address", address)
    assert code == 2 and f"nothing answers at {address}" in err and err.count("\n") == 1
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    try:
        other = f"127.0.0.1:{listening.getsockname()[1]}"
        code, err = cli(capsys, "run", str(good), "--out", str(tmp_path / "out"), "--no-progress", "--executor", "ray",
                        "--address", other)
        assert code == 2 and "Ray joins one cluster per process" in err and err.count("\n") == 1
    finally:
        listening.close()
