"""Bad input ends as one line naming the file, the key and what was expected, with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedsim.cli import main
from tests.conftest import SMALL


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err
    return code, err


def with_change(old: str, new: str) -> str:
    assert old in SMALL
    return SMALL.replace(old, new)


BAD = [
    # (scenario text, key expected in the message, words expected in the message)
    (with_change('lr = 0.1', 'lr = -0.1'), "algorithm.lr", "> 0"),
    (with_change('lr = 0.1', 'lr = "fast"'), "algorithm.lr", "a number"),
    (with_change('lr = 0.1', 'lr = 0.1\nlearning_rate = 2'), "algorithm.learning_rate", "unknown key"),
    (with_change('rounds = 4', 'rounds = 0'), "rounds", ">= 1"),
    (with_change('rounds = 4', 'rounds = 4.5'), "rounds", "an integer"),
    (with_change('rounds = 4', 'roundz = 4'), "roundz", "unknown key (did you mean 'rounds'? accepted: "),
    (with_change('clients_per_round = 4', 'clients_per_round = 40'), "algorithm.clients_per_round", "at most"),
    (with_change('name = "fedavg"', 'name = "fedavgg"'), "algorithm.name", "did you mean 'fedavg'"),
    (with_change('dataset = "synthetic"', 'dataset = "synthetc"'), "data.dataset", "did you mean 'synthetic'"),
    (with_change('name = "mlp"', 'name = "mpl"'), "model.name", "did you mean 'mlp'"),
    (with_change('hidden = [32]', 'hidden = [32]\nwidth = 3'), "model.width", "unknown key"),
    (with_change('hidden = [32]', 'hidden = "wide"'), "model.hidden", "expected"),
    (with_change('[data]', '[data]\nalpha = 0'), "data.alpha", "> 0"),
    (with_change('[data]', '[data]\npartition = "dirichelt"'), "data.partition", "one of"),
    (with_change('executor = "inline"', 'executor = "spark"'), "system.executor", "one of"),
    (SMALL + '\n[aggregator]\nname = "medain"\n', "aggregator.name", "unknown aggregator"),
    (SMALL + '\n[topology]\nname = "ring"\n', "topology", "central server"),
    (SMALL + '\n[sweep]\nseed = []\n', "sweep.seed", "non-empty list"),
    (SMALL + '\n[sweep]\nseed = 3\n', "sweep.seed", "non-empty list"),
    ("rounds = [\n", None, "not valid TOML"),
    # a key that takes a number or a table: a table's own mistake is named, not "expected a number"
    (with_change('executor = "inline"', 'compute = { dist = "lognormal", mean = 0.02, sgima = 0.5 }'),
     "system.compute.sgima", "unknown key (did you mean 'sigma'? accepted: dist, high, low, mean, sigma)"),
    (with_change('executor = "inline"', 'compute = { dist = "gamma" }'), "system.compute.dist", "one of 'fixed'"),
    (with_change('executor = "inline"', 'compute = { dist = "uniform", low = 2, high = 1 }'), "system.compute",
     "needs 0 < low < high"),
    (with_change('executor = "inline"', 'compute = "slow"'), "system.compute", "expected a number, got 'slow'"),
]


@pytest.mark.parametrize("text,key,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_scenario_is_one_line_exit_2(capsys, write_scenario, text, key, words):
    path = write_scenario(text)
    code, err = run_cli(capsys, "validate", str(path))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(path) in lines[0]
    if key is not None:
        assert f": {key}: " in lines[0], lines[0]
    assert words in lines[0], lines[0]


def test_missing_file(capsys, tmp_path):
    code, err = run_cli(capsys, "run", str(tmp_path / "nope.toml"))
    assert code == 2 and "nope.toml: file not found" in err


def test_set_override_is_validated(capsys, write_scenario):
    path = write_scenario()
    code, err = run_cli(capsys, "validate", str(path), "--set", "algorithm.lr=-1")
    assert code == 2 and "algorithm.lr" in err
    code, err = run_cli(capsys, "validate", str(path), "--set", "algorithm.lr=0.5", "--set", "data.num_clients=20")
    assert code == 0, err


def test_missing_data_file_names_the_file(capsys, write_scenario, tmp_path):
    text = with_change('dataset = "synthetic"', f'dataset = "fashion_mnist"\ndata_dir = "{tmp_path}/none"')
    path = write_scenario(text.replace('name = "mlp"\nhidden = [32]', 'name = "logreg"'))
    code, err = run_cli(capsys, "run", str(path), "--out", str(tmp_path / "runs"))
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "data" in err and "apt-get install dataset-fashion-mnist" in err


def test_no_traceback_in_a_real_process(write_scenario):
    path = write_scenario(with_change('lr = 0.1', 'lr = 0'))
    proc = subprocess.run([sys.executable, "-m", "fedsim", "run", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "algorithm.lr" in proc.stderr


def test_run_refuses_a_scenario_that_cannot_fit_in_memory(capsys, write_scenario, tmp_path):
    huge = SMALL.replace("num_clients = 12", "num_clients = 10000000").replace('name = "fedavg"\nclients_per_round = 4', 'name = "dpsgd"')
    path = write_scenario(huge.replace("[system]", '[topology]\nname = "ring"\n\n[system]'))
    code, err = run_cli(capsys, "run", str(path), "--out", str(tmp_path))
    assert code == 2 and "GiB" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "small").exists()  # refused before anything was written


def test_an_interrupted_run_says_how_to_continue(capsys, write_scenario, tmp_path, monkeypatch):
    import fedsim.coordinator as coordinator

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(coordinator, "run_all", interrupted)
    path = write_scenario()
    code, err = run_cli(capsys, "run", str(path), "--out", str(tmp_path / "out"), "--no-progress")
    assert code == 130
    assert err.strip() == (f"fedsim: interrupted; the rows written so far are kept; continue with "
                           f"`fedsim run --resume {tmp_path / 'out'}`")
