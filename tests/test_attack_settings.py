"""Attacks and robust rules in every setting: what a merge point's rule receives is checked row by
row against the papers' formulas (ALIE, IPM, sign flipping) on that merge's honest rows; server
rounds, FedBuff and FedCompass buffers, gossip merges, graph neighbourhoods and MoDeST's
aggregators alike. Label flipping acts on the attackers' data only, graph metrics leave attackers'
models out, and a rule that needs more updates than a merge holds is refused before anything
trains."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from fedsim import Aggregator, RunContext, WeightedMean, register_aggregator
from fedsim.adversary import alie_z
from fedsim.cli import main
from fedsim.coordinator import RunOptions
from fedsim.registry import aggregators
from fedsim.scenario import load
from fedsim.training import SGDTrainer
from tests.conftest import SMALL

SEEN: list[dict] = []


@register_aggregator("test_record")
class Record(Aggregator):
    """Records each batch the rule receives (after the engine's attack) with the merge's centre,
    then merges with `inner` (a registered rule with its keys), whose `min_clients` it shares."""

    def __init__(self, inner: str = "fedavg", **keys):
        self.inner = aggregators.get(inner)(**keys)
        self.min_clients = getattr(self.inner, "min_clients", 1)

    def __call__(self, global_params, batch, *, round):
        SEEN.append({"batch": batch, "center": None if batch.relative else dict(global_params)})
        return self.inner(global_params, batch, round=round)


def scenario(algorithm: str, extra: str = "", topology: str | None = None, rounds: int = 3) -> str:
    text = SMALL.replace('name = "fedavg"\nclients_per_round = 4', f'name = "{algorithm}"\n{extra}')
    text = text.replace("rounds = 4", f"rounds = {rounds}")
    text = text.replace("[system]\n", "[system]\ndivergence_factor = 1e300\n")
    if topology:
        text = text.replace("[system]", f"[topology]\n{topology}\n\n[system]")
    return text


SETTINGS = {
    "fedavg": scenario("fedavg", "clients_per_round = 12"),
    "fedbuff": scenario("fedbuff", "round_seconds = 1.0\nlocal_steps = 4\nbuffer_size = 6"),
    "fedcompass": scenario("fedcompass", "round_seconds = 1.0\nq_max = 8\nq_min = 2"),
    "gossip": scenario("gossip", "", 'name = "random_regular"\ndegree = 4'),
    "dpsgd_ring": scenario("dpsgd", "", 'name = "ring"'),
    "dfedavg_ring": scenario("dfedavg", "local_steps = 3", 'name = "ring"'),
    # MoDeST's aggregators merge the sample's models with the scenario's rule (ctx.combine)
    "modest": scenario("modest", "sample_size = 10\nlocal_steps = 3"),
}
ATTACK = '\n[adversary]\nfraction = 0.25\nbehaviour = "{behaviour}"\n{keys}\n'


def run(tmp_path, text: str, name: str) -> tuple[pd.DataFrame, dict]:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    assert main(["run", str(path), "--out", str(tmp_path / name), "--no-progress"]) == 0
    out = tmp_path / name / "small"
    return pd.read_csv(out / "metrics.csv"), json.loads((out / "summary.json").read_text())


def as_deltas(entry: dict) -> torch.Tensor:
    """The batch's floating rows as updates, flattened: w_start - w_end for relative batches
    (as sent), centre - model for models (the merging server's or node's model)."""
    batch = entry["batch"]
    cols = []
    for name, t in batch.params.items():
        if not t.is_floating_point():
            continue
        rows = t if batch.relative else entry["center"][name] - t
        cols.append(rows.reshape(len(t), -1).double())
    return torch.cat(cols, 1)


def attacked_merges(attackers: list[int]) -> list[tuple[dict, torch.Tensor, torch.Tensor]]:
    """The recorded merges holding both attackers and honest senders, with the two masks."""
    found = []
    for entry in SEEN:
        ids = entry["batch"].client_ids
        bad = torch.from_numpy(np.isin(ids.numpy(), attackers))
        if bad.any() and (~bad).any():
            found.append((entry, bad, ~bad))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("behaviour, keys", [("alie", ""), ("ipm", "epsilon = 0.5")])
def test_what_each_merge_receives_is_the_attack_on_its_honest_rows(setting, behaviour, keys, tmp_path):
    """Every merge that holds attackers and honest senders: the attackers' rows are exactly the
    paper's formula on that merge's honest rows, as updates (ALIE: mu - z sigma, z = z_max(n, f),
    population std; IPM: -epsilon mu); the honest rows of graph merges include the merging node."""
    SEEN.clear()
    text = SETTINGS[setting] + '\n[aggregator]\nname = "test_record"\n' + ATTACK.format(behaviour=behaviour, keys=keys)
    _, summary = run(tmp_path, text, "attacked")
    attackers = summary["attackers"]
    assert len(attackers) == 3  # round(0.25 * 12), marked in summary.json
    merges = attacked_merges(attackers)
    assert len(merges) >= 2, f"{setting}: no merge held both attackers and honest clients"
    for entry, bad, honest in merges:
        d = as_deltas(entry)
        if behaviour == "alie":
            mu, sigma = d[honest].mean(0), d[honest].std(0, correction=0)
            expected = mu - alie_z(len(d), int(bad.sum())) * sigma
        else:
            expected = -0.5 * d[honest].mean(0)
        assert torch.allclose(d[bad], expected.expand_as(d[bad]), atol=1e-5), setting


@pytest.mark.slow
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_sign_flipping_sends_the_negated_own_update(setting, tmp_path):
    """The first merge holding an attacker sees the same inputs with and without the attack
    (nothing attacked has been merged yet): attackers' rows are the negation of what they would
    have sent, honest rows are untouched."""
    base = SETTINGS[setting] + '\n[aggregator]\nname = "test_record"\n'
    SEEN.clear()
    _, summary = run(tmp_path, base + ATTACK.format(behaviour="sign_flip", keys=""), "flipped")
    attacked = list(SEEN)
    SEEN.clear()
    run(tmp_path, base, "clean")
    clean = list(SEEN)
    attackers = summary["attackers"]
    k = next(i for i, e in enumerate(attacked) if np.isin(e["batch"].client_ids.numpy(), attackers).any())
    assert torch.equal(attacked[k]["batch"].client_ids, clean[k]["batch"].client_ids)
    bad = torch.from_numpy(np.isin(attacked[k]["batch"].client_ids.numpy(), attackers))
    flipped, honest = as_deltas(attacked[k]), as_deltas(clean[k])
    assert torch.allclose(flipped[~bad], honest[~bad], atol=1e-6)
    assert torch.allclose(flipped[bad], -honest[bad], atol=1e-5)
    assert float(honest[bad].abs().max()) > 0 or setting.endswith("ring")  # a node's own row is zero


def test_label_flipping_flips_the_attackers_labels_only(write_scenario):
    path = write_scenario(SMALL + '\n[adversary]\nfraction = 0.25\nbehaviour = "label_flip"\n')
    ctx = RunContext(load(path)[0], RunOptions(executor="inline"))
    worker = ctx.executor(SGDTrainer(lr=0.1, batch_size=16)).inner.worker
    assert len(ctx.attackers) == 3
    for client in range(ctx.data.num_clients):
        _, y = ctx.data.client(client)
        _, trained_on = worker.client_data(client)
        if client in ctx.attackers:
            assert np.array_equal(trained_on, ctx.data.num_classes - 1 - y)
        else:
            assert np.array_equal(trained_on, y)
    ctx.close()


@pytest.mark.slow
def test_graph_metrics_are_the_honest_nodes_on_the_clean_test_set(tmp_path):
    """With attackers among the nodes, accuracy is averaged over honest nodes only, measured on
    the test set (never the attackers' flipped labels): equal to evaluating those nodes by hand."""
    from fedsim import NodeEvaluator

    text = SETTINGS["dpsgd_ring"] + '\n[adversary]\nfraction = 0.25\nbehaviour = "label_flip"\n'
    path = tmp_path / "s.toml"
    path.write_text(text)
    ctx = RunContext(load(path)[0], RunOptions(executor="inline"))
    evaluator = NodeEvaluator(ctx, 16)
    assert sorted(set(evaluator.rows) | set(ctx.attackers.tolist())) == list(range(12))
    assert not set(evaluator.rows) & set(ctx.attackers.tolist())
    g = torch.Generator().manual_seed(0)
    X = {k: v[None].repeat(12, *([1] * v.dim())) + 0.1 * torch.randn(12, *v.shape, generator=g)
         for k, v in ctx.init_params.items()}
    out = evaluator(X)
    by_hand = [ctx.evaluate({k: v[i] for k, v in X.items()})[0] for i in evaluator.rows]
    assert out["test_accuracy"] == pytest.approx(float(np.mean(by_hand)))
    ctx.close()


# ------------------------------------------------------------------------------------------------
# Robust rules change the outcome in every setting

RULES = {
    "median": 'name = "median"', "trimmed_mean": 'name = "trimmed_mean"\nf = 1', "krum": 'name = "krum"\nf = 1',
    "multi_krum": 'name = "multi_krum"\nf = 1', "bulyan": 'name = "bulyan"\nf = 1',
    "geometric_median": 'name = "geometric_median"', "centered_clipping": 'name = "centered_clipping"\ntau = 0.5',
    "norm_bounding": 'name = "norm_bounding"\nmax_norm = 0.5',
}
# every merge holds at least 7 updates (Bulyan with f = 1), at most one of them an attacker's
OUTCOME = {
    "fedavg": scenario("fedavg", "clients_per_round = 8", rounds=4),
    "fedbuff": scenario("fedbuff", "round_seconds = 1.0\nlocal_steps = 4\nbuffer_size = 7", rounds=4),
    "fedcompass": scenario("fedcompass", "round_seconds = 1.0\nq_max = 8\nq_min = 2", rounds=4),
    "gossip": scenario("gossip", "", 'name = "random_regular"\ndegree = 7', rounds=4),
    "dfedavg": scenario("dfedavg", "local_steps = 3", 'name = "random_regular"\ndegree = 6', rounds=4),
    "modest": scenario("modest", "sample_size = 8\nlocal_steps = 4", rounds=4),
}
BOOST = '\n[adversary]\nfraction = 0.1\nbehaviour = "scale"\nscale = -100.0\n'


@pytest.mark.slow
@pytest.mark.parametrize("setting", sorted(OUTCOME))
def test_every_robust_rule_resists_an_attack_that_wrecks_the_mean(setting, tmp_path):
    """One attacker sending -100 times its update: the default merge ends far from the clean
    run, every robust rule ends near its own clean run (the trimmed mean's O(f/n) bias, one honest
    extreme kept on the attacker's side, costs it most)."""
    final = lambda df: float(df["test_loss"].iloc[-1])  # noqa: E731
    clean, _ = run(tmp_path, OUTCOME[setting], "clean")
    wrecked, summary = run(tmp_path, OUTCOME[setting] + BOOST, "mean")
    assert len(summary["attackers"]) == 1
    assert final(wrecked) > final(clean) + 1.0, (final(clean), final(wrecked))
    for rule, keys in RULES.items():
        with_rule = OUTCOME[setting] + f"\n[aggregator]\n{keys}\n"
        robust_clean, _ = run(tmp_path, with_rule, f"{rule}_clean")
        robust, _ = run(tmp_path, with_rule + BOOST, rule)
        assert final(robust) < 2 * final(robust_clean), (setting, rule, final(robust_clean), final(robust))
        assert final(robust) < final(wrecked) - 0.7, (setting, rule, final(robust), final(wrecked))


@pytest.mark.slow
def test_fedcompass_holds_updates_until_the_rule_has_enough(tmp_path):
    """Krum with f = 1 needs five updates: FedCompass's lone first arrivals and small groups wait
    in its general buffer, so every merge the rule sees holds at least five distinct senders,
    where the default merge applies lone arrivals."""
    SEEN.clear()
    run(tmp_path, SETTINGS["fedcompass"] + '\n[aggregator]\nname = "test_record"\ninner = "krum"\nf = 1\n', "krum")
    sizes = [len(e["batch"]) for e in SEEN]
    assert SEEN and min(sizes) >= 5, sizes
    assert all(len(set(e["batch"].client_ids.tolist())) == len(e["batch"]) for e in SEEN)
    SEEN.clear()
    run(tmp_path, SETTINGS["fedcompass"] + '\n[aggregator]\nname = "test_record"\ninner = "fedavg"\n', "mean")
    assert min(len(e["batch"]) for e in SEEN) >= 2  # a scenario rule never sees a lone update


@pytest.mark.slow
def test_gossip_gives_each_sender_one_vote_under_a_rule(tmp_path):
    """Fast neighbours push twice before some merges (buffers of 12 and 13 from 7 neighbours here):
    a scenario rule still sees each sender once, its latest model, so that a Byzantine sender
    cannot hold two of the f votes a rule tolerates."""
    SEEN.clear()
    run(tmp_path, OUTCOME["gossip"] + '\n[aggregator]\nname = "test_record"\n', "gossip")
    assert len(SEEN) > 10
    for entry in SEEN:
        ids = entry["batch"].client_ids.tolist()
        assert len(set(ids)) == len(ids) and ids == sorted(ids), ids
    assert max(len(e["batch"]) for e in SEEN) <= 7
