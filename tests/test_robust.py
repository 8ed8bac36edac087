"""Byzantine-robust rules: hand computations, breakdown points, Krum finding the planted honest
update, translation equivariance, conformance, and how bad settings are reported."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from fedsim import UpdateBatch
from fedsim.algorithms.fedavg import WeightedMean
from fedsim.algorithms.robust import (
    Bulyan,
    CenteredClipping,
    CoordinateMedian,
    GeometricMedian,
    Krum,
    MultiKrum,
    NormBounding,
    TrimmedMean,
)
from fedsim.cli import main
from fedsim.registry import aggregators
from fedsim.testing import check_aggregator
from tests.conftest import SMALL


def batch_of(rows, num_examples=None, ids=None, name="w", relative=False, coefficients=None) -> UpdateBatch:
    t = torch.as_tensor(rows, dtype=torch.float32)
    if t.dim() == 1:
        t = t[:, None]
    n = t.shape[0]
    return UpdateBatch(
        params={name: t},
        num_examples=torch.as_tensor(num_examples if num_examples is not None else [1] * n),
        client_ids=torch.as_tensor(ids if ids is not None else list(range(n))),
        staleness=torch.zeros(n, dtype=torch.int64),
        relative=relative,
        coefficients=None if coefficients is None else torch.as_tensor(coefficients, dtype=torch.float64),
    )


def zeros(d=1):
    return {"w": torch.zeros(d)}


ALL_RULES = {
    "median": CoordinateMedian(),
    "trimmed_mean": TrimmedMean(f=1),
    "krum": Krum(f=1),
    "multi_krum": MultiKrum(f=1),
    "bulyan": Bulyan(f=1),
    "geometric_median": GeometricMedian(),
    "centered_clipping": CenteredClipping(),
    "norm_bounding": NormBounding(),
}


@pytest.mark.parametrize("name", sorted(ALL_RULES))
def test_rules_are_registered_and_pass_conformance(name):
    assert isinstance(ALL_RULES[name], aggregators.get(name))
    check_aggregator(ALL_RULES[name])


@pytest.mark.parametrize("rule", [TrimmedMean(trim=0.2), Bulyan(f=2), Krum(f=2, m=3), MultiKrum(f=2, m=4),
                                  CenteredClipping(tau=100.0, iterations=3), NormBounding(max_norm=100.0)], ids=repr)
def test_rules_with_other_settings_pass_conformance(rule):
    check_aggregator(rule)


def test_median_hand_computation():
    # column 0 sorted [1, 2, 3, 100] -> (2 + 3) / 2; column 1 sorted [-5, 0, 1, 10] -> (0 + 1) / 2
    out = CoordinateMedian()(zeros(2), batch_of([[1, 10], [2, -5], [100, 0], [3, 1]]), round=1)
    assert torch.equal(out["w"], torch.tensor([2.5, 0.5]))
    out = CoordinateMedian()(zeros(), batch_of([7, -3, 1000, 2, 5]), round=1)  # odd: the middle value
    assert torch.equal(out["w"], torch.tensor([5.0]))


def test_trimmed_mean_hand_computation():
    batch = batch_of([[100, -1], [1, 0], [2, 50], [3, 1], [4, -90]])
    # f = 1 drops one value from each end of every column: [2, 3, 4] -> 3 and [-1, 0, 1] -> 0
    assert torch.equal(TrimmedMean(f=1)(zeros(2), batch, round=1)["w"], torch.tensor([3.0, 0.0]))
    # trim = 0.2 of 5 clients is the same single value per side
    assert torch.equal(TrimmedMean(trim=0.2)(zeros(2), batch, round=1)["w"], torch.tensor([3.0, 0.0]))
    # f = 0 is the plain mean: (100 + 1 + 2 + 3 + 4) / 5 = 22
    assert TrimmedMean(f=0)(zeros(2), batch, round=1)["w"][0].item() == pytest.approx(22.0)


# Five points in the plane, f = 1, so each score sums the n - f - 2 = 2 smallest squared distances:
#   x0 = (0, 0): 1 (x1) + 4 (x2) = 5       x1 = (1, 0): 1 (x0) + 5 (x2) = 6
#   x2 = (0, 2): 4 (x0) + 5 (x1) = 9       x3 = (3, 3): 10 (x2) + 13 (x1) = 23
#   x4 = (10, 10): 98 (x3) + 164 (x2) = 262
KRUM_POINTS = [[0, 0], [1, 0], [0, 2], [3, 3], [10, 10]]


def test_krum_and_multi_krum_hand_computation():
    batch = batch_of(KRUM_POINTS)
    assert torch.equal(Krum(f=1)(zeros(2), batch, round=1)["w"], torch.tensor([0.0, 0.0]))
    # m = 3: mean of x0, x1, x2 = (1/3, 2/3)
    assert torch.allclose(Krum(f=1, m=3)(zeros(2), batch, round=1)["w"], torch.tensor([1 / 3, 2 / 3]))
    # multi-Krum's default m = n - f = 4: mean of x0..x3 = (4/4, 5/4)
    assert torch.allclose(MultiKrum(f=1)(zeros(2), batch, round=1)["w"], torch.tensor([1.0, 1.25]))
    # the choice follows the points, not their position in the batch
    order = [3, 4, 0, 2, 1]
    shuffled = batch_of([KRUM_POINTS[i] for i in order], ids=order)
    assert torch.equal(Krum(f=1)(zeros(2), shuffled, round=1)["w"], torch.tensor([0.0, 0.0]))


def test_krum_picks_the_planted_honest_update():
    """Ten clients, three colluding attackers that send the same far-away point, six honest clients
    at centre +- 0.3 e_j (j = 1..3) and the planted honest update at the centre itself. With f = 3
    each score sums 5 squared distances: the centre's are all 0.09 (0.45); an axis point has 0.09 to
    the centre and 0.18 to the orthogonal ones (0.81); an attacker pays two zeros and three ~1500s.
    Krum must return the centre exactly, while the mean is dragged away."""
    centre = torch.tensor([1.0, -2.0, 0.5, 3.0])
    axes = 0.3 * torch.eye(4)[:3]
    honest = torch.cat([centre + axes, centre - axes])
    attackers = torch.full((3, 4), 40.0)
    rows = torch.cat([attackers[:2], honest[:3], centre[None], attackers[2:], honest[3:]])
    batch = batch_of(rows)
    out = Krum(f=3)({"w": torch.zeros(4)}, batch, round=1)["w"]
    assert torch.equal(out, centre)
    assert (WeightedMean()({"w": torch.zeros(4)}, batch, round=1)["w"] - centre).norm() > 10


def test_bulyan_hand_computation():
    """x = [0, 1.5, 3, 5.5, 10, 15, 100] (ids 0..6), f = 1: theta = 5 selections, beta = 3.
    Each Krum step scores over the remaining set R with max(|R| - f - 2, 1) neighbours:
      |R| = 7, 4 neighbours: 3 scores 2.25+6.25+9+49 = 66.5 (5.5: 72.75, 1.5: 92.75)  -> pick 3
      |R| = 6, 3 neighbours: 5.5 scores 16+20.25+30.25 = 66.5 (1.5: 90.5, 10: 117.5) -> pick 5.5
      |R| = 5, 2 neighbours: 1.5 scores 2.25+72.25 = 74.5 (10: 97.25, 0: 102.25)      -> pick 1.5
      |R| = 4, 1 neighbour:  10 and 15 both 25; the smaller id (4) wins              -> pick 10
      |R| = 3, 1 neighbour:  0 and 15 both 225 (each other); id 0 wins                -> pick 0
    Selected {0, 1.5, 3, 5.5, 10}, median 3, distances 3, 1.5, 0, 2.5, 7: mean of 3, 1.5 and 5.5."""
    x = [0, 1.5, 3, 5.5, 10, 15, 100]
    assert Bulyan(f=1).selection(batch_of(x)) == [2, 3, 1, 4, 0]
    out = Bulyan(f=1)(zeros(), batch_of(x), round=1)["w"]
    assert out.item() == pytest.approx((3 + 1.5 + 5.5) / 3)
    with pytest.raises(ValueError, match=r"bulyan: f=1 needs at least 7 updates per aggregation, got 6"):
        Bulyan(f=1)(zeros(), batch_of(x[:6]), round=1)


def test_krum_distances_survive_a_large_common_offset():
    """Models sit far from the origin and differ little; distances are computed on centred values,
    so the offset cannot swamp the differences."""
    far = torch.tensor(KRUM_POINTS, dtype=torch.float64) + 1e12
    batch = batch_of(far, ids=[4, 3, 2, 1, 0])  # x0 has the largest id: a tie would not pick it
    batch.params["w"] = far
    out = Krum(f=1)({"w": torch.zeros(2, dtype=torch.float64)}, batch, round=1)["w"]
    assert torch.equal(out, far[0])


def test_geometric_median_hand_computation():
    rule = GeometricMedian()
    # in one dimension the geometric median is the (weighted) median
    assert rule(zeros(), batch_of([0, 1, 10]), round=1)["w"].item() == pytest.approx(1.0, abs=1e-4)
    assert rule(zeros(), batch_of([0, 1, 10], num_examples=[1, 1, 3]), round=1)["w"].item() == pytest.approx(10.0, abs=1e-4)
    # a square's corners and its centre: the centre, whatever the outlier weight on one corner
    square = [[1, 1], [1, -1], [-1, 1], [-1, -1], [0, 0]]
    assert torch.allclose(rule(zeros(2), batch_of(square), round=1)["w"], torch.zeros(2), atol=1e-4)


def test_centered_clipping_hand_computation():
    # reference (0, 0); diffs (3, 4) (norm 5), (0, 1), (0, 0); tau = 2:
    # v1 = [(3, 4) * 2/5 + (0, 1)] / 3 = (1.2, 2.6) / 3
    batch = batch_of([[3, 4], [0, 1], [0, 0]])
    out = CenteredClipping(tau=2.0)(zeros(2), batch, round=1)["w"]
    assert torch.allclose(out, torch.tensor([0.4, 2.6 / 3]))
    # a second iteration from v1: (2.6, 3.1333) has norm 4.0716 and is scaled by 2/4.0716; the other
    # two diffs (-0.4, 0.1333), (-0.4, -0.8667) are shorter than tau: v2 = v1 + sum / 3
    out2 = CenteredClipping(tau=2.0, iterations=2)(zeros(2), batch, round=1)["w"]
    assert torch.allclose(out2, torch.tensor([0.559048, 1.135263]), atol=1e-5)
    # updates are clipped around zero, whatever the global model, and scaled by the total weight
    updates = batch_of([[3, 4], [0, 1], [0, 0]], relative=True, coefficients=[0.25, 0.25, 0.25])
    out = CenteredClipping(tau=2.0)({"w": torch.tensor([10.0, 0.0])}, updates, round=1)["w"]
    assert torch.allclose(out, 0.75 * torch.tensor([0.4, 2.6 / 3]))
    # models are clipped around the global model: shifting everything shifts the result
    shifted = batch_of([[13, 4], [10, 1], [10, 0]])
    assert torch.allclose(CenteredClipping(tau=2.0)({"w": torch.tensor([10.0, 0.0])}, shifted, round=1)["w"],
                          torch.tensor([10.4, 2.6 / 3]))


def test_norm_bounding_hand_computation():
    # global (1, 1); deltas (3, 4) (norm 5 -> scaled to norm 2: (1.2, 1.6)) and (0, 1), weights 1 : 3
    batch = batch_of([[4, 5], [1, 2]], num_examples=[1, 3])
    out = NormBounding(max_norm=2.0)({"w": torch.tensor([1.0, 1.0])}, batch, round=1)["w"]
    assert torch.allclose(out, torch.tensor([1.0 + 0.3, 1.0 + 1.15]))
    # updates are clipped around zero, combined with the merge point's coefficients (FedBuff's
    # server lr and staleness discount): 0.1 * (1.2, 1.6) + 0.3 * (0, 1)
    deltas = batch_of([[3, 4], [0, 1]], relative=True, coefficients=[0.1, 0.3])
    out = NormBounding(max_norm=2.0)({"w": torch.tensor([1.0, 1.0])}, deltas, round=1)["w"]
    assert torch.allclose(out, torch.tensor([0.12, 0.16 + 0.3]))


def _corrupted(num_honest: int, num_bad: int, value: float = 1e6):
    g = torch.Generator().manual_seed(1)
    honest = torch.rand(num_honest, 6, generator=g)  # every coordinate in [0, 1)
    bad = torch.full((num_bad, 6), value)
    return honest, batch_of(torch.cat([bad, honest]))


def test_median_breakdown_point_is_one_half_and_the_mean_has_none():
    honest, batch = _corrupted(5, 4)  # 4 of 9 corrupted: under half
    out = CoordinateMedian()({"w": torch.zeros(6)}, batch, round=1)["w"]
    assert (out >= honest.min(0).values).all() and (out <= honest.max(0).values).all()
    _, majority = _corrupted(4, 5)  # 5 of 9: the attackers own the median
    assert (CoordinateMedian()({"w": torch.zeros(6)}, majority, round=1)["w"] == 1e6).all()
    _, one = _corrupted(8, 1)  # the mean breaks with a single attacker
    assert (WeightedMean()({"w": torch.zeros(6)}, one, round=1)["w"] > 1e5).all()


@pytest.mark.parametrize("rule, num_bad", [
    (TrimmedMean(f=2), 2), (Krum(f=2), 2), (MultiKrum(f=2), 2), (Bulyan(f=2), 2), (GeometricMedian(), 4),
])
def test_robust_rules_stay_within_the_honest_values(rule, num_bad):
    honest, batch = _corrupted(11 - num_bad, num_bad)
    out = rule({"w": torch.zeros(6)}, batch, round=1)["w"]
    if isinstance(rule, GeometricMedian):  # not coordinate-wise: near the honest points instead,
        assert (out - honest.mean(0)).norm() < 1.0  # and where the attackers sit does not matter
        _, nearer = _corrupted(11 - num_bad, num_bad, value=1e3)
        assert torch.allclose(rule({"w": torch.zeros(6)}, nearer, round=1)["w"], out, atol=1e-3)
    else:
        assert (out >= honest.min(0).values - 1e-6).all() and (out <= honest.max(0).values + 1e-6).all()


@pytest.mark.parametrize("rule, num_bad", [(CenteredClipping(tau=1.0), 3), (NormBounding(max_norm=1.0), 3)])
def test_clipping_rules_bound_what_attackers_move(rule, num_bad):
    """9 clients, 3 sending 1e6: each can pull the result at most tau (or max_norm) times its weight."""
    _, batch = _corrupted(9 - num_bad, num_bad)
    out = rule({"w": torch.zeros(6)}, batch, round=1)["w"]
    assert out.norm() <= 1.0 + 1e-5


@pytest.mark.parametrize("name", sorted(ALL_RULES))
def test_rules_are_translation_equivariant(name):
    """rule(x + c, g + c) = rule(x, g) + c: the same step whether clients send models or deltas
    (the clipping rules clip models around the global model, which moves too)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 5, generator=g)
    glob = torch.randn(5, generator=g)
    c = torch.randn(5, generator=g) * 50
    rule = ALL_RULES[name]
    a = rule({"w": glob}, batch_of(x), round=1)["w"]
    b = rule({"w": glob + c}, batch_of(x + c), round=1)["w"]
    assert torch.allclose(b, a + c, atol=1e-3)


@pytest.mark.parametrize("name", sorted(ALL_RULES))
def test_on_updates_rules_keep_the_methods_step(name):
    """FedBuff-style coefficients (server lr x staleness discount, summing to 0.6): a rule returns
    0.6 times its estimate, as the default weighted sum returns sum_i w_i Delta_i. Where every
    client sends the same update, that is 0.6 times the update."""
    same = torch.tensor([[0.5, -1.0]] * 7)
    out = ALL_RULES[name](zeros(2), batch_of(same, relative=True, coefficients=[0.6 / 7] * 7), round=1)["w"]
    assert torch.allclose(out, 0.6 * same[0], atol=1e-6)
    median = CoordinateMedian()(zeros(2), batch_of([[1.0, 2.0], [3.0, -4.0], [100.0, 0.0]], relative=True,
                                                   coefficients=[0.2, 0.2, 0.2]), round=1)["w"]
    assert torch.allclose(median, 0.6 * torch.tensor([3.0, 0.0]))


def test_cohorts_too_small_for_f_are_named():
    with pytest.raises(ValueError, match=r"krum: f=2, m=1 needs at least 7 updates per aggregation, got 5"):
        Krum(f=2)(zeros(2), batch_of(KRUM_POINTS), round=1)
    with pytest.raises(ValueError, match=r"trimmed_mean: f=3 needs at least 7 updates"):
        TrimmedMean(f=3)(zeros(2), batch_of(KRUM_POINTS), round=1)
    assert Krum(f=2).min_clients == 7 and Bulyan(f=2).min_clients == 11 and TrimmedMean(f=3).min_clients == 7


def test_integer_buffers_keep_their_dtype():
    batch = UpdateBatch(
        params={"w": torch.randn(7, 3), "count": torch.tensor([5, 3, 9, 4, 4, 8, 1])},
        num_examples=torch.ones(7, dtype=torch.int64), client_ids=torch.arange(7),
        staleness=torch.zeros(7, dtype=torch.int64),
    )
    for name, rule in ALL_RULES.items():
        out = rule({"w": torch.zeros(3), "count": torch.tensor(0)}, batch, round=1)
        assert out["count"].dtype == torch.int64, name
        if name in ("krum", "multi_krum", "bulyan"):  # the lower median of the selected clients
            assert out["count"].item() in batch.params["count"].tolist(), name
        else:  # the lower median of all: sorted 1 3 4 4 5 8 9
            assert out["count"].item() == 4, name


def test_bad_settings_are_one_line_at_validate(capsys, write_scenario):
    path = write_scenario(SMALL + '\n[aggregator]\nname = "krum"\nf = -1\n')
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "aggregator.f" in err and ">= 0" in err
    path = write_scenario(SMALL + '\n[aggregator]\nname = "trimmed_mean"\ntrim = 0.5\n')
    assert main(["validate", str(path)]) == 2
    assert "aggregator.trim" in capsys.readouterr().err


@pytest.mark.slow
def test_a_robust_rule_runs_as_the_server_rule(write_scenario, tmp_path):
    """FedAvg with Krum (f = 1, so 5 clients per round) learns, and its curve is not FedAvg's."""
    curves = {}
    for rule in ["fedavg", "krum"]:
        path = write_scenario(SMALL + f'\n[aggregator]\nname = "{rule}"\n', name=f"{rule}.toml")
        out = tmp_path / rule
        assert main(["run", str(path), "--out", str(out), "--no-progress", "--set", "algorithm.clients_per_round=5"]) == 0
        curves[rule] = pd.read_csv(out / "small" / "metrics.csv")
    assert curves["krum"]["test_loss"].iloc[-1] < curves["krum"]["test_loss"].iloc[0]
    assert not curves["krum"]["test_loss"].equals(curves["fedavg"]["test_loss"])


@pytest.mark.slow
@pytest.mark.parametrize("algorithm, rule", [
    ('name = "fedbuff"\nbuffer_size = 4\nlocal_steps = 3\nround_seconds = 1.0', 'name = "geometric_median"'),
    ('name = "dpsgd"', 'name = "trimmed_mean"\nf = 1'),
])
def test_robust_rules_merge_in_buffers_and_neighbourhoods(write_scenario, tmp_path, algorithm, rule):
    """The same rules run inside FedBuff's buffer (on updates) and as a ring's neighbourhood merge
    (three models each: f = 1 trims to the middle one); the curve is not the default rule's."""
    text = SMALL.replace('name = "fedavg"\nclients_per_round = 4', algorithm)
    if "dpsgd" in algorithm:
        text += '\n[topology]\nname = "ring"\n'
    curves = {}
    for label, extra in [("default", ""), ("robust", f"\n[aggregator]\n{rule}\n")]:
        path = write_scenario(text + extra, name=f"{label}.toml")
        assert main(["run", str(path), "--out", str(tmp_path / label), "--no-progress"]) == 0
        curves[label] = pd.read_csv(tmp_path / label / "small" / "metrics.csv")
    assert curves["robust"]["test_loss"].iloc[-1] < curves["robust"]["test_loss"].iloc[0]
    assert not curves["robust"]["test_loss"].equals(curves["default"]["test_loss"])


@pytest.mark.parametrize("command", ["validate", "run"])
def test_krum_on_a_ring_names_the_node_it_cannot_serve(write_scenario, tmp_path, capsys, command):
    """A ring node merges three models; Krum with f = 1 needs five. Refused before anything
    trains, by validate and run alike: one line naming the rule, its f, the node and the counts."""
    text = SMALL.replace('name = "fedavg"\nclients_per_round = 4', 'name = "dpsgd"')
    path = write_scenario(text + '\n[topology]\nname = "ring"\n\n[aggregator]\nname = "krum"\nf = 1\n')
    args = [command, str(path)] + (["--out", str(tmp_path / "o"), "--no-progress"] if command == "run" else [])
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "krum with f = 1 needs at least 5 models per merge, but node 0 has 2 neighbours, so its merge holds 3" in err[0]
    assert "aggregator" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "o" / "small" / "metrics.csv").exists()


@pytest.mark.parametrize("algorithm, rule, expected", [
    ('name = "fedavg"\nclients_per_round = 4', 'name = "krum"\nf = 1',
     "algorithm.clients_per_round: krum with f = 1 needs at least 5 updates per merge, but algorithm.clients_per_round = 4 gives 4"),
    ('name = "fedbuff"\nbuffer_size = 6', 'name = "bulyan"\nf = 1',
     "algorithm.buffer_size: bulyan with f = 1 needs at least 7 updates per merge, but algorithm.buffer_size = 6 gives 6"),
    ('name = "fedasync"', 'name = "trimmed_mean"\nf = 1',
     "trimmed_mean with f = 1 needs at least 3 updates per merge, but fedasync merges each update alone"),
    ('name = "gossip"', 'name = "multi_krum"\nf = 1', "node 0 has 2 neighbours, so its merge holds 2 (the models it waits for"),
])
def test_merges_too_small_for_the_rule_are_refused_at_validate(write_scenario, capsys, algorithm, rule, expected):
    text = SMALL.replace('name = "fedavg"\nclients_per_round = 4', algorithm)
    if "gossip" in algorithm:
        text += '\n[topology]\nname = "ring"\n'
    path = write_scenario(text + f"\n[aggregator]\n{rule}\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_rules_that_fit_the_merge_are_accepted(write_scenario, capsys):
    text = SMALL.replace('name = "fedavg"\nclients_per_round = 4', 'name = "dpsgd"')
    path = write_scenario(text + '\n[topology]\nname = "random_regular"\ndegree = 4\n\n[aggregator]\nname = "krum"\nf = 1\n')
    assert main(["validate", str(path)]) == 0
    path = write_scenario(SMALL + '\n[aggregator]\nname = "median"\n')  # no f: any cohort
    assert main(["validate", str(path)]) == 0
