"""Decentralized methods: mixing, consensus, SAM, variance correction, equivalences, end to end."""

from __future__ import annotations

import json

import networkx as nx
import numpy as np
import pandas as pd
import pytest
import torch

from fedsim.algorithms.gossip import conservative_average, variance_corrected_average
from fedsim.cli import main
from fedsim.decentralized import consensus_distance, mix, mixing_operator
from fedsim.topologies import complete, ring
from fedsim.training import sam_gradient

DECENTRALIZED = """
name = "dec"
seed = 1
rounds = 3

[data]
dataset = "synthetic"
num_clients = 8
samples_per_client = 40
test_size = 200

[model]
name = "mlp"
hidden = [16]

[topology]
name = "ring"

[algorithm]
name = "dfedsam"
lr = 0.1
local_steps = 2

[system]
executor = "inline"
"""


def random_stack(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n, 3, 4, generator=g), "b": torch.randn(n, 4, generator=g)}


def test_uniform_mixing_on_complete_graph_is_exact_averaging():
    X = random_stack(6)
    out = mix(mixing_operator(complete(6), "uniform"), X)
    for name, t in X.items():
        assert torch.allclose(out[name], t.mean(0, keepdim=True).expand_as(t), atol=1e-6)


def test_consensus_distance_falls_monotonically_with_gossip_steps_on_a_ring():
    X = random_stack(12)
    W = mixing_operator(ring(12), "metropolis_hastings")
    distances = [consensus_distance(X)]
    for _ in range(8):
        X = mix(W, X)
        distances.append(consensus_distance(X))
    assert all(b < a for a, b in zip(distances, distances[1:]))
    assert distances[-1] < 0.5 * distances[0]


def test_mixing_keeps_the_network_average():
    X = random_stack(10, seed=3)
    out = mix(mixing_operator(nx.random_regular_graph(3, 10, seed=0), "metropolis_hastings"), X)
    for name in X:
        assert torch.allclose(out[name].mean(0), X[name].mean(0), atol=1e-6)


def test_one_sam_step_matches_hand_computation_on_a_quadratic():
    A = torch.tensor([[3.0, 0.5], [0.5, 1.0]])
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    rho = 0.1

    def loss():
        return 0.5 * w @ A @ w

    loss().backward()
    sam_gradient([w], loss, rho)
    with torch.no_grad():
        g = A @ torch.tensor([1.0, -2.0])
        e = rho * g / g.norm()
        expected = A @ (torch.tensor([1.0, -2.0]) + e)
    assert torch.allclose(w.grad, expected, atol=1e-6)
    assert torch.equal(w.detach(), torch.tensor([1.0, -2.0]))  # weights restored before the base step


def test_variance_correction_keeps_the_mean_and_reaches_the_target_variance():
    g = torch.Generator().manual_seed(0)
    received = {"w": torch.randn(5, 50, 40, generator=g) * 0.3, "bias": torch.randn(5, 40, generator=g)}
    own = {"w": torch.randn(50, 40, generator=g) * 0.3, "bias": torch.randn(40, generator=g)}
    mean = {k: v.mean(0) for k, v in received.items()}
    plain = conservative_average(own, mean, c=0.5)
    corrected = variance_corrected_average(own, mean, received, c=0.5, eps=0.0)
    for name in own:
        target = received[name].reshape(5, -1).var(dim=1).mean()
        assert torch.allclose(corrected[name].mean(), plain[name].mean(), atol=1e-5)
        assert torch.allclose(corrected[name].var(), target, rtol=1e-4)
        assert plain[name].var() < 0.8 * target  # averaging uncorrelated models shrinks the variance


def test_variance_correction_changes_nothing_when_all_inputs_are_identical():
    own = {"w": torch.randn(7, 3), "bn.running_mean": torch.randn(3), "scale": torch.tensor([2.0])}
    received = {k: v.unsqueeze(0).repeat(4, *([1] * v.dim())) for k, v in own.items()}
    out = variance_corrected_average(own, {k: v.mean(0) for k, v in received.items()}, received, c=0.5)
    for name in own:
        assert torch.allclose(out[name], own[name], atol=1e-6)


def test_dpsgd_on_complete_graph_equals_fedavg_with_full_participation(write_scenario, tmp_path):
    common = DECENTRALIZED.replace('name = "dfedsam"\nlr = 0.1\nlocal_steps = 2', 'name = "dpsgd"\nlr = 0.1')
    dpsgd = write_scenario(common.replace('name = "ring"', 'name = "complete"\nmixing = "uniform"'), "dpsgd.toml")
    fedavg = write_scenario(
        common.replace('[topology]\nname = "ring"\n', "").replace(
            'name = "dpsgd"', 'name = "fedavg"\nclients_per_round = 8\nlocal_steps = 1'
        ),
        "fedavg.toml",
    )
    assert main(["run", str(dpsgd), "--out", str(tmp_path / "d"), "--no-progress"]) == 0
    assert main(["run", str(fedavg), "--out", str(tmp_path / "f"), "--no-progress"]) == 0
    d = pd.read_csv(tmp_path / "d" / "dec" / "metrics.csv")
    f = pd.read_csv(tmp_path / "f" / "dec" / "metrics.csv")
    assert np.allclose(d["avg_model_loss"], f["test_loss"], rtol=1e-5)
    assert np.allclose(d["test_loss"], f["test_loss"], rtol=1e-5)  # every node holds the average
    assert d["consensus_distance"].max() < 1e-8


def test_bytes_count_every_gossip_step_on_every_edge(write_scenario, tmp_path):
    path = write_scenario(DECENTRALIZED.replace('name = "dfedsam"', 'name = "dfedsam_mgs"\ngossip_steps = 3'))
    assert main(["run", str(path), "--out", str(tmp_path), "--no-progress", "--set", "rounds=1"]) == 0
    df = pd.read_csv(tmp_path / "dec" / "metrics.csv")
    model_bytes = 4 * (60 * 16 + 16 + 16 * 10 + 10)
    assert df["bytes_sent"].iloc[-1] == 3 * (2 * 8) * model_bytes  # 3 steps x 16 directed ring edges


def test_more_gossip_steps_lower_the_consensus_distance(write_scenario, tmp_path):
    out = {}
    for q in (1, 4):
        path = write_scenario(DECENTRALIZED.replace('name = "dfedsam"', f'name = "dfedsam_mgs"\ngossip_steps = {q}'))
        assert main(["run", str(path), "--out", str(tmp_path / str(q)), "--no-progress"]) == 0
        out[q] = pd.read_csv(tmp_path / str(q) / "dec" / "metrics.csv")["consensus_distance"].iloc[-1]
    assert out[4] < out[1]


def test_time_varying_graph_is_redrawn_each_round_and_reproducible(write_scenario, tmp_path):
    text = DECENTRALIZED.replace('name = "ring"', 'name = "random_regular"\ndegree = 3\ntime_varying = true')
    path = write_scenario(text)
    runs = []
    for k in range(2):
        assert main(["run", str(path), "--out", str(tmp_path / str(k)), "--no-progress"]) == 0
        runs.append(pd.read_csv(tmp_path / str(k) / "dec" / "metrics.csv").drop(columns="wall_time"))
    pd.testing.assert_frame_equal(runs[0], runs[1])
    fixed = write_scenario(text.replace("time_varying = true", ""), "fixed.toml")
    assert main(["run", str(fixed), "--out", str(tmp_path / "fixed"), "--no-progress"]) == 0
    other = pd.read_csv(tmp_path / "fixed" / "dec" / "metrics.csv").drop(columns="wall_time")
    assert not other["consensus_distance"].equals(runs[0]["consensus_distance"])


def test_time_varying_needs_a_random_factory(write_scenario, tmp_path, capsys):
    path = write_scenario(DECENTRALIZED.replace('name = "ring"', 'name = "ring"\ntime_varying = true'))
    assert main(["run", str(path), "--out", str(tmp_path), "--no-progress"]) == 2
    assert "topology.time_varying" in capsys.readouterr().err


def test_disconnected_graph_is_a_clear_error(write_scenario, tmp_path, capsys):
    edges = tmp_path / "two_parts.txt"
    edges.write_text("0 1\n1 2\n2 3\n3 0\n4 5\n5 6\n6 7\n7 4\n")
    for algorithm in ("dfedsam", "gossip"):
        text = DECENTRALIZED.replace('name = "ring"', f'name = "from_file"\npath = "{edges}"')
        path = write_scenario(text.replace('name = "dfedsam"\nlr = 0.1\nlocal_steps = 2', f'name = "{algorithm}"'))
        assert main(["run", str(path), "--out", str(tmp_path / "runs"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "topology" in err[0] and "disconnected" in err[0] and str(path) in err[0]


def test_gossip_variance_correction_keeps_weight_variance(write_scenario, tmp_path):
    text = DECENTRALIZED.replace('name = "dfedsam"\nlr = 0.1\nlocal_steps = 2', 'name = "gossip"\nlr = 0.05').replace(
        "rounds = 3", "rounds = 6"
    )
    out = {}
    for merge in ("average", "variance_corrected"):
        path = write_scenario(text + f'\n[sweep]\n"algorithm.merge" = ["{merge}"]\n')
        assert main(["run", str(path), "--out", str(tmp_path), "--no-progress"]) == 0
        df = pd.read_csv(tmp_path / f"dec-merge={merge}" / "metrics.csv")
        out[merge] = df["weight_variance"]
    # plain averaging of independently initialised nodes collapses the variance; VC holds it
    assert out["average"].iloc[-1] < 0.5 * out["average"].iloc[0]
    assert out["variance_corrected"].iloc[-1] > 0.8 * out["variance_corrected"].iloc[0]


@pytest.mark.slow
def test_every_decentralized_method_runs_on_ray_and_matches_inline(ray_session, write_scenario, tmp_path):
    algorithms = ["dpsgd", "dfedavg", "dfedavgm", "dfedsam", "dfedsam_mgs", "gossip"]
    text = DECENTRALIZED.replace('name = "dfedsam"\nlr = 0.1\nlocal_steps = 2', 'name = "dfedsam"\nlr = 0.05')
    path = write_scenario(text + f"\n[sweep]\n\"algorithm.name\" = {json.dumps(algorithms)}\n")
    assert main(["run", str(path), "--out", str(tmp_path / "ray"), "--no-progress", "--executor", "ray"]) == 0
    assert main(["run", str(path), "--out", str(tmp_path / "inline"), "--no-progress", "--executor", "inline"]) == 0
    for name in algorithms:
        ray_df = pd.read_csv(tmp_path / "ray" / f"dec-algorithm={name}" / "metrics.csv").drop(columns="wall_time")
        inline_df = pd.read_csv(tmp_path / "inline" / f"dec-algorithm={name}" / "metrics.csv").drop(columns="wall_time")
        pd.testing.assert_frame_equal(ray_df, inline_df, check_exact=True)
        assert ray_df["test_accuracy"].iloc[-1] > ray_df["test_accuracy"].iloc[0], name
