"""A run whose simulated clock stops advancing says so: one line, exit code 4, summary.json."""

from __future__ import annotations

import json

import pandas as pd

from fedsim.cli import main
from fedsim.coordinator import STALL_ROUNDS

SMALL = """
name = "small"
seed = 3
rounds = 40

[data]
dataset = "synthetic"
num_clients = 12
samples_per_client = 60
test_size = 400

[model]
name = "logreg"

[algorithm]
name = "fedavg"
clients_per_round = 4
lr = 0.1

[system]
executor = "inline"
"""


def test_a_run_whose_clock_stops_is_reported_as_stalled(write_scenario, tmp_path, capsys):
    # every client crashes at round 3: FedAvg's rounds find nobody and no simulated time passes
    text = SMALL + "\n[system.failures]\ncrash_fraction = 1.0\ncrash_round = 3\n"
    path = write_scenario(text)
    assert main(["run", str(path), "--out", str(tmp_path), "--no-progress"]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stalled" in err[0] and "from round 3 to 12" in err[0] and str(path) in err[0]
    summary = json.loads((tmp_path / "small" / "summary.json").read_text())
    assert summary["stalled"] is True and summary["stalled_since_round"] == 3 and summary["rounds"] == 2 + STALL_ROUNDS
    df = pd.read_csv(tmp_path / "small" / "metrics.csv")
    assert df["round"].tolist() == list(range(0, 13))  # every row kept, up to the round it stopped
    assert df["sim_time"].iloc[2:].nunique() == 1
    assert not (tmp_path / "small" / "checkpoint.pt").exists()


def test_a_run_whose_clock_moves_is_not_stalled(write_scenario, tmp_path):
    path = write_scenario(SMALL.replace("rounds = 40", "rounds = 3"))
    assert main(["run", str(path), "--out", str(tmp_path), "--no-progress"]) == 0
    assert json.loads((tmp_path / "small" / "summary.json").read_text())["stalled"] is False
