"""[system.failures]: the model itself, and every kind of method surviving it without hanging."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from fedsim.cli import main
from fedsim.failures import FailureModel
from fedsim.scenario import FailuresConfig
from tests.conftest import SMALL


def test_failure_model_is_seeded_and_does_what_it_says():
    cfg = FailuresConfig(crash_fraction=0.5, crash_at=10.0, join_fraction=0.25, join_at=5.0)
    a, b, c = FailureModel(cfg, 20, seed=1), FailureModel(cfg, 20, seed=1), FailureModel(cfg, 20, seed=2)
    assert np.array_equal(a.crashes, b.crashes) and not np.array_equal(a.crashes, c.crashes)
    assert a.crashes.sum() == 10 and a.joins.sum() == 5
    crashed = int(np.flatnonzero(a.crashes & ~a.joins)[0])
    assert a.alive(crashed, 9.9) and not a.alive(crashed, 10.0)
    joiner = int(np.flatnonzero(a.joins & ~a.crashes)[0])
    assert not a.alive(joiner, 4.9) and a.alive(joiner, 5.0)
    assert a.alive_mask(11.0).sum() == 20 - a.crashes.sum()  # the joiners are in by then


def test_churn_alternates_up_and_down():
    model = FailureModel(FailuresConfig(churn_fraction=1.0, mean_up=10.0, mean_down=5.0), 4, seed=0)
    times = np.linspace(0, 500, 5001)
    up = np.array([model.alive(0, t) for t in times])
    assert up[0] and 0.4 < up.mean() < 0.9 and (np.diff(up.astype(int)) != 0).sum() > 10
    assert [model.alive(0, t) for t in times[:50]] == list(up[:50])  # asking again gives the same


def test_failure_settings_are_validated(write_scenario, capsys):
    path = write_scenario(SMALL + "\n[system.failures]\ncrash_fraction = 0.5\n")
    assert main(["validate", str(path)]) == 2
    assert "crash_fraction needs crash_at" in capsys.readouterr().err


def test_server_round_with_dead_clients_goes_on_and_records_failures(write_scenario, tmp_path):
    text = SMALL + "\n[system.failures]\ncrash_fraction = 0.5\ncrash_round = 2\nmessage_loss = 0.05\n"
    path = write_scenario(text.replace("rounds = 4", "rounds = 6"))
    assert main(["run", str(path), "--out", str(tmp_path), "--no-progress"]) == 0
    df = pd.read_csv(tmp_path / "small" / "metrics.csv")
    assert df["failures"].iloc[1] <= df["failures"].iloc[2:].mean()
    assert df["failures"].iloc[2:].sum() > 0
    assert df["test_accuracy"].iloc[-1] > df["test_accuracy"].iloc[0]
    summary = json.loads((tmp_path / "small" / "summary.json").read_text())
    assert summary["crashed_nodes"] == 6


@pytest.mark.parametrize("algorithm", ["dfedsam", "gossip"])
def test_decentralized_methods_skip_dead_neighbours(write_scenario, tmp_path, algorithm):
    text = SMALL.replace('name = "fedavg"\nclients_per_round = 4', f'name = "{algorithm}"')
    text = text.replace("[system]", '[topology]\nname = "random_regular"\ndegree = 4\n\n[system]')
    text += "\n[system.failures]\ncrash_fraction = 0.5\ncrash_round = 2\nchurn_fraction = 0.2\nmean_up = 1.0\nmean_down = 0.5\n"
    path = write_scenario(text.replace("rounds = 4", "rounds = 8"))
    assert main(["run", str(path), "--out", str(tmp_path), "--no-progress"]) == 0
    df = pd.read_csv(tmp_path / "small" / "metrics.csv")
    assert len(df) == 9 and np.isfinite(df["test_accuracy"]).all()


@pytest.mark.parametrize("algorithm", ["fedasync", "fedbuff", "fedcompass"])
def test_async_methods_survive_crashes_and_churn(write_scenario, tmp_path, algorithm):
    text = SMALL.replace('name = "fedavg"\nclients_per_round = 4', f'name = "{algorithm}"\nround_seconds = 1.0\nlocal_steps = 4')
    if algorithm == "fedcompass":
        text = text.replace("local_steps = 4", "q_max = 8\nq_min = 2")
    text += "\n[system.failures]\ncrash_fraction = 0.4\ncrash_at = 2.0\nchurn_fraction = 0.3\nmean_up = 2.0\nmean_down = 1.0\nmessage_loss = 0.05\n"
    path = write_scenario(text.replace("rounds = 4", "rounds = 8"))
    assert main(["run", str(path), "--out", str(tmp_path), "--no-progress"]) == 0
    df = pd.read_csv(tmp_path / "small" / "metrics.csv")
    assert len(df) == 9 and df["sim_time"].iloc[-1] == 8.0
    assert df["updates_applied"].iloc[-3:].sum() > 0  # still making progress after the crash
