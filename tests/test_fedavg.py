"""FedAvg: the aggregation rule against a hand computation, and end-to-end runs that learn."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from fedsim import UpdateBatch
from fedsim.algorithms.fedavg import WeightedMean
from fedsim.cli import main
from fedsim.testing import check_aggregator
from tests.conftest import SMALL


def test_weighted_mean_matches_hand_computation():
    batch = UpdateBatch(
        params={"w": torch.tensor([[1.0, 2.0], [3.0, 6.0], [0.0, -2.0]]), "b": torch.tensor([1.0, 2.0, 4.0])},
        num_examples=torch.tensor([10, 30, 60]),
        client_ids=torch.tensor([4, 7, 9]),
        staleness=torch.zeros(3, dtype=torch.int64),
    )
    out = WeightedMean()({"w": torch.zeros(2), "b": torch.zeros(())}, batch, round=1)
    # 0.1 * [1, 2] + 0.3 * [3, 6] + 0.6 * [0, -2] = [1.0, 0.8];  0.1 + 0.6 + 2.4 = 3.1
    assert torch.allclose(out["w"], torch.tensor([1.0, 0.8]))
    assert torch.allclose(out["b"], torch.tensor(3.1))


def test_weighted_mean_passes_conformance():
    check_aggregator(WeightedMean())


def test_conformance_catches_a_broken_rule():
    class FirstClient:
        def __call__(self, global_params, batch, *, round):
            return {k: v[0] for k, v in batch.params.items()}

    with pytest.raises(AssertionError, match="client order"):
        check_aggregator(FirstClient())


def test_run_writes_curves_summary_plot_and_resolved_scenario(write_scenario, tmp_path):
    path = write_scenario()
    assert main(["run", str(path), "--out", str(tmp_path / "runs"), "--no-progress"]) == 0
    run = tmp_path / "runs" / "small"
    df = pd.read_csv(run / "metrics.csv")
    for col in ["round", "sim_time", "wall_time", "test_accuracy", "test_loss", "train_loss", "bytes_sent"]:
        assert col in df
    assert list(df["round"]) == [0, 1, 2, 3, 4]
    assert df["bytes_sent"].is_monotonic_increasing and df["bytes_sent"].iloc[-1] > 0
    assert df["sim_time"].is_monotonic_increasing and df["sim_time"].iloc[-1] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 4 and summary["total_bytes"] == df["bytes_sent"].iloc[-1]
    assert summary["best_accuracy"] == df["test_accuracy"].max()
    assert (run / "convergence.png").stat().st_size > 1000
    resolved = (run / "scenario.toml").read_text()
    assert "torch" in resolved and "clients_per_round = 4" in resolved and "momentum = 0.0" in resolved
    # the resolved scenario is itself a valid scenario that reproduces the run
    assert main(["validate", str(run / "scenario.toml")]) == 0


def test_bytes_follow_the_model_size(write_scenario, tmp_path):
    path = write_scenario()
    main(["run", str(path), "--out", str(tmp_path), "--no-progress", "--set", "rounds=1"])
    df = pd.read_csv(tmp_path / "small" / "metrics.csv")
    model_bytes = 4 * (60 * 32 + 32 + 32 * 10 + 10)
    assert df["bytes_sent"].iloc[-1] == 2 * 4 * model_bytes  # 4 clients, one download and one upload each


def test_sweep_writes_one_folder_per_point_and_an_index(write_scenario, tmp_path):
    path = write_scenario(SMALL + '\n[sweep]\nseed = [1, 2]\n"algorithm.lr" = [0.05, 0.1]\n')
    assert main(["run", str(path), "--out", str(tmp_path), "--no-progress", "--set", "rounds=1"]) == 0
    index = pd.read_csv(tmp_path / "runs.csv")
    assert len(index) == 4 and set(index.columns) == {"run_dir", "status", "error", "sweep", "seed", "algorithm.lr"}
    assert (index["status"] == "done").all()
    for d in index["run_dir"]:
        assert (tmp_path / d / "metrics.csv").is_file()
    out = tmp_path / "by_lr.png"
    assert main(["plot", str(tmp_path / "runs.csv"), "--by", "algorithm.lr", "-o", str(out)]) == 0
    assert out.stat().st_size > 1000


@pytest.mark.slow
def test_fedavg_on_ray_beats_chance_on_synthetic(ray_session, tmp_path):
    assert main(["run", "scenarios/quickstart.toml", "--out", str(tmp_path), "--no-progress", "--set", "rounds=30"]) == 0
    summary = json.loads((tmp_path / "quickstart" / "summary.json").read_text())
    assert summary["final_accuracy"] > 0.4  # the majority class is 15% of the test set


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fedavg_on_ray_beats_chance_on_fashion_mnist(ray_session, write_scenario, tmp_path):
    text = (
        SMALL.replace('dataset = "synthetic"', 'dataset = "fashion_mnist"\npartition = "dirichlet"\nalpha = 0.5')
        .replace('executor = "inline"', 'executor = "ray"')
        .replace("rounds = 4", "rounds = 5")
        .replace("num_clients = 12", "num_clients = 100")
        .replace("clients_per_round = 4", "clients_per_round = 10")
    )
    path = write_scenario(text)
    assert main(["run", str(path), "--out", str(tmp_path), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "small" / "summary.json").read_text())
    assert summary["final_accuracy"] > 0.6
