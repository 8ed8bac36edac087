"""The virtual clock and the event-driven server methods: FedAsync, FedBuff, FedCompass."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from fedsim.algorithms.fedcompass import Group, assign
from fedsim.asynchronous import Arrival, AsyncServer, staleness_weight
from fedsim.training import ClientResult
from fedsim.cli import main
from fedsim.clock import EventQueue
from fedsim.coordinator import RunContext, RunOptions
from fedsim.scenario import load

ASYNC = """
name = "async"
seed = 2
rounds = 6

[data]
dataset = "synthetic"
num_clients = 6
samples_per_client = 60
test_size = 300

[model]
name = "mlp"
hidden = [16]

[algorithm]
name = "fedcompass"
lr = 0.05
q_max = 10
q_min = 2
round_seconds = 1.0

[system]
executor = "inline"
compute = { dist = "uniform", low = 0.01, high = 0.08 }
link = { bandwidth_mbps = 100, latency_ms = 1 }
"""


def test_event_queue_orders_by_time_and_breaks_ties_by_insertion():
    q = EventQueue()
    for time, name in [(2.0, "c"), (1.0, "a"), (2.0, "d"), (1.0, "b"), (0.5, "first")]:
        q.push(time, "e", name)
    assert [q.pop().payload for _ in range(5)] == ["first", "a", "b", "c", "d"]


def test_deltas_are_start_minus_end_bit_for_bit_with_interleaved_start_models():
    # a merge's arrivals started from three versions, in runs and alone; every row must be exactly
    # that client's own w_start - w_end (the in-place, per-run subtraction must not mix rows up)
    gen = torch.Generator().manual_seed(0)
    versions = [{"w": torch.randn(4, 3, generator=gen), "b": torch.randn(4, generator=gen)} for _ in range(3)]
    order = [0, 0, 1, 2, 2, 2, 0, 1, 1, 0]
    arrivals = []
    for client, v in enumerate(order):
        end = {n: torch.randn(t.shape, generator=gen) for n, t in versions[v].items()}
        start = dict(versions[v])  # a dispatch's copy of the version's dict, sharing its tensors
        arrivals.append(Arrival(client, ClientResult(client, end, 1, {}), start, v, 1, 0.0))
    kept = {n: [a.result.params[n].clone() for a in arrivals] for n in ("w", "b")}
    out = AsyncServer.deltas(arrivals)
    for n in ("w", "b"):
        expected = torch.stack([versions[v][n] - e for v, e in zip(order, kept[n])])
        assert torch.equal(out[n], expected)
        assert torch.equal(torch.stack([a.result.params[n] for a in arrivals]), torch.stack(kept[n]))  # ends untouched
    assert all(torch.equal(versions[0][n], arrivals[0].start_params[n]) for n in ("w", "b"))


def test_staleness_weight_decreases_with_staleness():
    taus = np.arange(0, 20)
    poly = staleness_weight(taus, "polynomial", a=0.5)
    hinge = staleness_weight(taus, "hinge", a=0.5, b=4)
    assert poly[0] == 1.0 and np.all(np.diff(poly) < 0)
    assert np.all(hinge[:5] == 1.0) and np.all(np.diff(hinge[4:]) < 0)
    assert staleness_weight(3, "polynomial", a=0.5) == pytest.approx(0.5)  # (3 + 1)^(-1/2)
    assert np.all(staleness_weight(taus, "constant") == 1.0)


def test_group_assignment_hand_worked_three_clients():
    speeds = np.array([1.0, 2.0, 9.0])  # seconds per step, as the server has observed them
    q_min, q_max, lam = 2, 10, 1.5
    groups: dict[int, Group] = {}
    # client 0 becomes free at t = 10 with no group: a new group, Q = Q_max, E = 10 + 10 * 1, L = 10 + 15
    g, q, e, latest = assign(10.0, speeds[0], groups, speeds, q_min, q_max, lam)
    assert (g, q, e, latest) == (None, 10, 20.0, 25.0)
    groups[0] = Group(e, latest, members={0})
    # client 1 at t = 12: floor((20 - 12) / 2) = 4 steps fit in [2, 10]: it joins group 0
    assert assign(12.0, speeds[1], groups, speeds, q_min, q_max, lam) == (0, 4, 20.0, 25.0)
    groups[0].members.add(1)
    # client 2 at t = 12: floor(8 / 9) = 0 < Q_min, so a new group. The fastest member of group 0
    # would next arrive at L + v_f * Q_max = 25 + 1 * 10 = 35: Q = floor((35 - 12) / 9) = 2
    g, q, e, latest = assign(12.0, speeds[2], groups, speeds, q_min, q_max, lam)
    assert (g, q) == (None, 2) and e == pytest.approx(30.0) and latest == pytest.approx(39.0)
    # a slow client whose estimate falls below Q_min still gets Q_min
    speeds2 = np.array([1.0, 2.0, 40.0])
    assert assign(12.0, speeds2[2], groups, speeds2, q_min, q_max, lam)[1] == q_min


def _flow(text: str, tmp_path, **overrides):
    path = tmp_path / "s.toml"
    path.write_text(text)
    spec = load(path, [f"{k}={v}" for k, v in overrides.items()])[0]
    ctx = RunContext(spec, RunOptions(executor="inline"))
    return ctx, spec.algorithm.build(spec.algorithm_config, ctx)


def test_identical_speeds_give_one_group_of_everyone_with_zero_staleness(tmp_path):
    text = ASYNC.replace('compute = { dist = "uniform", low = 0.01, high = 0.08 }', "compute = 0.05")
    ctx, flow = _flow(text, tmp_path)
    rows = [flow.step(r) for r in range(1, 9)]
    assert all(r["groups"] <= 1 for r in rows)
    sizes = [r["mean_group_size"] for r in rows if not np.isnan(r["mean_group_size"])]
    assert sizes and all(s == 6 for s in sizes)  # every aggregation is a full synchronous round
    later = [r for r in rows[3:] if r["updates_applied"] > 0]
    assert later and all(r["max_staleness"] == 0 for r in later)


def test_heterogeneous_speeds_form_groups_and_fast_clients_take_more_steps(tmp_path):
    ctx, flow = _flow(ASYNC.replace("rounds = 6", "rounds = 20"), tmp_path)
    for r in range(1, 16):
        flow.step(r)
    fast, slow = np.argmin(ctx.system.step_time), np.argmax(ctx.system.step_time)
    assert flow.q[fast] > flow.q[slow]
    assert flow.q[slow] >= 2 and flow.q[fast] <= 10


def test_fedbuff_with_k_equal_to_clients_and_no_staleness_is_fedavg(tmp_path):
    # identical speeds: every client's first update arrives before any client's second one
    fedbuff = ASYNC.replace(
        'name = "fedcompass"\nlr = 0.05\nq_max = 10\nq_min = 2',
        'name = "fedbuff"\nlr = 0.05\nbuffer_size = 6\nlocal_steps = 3\nweights = "examples"',
    ).replace('compute = { dist = "uniform", low = 0.01, high = 0.08 }', "compute = 0.05")
    ctx_b, buff = _flow(fedbuff, tmp_path)
    buff.start()
    while buff.version == 0:
        event = buff.loop.queue.pop()
        arrival = buff._pending.pop(event.payload)
        arrival.result = buff.jobs.result(event.payload)
        buff.on_arrival(arrival, event.time)
    fedavg = fedbuff.replace(
        'name = "fedbuff"\nlr = 0.05\nbuffer_size = 6\nlocal_steps = 3\nweights = "examples"\nround_seconds = 1.0',
        'name = "fedavg"\nlr = 0.05\nclients_per_round = 6\nlocal_steps = 3',
    )
    ctx_a, avg = _flow(fedavg, tmp_path)
    avg.step(1)
    for name in avg.params:
        assert torch.allclose(buff.params[name], avg.params[name], atol=1e-6), name


def test_async_metrics_and_idle_fractions_are_recorded(write_scenario, tmp_path):
    path = write_scenario(ASYNC)
    assert main(["run", str(path), "--out", str(tmp_path), "--no-progress"]) == 0
    df = pd.read_csv(tmp_path / "async" / "metrics.csv")
    for column in ["mean_staleness", "max_staleness", "groups", "updates_applied"]:
        assert column in df
    assert list(df["sim_time"]) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # rounds are windows of round_seconds
    summary = json.loads((tmp_path / "async" / "summary.json").read_text())
    idle = summary["client_idle_fraction"]
    assert len(idle) == 6 and all(0 <= x < 1 for x in idle)


def test_sync_deadline_drops_late_clients_as_failures(write_scenario, tmp_path):
    text = ASYNC.replace(
        'name = "fedcompass"\nlr = 0.05\nq_max = 10\nq_min = 2\nround_seconds = 1.0',
        'name = "fedavg"\nlr = 0.05\nclients_per_round = 6\nlocal_steps = 5\ndeadline = 0.25',
    )
    path = write_scenario(text)
    assert main(["run", str(path), "--out", str(tmp_path), "--no-progress"]) == 0
    df = pd.read_csv(tmp_path / "async" / "metrics.csv")
    assert df["failures"].iloc[1:].min() > 0 and df["failures"].iloc[1:].max() < 6
    assert np.allclose(np.diff(df["sim_time"]), 0.25)  # every round is cut at the deadline


def test_client_speeds_come_from_distributions_traces_and_jitter(write_scenario, tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("client,step_time,bandwidth_mbps\n0,0.5,1\n3,0.25,2\n")
    path = write_scenario(ASYNC.replace("[system]", f'[system]\ntrace = "{trace}"\ncompute_jitter = 0.3'))
    spec = load(path)[0]
    ctx = RunContext(spec, RunOptions(executor="inline"))
    s = ctx.system
    assert s.step_time[0] == 0.5 and s.step_time[3] == 0.25 and s.bandwidth[0] == 1e6 / 8
    others = np.delete(s.step_time, [0, 3])
    assert np.all((others >= 0.01) & (others <= 0.08))
    a, b = s.compute_time(1, 10, job=1), s.compute_time(1, 10, job=2)
    assert a != b and a == s.compute_time(1, 10, job=1)  # jitter per job, reproducible


def test_bad_trace_is_a_clear_error(write_scenario, tmp_path, capsys):
    trace = tmp_path / "trace.csv"
    trace.write_text("client,step_time\n0,-1\n")
    path = write_scenario(ASYNC.replace("[system]", f'[system]\ntrace = "{trace}"'))
    assert main(["run", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "system.trace" in err and "positive" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["fedcompass", "fedasync", "fedbuff"])
def test_async_methods_identical_across_executors(ray_session, write_scenario, tmp_path, algorithm):
    text = ASYNC.replace('name = "fedcompass"\nlr = 0.05\nq_max = 10\nq_min = 2', f'name = "{algorithm}"\nlr = 0.05')
    if algorithm != "fedcompass":
        text = text.replace("round_seconds = 1.0", "round_seconds = 1.0\nlocal_steps = 4")
    path = write_scenario(text)
    frames = []
    for executor, workers in [("inline", None), ("ray", "1"), ("ray", "2")]:
        out = tmp_path / f"{executor}{workers}"
        count = ["--workers", workers] if workers else []  # --workers with inline is an error
        assert main(["run", str(path), "--out", str(out), "--no-progress", "--executor", executor, *count]) == 0
        frames.append(pd.read_csv(out / "async" / "metrics.csv").drop(columns="wall_time"))
    pd.testing.assert_frame_equal(frames[0], frames[1], check_exact=True)
    pd.testing.assert_frame_equal(frames[0], frames[2], check_exact=True)
    assert frames[0]["test_accuracy"].iloc[-1] > frames[0]["test_accuracy"].iloc[0]


def test_fedcompass_survives_deadlines_that_find_nobody(write_scenario, tmp_path):
    """Heavy jitter makes whole groups miss their deadline; aggregating nothing must be a no-op."""
    text = ASYNC.replace("num_clients = 6", "num_clients = 4").replace("[system]", "[system]\ncompute_jitter = 1.5")
    for seed in (0, 1):
        path = write_scenario(text.replace("seed = 2", f"seed = {seed}"))
        assert main(["run", str(path), "--out", str(tmp_path / str(seed)), "--no-progress"]) == 0

