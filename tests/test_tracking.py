"""Experiment tracking: each backend's records, read back with the library's own reader, equal the
run folder's metrics.csv, scenario.toml and plots. Nothing here touches the network."""

from __future__ import annotations

import json
import math
import sys
import tomllib
from pathlib import Path

import pandas as pd
import pytest

from fedsim.cli import main
from fedsim.history import BASE_COLUMNS
from fedsim.tracking import flat_params
from tests.conftest import SMALL

TRACKED = SMALL + '\n[tracking]\nbackends = ["tensorboard", "mlflow"]\nexperiment = "tracked"\n'


def resolved(run_dir: Path) -> dict:
    return tomllib.loads((run_dir / "scenario.toml").read_text())


def assert_column_equal(values: list[float], column: pd.Series, rel: float = 0.0) -> None:
    assert len(values) == len(column)
    for got, want in zip(values, column):
        if math.isnan(want):
            assert math.isnan(got)
        else:
            assert got == pytest.approx(want, rel=rel, abs=0.0)


def assert_records_equal(steps: list[int], values: list[float], metrics: pd.DataFrame, column: str,
                         rel: float = 0.0) -> None:
    """A tracker's (step, value) records of one column against metrics.csv: every row's value at
    its round. A column that appears after round 0 (failures) has no record where the row had
    none, which metrics.csv shows as an empty cell; the base columns have every round."""
    frame = metrics.set_index("round")[column]
    if column in BASE_COLUMNS:
        assert steps == metrics["round"].tolist()
    else:
        assert steps == sorted(steps) and set(frame.index) - set(steps) <= set(frame.index[frame.isna()])
    assert_column_equal(values, frame.loc[steps], rel=rel)


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One run sent to all three backends: two from the scenario's [tracking] table, W&B by --track."""
    tmp = tmp_path_factory.mktemp("tracked")
    path = tmp / "scenario.toml"
    path.write_text(TRACKED)
    out = tmp / "out"
    assert main(["run", str(path), "--out", str(out), "--no-progress", "--track", "wandb"]) == 0
    run_dir = out / "small"
    return run_dir, pd.read_csv(run_dir / "metrics.csv")


def test_tensorboard_event_files_hold_every_row_the_scenario_and_the_plot(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, metrics = tracked_run
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    columns = [c for c in metrics.columns if c != "round"]
    assert set(columns) <= set(acc.Tags()["scalars"])
    for column in columns:
        events = acc.Scalars(column)
        assert_records_equal([e.step for e in events], [e.value for e in events], metrics, column, rel=1e-6)  # float32
    (text,) = acc.Tensors("scenario/text_summary")
    toml_text = text.tensor_proto.string_val[0].decode().removeprefix("```toml\n").removesuffix("```")
    assert tomllib.loads(toml_text) == resolved(run_dir)
    (image,) = acc.Images("convergence")
    import matplotlib.image

    png = matplotlib.image.imread(str(run_dir / "convergence.png"))
    assert (image.height, image.width) == png.shape[:2]


def test_mlflow_file_store_holds_every_row_the_parameters_and_the_artifacts(tracked_run):
    from mlflow.tracking import MlflowClient

    run_dir, metrics = tracked_run
    state = json.loads((run_dir / "tracking.json").read_text())["mlflow"]
    assert state["tracking_uri"] == (run_dir.parent / "mlruns").resolve().as_uri()
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    run = client.get_run(state["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "tracked"
    assert run.info.run_name == "small" and run.info.status == "FINISHED"
    for column in [c for c in metrics.columns if c != "round"]:
        history = sorted(client.get_metric_history(state["run_id"], column), key=lambda m: m.step)
        assert_records_equal([m.step for m in history], [m.value for m in history], metrics, column)  # exact
    params = run.data.params
    expected = {k: str(v) for k, v in flat_params(resolved(run_dir)).items()}
    assert params == expected
    assert params["algorithm.lr"] == "0.1" and params["data.num_clients"] == "12"
    artifacts = {a.path for a in client.list_artifacts(state["run_id"])}
    assert {"convergence.png", "summary.json", "scenario.toml"} <= artifacts


def wandb_records(run_dir: Path) -> dict[str, list]:
    """The offline run file's records by type, read with wandb's own reader."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    store = datastore.DataStore()
    store.open_for_scan(str(path))
    records: dict[str, list] = {}
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        records.setdefault(kind, []).append(getattr(record, kind))
    return records


def test_wandb_offline_run_holds_every_row_the_config_and_the_plot(tracked_run):
    run_dir, metrics = tracked_run
    records = wandb_records(run_dir)
    (run,) = records["run"]
    assert run.project == "tracked" and run.display_name == "small"
    config = {item.key: json.loads(item.value_json) for item in run.config.update if item.key != "_wandb"}
    assert config == resolved(run_dir)
    rows = [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in h.item} for h in records["history"]]
    assert [r["_step"] for r in rows] == metrics["round"].tolist()
    for column in [c for c in metrics.columns if c != "round"]:
        have = [r for r in rows if column in r]
        assert_records_equal([r["_step"] for r in have], [float(r[column]) for r in have], metrics, column)
    (artifact,) = records["artifact"]
    assert artifact.type == "plots"
    assert [entry.path for entry in artifact.manifest.contents] == ["convergence.png"]


def test_a_sweep_is_one_mlflow_experiment_with_a_run_per_point(write_scenario, tmp_path):
    from mlflow.tracking import MlflowClient

    path = write_scenario(SMALL.replace("rounds = 4", "rounds = 1") + '\n[tracking]\nbackends = ["mlflow"]\n'
                          '\n[sweep]\n"algorithm.lr" = [0.05, 0.2]\n')
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 0
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("small")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.params["algorithm.lr"] for r in runs) == ["0.05", "0.2"]
    assert sorted(r.info.run_name for r in runs) == ["small-lr=0.05", "small-lr=0.2"]


@pytest.mark.parametrize("backend, module", [("tensorboard", "tensorboard"), ("mlflow", "mlflow"), ("wandb", "wandb")])
def test_a_missing_extra_is_one_line_naming_it(write_scenario, tmp_path, capsys, monkeypatch, backend, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    out = tmp_path / "out"
    path = write_scenario()
    code = main(["run", str(path), "--out", str(out), "--no-progress", "--track", backend])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [f"fedsim: error: {path}: tracking.backends: tracking with {backend} needs its "
                                        f"extra: pip install 'fedsim[{backend}]' with the pip of fedsim's own "
                                        "environment (e.g. .venv/bin/pip)"]
    assert not out.exists()  # refused before anything ran


def test_an_unknown_backend_is_refused(write_scenario, tmp_path, capsys):
    assert main(["run", str(write_scenario()), "--out", str(tmp_path), "--track", "neptune"]) == 2
    assert "--track: expected tensorboard, mlflow or wandb, got 'neptune'" in capsys.readouterr().err
    path = write_scenario(SMALL + '\n[tracking]\nbackends = ["neptune"]\n', "bad.toml")
    assert main(["validate", str(path)]) == 2
    assert "tracking.backends.0: expected one of 'tensorboard', 'mlflow' or 'wandb'" in capsys.readouterr().err


def test_a_resumed_run_replaces_its_earlier_records(write_scenario, tmp_path, monkeypatch):
    """A killed run resumed from its checkpoint: the trackers hold exactly metrics.csv's rows, not
    also the rows the killed session had sent after its last checkpoint."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedsim.history import History

    path = write_scenario(TRACKED.replace("rounds = 4", "rounds = 6\ncheckpoint_every = 2"))
    append = History.append

    def crash_after_round_5(self, row):
        append(self, row)
        if row["round"] == 5:
            raise KeyboardInterrupt  # as if killed: checkpoint at round 4, round 5 already tracked

    monkeypatch.setattr(History, "append", crash_after_round_5)
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 130
    monkeypatch.setattr(History, "append", append)
    run_dir = tmp_path / "out" / "small"
    first_id = json.loads((run_dir / "tracking.json").read_text())["mlflow"]["run_id"]
    state = json.loads((run_dir / "tracking.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    assert client.get_run(first_id).info.status == "FAILED"
    assert sorted(m.step for m in client.get_metric_history(first_id, "test_accuracy")) == [0, 1, 2, 3, 4, 5]

    assert main(["run", "--resume", str(run_dir), "--no-progress"]) == 0
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert metrics["round"].tolist() == [0, 1, 2, 3, 4, 5, 6]
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("test_accuracy")
    assert [e.step for e in events] == metrics["round"].tolist()
    assert_column_equal([e.value for e in events], metrics["test_accuracy"], rel=1e-6)
    state = json.loads((run_dir / "tracking.json").read_text())["mlflow"]
    assert state["run_id"] != first_id
    assert client.get_run(first_id).info.lifecycle_stage == "deleted"
    history = sorted(client.get_metric_history(state["run_id"], "test_accuracy"), key=lambda m: m.step)
    assert [m.step for m in history] == metrics["round"].tolist()
    assert_column_equal([m.value for m in history], metrics["test_accuracy"])
