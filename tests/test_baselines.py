"""The baselines of issue 12 as registered methods: each checked through `fedsim run` or the engine
against what the method must do (FedAvg's curves where it reduces to FedAvg, the server state it
keeps, the bytes it sends, what never leaves a client), plus resume for every stateful method."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedsim import ClientResult, KeepLocal, SGDTrainer, TrainJob, WeightedMean, make_batch, num_bytes, stack
from fedsim.algorithms.ditto import PERSONAL, PERSONAL_PASS, DittoObjective
from fedsim.algorithms.fednova import fednova_combine, normalised_batch
from fedsim.algorithms.moon import PREV, MoonObjective
from fedsim.cli import main
from fedsim.coordinator import RunContext, RunOptions
from fedsim.history import History
from fedsim.personal import LOCAL, summarize_client_accuracy
from fedsim.scenario import load
from fedsim.seeding import generator
from fedsim.training import evaluate
from fedsim.vectorized import train_chunk
from tests.conftest import SMALL

FEDAVG = 'name = "fedavg"\nclients_per_round = 4'


def scenario(algorithm: str, extra: str = "", *, data: str = "", model: str = "", tail: str = "") -> str:
    text = SMALL.replace(FEDAVG, f'name = "{algorithm}"\nclients_per_round = 4\n{extra}')
    text = text.replace("test_size = 400", f"test_size = 400\n{data}")
    text = text.replace("hidden = [32]", f"hidden = [32]\n{model}")
    return text + tail


def run_rows(tmp_path: Path, text: str, name: str, code: int = 0) -> pd.DataFrame:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    assert main(["run", str(path), "--out", str(tmp_path / name), "--no-progress"]) == code
    return pd.read_csv(tmp_path / name / "small" / "metrics.csv").drop(columns="wall_time")


def build(tmp_path: Path, text: str):
    path = tmp_path / "built.toml"
    path.write_text(text)
    spec = load(path)[0]
    ctx = RunContext(spec, RunOptions(executor="inline", progress=False))
    return ctx, spec.algorithm.build(spec.algorithm_config, ctx)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- FedProx, FedNova, MOON reduce to FedAvg


@pytest.mark.parametrize("method, zero, other", [
    ("fedprox", "mu = 0.0", "mu = 1.0"),
    ("fednova", "", "local_steps_range = [1, 6]"),
    ("moon", "mu = 0.0", "mu = 5.0"),
])
def test_methods_reduce_to_fedavg_bit_for_bit(method, zero, other, tmp_path):
    """FedProx with mu = 0, FedNova with equal steps (equal data, local_epochs) and MOON with mu = 0
    give FedAvg's curves exactly through `fedsim run`; the method's own setting changes them.
    (FedNova's clients also upload their step count, 8 bytes: its bytes and time are its own.)"""
    fedavg = run_rows(tmp_path, scenario("fedavg"), "fedavg")
    reduced = run_rows(tmp_path, scenario(method, zero), "zero")
    if method == "fednova":
        assert (reduced["bytes_sent"] > fedavg["bytes_sent"])[1:].all() and (reduced["sim_time"] > fedavg["sim_time"])[1:].all()
        fedavg, reduced = (f.drop(columns=["bytes_sent", "sim_time"]) for f in (fedavg, reduced))
    pd.testing.assert_frame_equal(fedavg, reduced, check_exact=True)
    changed = run_rows(tmp_path, scenario(method, other), "other")
    assert not np.allclose(fedavg["test_loss"], changed["test_loss"])


# ---------------------------------------------------------------- FedNova


def test_normalised_batch_gives_the_hand_computed_fednova_step():
    """Steps [1, 2, 4], p = [0.5, 0.25, 0.25], w_g = 1, w = [0.9, 0.6, 0.2]: FedNova's 0.7 (test_fednova)
    as the weighted mean of the rescaled models, which a robust rule would merge instead."""
    g = {"w": torch.tensor([1.0], dtype=torch.float64)}
    results = [ClientResult(c, {"w": torch.tensor([v], dtype=torch.float64)}, n, {}, {"steps": torch.tensor(s)}, s)
               for c, (v, n, s) in enumerate([(0.9, 2, 1), (0.6, 1, 2), (0.2, 1, 4)])]
    batch = make_batch(results)
    normalised = normalised_batch(g, batch)
    # tau_eff = 2: models move to 1 + (2 / a_i)(w_i - 1) = [0.8, 0.6, 0.6]
    assert normalised.params["w"][:, 0].tolist() == pytest.approx([0.8, 0.6, 0.6], abs=1e-15)
    assert float(WeightedMean()(g, normalised, round=1)["w"][0]) == pytest.approx(0.7, abs=1e-15)
    equal = make_batch([ClientResult(c, r.params, r.num_examples, {}, {"steps": torch.tensor(3)}, 3) for c, r in enumerate(results)])
    assert normalised_batch(g, equal) is equal  # equal steps: the clients' own models, untouched


def test_fednova_round_with_drawn_steps_is_the_normalised_average(tmp_path):
    ctx, flow = build(tmp_path, scenario("fednova", "local_steps_range = [1, 6]"))
    start = {k: v.clone() for k, v in flow.params.items()}
    sampled = flow.sample(1)
    steps = [flow.steps(int(c), 1) for c in sampled]
    assert len(set(steps)) > 1 and all(1 <= s <= 6 for s in steps)
    assert steps == [flow.steps(int(c), 1) for c in sampled]  # drawn from the seed, not call order
    results = flow.executor.train(start, [TrainJob(int(c), 1, steps=s) for c, s in zip(sampled, steps)])
    assert [r.steps for r in results] == steps
    flow.step(1)
    batch = make_batch(results)
    expected = fednova_combine(start, batch.params, steps, batch.weights())
    assert all(torch.allclose(flow.params[k], expected[k], atol=1e-6) for k in expected)
    plain = WeightedMean()(start, batch, round=1)
    assert not all(torch.allclose(flow.params[k], plain[k], atol=1e-6) for k in plain)
    ctx.close()


def test_fednova_steps_from_the_system_model(tmp_path):
    text = scenario("fednova", "step_budget = 0.1").replace("[system]", '[system]\ncompute = { dist = "uniform", low = 0.01, high = 0.06 }')
    ctx, flow = build(tmp_path, text)
    steps = np.array([flow.steps(c, 1) for c in range(ctx.data.num_clients)])
    assert len(set(steps.tolist())) > 1
    assert np.all(steps * ctx.system.step_time <= 0.1 + 1e-12) and np.all((steps + 1) * ctx.system.step_time > 0.1)
    ctx.close()


def test_fednova_merges_with_a_robust_rule(tmp_path):
    text = scenario("fednova", "local_steps_range = [1, 6]")
    mean = run_rows(tmp_path, text, "mean")
    median = run_rows(tmp_path, text + '\n[aggregator]\nname = "median"\n', "median")
    assert not np.allclose(mean["test_loss"], median["test_loss"])


# ---------------------------------------------------------------- SCAFFOLD


def test_scaffold_round_moves_c_by_the_clients_deltas_and_counts_both_variates(tmp_path):
    ctx, flow = build(tmp_path, scenario("scaffold"))
    model_bytes = num_bytes(ctx.init_params)
    assert all(float(t.abs().max()) == 0 for t in flow.c.values())
    sampled = flow.sample(1).tolist()
    flow.step(1)
    states = ctx.client_states.states
    assert sorted(states) == sampled
    n = ctx.data.num_clients
    for name, c in flow.c.items():  # c_i started at 0, so Delta c_i = c_i+: c = (1/N) sum_i c_i+
        expected = sum(states[i]["c_i:" + name] for i in sampled) / n
        assert torch.allclose(c, expected, atol=1e-7) and float(c.abs().max()) > 0
    # download: model + c; upload: model + Delta c_i; 4 clients
    assert ctx.ledger.total == 4 * 4 * model_bytes
    before = {k: v.clone() for k, v in flow.c.items()}
    flow.step(2)  # round 2's clients receive c: their variates are corrected by it
    assert not same(before, flow.c)
    ctx.close()


def test_scaffold_global_step_size_is_the_server_optimisers_lr(tmp_path, capsys):
    by_key = run_rows(tmp_path, scenario("scaffold", "global_lr = 0.5"), "key")
    by_table = run_rows(tmp_path, scenario("scaffold", tail='\n[server_optimizer]\nname = "sgd"\nlr = 0.5\n'), "table")
    pd.testing.assert_frame_equal(by_key, by_table, check_exact=True)
    unit = run_rows(tmp_path, scenario("scaffold"), "unit")
    assert not np.allclose(unit["test_loss"], by_key["test_loss"])
    path = tmp_path / "both.toml"
    path.write_text(scenario("scaffold", "global_lr = 0.5", tail='\n[server_optimizer]\nname = "sgd"\nlr = 0.5\n'))
    capsys.readouterr()
    assert main(["run", str(path), "--out", str(tmp_path / "both"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "algorithm.global_lr" in err[0], err


# ---------------------------------------------------------------- FedOpt


def test_fedopt_names_are_fedavg_with_a_default_server_optimiser(tmp_path, capsys):
    adam = run_rows(tmp_path, scenario("fedadam"), "fedadam")
    by_table = run_rows(tmp_path, scenario("fedavg", tail='\n[server_optimizer]\nname = "adam"\nlr = 0.01\n'), "table")
    pd.testing.assert_frame_equal(adam, by_table, check_exact=True)
    # the table replaces the method's default: FedAdam's name with Yogi's table is FedYogi
    yogi = run_rows(tmp_path, scenario("fedyogi"), "fedyogi")
    swapped = run_rows(tmp_path, scenario("fedadam", tail='\n[server_optimizer]\nname = "yogi"\nlr = 0.01\n'), "swapped")
    pd.testing.assert_frame_equal(yogi, swapped, check_exact=True)
    assert not np.allclose(adam["test_loss"], yogi["test_loss"])
    avgm = run_rows(tmp_path, scenario("fedavgm"), "fedavgm")
    robust = run_rows(tmp_path, scenario("fedavgm", tail='\n[aggregator]\nname = "median"\n'), "robust")
    assert not np.allclose(avgm["test_loss"], robust["test_loss"])
    path = tmp_path / "both.toml"
    path.write_text(scenario("fedadagrad", "server_lr = 0.2", tail='\n[server_optimizer]\nname = "adam"\nlr = 0.1\n'))
    capsys.readouterr()
    assert main(["run", str(path), "--out", str(tmp_path / "both"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "algorithm.server_lr" in err[0], err


# ---------------------------------------------------------------- FedDyn


def test_feddyn_keeps_h_and_moves_the_model_past_the_mean(tmp_path):
    text = scenario("feddyn", "alpha = 0.5")
    ctx, flow = build(tmp_path, text)
    start = {k: v.clone() for k, v in flow.params.items()}
    sampled = flow.sample(1).tolist()
    flow.step(1)
    fresh, twin = build(tmp_path, text)  # the same jobs from scratch: g_k = 0 for every client
    models = stack([r.params for r in twin.executor.train(start, [TrainJob(c, 1) for c in sampled])])
    n, alpha = ctx.data.num_clients, 0.5
    for name, t in models.items():
        h = -alpha / n * (t - start[name]).sum(0)
        assert torch.allclose(flow.h[name], h, atol=1e-7) and float(h.abs().max()) > 0
        assert torch.allclose(flow.params[name], t.mean(0) - h / alpha, atol=1e-6)
    for c in sampled:  # g_k = -alpha (theta_k - theta^{t-1}), kept by the engine
        for name in models:
            i = sampled.index(c)
            assert torch.allclose(ctx.client_states.states[c]["grad:" + name], -alpha * (models[name][i] - start[name]), atol=1e-7)
    ctx.close()
    fresh.close()


# ---------------------------------------------------------------- local objectives, both trainers


def _objectives(params, head):
    names = tuple(params)
    body = tuple(n for n in names if n not in head)
    trainable = tuple(n for n in names if params[n].is_floating_point())
    return {
        "fedrep": KeepLocal(tuple(head), body, local_first=2),
        "local": KeepLocal(names, ()),
        "ditto": DittoObjective(lam=0.5),
        "moon": MoonObjective(mu=5.0, temperature=0.5, names=trainable),
    }


@pytest.mark.parametrize("which", ["fedrep", "local", "ditto", "moon"])
def test_new_objective_hooks_agree_one_after_another_and_vectorised(which, tmp_path):
    ctx, _ = build(tmp_path, scenario("fedavg"))
    params = ctx.init_params
    head = ["3.weight", "3.bias"]
    objective = _objectives(params, head)[which]
    trainer = SGDTrainer(lr=0.1, batch_size=16, momentum=0.5, objective=objective)
    gen = torch.Generator().manual_seed(1)
    own = {n: t + 0.1 * torch.randn(t.shape, generator=gen) for n, t in params.items()}  # a client's kept tensors
    jobs = []
    flag = {PERSONAL_PASS: torch.ones(())} if which == "ditto" else {}  # Ditto's personal pass
    for c in range(3):
        state = objective.initial_state(own)
        jobs.append(TrainJob(c, 2, steps=4 + c, inputs=dict(flag), state=state))
    data = [ctx.data.client(c) for c in range(3)]
    seq = [trainer.train(ctx.model, params, *data[c], jobs[c], generator(0, "t", c)) for c in range(3)]
    vec = train_chunk(ctx.model, trainer, [params] * 3, data, jobs, [generator(0, "t", c) for c in range(3)])
    for a, b in zip(seq, vec):
        assert a.params.keys() == b.params.keys() and a.state.keys() == b.state.keys()
        for k in a.params:
            assert torch.allclose(a.params[k], b.params[k], atol=1e-5), k
        for k in a.state:
            assert torch.allclose(a.state[k], b.state[k], atol=1e-5), k
    # what each returns and keeps
    if which == "fedrep":
        assert sorted(seq[0].params) == ["1.bias", "1.weight"]  # the body only
        assert sorted(seq[0].state) == [LOCAL + n for n in sorted(head)]
    if which == "local":
        assert seq[0].params == {}  # nothing leaves the client
    if which == "moon":
        assert all(torch.equal(seq[0].state[PREV + n], seq[0].params[n]) for n in params)
    if which == "ditto":
        assert sorted(seq[0].state) == sorted(PERSONAL + n for n in params)
    ctx.close()


def test_fedrep_trains_the_head_then_the_body(tmp_path):
    ctx, _ = build(tmp_path, scenario("fedavg"))
    params = ctx.init_params
    head, body = ("3.weight", "3.bias"), ("1.weight", "1.bias")
    trainer = SGDTrainer(lr=0.1, batch_size=16, objective=KeepLocal(head, body, local_first=3))
    x, y = ctx.data.client(0)
    only_head = trainer.train(ctx.model, params, x, y, TrainJob(0, 1, steps=3), generator(0, "t"))
    assert same(only_head.params, {n: params[n] for n in body})  # three steps: the body has not moved
    assert not torch.equal(only_head.state[LOCAL + "3.weight"], params["3.weight"])
    both = trainer.train(ctx.model, params, x, y, TrainJob(0, 1, steps=5), generator(0, "t"))
    assert not torch.equal(both.params["1.weight"], params["1.weight"])
    # the head stops at step 3: two more steps leave it where three left it
    assert torch.equal(both.state[LOCAL + "3.weight"], only_head.state[LOCAL + "3.weight"])
    ctx.close()


def test_moon_needs_a_representation_layer(tmp_path, capsys):
    path = tmp_path / "m.toml"
    path.write_text(scenario("moon").replace('name = "mlp"\nhidden = [32]', 'name = "logreg"'))
    assert main(["run", str(path), "--out", str(tmp_path / "m"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.name" in err[0] and "representation" in err[0], err


# ---------------------------------------------------------------- personalised FL


def test_client_test_fraction_holds_out_part_of_each_clients_own_data(tmp_path):
    from fedsim.data import build_federated_data
    from fedsim.errors import DataError

    ctx, _ = build(tmp_path, scenario("fedavg", data="client_test_fraction = 0.25\npartition = \"quantity\""))
    cfg = ctx.spec.scenario.data
    whole = build_federated_data(cfg.model_copy(update={"client_test_fraction": 0.0}), ctx.seed)
    split = ctx.data
    for c in range(split.num_clients):
        x, _ = whole.client(c)
        xt, _ = split.client(c)
        xh, _ = split.client_test(c)
        assert len(xh) == max(1, round(0.25 * len(x))) and len(xt) + len(xh) == len(x)
        rows = lambda a: {r.tobytes() for r in a}  # noqa: E731
        assert rows(xt) | rows(xh) == rows(x) and not rows(xt) & rows(xh)  # the client's own examples, split
    with pytest.raises(DataError, match="client_test_fraction"):
        build_federated_data(cfg.model_copy(update={"lazy": True}), ctx.seed)
    ctx.close()


def test_per_client_accuracy_is_of_the_model_each_client_uses(tmp_path):
    ctx, flow = build(tmp_path, scenario("fedper", data="client_test_fraction = 0.3"))
    flow.step(1)
    flow.step(2)
    row = flow.evaluate()
    accuracies = [evaluate(ctx.model, flow.client_model(c), *ctx.data.client_test(c))[0] for c in range(ctx.data.num_clients)]
    assert {k: row[k] for k in ("client_accuracy_mean", "client_accuracy_p10", "client_accuracy_worst")} == \
        pytest.approx(summarize_client_accuracy(accuracies), abs=1e-12)
    # a client that trained uses its own head, one that did not the server's
    trained = next(iter(ctx.client_states.states))
    assert torch.equal(flow.client_model(trained)["3.weight"], ctx.client_states.states[trained][LOCAL + "3.weight"])
    idle = next(c for c in range(ctx.data.num_clients) if c not in ctx.client_states.states)
    assert same(flow.client_model(idle), flow.params)
    # a global method's per-client accuracy is of the global model
    ctx2, fedavg = build(tmp_path, scenario("fedavg", data="client_test_fraction = 0.3"))
    fedavg.step(1)
    accuracies = [evaluate(ctx2.model, fedavg.params, *ctx2.data.client_test(c))[0] for c in range(ctx2.data.num_clients)]
    assert fedavg.evaluate()["client_accuracy_mean"] == pytest.approx(np.mean(accuracies), abs=1e-12)
    ctx.close()
    ctx2.close()


PERSONAL_CASES = {
    "fedper": ("", "", ["3.weight", "3.bias"]),
    "fedrep": ("head_steps = 2", "", ["3.weight", "3.bias"]),
    "fedbn": ("", "batch_norm = true", ["2.weight", "2.bias", "2.running_mean", "2.running_var", "2.num_batches_tracked"]),
    "local": ("", "", None),
    "ditto": ("lam = 0.5", "", []),
}


@pytest.mark.parametrize("method", list(PERSONAL_CASES))
def test_personal_tensors_never_leave_the_client(method, tmp_path, capsys):
    extra, model, local = PERSONAL_CASES[method]
    ctx, flow = build(tmp_path, scenario(method, extra, model=model, data="client_test_fraction = 0.25"))
    init = {k: v.clone() for k, v in ctx.init_params.items()}
    local = list(init) if local is None else local
    shared = [n for n in init if n not in local]
    for r in (1, 2, 3):
        flow.step(r)
    # bytes: the shared tensors down and up, for every client of every round (no loss configured)
    assert ctx.ledger.total == 3 * 4 * 2 * num_bytes({n: init[n] for n in shared})
    # the server never saw the local tensors: they are still the initial ones there
    assert all(torch.equal(flow.params[n], init[n]) for n in local)
    assert all(not torch.equal(flow.params[n], init[n]) for n in shared if init[n].is_floating_point())
    # and each client that trained holds its own
    key = PERSONAL if method == "ditto" else LOCAL
    kept = list(init) if method == "ditto" else local
    for c, state in ctx.client_states.states.items():
        assert sorted(state) == sorted(key + n for n in kept)
        assert any(not torch.equal(state[key + n], init[n]) for n in kept)
    if method == "fedbn":
        assert "clients train one client after another: the model has buffers" in capsys.readouterr().out
    ctx.close()


def test_ditto_and_fedavg_ft_train_the_global_model_as_fedavg_does(tmp_path):
    data = "client_test_fraction = 0.25"
    fedavg = run_rows(tmp_path, scenario("fedavg", data=data), "fedavg")
    for method, extra in (("ditto", "lam = 0.5"), ("fedavg_ft", "finetune_steps = 3")):
        rows = run_rows(tmp_path, scenario(method, extra, data=data), method)
        pd.testing.assert_frame_equal(rows[["round", "sim_time", "test_accuracy", "test_loss", "bytes_sent"]],
                                      fedavg[["round", "sim_time", "test_accuracy", "test_loss", "bytes_sent"]], check_exact=True)
        assert not np.allclose(rows["client_accuracy_mean"].iloc[1:], fedavg["client_accuracy_mean"].iloc[1:])


def test_fedavg_ft_evaluates_each_client_after_fine_tuning_by_hand(tmp_path):
    ctx, flow = build(tmp_path, scenario("fedavg_ft", "finetune_steps = 3", data="client_test_fraction = 0.25"))
    flow.step(1)
    row = flow.evaluate()
    tuner = SGDTrainer(lr=0.1, batch_size=16, local_steps=3)
    accuracies = []
    for c in range(ctx.data.num_clients):
        tuned = tuner.train(ctx.model, flow.params, *ctx.data.client(c), TrainJob(c, 1), generator(ctx.seed, "train", c, 1))
        accuracies.append(evaluate(ctx.model, tuned.params, *ctx.data.client_test(c))[0])
    assert row["client_accuracy_mean"] == pytest.approx(np.mean(accuracies), abs=1e-9)
    ctx.close()


# ---------------------------------------------------------------- resume, every stateful method


STATEFUL = {
    "scaffold": scenario("scaffold", "global_lr = 0.8"),
    "feddyn": scenario("feddyn"),
    "fednova": scenario("fednova", "local_steps_range = [1, 5]"),
    "fedadam": scenario("fedadam"),
    "fedavgm": scenario("fedavgm"),
    "moon": scenario("moon"),
    "ditto": scenario("ditto", data="client_test_fraction = 0.25"),
    "fedper": scenario("fedper", data="client_test_fraction = 0.25"),
    "fedrep": scenario("fedrep", "head_steps = 2", data="client_test_fraction = 0.25"),
    "fedbn": scenario("fedbn", model="batch_norm = true", data="client_test_fraction = 0.25"),
    "local": scenario("local", data="client_test_fraction = 0.25"),
    "fedavg_ft": scenario("fedavg_ft", data="client_test_fraction = 0.25"),
}


@pytest.mark.parametrize("method", list(STATEFUL))
def test_resume_gives_the_uninterrupted_curves(method, tmp_path, monkeypatch):
    text = STATEFUL[method].replace("rounds = 4", "rounds = 6\ncheckpoint_every = 2")
    path = tmp_path / "s.toml"
    path.write_text(text)
    assert main(["run", str(path), "--out", str(tmp_path / "whole"), "--no-progress"]) == 0
    append = History.append

    def crash_after_round_5(self, row):
        append(self, row)
        if row["round"] == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(History, "append", crash_after_round_5)
    assert main(["run", str(path), "--out", str(tmp_path / "cut"), "--no-progress"]) == 130
    monkeypatch.setattr(History, "append", append)
    assert main(["run", "--resume", str(tmp_path / "cut" / "small"), "--no-progress"]) == 0
    whole = pd.read_csv(tmp_path / "whole" / "small" / "metrics.csv").drop(columns="wall_time")
    resumed = pd.read_csv(tmp_path / "cut" / "small" / "metrics.csv").drop(columns="wall_time")
    pd.testing.assert_frame_equal(whole, resumed, check_exact=True)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["scaffold", "ditto", "fedrep", "moon", "fedavg_ft"])
def test_stateful_methods_give_identical_curves_on_ray(method, tmp_path, ray_session):
    inline = run_rows(tmp_path, STATEFUL[method], "inline")
    ray = run_rows(tmp_path, STATEFUL[method].replace('executor = "inline"', 'executor = "ray"\nworkers = 2'), "ray")
    pd.testing.assert_frame_equal(inline, ray, check_exact=True)


def test_ditto_personal_steps_start_from_and_pull_towards_the_downloaded_model(tmp_path):
    ctx, flow = build(tmp_path, scenario("ditto", "lam = 0.5"))
    first = set(flow.sample(1).tolist())
    flow.step(1)
    downloaded = {k: v.clone() for k, v in flow.params.items()}  # w^1, what round 2's clients receive
    new = [c for c in flow.sample(2).tolist() if c not in first]
    assert new, "round 2 must sample a client that round 1 did not"
    flow.step(2)
    personal = SGDTrainer(lr=0.1, batch_size=16, objective=DittoObjective(0.5))
    for c in new:  # v_k starts as w^1 and is regularised towards w^1
        job = TrainJob(c, 2, inputs={PERSONAL_PASS: torch.ones(())})
        out = personal.train(ctx.model, downloaded, *ctx.data.client(c), job, generator(ctx.seed, "train", c, 2))
        assert all(torch.allclose(ctx.client_states.states[c][PERSONAL + n], out.state[PERSONAL + n], atol=1e-5) for n in downloaded)
    ctx.close()
