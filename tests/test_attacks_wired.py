"""Attacks from a scenario's [adversary] table reach every merge point, and robust rules resist
them where the mean does not (server, event-driven and graph settings)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from fedsim.cli import main
from tests.conftest import SMALL
from tests.spy_rule import CALLS, METHODS  # noqa: F401  (registers the spy rule)

ATTACK = '\n[adversary]\nfraction = 0.25\nbehaviour = "{behaviour}"\nscale = {scale}\n'
SCALE = {"fedavg": -4.0, "fedbuff": -1.5, "dpsgd": -4.0}


def run(tmp_path, text, name):
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    assert main(["run", str(path), "--out", str(tmp_path / name), "--no-progress"]) == 0
    out = tmp_path / name / "small"
    return pd.read_csv(out / "metrics.csv"), json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("method", ["fedavg"])
def test_an_attack_hurts_the_mean_and_a_robust_rule_resists_it(method, tmp_path):
    # a wrecked model is the point here, not a divergence stop
    base = METHODS[method].replace("rounds = 4", "rounds = 2" if method == "fedbuff" else "rounds = 6").replace("[system]\n", "[system]\ndivergence_factor = 1e9\n")
    if method == "fedavg":
        base = base.replace("clients_per_round = 4", "clients_per_round = 12")
    clean, _ = run(tmp_path, base, "clean")
    attacked, summary = run(tmp_path, base + ATTACK.format(behaviour="scale", scale=SCALE[method]), "attacked")
    assert len(summary["attackers"]) == 3
    median = base + '\n[aggregator]\nname = "median"\n'
    robust_clean, _ = run(tmp_path, median, "robust_clean")
    robust, _ = run(tmp_path, median + ATTACK.format(behaviour="scale", scale=SCALE[method]), "robust")
    final = lambda df: df["test_accuracy"].iloc[-1]  # noqa: E731
    hurt_mean = final(clean) - final(attacked)
    hurt_median = final(robust_clean) - final(robust)
    assert hurt_mean > 0.05, (final(clean), final(attacked))
    assert hurt_median < hurt_mean - 0.03, (hurt_median, hurt_mean)


def test_label_flipping_changes_what_attackers_train_on(tmp_path):
    clean, _ = run(tmp_path, SMALL, "clean")
    flipped, summary = run(tmp_path, SMALL + '\n[adversary]\nfraction = 0.5\nbehaviour = "label_flip"\n', "flip")
    assert len(summary["attackers"]) == 6
    assert not clean["train_loss"].iloc[1:].equals(flipped["train_loss"].iloc[1:])


def test_a_malformed_adversary_is_one_line(tmp_path, capsys):
    path = tmp_path / "a.toml"
    path.write_text(SMALL + '\n[adversary]\nfraction = 0.2\nbehaviour = "teleport"\n')
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "adversary.behaviour" in err[0]
