"""Vectorised cohorts agree with one-after-another training, for every trainer option."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
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
        assert a.steps == b.steps
        assert abs(a.train_loss - b.train_loss) <= 1e-5 * abs(a.train_loss)
        for k in a.params:
            rel = (a.params[k] - b.params[k]).norm() / a.params[k].norm()
            assert rel < 1e-5, (name, k, float(rel))


@pytest.mark.parametrize("name", ["sam", "sgd", "decay"])  # sgd, decay: weights move inside the backward pass
def test_vectorised_rows_of_a_stacked_set_and_chunking_do_not_change_results(name):
    data = build_federated_data(DATA, seed=1)
    assert len(set(data.num_examples().tolist())) > 3  # clients finish at different steps
    spec = WorkerSpec("mlp", {"hidden": [24]}, data.feature_shape, data.num_classes, 1, TRAINERS[name], vectorize=True)
    model = build_model("mlp", {"hidden": [24]}, data.feature_shape, data.num_classes, 1)
    stacked = {k: torch.stack([v + 0.01 * i for i in range(9)]) for k, v in get_params(model).items()}
    jobs = [TrainJob(c, round=1 + c % 3, row=c) for c in range(9)]  # rounds differ: so do decayed lrs
    results = [Worker(data, replace(spec, chunk_size=size)).run(to_numpy(stacked), jobs) for size in (1, 4, 9)]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            for k in a.params:
                assert torch.equal(a.params[k], b.params[k])


def test_a_cnn_trains_vectorised_with_vmap_like_one_after_another_and_within_1e5_across_chunkings():
    # vmap turns each convolution into one grouped convolution whose kernel depends on how many
    # clients share the chunk: the last bits may move with the chunking (README, Scale), no more
    from fedsim.data.base import FederatedData

    rng = np.random.default_rng(0)
    sizes = [40, 24, 40, 33, 40, 17]
    n = sum(sizes)
    data = FederatedData(x=rng.random((n, 1, 12, 12), dtype=np.float32), y=rng.integers(0, 10, n),
                         offsets=np.concatenate([[0], np.cumsum(sizes)]), x_test=np.zeros((1, 1, 12, 12), np.float32),
                         y_test=np.zeros(1, np.int64), num_classes=10)
    options = {"channels": [4, 8], "hidden": 16}
    spec = WorkerSpec("cnn", options, (1, 12, 12), 10, 0, SGDTrainer(lr=0.1, batch_size=8, momentum=0.9))
    model = build_model("cnn", options, (1, 12, 12), 10, 0)
    stacked = {k: torch.stack([v + 0.01 * i for i in range(len(sizes))]) for k, v in get_params(model).items()}
    jobs = [TrainJob(c, round=1, row=c) for c in range(len(sizes))]
    sequential = Worker(data, replace(spec, vectorize=False)).run(to_numpy(stacked), jobs)
    chunked = []
    for size in (1, 4, 6):
        worker = Worker(data, replace(spec, vectorize=True, chunk_size=size))
        assert worker.vectorize and worker.engine == "vmap"
        chunked.append(worker.run(to_numpy(stacked), jobs))
    for results in chunked:
        for a, b in zip(sequential, results):
            assert a.steps == b.steps
            for k in a.params:
                assert (a.params[k] - b.params[k]).norm() <= 1e-5 * a.params[k].norm(), k


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


def test_device_cuda_without_a_gpu_is_a_clear_error(write_scenario, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the setting is valid here")
    path = write_scenario(SMALL.replace("[system]", '[system]\ndevice = "cuda"'))
    assert main(["run", str(path), "--out", str(tmp_path), "--no-progress"]) == 2
    assert "system.device" in capsys.readouterr().err


def test_vectorised_chunk_on_an_explicit_device_matches():
    from fedsim import vectorized

    data = build_federated_data(DATA, seed=0)
    model = build_model("mlp", {"hidden": [8]}, data.feature_shape, 10, 0)
    params = [get_params(model)] * 3
    jobs = [TrainJob(c, 1) for c in range(3)]
    rngs = lambda: [np.random.default_rng(c) for c in range(3)]  # noqa: E731
    chunks = [[data.client(c) for c in range(3)], [data.client(c) for c in range(3)]]
    a = vectorized.train_chunk(model, TRAINERS["sgd"], params, chunks[0], jobs, rngs())
    b = vectorized.train_chunk(model, TRAINERS["sgd"], params, chunks[1], jobs, rngs(), device=torch.device("cpu"))
    for oa, ob in zip(a, b):
        pa, pb = oa.params, ob.params
        assert all(torch.equal(pa[k], pb[k]) and pb[k].device.type == "cpu" for k in pa)


@pytest.mark.parametrize("freeze_a", [False, True])
def test_lora_adapters_train_vectorised_like_one_after_another(freeze_a, tmp_path, monkeypatch):
    from fedsim.algorithms.lora_fair import LoRATrainer

    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path))
    data = build_federated_data(DATA, seed=0)
    options = {"hidden": [16], "pretrain_examples": 300, "pretrain_epochs": 1, "rank": 2}
    trainer = LoRATrainer(sgd=SGDTrainer(lr=0.1, batch_size=16, local_steps=4), freeze_A=freeze_a)
    spec = WorkerSpec("pretrained_mlp", options, data.feature_shape, 10, 0, trainer)
    seq, vec = Worker(data, replace(spec, vectorize=False)), Worker(data, replace(spec, vectorize=True))
    assert vec.vectorize
    shared = to_numpy(get_params(build_model("pretrained_mlp", options, data.feature_shape, 10, 0)))
    jobs = [TrainJob(c, round=1) for c in range(5)]
    for a, b in zip(seq.run(shared, jobs), vec.run(shared, jobs)):
        assert set(a.params) == set(b.params) and all("lora" in k or "head" in k for k in b.params)
        assert any(k.endswith("lora_A") for k in b.params) != freeze_a
        for k in a.params:
            assert (a.params[k] - b.params[k]).norm() <= 1e-5 * a.params[k].norm() + 1e-7


class _Branchy:
    """A proximal term with data-dependent control flow, which vmap cannot batch."""

    calls = 0

    def loss(self, w, start, inputs):
        type(self).calls += 1
        d = sum(((w[n] - start[n]) ** 2).sum() for n in w)
        if d > 1e6:  # a Python branch on a tensor's value
            d = d * 2
        return 0.01 * d

    def initial_state(self, start):
        return {}

    def after(self, start, end, inputs, steps, lr):
        return {}, {}


def test_a_trainer_vmap_cannot_batch_is_said_once_and_then_trains_one_after_another(capsys):
    from fedsim.executor import InlineExecutor

    data = build_federated_data(DATA, seed=0)
    trainer = SGDTrainer(lr=0.1, batch_size=16, local_steps=3, objective=_Branchy())
    spec = WorkerSpec("mlp", {"hidden": [8]}, data.feature_shape, 10, 0, trainer, vectorize=True)
    params = get_params(build_model("mlp", {"hidden": [8]}, data.feature_shape, 10, 0))
    executor = InlineExecutor(data, spec)
    jobs = [TrainJob(c, 1) for c in range(4)]
    first = executor.train(params, jobs)
    path = executor.path
    assert path is not None and not path.vectorize and "vectorised training raised RuntimeError" in path.reason
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("fedsim: clients train")]
    assert lines[-1] == path.line() and "one client after another" in lines[-1]
    _Branchy.calls = 0
    second = executor.train(params, [TrainJob(c, 2) for c in range(4)])
    assert _Branchy.calls == 4 * 3  # one call per client step: no vectorised attempt any more
    assert "fedsim: clients train" not in capsys.readouterr().out  # said once
    _Branchy.calls = 0  # a Ray actor is told the run's path: it keeps to what it found out itself
    executor.worker.run(to_numpy(params), jobs, vectorize=True)
    assert _Branchy.calls == 4 * 3
    reference = Worker(data, replace(spec, vectorize=False)).run(to_numpy(params), jobs)
    for a, b in zip(first, reference):  # the retried chunk's results are the sequential ones
        assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    assert len(second) == 4 and not any(r.metrics.get("failed") for r in second)
