"""Vectorised cohorts agree with one-after-another training, for every trainer option."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from fedsim.cli import main
from fedsim.data import build_federated_data
from fedsim.executor import Worker, WorkerSpec
from fedsim.models import build_model
from fedsim.params import to_numpy
from fedsim.training import SGDTrainer, TrainJob, get_params
from tests.conftest import SMALL

DATA = SimpleNamespace(dataset="synthetic", num_clients=9, partition="quantity", quantity_sigma=1.0, min_examples=5,
                       samples_per_client=40, synthetic_alpha=0.5, synthetic_beta=0.5, test_size=50)

TRAINERS = {
    "sgd": SGDTrainer(lr=0.1, batch_size=16),
    "momentum+wd": SGDTrainer(lr=0.05, momentum=0.9, weight_decay=1e-3, batch_size=16, local_epochs=2),
    "sam": SGDTrainer(lr=0.1, batch_size=8, local_steps=6, sam_rho=0.05),
    "decay": SGDTrainer(lr=0.1, lr_decay=0.9, batch_size=32),
}


@pytest.mark.parametrize("name", list(TRAINERS))
def test_vectorised_round_matches_sequential(name):
    data = build_federated_data(DATA, seed=0)
    assert len(set(data.num_examples().tolist())) > 3  # uneven client sizes, padded and masked
    spec = WorkerSpec("mlp", {"hidden": [24]}, data.feature_shape, data.num_classes, 0, TRAINERS[name])
    seq = Worker(data, replace(spec, vectorize=False))
    vec = Worker(data, replace(spec, vectorize=True, chunk_size=4))
    assert vec.vectorize and not seq.vectorize
    shared = to_numpy(get_params(build_model("mlp", {"hidden": [24]}, data.feature_shape, data.num_classes, 0)))
    jobs = [TrainJob(c, round=3) for c in range(9)]
    for a, b in zip(seq.run(shared, jobs), vec.run(shared, jobs)):
        assert a.metrics["steps"] == b.metrics["steps"]
        assert abs(a.metrics["train_loss"] - b.metrics["train_loss"]) <= 1e-5 * abs(a.metrics["train_loss"])
        for k in a.params:
            rel = (a.params[k] - b.params[k]).norm() / a.params[k].norm()
            assert rel < 1e-5, (name, k, float(rel))


def test_vectorised_rows_of_a_stacked_set_and_chunking_do_not_change_results():
    data = build_federated_data(DATA, seed=1)
    spec = WorkerSpec("mlp", {"hidden": [24]}, data.feature_shape, data.num_classes, 1, TRAINERS["sam"], vectorize=True)
    model = build_model("mlp", {"hidden": [24]}, data.feature_shape, data.num_classes, 1)
    stacked = {k: torch.stack([v + 0.01 * i for i in range(9)]) for k, v in get_params(model).items()}
    jobs = [TrainJob(c, round=1, row=c) for c in range(9)]
    results = [Worker(data, replace(spec, chunk_size=size)).run(to_numpy(stacked), jobs) for size in (1, 4, 9)]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            for k in a.params:
                assert torch.equal(a.params[k], b.params[k])


def test_a_model_with_buffers_falls_back_to_sequential():
    data = build_federated_data(DATA, seed=0)
    worker = Worker(data, WorkerSpec("mlp", {"hidden": [8]}, data.feature_shape, 10, 0, TRAINERS["sgd"], vectorize=True))
    worker.model.register_buffer("running_mean", torch.zeros(3))
    from fedsim import vectorized

    assert not vectorized.supports(worker.model, TRAINERS["sgd"])


def test_whole_runs_agree_with_and_without_vectorisation(write_scenario, tmp_path):
    path = write_scenario(SMALL)
    frames = []
    for flag in ("true", "false"):
        assert main(["run", str(path), "--out", str(tmp_path / flag), "--no-progress", "--set", f"system.vectorize={flag}"]) == 0
        frames.append(pd.read_csv(tmp_path / flag / "small" / "metrics.csv"))
    pd.testing.assert_series_equal(frames[0]["test_loss"], frames[1]["test_loss"], rtol=1e-4)


def test_a_failing_vectorised_chunk_is_retried_client_by_client(monkeypatch):
    from fedsim import vectorized

    data = build_federated_data(DATA, seed=0)
    spec = WorkerSpec("mlp", {"hidden": [8]}, data.feature_shape, 10, 0, TRAINERS["sgd"], vectorize=True)

    def broken(*args, **kwargs):
        raise RuntimeError("vmap failed")

    monkeypatch.setattr(vectorized, "train_chunk", broken)
    shared = to_numpy(get_params(build_model("mlp", {"hidden": [8]}, data.feature_shape, 10, 0)))
    results = Worker(data, spec).run(shared, [TrainJob(c, 1) for c in range(3)])
    assert [r.client_id for r in results] == [0, 1, 2] and all("nonfinite" not in r.metrics for r in results)
