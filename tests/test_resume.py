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


def test_checkpoints_load_without_executing_code_and_go_when_the_run_ends(write_scenario, tmp_path, monkeypatch):
    path = write_scenario(SMALL.replace("rounds = 4", "rounds = 3\ncheckpoint_every = 1"))
    append = History.append

    def stop_after_round_2(self, row):
        append(self, row)
        if row["round"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(History, "append", stop_after_round_2)
    assert main(["run", str(path), "--out", str(tmp_path), "--no-progress"]) == 130
    data = checkpoint.load(tmp_path / "small" / "checkpoint.pt")  # checked, then torch.load(weights_only=True)
    assert data["round"] == 1 and "params" in data["flow"]  # round 2 stopped before its checkpoint
    monkeypatch.setattr(History, "append", append)
    assert main(["run", "--resume", str(tmp_path / "small"), "--no-progress"]) == 0
    assert not (tmp_path / "small" / "checkpoint.pt").exists()  # a finished run needs none


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


@pytest.mark.slow
def test_a_killed_ray_actor_is_replaced_and_the_round_rerun(ray_session, write_scenario, tmp_path):
    """Kill an actor's process by its id while it trains; the results equal an undisturbed run."""
    import threading

    from fedsim.coordinator import RunContext, RunOptions
    from fedsim.scenario import load
    from fedsim.training import TrainJob

    text = SMALL.replace("num_clients = 12", "num_clients = 8").replace("samples_per_client = 60", "samples_per_client = 400")
    # two chunks of four, one per actor, so that the killed actor has work in the round
    path = write_scenario(text.replace('executor = "inline"', 'executor = "ray"\nchunk_size = 4'))
    spec = load(path)[0]
    ctx = RunContext(spec, RunOptions(workers=2))
    flow = spec.algorithm.build(spec.algorithm_config, ctx)
    executor = flow.executor
    jobs = [TrainJob(c, 1, steps=1500) for c in range(8)]
    try:
        executor.train(flow.params, [TrainJob(c, 1, steps=1) for c in range(8)])  # actors started
        start = time.perf_counter()
        expected = executor.train(flow.params, jobs)
        duration = time.perf_counter() - start
        victim = ray_pid(executor.actors[1])
        timer = threading.Timer(duration / 2, os.kill, (victim, signal.SIGKILL))  # mid-round
        timer.start()
        got = executor.train(flow.params, jobs)
        timer.join()
        assert executor.replaced == 1
        for a, b in zip(expected, got):
            assert a.client_id == b.client_id
            for name in a.params:
                assert torch.equal(a.params[name], b.params[name])
    finally:
        ctx.close()


def ray_pid(actor) -> int:
    import ray

    return ray.get(actor.pid.remote())


def test_a_trainer_exception_names_the_plugin_and_client_and_keeps_rows(write_scenario, tmp_path, capsys, monkeypatch):
    from fedsim.training import SGDTrainer

    original = SGDTrainer.train

    def broken(self, model, params, x, y, job, rng):
        if job.round == 3 and job.client_id % 2 == 1:
            raise ValueError("boom")
        return original(self, model, params, x, y, job, rng)

    monkeypatch.setattr(SGDTrainer, "train", broken)
    monkeypatch.setattr("fedsim.vectorized.plan", lambda model, trainer: None)  # the patched method runs
    path = write_scenario(SMALL)
    assert main(["run", str(path), "--out", str(tmp_path / "a"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trainer SGDTrainer raised ValueError('boom') on client" in err[0] and "round 3" in err[0]
    assert list(metrics(tmp_path / "a" / "small")["round"]) == [0, 1, 2]
    path = write_scenario(SMALL.replace("[system]", '[system]\non_client_error = "drop"'))
    assert main(["run", str(path), "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    df = metrics(tmp_path / "b" / "small")
    assert df["failures"].iloc[3] > 0 and df["failures"].drop(index=3).fillna(0).sum() == 0


def test_divergence_stops_with_exit_3_or_drops_bad_updates(write_scenario, tmp_path, capsys, monkeypatch):
    from fedsim.training import SGDTrainer

    original = SGDTrainer.train

    def poisoned(self, model, params, x, y, job, rng):
        out = original(self, model, params, x, y, job, rng)
        if job.round == 2 and job.client_id == 5:
            out.params = {k: v * float("nan") for k, v in out.params.items()}
        return out

    monkeypatch.setattr(SGDTrainer, "train", poisoned)
    monkeypatch.setattr("fedsim.vectorized.plan", lambda model, trainer: None)
    text = SMALL.replace("clients_per_round = 4", "clients_per_round = 12")
    path = write_scenario(text)
    assert main(["run", str(path), "--out", str(tmp_path / "a"), "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert "client or node 5" in err and "round 2" in err
    assert list(metrics(tmp_path / "a" / "small")["round"]) == [0, 1, 2]  # the bad row is on disk too
    path = write_scenario(text.replace("[system]", '[system]\non_divergence = "drop"'))
    assert main(["run", str(path), "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    df = metrics(tmp_path / "b" / "small")
    assert df["dropped_updates"].iloc[-1] == 1 and df["test_loss"].notna().all()


def test_exploding_loss_is_divergence(write_scenario, tmp_path, capsys):
    path = write_scenario(SMALL.replace("lr = 0.1", "lr = 50.0"))
    assert main(["run", str(path), "--out", str(tmp_path), "--no-progress"]) == 3
    assert "diverged" in capsys.readouterr().err
