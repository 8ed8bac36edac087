"""Vectorised only where it wins: the calibration's choice, forced choices, the stacked MLP engine
and the cheaper round bookkeeping keep the numbers they promise."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedsim import training_path, vectorized
from fedsim.cli import main
from fedsim.data import build_federated_data
from fedsim.executor import InlineExecutor, Worker, WorkerSpec
from fedsim.history import History
from fedsim.ledger import Ledger
from fedsim.models import build_model
from fedsim.params import to_numpy, weighted_sum
from fedsim.seeding import generator
from fedsim.stacked_linear import LinearStack
from fedsim.training import SGDTrainer, TrainJob, evaluate, get_params, minibatches, sgd_step
from tests.conftest import SMALL

DATA = SimpleNamespace(dataset="synthetic", num_clients=9, partition="quantity", quantity_sigma=1.0, min_examples=5,
                       samples_per_client=40, synthetic_alpha=0.5, synthetic_beta=0.5, test_size=50)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "calibration.json"


def spec_for(data, **changes) -> WorkerSpec:
    spec = WorkerSpec("mlp", {"hidden": [16]}, data.feature_shape, data.num_classes, 0, SGDTrainer(lr=0.1, batch_size=8))
    return replace(spec, **changes)


def shared_params(data) -> dict:
    return to_numpy(get_params(build_model("mlp", {"hidden": [16]}, data.feature_shape, data.num_classes, 0)))


def burn(seconds: float) -> None:
    """Spend CPU time (the calibration measures CPU time, so sleeping would not count)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


@pytest.mark.parametrize("slow_path", ["vectorised", "sequential"])
def test_calibration_keeps_the_faster_path(slow_path, cache, monkeypatch):
    data = build_federated_data(DATA, seed=0)
    worker = Worker(data, spec_for(data))
    assert worker.path is None  # nothing forced: decided on the first jobs
    name = "_run_vectorized" if slow_path == "vectorised" else "_run_sequential"
    original = getattr(Worker, name)

    def slowed(self, tensors, jobs, **kwargs):
        burn(0.05)
        return original(self, tensors, jobs, **kwargs)

    monkeypatch.setattr(Worker, name, slowed)
    jobs = [TrainJob(c, 1) for c in range(6)]
    worker.run(shared_params(data), jobs)
    path = worker.path
    assert path.vectorize == (slow_path == "sequential")
    assert path.vectorised_ms is not None and path.sequential_ms is not None
    assert (path.vectorised_ms < path.sequential_ms) == path.vectorize
    assert "per client step" in path.reason and "CPU time" in path.reason
    stored = json.loads(cache.read_text())
    assert [v["vectorize"] for v in stored.values()] == [path.vectorize]


def test_a_remembered_choice_is_reused_without_measuring(cache, monkeypatch):
    data = build_federated_data(DATA, seed=0)
    jobs = [TrainJob(c, 1) for c in range(4)]
    first = Worker(data, spec_for(data))
    first.run(shared_params(data), jobs)
    calls = []
    monkeypatch.setattr(Worker, "_run_sequential", lambda self, t, j, **k: calls.append("seq") or [])
    monkeypatch.setattr(Worker, "_run_vectorized", lambda self, t, j, **k: calls.append("vec") or [])
    second = Worker(data, spec_for(data))
    path = second.decide({}, jobs)
    assert calls == [] and path.vectorize == first.path.vectorize and "measured before" in path.reason
    other = Worker(data, spec_for(data, trainer=SGDTrainer(lr=0.1, batch_size=8, momentum=0.9)))
    monkeypatch.undo()
    monkeypatch.setenv("FEDSIM_CACHE", str(cache.parent))
    other.run(shared_params(data), jobs)  # another trainer is another key: measured afresh
    assert "measured before" not in other.path.reason and len(json.loads(cache.read_text())) == 2


@pytest.mark.parametrize("flag", [True, False])
def test_a_forced_choice_is_honoured_and_never_measured(flag, cache, monkeypatch):
    data = build_federated_data(DATA, seed=0)
    worker = Worker(data, spec_for(data, vectorize=flag))

    def fail(*args, **kwargs):
        pytest.fail("the forced choice was not honoured")

    monkeypatch.setattr("fedsim.executor.calibrate", fail)
    monkeypatch.setattr(Worker, "_run_sequential" if flag else "_run_vectorized", fail)
    results = worker.run(shared_params(data), [TrainJob(c, 1) for c in range(4)])
    assert len(results) == 4 and worker.path.vectorize is flag
    assert worker.path.reason == f"system.vectorize = {str(flag).lower()}" and worker.path.sequential_ms is None
    assert not cache.exists()


def test_the_run_prints_and_records_its_choice(write_scenario, tmp_path, cache, capsys):
    path = write_scenario(SMALL)
    assert main(["run", str(path), "--out", str(tmp_path / "auto"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("fedsim: clients train")]
    summary = json.loads((tmp_path / "auto" / "small" / "summary.json").read_text())
    (choice,) = summary["training"]
    assert len(lines) == 1 and choice["reason"] in lines[0]
    assert isinstance(choice["vectorize"], bool) and choice["vectorised_ms"] > 0 and choice["sequential_ms"] > 0
    assert choice["engine"] == "stacked MLP backward"
    assert main(["run", str(path), "--out", str(tmp_path / "off"), "--no-progress", "--set", "system.vectorize=false"]) == 0
    summary = json.loads((tmp_path / "off" / "small" / "summary.json").read_text())
    assert summary["training"] == [{"vectorize": False, "reason": "system.vectorize = false", "engine": "stacked MLP backward"}]


def test_an_unsupported_trainer_or_model_says_why_it_trains_one_after_another(cache):
    data = build_federated_data(DATA, seed=0)
    for flag in (None, True):
        worker = Worker(data, spec_for(data, trainer=object(), vectorize=flag))
        assert worker.path == training_path.TrainingPath(False, "object has no vectorised form")
        assert not worker.vectorize
    recurrent = Worker(data, spec_for(data, model_name="char_gru", model_options={"vocabulary": 80}))
    assert recurrent.path == training_path.TrainingPath(False, "the model (CharRNN) opts out of vectorised training")


def test_the_stacked_engine_takes_plain_mlps_only():
    shape = (60,)
    assert LinearStack.of(build_model("mlp", {"hidden": [32, 16]}, shape, 10, 0), shape) is not None
    assert LinearStack.of(build_model("logreg", {}, (1, 28, 28), 10, 0), (1, 28, 28)) is not None
    assert LinearStack.of(build_model("cnn", {}, (1, 28, 28), 10, 0), (1, 28, 28)) is None
    assert LinearStack.of(nn.Sequential(nn.Linear(28, 10)), (1, 28, 28)) is None  # Linear on the last axis only
    assert LinearStack.of(nn.Sequential(nn.Linear(60, 8), nn.GELU(), nn.Linear(8, 10)), shape) is None
    assert LinearStack.of(nn.Sequential(nn.Linear(60, 8), nn.ReLU()), shape) is None  # no logits layer


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh, nn.Sigmoid])
@pytest.mark.parametrize("options", [{}, {"momentum": 0.9, "weight_decay": 1e-3}, {"sam_rho": 0.05}])
def test_the_stacked_engine_matches_vmap_and_autograd(act, options):
    data = build_federated_data(DATA, seed=0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(60, 12), act(), nn.Linear(12, 12, bias=False), act(), nn.Linear(12, 10))
    stack = LinearStack.of(model, (60,))
    assert stack is not None
    trainer = SGDTrainer(lr=0.1, batch_size=16, local_epochs=2, **options)
    params = [get_params(model)] * 5
    chunk = [data.client(c) for c in range(5)]
    jobs = [TrainJob(c, 1) for c in range(5)]
    rngs = lambda: [np.random.default_rng(c) for c in range(5)]  # noqa: E731
    ours = vectorized.train_chunk(model, trainer, params, chunk, jobs, rngs(), stack=stack)
    theirs = vectorized.train_chunk(model, trainer, params, chunk, jobs, rngs())
    for (x, y), job, a, b, rng in zip(chunk, jobs, ours, theirs, rngs()):
        one = trainer.train(model, params[0], x, y, job, rng)
        assert abs(a.train_loss - b.train_loss) <= 1e-5 * abs(b.train_loss)
        for k in b.params:
            scale = b.params[k].norm()
            assert (a.params[k] - b.params[k]).norm() <= 1e-5 * scale, k
            assert (a.params[k] - one.params[k]).norm() <= 1e-5 * scale, k


def test_sgd_steps_equal_torch_optim_sgd_bit_for_bit():
    x = np.random.default_rng(0).standard_normal((100, 60)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 10, 100)
    for momentum, decay in [(0.0, 0.0), (0.9, 0.0), (0.9, 1e-3), (0.0, 1e-3)]:
        trainer = SGDTrainer(lr=0.05, momentum=momentum, weight_decay=decay, batch_size=16, local_epochs=2)
        model = build_model("mlp", {"hidden": [32]}, (60,), 10, 0)
        ours = trainer.train(model, get_params(model), x, y, TrainJob(0, 1), np.random.default_rng(5))
        reference = build_model("mlp", {"hidden": [32]}, (60,), 10, 0)
        opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=momentum, weight_decay=decay)
        for idx in minibatches(100, 16, trainer.num_steps(100), np.random.default_rng(5)):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(reference(torch.from_numpy(x[idx])), torch.from_numpy(y[idx])).backward()
            opt.step()
        assert all(torch.equal(ours.params[k], v) for k, v in get_params(reference).items()), (momentum, decay)
    p = torch.ones(3, requires_grad=True)
    sgd_step([p], [None], 0.1, 0.9, 0.1)  # no gradient: left alone, as torch.optim.SGD does
    assert torch.equal(p, torch.ones(3))


def test_evaluation_on_two_threads_equals_one_thread(monkeypatch):
    model = build_model("mlp", {"hidden": [32]}, (60,), 10, 0)
    x = np.random.default_rng(0).standard_normal((2500, 60)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 10, 2500)
    two = evaluate(model, get_params(model), x, y)
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    one = evaluate(model, get_params(model), x, y)
    assert two == one
    with torch.no_grad():
        out = model(torch.from_numpy(x))
        loss = float(F.cross_entropy(out, torch.from_numpy(y)))
        acc = int((out.argmax(1) == torch.from_numpy(y)).sum()) / len(y)
    assert one[0] == pytest.approx(acc, abs=1e-12) and one[1] == pytest.approx(loss, rel=1e-5)


def test_weighted_sum_is_the_weighted_mean():
    stacked = {"w": torch.randn(7, 3, 4), "b": torch.randn(7, 4), "n": torch.arange(7)}
    weights = torch.rand(7, dtype=torch.float64)
    out = weighted_sum(stacked, weights)
    for k in ("w", "b"):
        expected = (weights.to(torch.float32).reshape(-1, *[1] * (stacked[k].dim() - 1)) * stacked[k]).sum(0)
        assert out[k].shape == stacked[k].shape[1:] and torch.allclose(out[k], expected, rtol=1e-6, atol=1e-6)
    assert out["n"] == 0


def test_checkpointed_rows_come_back_exactly(tmp_path):
    history = History(tmp_path / "metrics.csv")
    rows = [{"round": 0, "sim_time": 0.1 + 0.2, "test_loss": float("nan"), "count": np.int64(3), "x": np.float64(1 / 3)},
            {"round": 1, "sim_time": 1e-300, "test_loss": float("inf"), "count": 4, "x": -0.0}]
    history.append(rows[0])
    first = History.decoded(history.encoded())
    history.append(rows[1])
    back = History.decoded(history.encoded())
    assert back[0] == first[0] and len(back) == 2
    for got, want in zip(back, rows):
        for k, v in want.items():
            assert (np.isnan(got[k]) and np.isnan(v)) or (got[k] == v and type(got[k]) in (int, float)), k
    assert str(back[1]["x"]) == "-0.0"


def test_one_message_ledger_updates_equal_the_general_ones():
    fast, slow = Ledger(5), Ledger(5)
    for sender, receiver in [(-1, np.array([2])), (3, np.array([-1])), (1, 2), (-1, np.array([0, 1, 1])),
                             (np.array([0, 1]), np.array([2, 3]))]:
        fast.transfer(sender, receiver, 7)
        s, r = np.broadcast_arrays(np.asarray(sender), np.asarray(receiver))
        np.add.at(slow.sent, s.ravel(), 7)
        np.add.at(slow.received, r.ravel(), 7)
    assert (fast.sent == slow.sent).all() and (fast.received == slow.received).all()


def test_inline_executor_reports_its_path_once(cache, capsys):
    data = build_federated_data(DATA, seed=0)
    executor = InlineExecutor(data, spec_for(data, vectorize=True))
    params = get_params(build_model("mlp", {"hidden": [16]}, data.feature_shape, data.num_classes, 0))
    executor.train(params, [TrainJob(0, 1)])
    executor.train(params, [TrainJob(1, 2)])
    assert capsys.readouterr().out.count("fedsim: clients train vectorised") == 1 and executor.path.vectorize


def test_results_travel_stacked_and_come_back_unchanged():
    from fedsim.executor import pack, unpack
    from fedsim.training import ClientResult

    def results():
        return [ClientResult(c, {"w": torch.full((2, 3), float(c)), "b": torch.arange(3.0) + c}, 10 + c, {"m": 1.0})
                for c in range(4)]

    packed = pack(results())
    assert packed[1] is not None and packed[1]["w"].shape == (4, 2, 3) and all(r.params == {} for r in packed[0])
    for got, want in zip(unpack(packed), results()):
        assert got.client_id == want.client_id and got.num_examples == want.num_examples
        assert set(got.params) == set(want.params) and all(torch.equal(got.params[k], want.params[k]) for k in want.params)
    mixed = results()
    mixed[2].params = {"w": torch.zeros(2, 3)}  # another layout: each result carries its own arrays
    packed = pack(mixed)
    assert packed[1] is None
    back = unpack(packed)
    assert set(back[2].params) == {"w"} and torch.equal(back[1].params["b"], torch.arange(3.0) + 1)
    assert unpack(pack([])) == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_vectorised_chunk_flags_exactly_the_non_finite_clients(bad):
    data = build_federated_data(DATA, seed=0)
    model = build_model("mlp", {"hidden": [8]}, data.feature_shape, 10, 0)
    good = get_params(model)
    broken = {k: v.clone() for k, v in good.items()}
    broken["1.weight"][3, 4] = bad  # the client starts from a broken model: its result is broken too
    params = [good, broken, good]
    jobs = [TrainJob(c, 1) for c in range(3)]
    rngs = [np.random.default_rng(c) for c in range(3)]
    stack = LinearStack.of(model, data.feature_shape)
    out = vectorized.train_chunk(model, SGDTrainer(lr=0.1, batch_size=8), params, [data.client(c) for c in range(3)],
                                 jobs, rngs, stack=stack)
    assert ["nonfinite" in r.metrics for r in out] == [False, True, False]


def test_chunks_on_two_threads_give_the_numbers_of_one(cache):
    data = build_federated_data(DATA, seed=1)
    jobs = [TrainJob(c, round=2) for c in range(9)]
    runs = []
    for threads in (1, 2):
        worker = Worker(data, spec_for(data, vectorize=True, chunk_threads=threads))
        results = worker.run(shared_params(data), jobs)
        runs.append(results)
        assert (worker._pool is not None) == (threads == 2)  # two chunks (9 // MIN_CHUNK) on two threads
    for a, b in zip(*runs):
        assert a.client_id == b.client_id and a.train_loss == b.train_loss
        assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    inline = InlineExecutor(data, spec_for(data))
    assert inline.worker.spec.chunk_threads == (os.cpu_count() or 1)


def test_convolutions_one_after_another_run_channels_last_with_the_same_numbers(cache):
    from fedsim.data.base import FederatedData

    rng = np.random.default_rng(0)
    n = 3 * 40
    data = FederatedData(x=rng.random((n, 1, 12, 12), dtype=np.float32), y=rng.integers(0, 10, n),
                         offsets=np.arange(0, n + 1, 40), x_test=np.zeros((1, 1, 12, 12), np.float32),
                         y_test=np.zeros(1, np.int64), num_classes=10)
    options = {"channels": [4, 8], "hidden": 16}
    trainer = SGDTrainer(lr=0.05, batch_size=8, local_steps=4, momentum=0.9)
    worker = Worker(data, WorkerSpec("cnn", options, (1, 12, 12), 10, 0, trainer, vectorize=False))
    assert worker.model[3].weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    worker.model[3].register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    reference = build_model("cnn", options, (1, 12, 12), 10, 0)
    start = get_params(reference)
    results = worker.run(to_numpy(start), [TrainJob(c, 1) for c in range(3)])
    assert seen and all(seen)
    for c, result in enumerate(results):
        x, y = data.client(c)
        plain = trainer.train(reference, start, x, y, TrainJob(c, 1), generator(0, "train", c, 1))
        for k, v in plain.params.items():
            assert result.params[k].is_contiguous()
            assert (result.params[k] - v).norm() <= 1e-5 * v.norm(), k


def test_a_representation_term_trains_with_vmap_on_one_thread_and_matches_one_client_at_a_time():
    # MOON's term runs the module's own forward (functional_call swaps the shared module's tensors):
    # two chunk threads at once corrupted the model (found by the baselines report's MOON runs)
    from fedsim.algorithms.moon import MoonObjective

    data = build_federated_data(DATA, seed=0)
    trainer = SGDTrainer(lr=0.1, batch_size=8, objective=MoonObjective(1.0, 0.5, ("1.weight", "1.bias", "3.weight", "3.bias")))
    worker = Worker(data, spec_for(data, trainer=trainer, chunk_threads=2, chunk_size=4))
    assert worker.engine == "vmap"
    shared = shared_params(data)
    jobs = [TrainJob(c, r) for r in (1, 2) for c in range(9)]
    vectorised = [worker.run(shared, jobs[:9], vectorize=True), worker.run(shared, jobs[9:], vectorize=True)]
    sequential = [worker.run(shared, jobs[:9], vectorize=False), worker.run(shared, jobs[9:], vectorize=False)]
    for got, want in zip(sum(vectorised, []), sum(sequential, [])):
        for name in want.params:
            torch.testing.assert_close(got.params[name], want.params[name], rtol=1e-4, atol=1e-5)
