"""The methods' `LocalObjective`s inside the engine's trainer: one-after-another and vectorised
training agree, FedProx with mu = 0 is plain SGD bit for bit, and the state and extras a client
returns are the paper's updates of what it actually trained."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedsim import ClientResult, SGDTrainer, TrainJob, make_batch
from fedsim.algorithms.feddyn import GRAD, FedDynObjective
from fedsim.algorithms.fednova import FedNovaRule, ReportSteps, fednova_combine
from fedsim.algorithms.fedprox import ProxObjective
from fedsim.algorithms.scaffold import CLIENT, DELTA, ScaffoldObjective, control_deltas, server_payload
from fedsim.data import build_federated_data
from fedsim.models import build_model
from fedsim.seeding import generator
from fedsim.training import get_params
from fedsim.vectorized import train_chunk

DATA = SimpleNamespace(dataset="synthetic", num_clients=5, partition="quantity", quantity_sigma=1.0, min_examples=5,
                       samples_per_client=40, synthetic_alpha=0.5, synthetic_beta=0.5, test_size=50)


def setup():
    data = build_federated_data(DATA, seed=0)
    model = build_model("mlp", {"hidden": [16]}, data.feature_shape, data.num_classes, 0)
    return data, model, get_params(model)


def noise(params, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(t.shape, generator=gen) for n, t in params.items()}


def jobs_for(objective, params, rounds=2):
    """Jobs with per-client state (as the engine's store fills it) and the round's payload merged
    into their inputs (as a worker does)."""
    jobs = []
    for c in range(DATA.num_clients):
        state, inputs = {}, {}
        if isinstance(objective, ScaffoldObjective):
            state = {CLIENT + n: t for n, t in noise(params, 10 + c, 0.05).items()}
            inputs = server_payload(noise(params, 99, 0.05))
        elif isinstance(objective, FedDynObjective):
            state = {GRAD + n: t for n, t in noise(params, 20 + c, 0.05).items()}
        jobs.append(TrainJob(c, round=rounds, inputs=inputs, state=state))
    return jobs


def run_both(objective, trainer_kwargs=None):
    data, model, params = setup()
    trainer = SGDTrainer(lr=0.1, batch_size=8, objective=objective, **(trainer_kwargs or {}))
    jobs = jobs_for(objective, params)
    seq = [trainer.train(model, params, *data.client(j.client_id), j, generator(0, "train", j.client_id, j.round)) for j in jobs]
    vec = train_chunk(model, trainer, [params] * len(jobs), [data.client(j.client_id) for j in jobs], jobs,
                      [generator(0, "train", j.client_id, j.round) for j in jobs])
    return params, jobs, trainer, seq, vec


def close(a, b, rel=1e-5):
    return float((a - b).norm()) <= rel * max(float(a.norm()), 1e-12)


@pytest.mark.parametrize("objective", [ProxObjective(mu=0.5), ScaffoldObjective(), FedDynObjective(alpha=0.3), ReportSteps()],
                         ids=["fedprox", "scaffold", "feddyn", "fednova"])
def test_sequential_and_vectorised_training_agree(objective):
    _, _, _, seq, vec = run_both(objective, {"momentum": 0.5})
    for a, b in zip(seq, vec):
        assert a.steps == b.steps
        assert all(close(a.params[n], b.params[n]) for n in a.params)
        assert a.state.keys() == b.state.keys() and all(close(a.state[n], b.state[n]) for n in a.state)
        assert a.extras.keys() == b.extras.keys() and all(close(a.extras[n].double(), b.extras[n].double()) for n in a.extras)


@pytest.mark.parametrize("vectorised", [False, True])
def test_fedprox_with_mu_zero_is_plain_sgd_bit_for_bit(vectorised):
    data, model, params = setup()
    jobs = [TrainJob(c, round=1) for c in range(DATA.num_clients)]
    outs = []
    for trainer in (SGDTrainer(lr=0.1, batch_size=8), SGDTrainer(lr=0.1, batch_size=8, objective=ProxObjective(mu=0.0))):
        rngs = [generator(0, "train", j.client_id, j.round) for j in jobs]
        if vectorised:
            outs.append(train_chunk(model, trainer, [params] * len(jobs), [data.client(j.client_id) for j in jobs], jobs, rngs))
        else:
            outs.append([trainer.train(model, params, *data.client(j.client_id), j, r) for j, r in zip(jobs, rngs)])
    for a, b in zip(*outs):
        assert all(torch.equal(a.params[n], b.params[n]) for n in a.params)
    # and mu > 0 pulls every client towards the start model
    prox = SGDTrainer(lr=0.1, batch_size=8, objective=ProxObjective(mu=5.0))
    pulled = [prox.train(model, params, *data.client(j.client_id), j, generator(0, "train", j.client_id, j.round)) for j in jobs]
    dist = lambda out: sum(float(((out.params[n] - params[n]) ** 2).sum()) for n in params)  # noqa: E731
    assert all(dist(p) < dist(a) for p, a in zip(pulled, outs[0]))


def test_scaffold_client_returns_option_two_variate_of_what_it_trained():
    params, jobs, trainer, seq, _ = run_both(ScaffoldObjective())
    lr = trainer.lr_at(jobs[0].round)
    for job, out in zip(jobs, seq):
        for n in params:
            c_i, c = job.state[CLIENT + n], job.inputs["c:" + n]
            expected = c_i - c + (params[n] - out.params[n]) / (out.steps * lr)
            assert torch.allclose(out.state[CLIENT + n], expected, atol=1e-6)
            assert torch.allclose(out.extras[DELTA + n], expected - c_i, atol=1e-6)
    # the correction changes training: without the variates the clients end elsewhere
    plain = SGDTrainer(lr=0.1, batch_size=8)
    data, model, _ = setup()
    other = plain.train(model, params, *data.client(0), jobs[0], generator(0, "train", 0, jobs[0].round))
    assert not torch.allclose(other.params["1.weight"], seq[0].params["1.weight"], atol=1e-4)
    # the server reads the stacked deltas back from a batch of these results
    results = [ClientResult(j.client_id, o.params, 10, {}, o.extras, o.steps) for j, o in zip(jobs, seq)]
    deltas = control_deltas(make_batch(results))
    assert deltas.keys() == params.keys() and deltas["1.weight"].shape == (DATA.num_clients, *params["1.weight"].shape)


def test_feddyn_client_state_update_of_what_it_trained():
    params, jobs, _, seq, _ = run_both(FedDynObjective(alpha=0.3))
    for job, out in zip(jobs, seq):
        for n in params:
            expected = job.state[GRAD + n] - 0.3 * (out.params[n] - params[n])
            assert torch.allclose(out.state[GRAD + n], expected, atol=1e-7)
    # a client's first job starts from g_k = 0
    first = FedDynObjective(alpha=0.3).initial_state(params)
    assert first.keys() == {GRAD + n for n in params} and all(float(t.abs().max()) == 0 for t in first.values())


def test_fednova_merges_the_steps_clients_report():
    data, model, params = setup()
    trainer = SGDTrainer(lr=0.1, batch_size=8, objective=ReportSteps())
    jobs = [TrainJob(c, round=1, steps=s) for c, s in enumerate([1, 2, 4, 4, 3])]
    outs = train_chunk(model, trainer, [params] * 5, [data.client(c) for c in range(5)], jobs,
                       [generator(0, "train", c, 1) for c in range(5)])
    assert [int(o.extras["steps"]) for o in outs] == [1, 2, 4, 4, 3] == [o.steps for o in outs]
    results = [ClientResult(c, o.params, int(n), {}, o.extras, o.steps) for c, (o, n) in enumerate(zip(outs, data.num_examples()[:5]))]
    batch = make_batch(results)
    merged = FedNovaRule()(params, batch, round=1)
    expected = fednova_combine(params, batch.params, np.array([1, 2, 4, 4, 3]), batch.weights())
    assert all(torch.equal(merged[n], expected[n]) for n in params)


@pytest.mark.parametrize("objective", [ScaffoldObjective(), FedDynObjective(alpha=0.3)], ids=["scaffold", "feddyn"])
def test_one_step_moves_by_the_papers_gradient_correction(objective):
    """On the same minibatch, one step with the objective differs from a plain step by -lr times
    the term's gradient at the start: c - c_i for SCAFFOLD, -g_k + alpha (w - w_start) = -g_k for
    FedDyn (the model has not moved yet)."""
    data, model, params = setup()
    job = replace(jobs_for(objective, params, rounds=1)[2], steps=1)
    lr = 0.1
    outs = [SGDTrainer(lr=lr, batch_size=8, objective=o).train(model, params, *data.client(2), job, generator(0, "train", 2, 1))
            for o in (None, objective)]
    for n in params:
        if isinstance(objective, ScaffoldObjective):
            correction = job.inputs["c:" + n] - job.state[CLIENT + n]
        else:
            correction = -job.state[GRAD + n]
        assert torch.allclose(outs[1].params[n] - outs[0].params[n], -lr * correction, atol=1e-6)
