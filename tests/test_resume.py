"""Checkpoint and resume: a killed run continues to exactly the curves of an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from fedsim import checkpoint
from fedsim.cli import main
from fedsim.history import History
from tests.conftest import SMALL

TOPOLOGY = '\n[topology]\nname = "ring"\n'
CASES = {
    "fedavg": (SMALL, ""),
    "dfedsam_mgs": (SMALL.replace('name = "fedavg"\nclients_per_round = 4', 'name = "dfedsam_mgs"'), TOPOLOGY),
    "gossip": (SMALL.replace('name = "fedavg"\nclients_per_round = 4', 'name = "gossip"'), TOPOLOGY),
    "fedcompass": (
        SMALL.replace('name = "fedavg"\nclients_per_round = 4', 'name = "fedcompass"\nq_max = 6\nq_min = 2\nround_seconds = 0.5')
        .replace("[system]", '[system]\ncompute = { dist = "uniform", low = 0.01, high = 0.08 }'),
        "",
    ),
    "fedbuff": (SMALL.replace('name = "fedavg"\nclients_per_round = 4', 'name = "fedbuff"\nlocal_steps = 3\nround_seconds = 0.5'), ""),
    "modest": (SMALL.replace('name = "fedavg"\nclients_per_round = 4', 'name = "modest"\nsample_size = 4'), ""),
}


def metrics(folder) -> pd.DataFrame:
    return pd.read_csv(folder / "metrics.csv").drop(columns="wall_time")


@pytest.mark.parametrize("algorithm", list(CASES))
def test_resume_after_a_crash_gives_the_uninterrupted_curves(write_scenario, tmp_path, monkeypatch, algorithm):
    text, extra = CASES[algorithm]
    text = text.replace("rounds = 4", "rounds = 8\ncheckpoint_every = 2").replace("[system]", extra + "\n[system]")
    path = write_scenario(text)
    assert main(["run", str(path), "--out", str(tmp_path / "whole"), "--no-progress"]) == 0
    whole = metrics(tmp_path / "whole" / "small")

    append = History.append

    def crash_after_round_6(self, row):
        append(self, row)
        if row["round"] == 6:
            raise KeyboardInterrupt  # as if killed: checkpoint at round 4, rows 5 and 6 on disk

    monkeypatch.setattr(History, "append", crash_after_round_6)
    assert main(["run", str(path), "--out", str(tmp_path / "cut"), "--no-progress"]) == 130
    monkeypatch.setattr(History, "append", append)
    run_dir = tmp_path / "cut" / "small"
    assert list(metrics(run_dir)["round"]) == [0, 1, 2, 3, 4, 5, 6]
    assert checkpoint.load(run_dir / "checkpoint.pt")["round"] == 4
    assert main(["run", "--resume", str(run_dir), "--no-progress"]) == 0
    pd.testing.assert_frame_equal(metrics(run_dir), whole, check_exact=True)


def test_checkpoints_load_without_executing_code(write_scenario, tmp_path):
    path = write_scenario(SMALL.replace("rounds = 4", "rounds = 2\ncheckpoint_every = 1"))
    assert main(["run", str(path), "--out", str(tmp_path), "--no-progress"]) == 0
    data = torch.load(tmp_path / "small" / "checkpoint.pt", weights_only=True)
    assert data["round"] == 2 and "params" in data["flow"]


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "no checkpoint.pt" in capsys.readouterr().err


def test_sigkill_mid_run_then_resume(write_scenario, tmp_path):
    text = SMALL.replace("rounds = 4", "rounds = 40\ncheckpoint_every = 3").replace("num_clients = 12", "num_clients = 30")
    path = write_scenario(text.replace('name = "fedavg"\nclients_per_round = 4', 'name = "fedavg"\nclients_per_round = 10\nlocal_epochs = 3'))
    assert main(["run", str(path), "--out", str(tmp_path / "whole"), "--no-progress"]) == 0
    cmd = [sys.executable, "-m", "fedsim", "run", str(path), "--out", str(tmp_path / "cut"), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "cut" / "small" / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and checkpoint.load(ckpt)["round"] >= 9:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(metrics(tmp_path / "cut" / "small")) < 41
    assert main(["run", "--resume", str(tmp_path / "cut" / "small"), "--no-progress"]) == 0
    pd.testing.assert_frame_equal(metrics(tmp_path / "cut" / "small"), metrics(tmp_path / "whole" / "small"), check_exact=True)
