"""`validate` checks what `run` checks: each case `run` refuses before starting, `validate` refuses
with the same line; a scenario `validate` accepts, `run` starts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedsim import resources
from fedsim.cli import main
from tests.conftest import SMALL

GRAPH = SMALL.replace('name = "fedavg"', 'name = "dpsgd"').replace("clients_per_round = 4\n", "")

CASES = {
    "data files missing": (
        SMALL.replace('dataset = "synthetic"', 'dataset = "fashion_mnist"\ndata_dir = "{tmp}/empty"'),
        "data: {tmp}/empty/train-images-idx3-ubyte.gz not found; install it with `apt-get install dataset-fashion-mnist`",
    ),
    "natural partition of a data set without clients": (
        SMALL.replace('dataset = "synthetic"', 'dataset = "folder"\ndata_dir = "{tmp}/d.npz"\npartition = "natural"'),
        "data.partition: this data set has no natural clients; choose partition auto, iid, dirichlet",
    ),
    "more shards than examples": (
        SMALL.replace('dataset = "synthetic"', 'dataset = "synthetic"\npartition = "shards"\nshards_per_client = 100'),
        "data.partition: 1200 shards (12 clients x 100) but only 720 examples; use fewer clients or shards_per_client",
    ),
    "more classes per client than classes": (
        SMALL.replace('dataset = "synthetic"', 'dataset = "synthetic"\npartition = "label_quantity"\nclasses_per_client = 11'),
        "data.partition: label_quantity needs 1 <= classes_per_client <= 10",
    ),
    "lazy data partitioned otherwise than naturally": (
        SMALL.replace('dataset = "synthetic"', 'dataset = "synthetic"\nlazy = true\npartition = "iid"'),
        'data.partition: a lazily generated Synthetic federation only supports partition = "natural"',
    ),
    "topology that cannot be built on this many nodes": (
        GRAPH + '\n[topology]\nname = "random_regular"\ndegree = 13\n',
        "topology:",
    ),
    "disconnected graph": (
        GRAPH + '\n[topology]\nname = "erdos_renyi"\np = 0.000001\nmax_tries = 2\n',
        "topology:",
    ),
    "memory estimate over what is available": (SMALL, "needs about "),
}


@pytest.fixture
def folder_data(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(200, 4)).astype(np.float32), y=rng.integers(0, 3, 200))
    (tmp_path / "empty").mkdir()
    return tmp_path


@pytest.mark.parametrize("case", sorted(CASES))
def test_validate_refuses_what_run_refuses(case: str, folder_data: Path, write_scenario, capsys, monkeypatch) -> None:
    text, expected = CASES[case]
    tmp = str(folder_data)
    path = write_scenario(text.replace("{tmp}", tmp), "s.toml")
    if case.startswith("memory"):
        monkeypatch.setattr(resources, "mem_available", lambda: 2**20)
    out = folder_data / "runs"
    errors = []
    for argv in (["validate", str(path)], ["run", str(path), "--out", str(out), "--no-progress"]):
        assert main(argv) == 2, (case, argv[0])
        errors.append(capsys.readouterr().err.strip())
    assert errors[0] == errors[1], case  # the same line from both commands
    line = errors[0]
    assert "\n" not in line and line.startswith(f"fedsim: error: {path}: ")
    assert expected.replace("{tmp}", tmp) in line, (case, line)
    assert not out.exists(), "a refused run leaves no folder behind"


def test_validate_ok_means_run_starts(write_scenario, tmp_path: Path, capsys) -> None:
    path = write_scenario(SMALL.replace("rounds = 4", "rounds = 1"))
    assert main(["validate", str(path)]) == 0
    assert "ok (1 run)" in capsys.readouterr().out
    assert main(["run", str(path), "--out", str(tmp_path / "runs"), "--no-progress"]) == 0
    assert (tmp_path / "runs" / "small" / "metrics.csv").is_file()


def test_validate_checks_every_sweep_point(write_scenario, capsys) -> None:
    text = SMALL + '\n[sweep]\n"data.shards_per_client" = [2, 100]\n'
    text = text.replace('dataset = "synthetic"', 'dataset = "synthetic"\npartition = "shards"')
    assert main(["validate", str(write_scenario(text))]) == 2
    assert "1200 shards" in capsys.readouterr().err


def test_a_missing_optional_package_is_found_before_anything_runs(write_scenario, tmp_path: Path, capsys, monkeypatch) -> None:
    # [privacy] without dp-accounting used to pass validate, write row 0 and leave a folder that
    # the next run refused
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "dp_accounting" else real(name, *a))
    path = write_scenario(SMALL + '\n[privacy]\nmode = "server"\nnoise_multiplier = 0.5\nclip_norm = 1.0\n')
    for args in (["validate", str(path)], ["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "privacy: privacy accounting needs dp-accounting" in err[0], err
        assert "fedsim[privacy]" in err[0] and str(path) in err[0]
    assert not (tmp_path / "out" / "small").exists()
    from fedsim.api import run

    with pytest.raises(Exception, match="needs dp-accounting"):
        run(path, out=tmp_path / "api")
    assert not (tmp_path / "api" / "small").exists()
