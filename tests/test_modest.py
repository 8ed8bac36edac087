"""MoDeST: hash sampling, the round protocol, failures, and equivalence with FedAvg."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedsim.algorithms.modest import Collection, MoDeST, View
from fedsim.cli import main
from fedsim.coordinator import RunContext, RunOptions
from fedsim.ledger import gini
from fedsim.sampling import hash_order, ordered_candidates
from fedsim.scenario import load

MODEST = """
name = "modest"
seed = 4
rounds = 8

[data]
dataset = "synthetic"
num_clients = 40
samples_per_client = 50
test_size = 400

[model]
name = "logreg"

[algorithm]
name = "modest"
lr = 0.1
sample_size = 6

[system]
executor = "inline"
"""


def test_same_view_same_sample_and_samples_change_with_the_round():
    n = 50
    a = View(np.zeros(n, dtype=np.int32), np.zeros(n, dtype=np.int16))
    b = View(a.last_active.copy(), a.membership.copy())
    for k in range(1, 6):
        sa = ordered_candidates(a.candidates(k, 1000, me=3), k)[:8]
        sb = ordered_candidates(b.candidates(k, 1000, me=17), k)[:8]
        assert np.array_equal(sa, sb)
    assert not np.array_equal(hash_order(n, 1)[:8], hash_order(n, 2)[:8])


def test_samples_are_close_to_uniform_over_many_rounds():
    n, s, rounds = 40, 5, 4000
    counts = np.zeros(n)
    for k in range(1, rounds + 1):
        counts[hash_order(n, k)[:s]] += 1
    expected = rounds * s / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 80  # 39 degrees of freedom: the 0.999 quantile is about 72


def test_views_merge_by_newest_activity_and_membership():
    a = View(np.array([3, 0, 5], dtype=np.int32), np.array([0, 1, -1], dtype=np.int16))
    b = View(np.array([1, 4, 5], dtype=np.int32), np.array([2, 0, 0], dtype=np.int16))
    m = a.merged(b)
    assert m.last_active.tolist() == [3, 4, 5] and m.membership.tolist() == [2, 1, 0]
    assert a.merged(a) is a
    assert m.candidates(10, 1000, me=0).tolist() == [True, False, True]  # 1 has left
    assert m.candidates(10, 4, me=0).tolist() == [True, False, False]  # 2 inactive since round 5


def _modest(tmp_path, text=MODEST, *overrides):
    path = tmp_path / "m.toml"
    path.write_text(text)
    spec = load(path, list(overrides))[0]
    ctx = RunContext(spec, RunOptions(executor="inline"))
    return ctx, spec.algorithm.build(spec.algorithm_config, ctx)


def test_aggregator_with_too_few_models_waits_for_the_timeout_then_drops_the_round(tmp_path):
    ctx, flow = _modest(tmp_path, MODEST, "algorithm.aggregation_timeout=50.0")
    assert isinstance(flow, MoDeST)
    flow.step(1)  # one normal round, so that a model exists
    from fedsim import ClientResult

    result = ClientResult(0, {k: v.clone() for k, v in flow.initial.items()}, 50, {"train_loss": 1.0})
    aggregator, round = 7, 50
    t0 = ctx.clock.now
    flow.on_update(aggregator, round, result, flow.genesis, 0, t0)
    flow.on_update(aggregator, round, ClientResult(1, result.params, 50, {}), flow.genesis, 1, t0)
    collection = flow.collections[(aggregator, round)]
    assert isinstance(collection, Collection) and not collection.done  # 2 < 6 models: it waits
    events = [e for e in flow.loop.queue._heap if e.kind == "aggregation_timeout" and e.payload == (aggregator, round)]
    assert len(events) == 1 and events[0].time == pytest.approx(t0 + 50.0)
    dropped = flow.dropped_rounds
    flow.on_aggregation_timeout(aggregator, round, t0 + 50.0)
    assert collection.done and flow.dropped_rounds == dropped + 1  # 2 < liveness minimum 3
    assert flow.latest < round - 1  # nothing was aggregated for that round


def test_no_failures_and_one_aggregator_matches_fedavg_on_the_same_sample(write_scenario, tmp_path):
    sweep = (
        '\n[sweep]\nalgorithm = [{ name = "modest", sample_size = 6, aggregators = 1 },'
        ' { name = "fedavg", clients_per_round = 6, sampler = "hash", batch_size = 20, local_steps = 5 }]\n'
    )
    path = write_scenario(MODEST.replace("sample_size = 6\n", "") + sweep)
    assert main(["run", str(path), "--out", str(tmp_path), "--no-progress"]) == 0
    m = pd.read_csv(tmp_path / "modest-algorithm=modest" / "metrics.csv")
    f = pd.read_csv(tmp_path / "modest-algorithm=fedavg" / "metrics.csv")
    pd.testing.assert_series_equal(m["test_accuracy"], f["test_accuracy"])
    pd.testing.assert_series_equal(m["test_loss"], f["test_loss"])


def test_eighty_percent_crash_keeps_improving_and_never_hangs(write_scenario, tmp_path):
    text = MODEST.replace("rounds = 8", "rounds = 30").replace("num_clients = 40", "num_clients = 60") + (
        "\n[system.failures]\ncrash_fraction = 0.8\ncrash_at = 2.0\n"
    )
    text = text.replace("sample_size = 6", "sample_size = 6\nsuccess_fraction = 0.8\naggregation_timeout = 20.0")
    path = write_scenario(text)
    assert main(["run", str(path), "--out", str(tmp_path), "--no-progress"]) == 0
    df = pd.read_csv(tmp_path / "modest" / "metrics.csv")
    assert len(df) == 31 and df["sim_time"].iloc[-1] < 30 * 3600  # bounded
    crash = int((df["sim_time"] >= 2.0).idxmax())
    after = df.iloc[crash:]
    assert after["global_round"].iloc[-1] > after["global_round"].iloc[0] + 5  # rounds keep completing
    assert after["test_accuracy"].iloc[-5:].mean() > after["test_accuracy"].iloc[0]


def test_communication_summary_counts_per_node_load(write_scenario, tmp_path):
    import json

    path = write_scenario(MODEST.replace("rounds = 8", "rounds = 8\ntarget_accuracy = 0.12"))
    assert main(["run", str(path), "--out", str(tmp_path), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "modest" / "summary.json").read_text())
    assert summary["server_bytes"] == 0 and summary["total_bytes"] > 0
    assert 0 < summary["gini_bytes_per_node"] < 1
    assert summary["bytes_to_target"] is None or summary["bytes_to_target"] <= summary["total_bytes"]


def test_gini():
    assert gini(np.ones(10)) == pytest.approx(0.0)
    assert gini(np.array([0, 0, 0, 10.0])) == pytest.approx(0.75)


def test_a_round_whose_trainers_all_crashed_is_started_again(tmp_path, monkeypatch):
    ctx, flow = _modest(tmp_path)
    flow.step(1)
    round = flow.latest + 5
    first, _ = flow.select(0, round, 6, ctx.clock.now)
    starter = next(n for n in range(40) if n not in first)  # a node that is not its own trainer
    trainers, _ = flow.select(starter, round, 6, ctx.clock.now)
    assert starter not in trainers
    dead = set(trainers)
    monkeypatch.setattr(ctx.failures, "alive", lambda node, t, r=None: node not in dead)
    flow.on_round_check(starter, round, flow.initial, tuple(trainers), ctx.clock.now)
    assert flow.restarts == 1
    resent = [e.payload[0] for e in flow.loop.queue._heap if e.kind == "model" and e.payload[1] == round]
    assert resent and not dead & set(resent)  # the round goes to trainers that answer
    monkeypatch.setattr(ctx.failures, "alive", lambda node, t, r=None: True)
    flow.on_round_check(starter, round, flow.initial, tuple(trainers), ctx.clock.now)
    assert flow.restarts == 1  # trainers alive: nothing to do


def _round_in_flight(flow):
    """The round whose model is on its way to (or with) its trainers, who started it, and who
    its trainers are."""
    round = flow.latest + 1
    starter = next(a for (a, k), c in flow.collections.items() if k == round and c.done)
    trainers = {int(n) for n in np.flatnonzero(flow.r_hat == round)}
    trainers |= {e.payload[0] for e in flow.loop.queue._heap if e.kind == "model" and e.payload[1] == round}
    return round, starter, trainers


def test_a_round_whose_trainers_and_starter_all_crashed_is_started_again_by_a_watcher(tmp_path, monkeypatch):
    ctx, flow = _modest(tmp_path, MODEST, "algorithm.aggregation_timeout=20.0")
    for r in range(1, 4):
        flow.step(r)
    round, starter, trainers = _round_in_flight(flow)
    dead = trainers | {starter}
    assert len(trainers) == 6 and starter not in trainers or len(trainers) >= 5
    monkeypatch.setattr(ctx.failures, "alive", lambda node, t, r=None: node not in dead)
    # every survivor has heard that the round started (acks, pongs): knowing of a round is not
    # holding its model, and must not keep the watchers waiting
    for node in range(40):
        if node not in dead:
            flow._hear(node, round, ctx.clock.now)
    for r in range(4, 9):
        flow.step(r)
    assert flow.silence_restarts >= 1 and flow.restarts == 0  # the starter's own check died with it
    assert flow.latest >= 8  # rounds keep completing
    assert not dead & {int(n) for n in np.flatnonzero(flow.r_hat > round)}  # with trainers that answer


def test_watchers_never_restart_a_healthy_protocol_even_with_a_short_timeout(tmp_path):
    """Nodes sit out most rounds (6 of 40 train); a watcher acts only on what its pings say."""
    curves = {}
    for timeout in ("0.5", "1000.0"):
        ctx, flow = _modest(tmp_path, MODEST, f"algorithm.silence_timeout={timeout}")
        for r in range(1, 9):
            flow.step(r)
        assert flow.silence_restarts == 0
        curves[timeout] = (flow.latest, flow.evaluate())
    assert curves["0.5"] == curves["1000.0"]


CRASH_AT_ROUND_30 = """
name = "crash80"
seed = 0
rounds = 36

[data]
dataset = "synthetic"
num_clients = 100
samples_per_client = 60
test_size = 500

[model]
name = "logreg"

[algorithm]              # scenarios/modest.toml's modest-crash80 case, on synthetic data
name = "modest"
lr = 0.05
batch_size = 20
local_steps = 20
sample_size = 10
aggregators = 1
success_fraction = 0.8
aggregation_timeout = 60.0

[system]
executor = "inline"
compute = { dist = "lognormal", mean = 0.02, sigma = 0.5 }
link = { bandwidth_mbps = 20, latency_ms = 30 }

[system.failures]
crash_fraction = 0.8
crash_round = 30
"""


@pytest.mark.slow
def test_the_seed_whose_round_in_flight_lost_its_starter_and_every_trainer_keeps_training(write_scenario, tmp_path):
    # seed 0: round 30's starter and all ten of its trainers are among the crashed 80%; before
    # the silence rule the event queue drained there and the run froze at global round 29
    path = write_scenario(CRASH_AT_ROUND_30)
    assert main(["run", str(path), "--out", str(tmp_path), "--no-progress"]) == 0
    df = pd.read_csv(tmp_path / "crash80" / "metrics.csv")
    assert df["silence_restarts"].iloc[-1] >= 1
    assert df["global_round"].iloc[-1] == 36 and df["sim_time"].iloc[-1] > df["sim_time"].iloc[30]
