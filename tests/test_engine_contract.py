"""The engine contract: rules at every merge point, the network's rules, client state and payloads,
local objectives that stay vectorised. Each test checks what the engine did, not that it ran."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedsim import (
    LocalSGDConfig,
    RunContext,
    ServerRounds,
    SGDTrainer,
    TrainJob,
    register_algorithm,
)
from fedsim.cli import main
from fedsim.coordinator import RunOptions
from fedsim.scenario import load
from fedsim.seeding import generator
from tests.conftest import SMALL
from tests.spy_rule import CALLS, METHODS, scenario  # registers the spy rule, test_spy


def run_rows(tmp_path: Path, text: str, name: str) -> pd.DataFrame:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    assert main(["run", str(path), "--out", str(tmp_path / name), "--no-progress"]) == 0
    return pd.read_csv(tmp_path / name / "small" / "metrics.csv")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_rule_runs_at_every_merge_point_and_decides_the_curve(method, tmp_path):
    base = METHODS[method]
    CALLS.clear()
    spied = run_rows(tmp_path, base + '\n[aggregator]\nname = "test_spy"\n', "spy")
    assert CALLS, f"{method} never called the configured rule"
    relative = {r for _, _, r in CALLS}
    assert relative == ({True} if method in ("fedasync", "fedbuff", "fedcompass") else {False})
    frozen = run_rows(tmp_path, base + '\n[aggregator]\nname = "test_spy"\nmode = "freeze"\n', "frozen")
    columns = ["test_accuracy", "test_loss"]
    assert not np.allclose(spied[columns].to_numpy(), frozen[columns].to_numpy()), (
        f"{method}: a rule that refuses to merge gave the same curve, so the rule is not what merges"
    )


@pytest.mark.parametrize("method", ["ferret", "flexlora", "lora_fair"])
def test_methods_whose_merge_is_the_method_refuse_a_rule(method, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path / "cache"))
    text = SMALL.replace('name = "fedavg"\nclients_per_round = 4', f'name = "{method}"\nclients_per_round = 4')
    text = text.replace('name = "mlp"\nhidden = [32]', 'name = "pretrained_mlp"\nhidden = [16]\nrank = 2\npretrain_examples = 200\npretrain_epochs = 1')
    path = tmp_path / "s.toml"
    path.write_text(text + '\n[aggregator]\nname = "test_spy"\n')
    assert main(["run", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "aggregator" in err[0] and method in err[0], err


def test_dead_nodes_are_left_out_of_every_neighbourhood(tmp_path):
    text = METHODS["dpsgd"].replace("rounds = 4", "rounds = 3")
    text += '\n[aggregator]\nname = "test_spy"\n\n[system.failures]\ncrash_fraction = 0.25\ncrash_round = 2\n'
    CALLS.clear()
    run_rows(tmp_path, text, "dead")
    spec = load(tmp_path / "dead.toml")[0]
    ctx = RunContext(spec, RunOptions(executor="inline"))
    dead = set(np.flatnonzero(ctx.failures.crashes).tolist())
    assert len(dead) == 3
    per_round = len(CALLS) // 3
    before, after = CALLS[:per_round], CALLS[per_round:]
    assert any(dead & set(ids) for _, ids, _ in before)  # round 1: everyone mixes
    assert not any(dead & set(ids) for _, ids, _ in after if len(ids) > 1)  # later: never with the dead
    ctx.close()


def test_message_loss_removes_exactly_the_messages_the_seed_says(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(SMALL + "\n[system.failures]\nmessage_loss = 0.3\n")
    spec = load(path)[0]
    ctx = RunContext(spec, RunOptions(executor="inline"))
    net = ctx.net
    receivers = list(range(12))
    reached = net.post(3, receivers, 100, purpose="test", ids=(7,))
    expected = [r for r in receivers if generator(spec.scenario.seed, "loss.test", 7, 4, r + 1).random() >= 0.3]
    assert reached == expected and 0 < len(reached) < 12
    # asking in another order, or again, changes nothing: loss never depends on call order
    assert sorted(net.post(3, receivers[::-1], 100, purpose="test", ids=(7,))) == expected
    assert net.ledger.sent[3] == 2 * 12 * 100  # a lost message still cost its bytes
    ctx.close()


def test_copies_leave_one_after_another_over_the_senders_uplink(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(SMALL.replace("[system]", "[system]\nlink = { bandwidth_mbps = 8, latency_ms = 10 }"))
    ctx = RunContext(load(path)[0], RunOptions(executor="inline"))
    arrivals = ctx.net.send(0, [1, 2, 3], 1_000_000, at=5.0, purpose="test")
    assert [round(t, 6) for _, t in arrivals] == [6.01, 7.01, 8.01]  # 1 s per copy, then 10 ms
    assert not ctx.net.longest_queue.any()  # the uplink was free: nothing waited
    later = ctx.net.send(0, [4], 1_000_000, at=6.0, purpose="test")  # queued behind the first three
    assert round(later[0][1], 6) == 9.01
    assert ctx.net.busy[0] == pytest.approx(4.0)
    # two copies were still ahead of it (the second and third, until 8 s): measured, node and time
    assert ctx.net.longest_queue.tolist() == pytest.approx([2.0, 0, 6.0, 2.0])
    ctx.net.send(1, [2], 1_000_000, at=0.0, purpose="test")  # a shorter queue elsewhere changes nothing
    saved = {k: v.copy() for k, v in ctx.net.state().items()}
    ctx.close()
    again = RunContext(load(path)[0], RunOptions(executor="inline"))
    again.net.load_state(saved)  # a checkpoint keeps it
    assert again.net.longest_queue.tolist() == pytest.approx([2.0, 0, 6.0, 2.0])
    again.close()


def test_a_flow_that_outruns_its_uplinks_is_said_once_and_recorded(tmp_path, capsys):
    # a node pushes to both ring neighbours after each 0.05 s job; a copy takes 0.15 s at 0.5 Mbps
    gossip = METHODS["gossip"].replace("rounds = 4", "rounds = 10").replace('name = "gossip"', 'name = "gossip"\nround_seconds = 0.5')
    slow = gossip.replace("[system]", "[system]\nlink = { bandwidth_mbps = 0.5, latency_ms = 1 }")
    run_rows(tmp_path, slow, "slow")
    lines = [line for line in capsys.readouterr().err.splitlines() if "uplinks saturated" in line]
    summary = json.loads((tmp_path / "slow" / "small" / "summary.json").read_text())
    assert len(lines) == 1 and f"node {summary['uplink_queue']['node']} found" in lines[0], lines
    assert summary["uplink_queue"]["copies"] >= 100 and summary["uplink_queue"]["waited_s"] > 0
    run_rows(tmp_path, gossip, "fast")  # the default links keep up: nothing said, nothing queued
    assert "uplinks saturated" not in capsys.readouterr().err
    fast = json.loads((tmp_path / "fast" / "small" / "summary.json").read_text())
    assert fast["uplink_queue"] == {"copies": 0, "node": None, "sim_time": None, "waited_s": 0.0}


def test_a_deadline_that_finds_nobody_leaves_the_model_unchanged(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(SMALL.replace("clients_per_round = 4", "clients_per_round = 4\ndeadline = 0.001"))
    spec = load(path)[0]
    ctx = RunContext(spec, RunOptions(executor="inline"))
    flow = spec.algorithm.build(spec.algorithm_config, ctx)
    before = {k: v.clone() for k, v in flow.params.items()}
    metrics = flow.step(1)
    assert metrics["failures"] == 4 and np.isnan(metrics["train_loss"])
    assert all(torch.equal(before[k], flow.params[k]) for k in before)
    assert ctx.clock.now == pytest.approx(0.001)
    ctx.close()


from tests.plugin_counting import EXTRAS, Counting  # noqa: E402  (registers test_counting)

COUNTING = SMALL.replace('name = "fedavg"\nclients_per_round = 4', 'name = "test_counting"') + '\n[plugins]\nmodules = ["tests.plugin_counting"]\n'


def test_client_state_is_kept_by_the_engine_and_extras_reach_the_rule(tmp_path):
    spec = load_text(tmp_path, COUNTING)
    ctx = RunContext(spec, RunOptions(executor="inline"))
    flow = spec.algorithm.build(spec.algorithm_config, ctx)
    EXTRAS.clear()
    sampled = []
    for r in range(1, 5):
        sampled += flow.sample(r).tolist()
        flow.step(r)
    counts = {c: float(s["jobs"]) for c, s in ctx.client_states.states.items()}
    assert counts == {c: float(sampled.count(c)) for c in set(sampled)}
    assert [tuple(e.shape) for e in EXTRAS] == [(4,)] * 4  # one stacked tensor per round
    ctx.close()


def load_text(tmp_path: Path, text: str, overrides: list[str] = ()):  # type: ignore[assignment]
    path = tmp_path / "counting.toml"
    path.write_text(text)
    return load(path, list(overrides))[0]


def test_a_local_objective_stays_vectorised_and_agrees_with_one_after_another(tmp_path):
    spec = load_text(tmp_path, COUNTING, ["algorithm.mu=0.5"])
    ctx = RunContext(spec, RunOptions(executor="inline"))
    trainer = SGDTrainer(lr=0.1, batch_size=16, local_steps=5, objective=Counting(0.5))
    from fedsim import vectorized

    assert vectorized.plan(ctx.model, trainer) is not None
    params = ctx.init_params
    jobs = [TrainJob(c, 1) for c in range(3)]
    data = [ctx.data.client(c) for c in range(3)]
    vec = vectorized.train_chunk(ctx.model, trainer, [params] * 3, data, jobs, [generator(0, "t", c) for c in range(3)])
    for c, out in enumerate(vec):
        seq = trainer.train(ctx.model, params, *data[c], jobs[c], generator(0, "t", c))
        assert seq.steps == out.steps and abs(seq.train_loss - out.train_loss) < 1e-5
        for k in seq.params:
            assert torch.allclose(seq.params[k], out.params[k], atol=1e-5), k
        assert float(out.state["jobs"]) == 1.0
    # the term matters: mu = 0.5 trains differently from mu = 0, and mu = 0 is plain FedAvg bit for bit
    plain = SGDTrainer(lr=0.1, batch_size=16, local_steps=5)
    zero = SGDTrainer(lr=0.1, batch_size=16, local_steps=5, objective=Counting(0.0))
    a = vectorized.train_chunk(ctx.model, plain, [params] * 3, data, jobs, [generator(0, "t", c) for c in range(3)])
    b = vectorized.train_chunk(ctx.model, zero, [params] * 3, data, jobs, [generator(0, "t", c) for c in range(3)])
    assert all(torch.equal(x.params[k], y.params[k]) for x, y in zip(a, b) for k in x.params)
    assert not all(torch.equal(x.params[k], y.params[k]) for x, y in zip(a, vec) for k in x.params)
    ctx.close()


def test_client_state_survives_resume(tmp_path, monkeypatch):
    """Killed after its third checkpoint, the run resumes to the curves of an uninterrupted one,
    which it cannot do unless every client's state came back from the checkpoint."""
    import fedsim.coordinator as coordinator

    path = tmp_path / "c.toml"
    path.write_text(COUNTING.replace("rounds = 4", "rounds = 6\ncheckpoint_every = 1").replace("[algorithm]\n", "[algorithm]\nmu = 0.3\n"))
    full = tmp_path / "full"
    assert main(["run", str(path), "--out", str(full), "--no-progress"]) == 0

    class Killed(Exception):
        pass

    saved = []
    real_save = coordinator.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        saved.append(args[2].client_states.states.copy())
        if len(saved) == 3:
            raise Killed

    monkeypatch.setattr(coordinator, "save_checkpoint", save_then_die)
    run_dir = tmp_path / "part" / "small"
    with pytest.raises(Killed):
        coordinator.run(load(path)[0], tmp_path / "part", RunOptions(progress=False))
    monkeypatch.setattr(coordinator, "save_checkpoint", real_save)
    assert saved[-1], "no client state had been kept by round 3"
    assert main(["run", "--resume", str(run_dir), "--no-progress"]) == 0
    a = pd.read_csv(full / "small" / "metrics.csv").drop(columns="wall_time")
    b = pd.read_csv(run_dir / "metrics.csv").drop(columns="wall_time")
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    {"executor": "ray", "workers": 1}, {"executor": "ray", "workers": 2}, {"executor": "ray", "clients_per_actor": 1},
])
def test_a_stateful_method_gives_identical_curves_on_every_executor(options, tmp_path, ray_session):
    text = COUNTING.replace("[algorithm]\n", "[algorithm]\nmu = 0.2\n")
    inline = run_rows(tmp_path, text, "inline")
    extra = "\n".join(f"{k} = {json.dumps(v)}" for k, v in options.items())
    other = run_rows(tmp_path, text.replace('executor = "inline"', extra), "other")
    pd.testing.assert_frame_equal(inline.drop(columns="wall_time"), other.drop(columns="wall_time"))


def test_validate_refuses_a_rule_the_method_cannot_use_and_a_rule_that_rejects_its_settings(tmp_path, capsys):
    path = tmp_path / "f.toml"
    path.write_text(SMALL.replace('name = "fedavg"\nclients_per_round = 4', 'name = "ferret"') + '\n[aggregator]\nname = "fedavg"\n')
    assert main(["validate", str(path)]) == 2
    assert "algorithm 'ferret' has no merge step" in capsys.readouterr().err
    path.write_text(SMALL + '\n[aggregator]\nname = "examples.robust_rules:TrimmedMean"\ntrim = 0.7\n')
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TrimmedMean rejected its settings: trim must lie in [0, 0.5)" in err[0], err


def test_a_server_optimiser_steps_after_any_rule_and_its_state_is_checkpointed(tmp_path):
    """[server_optimizer] is one knob for every server: FedAdam after the default mean, after a
    robust rule, and on FedBuff's buffer; sgd with lr = 1 is exactly the default."""
    plain = run_rows(tmp_path, SMALL, "plain")
    sgd = run_rows(tmp_path, SMALL + '\n[server_optimizer]\nname = "sgd"\nlr = 1.0\n', "sgd")
    pd.testing.assert_frame_equal(plain.drop(columns="wall_time"), sgd.drop(columns="wall_time"))
    adam = run_rows(tmp_path, SMALL + '\n[server_optimizer]\nname = "adam"\nlr = 0.05\n', "adam")
    assert not np.allclose(plain["test_loss"], adam["test_loss"])
    CALLS.clear()
    run_rows(tmp_path, SMALL + '\n[aggregator]\nname = "test_spy"\n\n[server_optimizer]\nname = "yogi"\nlr = 0.05\n', "yogi")
    assert CALLS
    buff = METHODS["fedbuff"]
    a = run_rows(tmp_path, buff.replace("local_steps = 4", "local_steps = 4\nserver_lr = 0.5"), "buff_lr")
    b = run_rows(tmp_path, buff + '\n[server_optimizer]\nname = "sgd"\nlr = 0.5\n', "buff_opt")
    pd.testing.assert_frame_equal(a.drop(columns="wall_time"), b.drop(columns="wall_time"))
    spec = load_text(tmp_path, SMALL + '\n[server_optimizer]\nname = "adam"\nlr = 0.05\n')
    ctx = RunContext(spec, RunOptions(executor="inline"))
    flow = spec.algorithm.build(spec.algorithm_config, ctx)
    flow.step(1)
    state = ctx.state()
    fresh = RunContext(spec, RunOptions(executor="inline"))
    from fedsim import checkpoint

    fresh.load_state(checkpoint.decode(checkpoint.encode(state)))
    for name in ("m_", "v_"):
        saved, loaded = getattr(ctx.server_optimizer, name), getattr(fresh.server_optimizer, name)
        assert saved and all(torch.equal(saved[k], loaded[k]) for k in saved)
    ctx.close()
    fresh.close()


def test_a_server_optimiser_where_there_is_no_global_model_is_refused(tmp_path, capsys):
    path = tmp_path / "g.toml"
    path.write_text(METHODS["dpsgd"] + '\n[server_optimizer]\nname = "adam"\nlr = 0.1\n')
    assert main(["validate", str(path)]) == 2
    assert "no global model for a server optimiser" in capsys.readouterr().err
    path.write_text(SMALL + '\n[server_optimizer]\nname = "sgd"\nbeta1 = 0.9\n')
    assert main(["validate", str(path)]) == 2
    assert "does not apply to server optimizer 'sgd'" in capsys.readouterr().err


class Undeclared:
    def __init__(self, ctx):
        self.ctx = ctx

    def step(self, round):
        return {"train_loss": 0.0}

    def evaluate(self):
        return {"test_accuracy": 0.0, "test_loss": 1.0}


class UndeclaredConfig(LocalSGDConfig):
    pass


@register_algorithm("test_undeclared")
def undeclared(cfg: UndeclaredConfig, ctx: RunContext) -> Undeclared:
    return Undeclared(ctx)


def test_a_flow_without_declared_state_is_refused_when_built(tmp_path, capsys):
    path = tmp_path / "u.toml"
    path.write_text(SMALL.replace('name = "fedavg"\nclients_per_round = 4', 'name = "test_undeclared"'))
    assert main(["run", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "declares no state" in err[0], err
