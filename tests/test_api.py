"""The Python API: fedsim.run from a path, TOML text or a dict; fedsim.load_runs; the notebook example."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pandas as pd
import pytest

import fedsim
from fedsim import FedsimError
from fedsim.api import RunResult, SweepResult
from tests.conftest import SMALL

ROOT = Path(__file__).resolve().parent.parent
SWEEP = SMALL.replace("rounds = 4", "rounds = 2") + '\n[sweep]\nseed = [1, 2]\n"algorithm.lr" = [0.05, 0.2]\n'


def test_run_from_text_returns_the_metrics_summary_and_folder(tmp_path):
    result = fedsim.run(SMALL, out=tmp_path)
    assert isinstance(result, RunResult)
    assert result.run_dir == tmp_path / "small"
    pd.testing.assert_frame_equal(result.metrics, pd.read_csv(tmp_path / "small" / "metrics.csv"))
    assert result.summary == json.loads((tmp_path / "small" / "summary.json").read_text())
    assert result.metrics["round"].tolist() == [0, 1, 2, 3, 4]
    assert result.scenario["algorithm"]["lr"] == 0.1


def test_a_folder_of_another_scenario_is_refused_unless_rerun(tmp_path):
    first = fedsim.run(SMALL, out=tmp_path)
    again = fedsim.run(SMALL, out=tmp_path)  # the same scenario, finished: read back, not run again
    assert again.summary["wall_time"] == first.summary["wall_time"]
    with pytest.raises(fedsim.FedsimError, match="holds a finished run of another scenario"):
        fedsim.run(SMALL, out=tmp_path, overrides={"algorithm.lr": 0.3})
    replaced = fedsim.run(SMALL, out=tmp_path, overrides={"algorithm.lr": 0.3}, rerun=True)
    assert replaced.scenario["algorithm"]["lr"] == 0.3 and replaced.run_dir == tmp_path / "small"


def test_path_dict_and_text_give_the_same_curves_and_overrides_apply(tmp_path, write_scenario):
    import tomllib

    path = write_scenario()
    by_path = fedsim.run(path, out=tmp_path / "a", overrides={"algorithm.lr": 0.3})
    by_dict = fedsim.run(tomllib.loads(SMALL), out=tmp_path / "b", overrides=["algorithm.lr=0.3"])
    by_text = fedsim.run(SMALL.replace("lr = 0.1", "lr = 0.3"), out=tmp_path / "c")
    curves = [r.metrics.drop(columns="wall_time") for r in (by_path, by_dict, by_text)]
    pd.testing.assert_frame_equal(curves[0], curves[1], check_exact=True)
    pd.testing.assert_frame_equal(curves[0], curves[2], check_exact=True)
    assert by_path.scenario["algorithm"]["lr"] == 0.3
    baseline = fedsim.run(SMALL, out=tmp_path / "d")  # the override changed the run
    assert not baseline.metrics["test_loss"].equals(by_path.metrics["test_loss"])


def test_a_sweep_returns_one_result_per_point_and_a_tidy_frame(tmp_path):
    sweep = fedsim.run(SWEEP, out=tmp_path)
    assert isinstance(sweep, SweepResult) and len(sweep) == 4
    assert [r.swept for r in sweep] == [{"seed": 1, "algorithm.lr": 0.05}, {"seed": 1, "algorithm.lr": 0.2},
                                        {"seed": 2, "algorithm.lr": 0.05}, {"seed": 2, "algorithm.lr": 0.2}]
    tidy = sweep.metrics
    assert len(tidy) == 4 * 3 and {"run", "run_dir", "seed", "algorithm.lr"} <= set(tidy.columns)
    for r in sweep:
        rows = tidy[tidy["run"] == r.name]
        assert (rows["seed"] == r.swept["seed"]).all() and (rows["algorithm.lr"] == r.swept["algorithm.lr"]).all()
        assert rows["test_accuracy"].tolist() == r.metrics["test_accuracy"].tolist()
    summary = sweep.summary
    assert summary["final_accuracy"].tolist() == [r.summary["final_accuracy"] for r in sweep]
    assert tidy["algorithm.lr"].dtype == float  # typed as in the scenario, ready for groupby
    means = tidy.groupby("algorithm.lr")["test_accuracy"].mean()
    assert list(means.index) == [0.05, 0.2]
    one_point = fedsim.run(SMALL.replace("rounds = 4", "rounds = 1") + "\n[sweep]\nseed = [7]\n", out=tmp_path / "one")
    assert isinstance(one_point, SweepResult) and [r.swept for r in one_point] == [{"seed": 7}]


def test_load_runs_takes_folders_runs_csv_and_adds_keys_that_differ(tmp_path):
    fedsim.run(SWEEP, out=tmp_path / "sweep")
    fedsim.run(SMALL.replace('name = "small"', 'name = "other"').replace("hidden = [32]", "hidden = [16]"),
               out=tmp_path / "single", overrides={"rounds": 2})
    from_csv = fedsim.load_runs(tmp_path / "sweep" / "runs.csv")
    from_folder = fedsim.load_runs(tmp_path / "sweep")
    pd.testing.assert_frame_equal(from_csv, from_folder)
    both = fedsim.load_runs([tmp_path / "sweep", tmp_path / "single" / "other"])
    assert sorted(both["run"].unique()) == sorted([*from_csv["run"].unique(), "other"])
    # The single run was not part of a sweep, but its hidden size differs from the sweep's: a column.
    assert set(both.loc[both["run"] == "other", "model.hidden"]) == {"[16]"}
    assert set(both.loc[both["run"] != "other", "model.hidden"]) == {"[32]"}
    assert both.loc[both["run"] == "other", "algorithm.lr"].tolist() == [0.1] * 3


def test_bad_input_is_a_fedsim_error(tmp_path):
    with pytest.raises(FedsimError, match="algorithm.lr: expected a value > 0"):
        fedsim.run(SMALL, out=tmp_path, overrides={"algorithm.lr": -1.0})
    with pytest.raises(FedsimError, match="not valid TOML"):
        fedsim.run("name = \n[", out=tmp_path)
    with pytest.raises(FedsimError, match="file not found"):
        fedsim.run(tmp_path / "missing.toml", out=tmp_path)
    with pytest.raises(FedsimError, match="--workers apply to the Ray executor"):
        fedsim.run(SMALL, out=tmp_path, workers=2)
    with pytest.raises(FedsimError, match="no runs found|expected a run folder"):
        fedsim.load_runs(tmp_path / "nothing-here")
    assert not (tmp_path / "small").exists()


def test_the_notebook_example_runs_and_compares_learning_rates(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSIM_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    ns = runpy.run_path(str(ROOT / "examples" / "notebook.py"), run_name="__main__")
    assert isinstance(ns["sweep"], SweepResult) and len(ns["sweep"]) == 4
    final = ns["final"]
    assert list(final.index) == [0.02, 0.2]
    for lr in (0.02, 0.2):
        finals = [r.summary["final_accuracy"] for r in ns["sweep"] if r.swept["algorithm.lr"] == lr]
        assert final.loc[lr, "mean"] == pytest.approx(sum(finals) / len(finals))
    assert ns["single"].scenario["algorithm"]["lr"] == 0.1
    assert (tmp_path / "by-lr.png").stat().st_size > 0
    text = (ROOT / "examples" / "notebook.py").read_text()
    assert text.count("# %%") >= 5  # opens as a notebook of cells
