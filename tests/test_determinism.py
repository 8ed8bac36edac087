"""Same scenario and seed: bit-identical curves on any executor and any number of workers."""

from __future__ import annotations

import pandas as pd

from fedsim.cli import main
from tests.conftest import SMALL


def curves(tmp_path, path, *args) -> pd.DataFrame:
    out = tmp_path / "_".join(args).replace("-", "")
    assert main(["run", str(path), "--out", str(out), "--no-progress", *args]) == 0
    return pd.read_csv(out / "small" / "metrics.csv").drop(columns=["wall_time"])


def test_identical_across_executors_and_worker_counts(ray_session, write_scenario, tmp_path):
    # six clients keep the one-actor-per-client run cheap
    path = write_scenario(SMALL.replace("num_clients = 12", "num_clients = 6").replace("clients_per_round = 4", "clients_per_round = 3"))
    inline = curves(tmp_path, path, "--executor", "inline")
    one = curves(tmp_path, path, "--executor", "ray", "--workers", "1")
    two = curves(tmp_path, path, "--executor", "ray", "--workers", "2")
    per_client = curves(tmp_path, path, "--executor", "ray", "--set", "system.clients_per_actor=1")
    pd.testing.assert_frame_equal(inline, one, check_exact=True)
    pd.testing.assert_frame_equal(inline, two, check_exact=True)
    pd.testing.assert_frame_equal(inline, per_client, check_exact=True)
    assert inline["test_accuracy"].iloc[-1] > inline["test_accuracy"].iloc[0]


def test_another_seed_gives_other_curves(write_scenario, tmp_path):
    path = write_scenario()
    a = curves(tmp_path, path, "--set", "seed=1")
    b = curves(tmp_path, path, "--set", "seed=2")
    assert not a["test_loss"].equals(b["test_loss"])
