"""`executor = "auto"` (the default): inline where Ray's start-up would dominate, Ray where more
workers pay; the choice is one printed line; Ray-only flags with the inline executor are errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsim.cli import main
from fedsim.executor_choice import RAY_STARTUP_S, choose, training_seconds
from fedsim.scenario import SystemConfig, load, loads
from tests.conftest import SMALL

ROOT = Path(__file__).resolve().parent.parent
MLP_60_200_10 = 60 * 200 + 200 + 200 * 10 + 10
BIG = """
rounds = 200
[data]
num_clients = 100
[model]
name = "mlp"
hidden = [1024, 1024]
[algorithm]
name = "fedavg"
clients_per_round = 50
"""
BIG_PARAMS = 60 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10


def test_auto_is_the_default():
    assert SystemConfig().executor == "auto"
    (spec,) = loads("[data]\nnum_clients = 4\n[algorithm]\nname = \"fedavg\"\nclients_per_round = 2\n")
    assert spec.scenario.system.executor == "auto"


def test_the_quickstart_runs_inline_and_a_heavy_run_on_ray():
    (quick,) = load(ROOT / "scenarios" / "quickstart.toml")
    assert quick.scenario.system.executor == "auto"
    choice = choose(quick, None, None, None, num_params=MLP_60_200_10, mean_examples=200, num_clients=100, cpus=2)
    assert choice.kind == "inline"
    assert training_seconds(quick, MLP_60_200_10, 200, 100) < RAY_STARTUP_S
    assert choice.line().startswith("executor: inline (about ") and "starting Ray" in choice.line()
    (big,) = loads(BIG)
    choice = choose(big, None, None, None, num_params=BIG_PARAMS, mean_examples=200, num_clients=100, cpus=2)
    assert (choice.kind, choice.workers) == ("ray", 2)
    assert choice.line().startswith("executor: ray, 2 workers (about ")
    # the same heavy run on one CPU has nothing to gain from Ray
    assert choose(big, None, None, None, num_params=BIG_PARAMS, mean_examples=200, num_clients=100, cpus=1).kind == "inline"


def test_a_stacked_mlp_stays_inline_where_its_chunks_use_every_core():
    (big,) = loads(BIG)
    heavy = dict(num_params=BIG_PARAMS, mean_examples=200, num_clients=100, cpus=2)
    choice = choose(big, None, None, None, stacked=True, **heavy)
    assert choice.kind == "inline" and "stacked chunks on all 2 cores" in choice.line()
    assert choose(big, None, 2, None, stacked=True, **heavy).kind == "ray"  # asked for: still honoured
    (forced,) = loads(BIG + "[system]\nvectorize = false\n")  # one client at a time: the estimate decides
    assert choose(forced, None, None, None, stacked=True, **heavy).kind == "ray"


def test_explicit_requests_win():
    (quick,) = load(ROOT / "scenarios" / "quickstart.toml")
    small = dict(num_params=MLP_60_200_10, mean_examples=200, num_clients=100, cpus=2)
    assert choose(quick, None, None, "127.0.0.1:6379", **small).kind == "ray"
    assert choose(quick, None, 2, None, **small).kind == "ray"
    assert choose(quick, "ray", None, None, **small).kind == "ray"
    (big,) = loads(BIG)
    assert choose(big, "inline", None, None, num_params=BIG_PARAMS, mean_examples=200, num_clients=100, cpus=2).kind == "inline"


def test_the_choice_is_printed_in_one_line(write_scenario, tmp_path, capsys):
    path = write_scenario(SMALL.replace('executor = "inline"', ""))  # the default: auto
    assert main(["run", str(path), "--out", str(tmp_path), "--no-progress"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fedsim: executor:")]
    assert len(lines) == 1 and lines[0].startswith("fedsim: executor: inline (the MLP trains in stacked chunks")
    # one client at a time, the MLP's training time is estimated (too little here to pay for Ray)
    path = write_scenario(SMALL.replace('executor = "inline"', "vectorize = false"), name="sequential.toml")
    assert main(["run", str(path), "--out", str(tmp_path / "sequential"), "--no-progress"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fedsim: executor:")]
    assert len(lines) == 1 and lines[0].startswith("fedsim: executor: inline (about 0 s of local training")


def test_an_explicit_executor_prints_no_choice(write_scenario, tmp_path, capsys):
    assert main(["run", str(write_scenario()), "--out", str(tmp_path), "--no-progress"]) == 0
    assert "executor:" not in capsys.readouterr().err


@pytest.mark.parametrize("args, scenario_executor, message", [
    (["--executor", "inline", "--workers", "2"], "ray", "--workers apply to the Ray executor, not with --executor inline"),
    (["--address", "127.0.0.1:1"], "inline", '--address apply to the Ray executor, not with system.executor = "inline"'),
    (["--workers", "2", "--address", "127.0.0.1:1"], "inline", "--workers and --address apply"),
])
def test_ray_flags_with_the_inline_executor_are_errors(write_scenario, tmp_path, capsys, args, scenario_executor, message):
    path = write_scenario(SMALL.replace('executor = "inline"', f'executor = "{scenario_executor}"'))
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and str(path) in err[0]
    assert not (tmp_path / "out").exists()
