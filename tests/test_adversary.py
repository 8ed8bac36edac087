"""Attacks: ALIE and IPM against their papers' formulas on fixed honest updates, the simple attacks
by hand, attackers drawn from the seed, and the config's validation."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
import torch

from fedsim.adversary import AdversaryConfig, alie_z, attacker_mask, choose_attackers, corrupt, flip_labels
from fedsim.seeding import generator

# Three honest updates (w_start - w_end) and two attackers (rows 1 and 3) whose own updates are (7, 7) and (-1, 0).
HONEST = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 4.0]])
ROWS = torch.stack([HONEST[0], torch.tensor([7.0, 7.0]), HONEST[1], torch.tensor([-1.0, 0.0]), HONEST[2]])
BAD = torch.tensor([False, True, False, True, False])
REF = torch.tensor([10.0, -20.0])


def attack(behaviour, reference=None, honest=None, **keys):
    """Rows are the updates Delta = w_start - w_end above, or, given a reference, the models
    reference - Delta; returns the attackers' rows as updates."""
    cfg = AdversaryConfig(fraction=0.4, behaviour=behaviour, **keys)
    rows = ROWS if reference is None else reference - ROWS
    ref = {"w": reference} if reference is not None else None
    out = corrupt({"w": rows}, BAD, ~BAD if honest is None else honest, ref, cfg, np.random.default_rng(0))
    assert torch.equal(out["w"][~BAD], rows[~BAD]), "honest rows must come back unchanged"
    return out["w"][BAD] if reference is None else reference - out["w"][BAD]


def test_alie_z_is_baruch_et_al_z_max():
    # n = 5, f = 2: s = floor(3.5) - 2 = 1, Phi^-1((5 - 1) / 5) = Phi^-1(0.8) = 0.841621
    assert alie_z(5, 2) == pytest.approx(0.841621, abs=1e-6)
    # n = 50, f = 12 (the paper's MNIST setting): s = 26 - 12 = 14, Phi^-1(36 / 50) = 0.582842
    assert alie_z(50, 12) == pytest.approx(0.582842, abs=1e-6)


@pytest.mark.parametrize("reference", [None, REF], ids=["deltas", "models"])
def test_alie_sends_mean_minus_z_std_of_the_honest_updates(reference):
    # honest mean (3, 4); population std sqrt(8/3) = 1.632993 in both coordinates; z = 0.841621
    expected = torch.tensor([3.0, 4.0]) - 0.841621 * 1.632993
    out = attack("alie", reference)
    assert torch.allclose(out, expected.expand(2, 2), atol=1e-5)
    assert torch.allclose(attack("alie", reference, z=1.5), (torch.tensor([3.0, 4.0]) - 1.5 * 1.632993).expand(2, 2), atol=1e-5)


@pytest.mark.parametrize("reference", [None, REF], ids=["deltas", "models"])
def test_ipm_sends_minus_epsilon_times_the_honest_mean(reference):
    assert torch.allclose(attack("ipm", reference, epsilon=0.5), torch.tensor([[-1.5, -2.0]] * 2))
    assert torch.allclose(attack("ipm", reference), torch.tensor([[-0.3, -0.4]] * 2))  # default 0.1


def test_non_omniscient_attackers_use_their_own_updates():
    # honest = the attackers themselves: mean of (7, 7), (-1, 0) = (3, 3.5); IPM eps 1 -> (-3, -3.5)
    out = attack("ipm", honest=BAD, epsilon=1.0)
    assert torch.allclose(out, torch.tensor([[-3.0, -3.5]] * 2))


@pytest.mark.parametrize("reference", [None, REF], ids=["deltas", "models"])
def test_sign_flip_and_scale_act_on_the_attackers_own_update(reference):
    own = ROWS[BAD]
    assert torch.equal(attack("sign_flip", reference), -own)
    assert torch.equal(attack("scale", reference, scale=-4.0), -4.0 * own)


def test_gaussian_attackers_send_noise_of_the_stated_std():
    n, d = 6, 200_000
    rows = torch.zeros(n, d)
    bad = torch.tensor([True, False, True, True, False, False])
    cfg = AdversaryConfig(fraction=0.5, behaviour="gaussian", noise_std=3.0)
    out = corrupt({"w": rows, "steps": torch.arange(n)}, bad, ~bad, None, cfg, np.random.default_rng(5))
    noise = out["w"][bad]
    # sample std of 600k normals: standard error 3 / sqrt(1.2e6) = 0.003
    assert abs(float(noise.std()) - 3.0) < 0.015 and abs(float(noise.mean())) < 0.015
    assert torch.equal(out["w"][~bad], rows[~bad]) and torch.equal(out["steps"], torch.arange(n))
    again = corrupt({"w": rows}, bad, ~bad, None, cfg, np.random.default_rng(5))
    assert torch.equal(again["w"], out["w"])  # the same generator, the same noise


def test_label_flip_is_data_side():
    assert torch.equal(flip_labels(torch.tensor([0, 3, 9]), 10), torch.tensor([9, 6, 0]))
    assert torch.equal(attack("label_flip"), ROWS[BAD])  # updates pass through


def test_corrupt_leaves_its_input_alone():
    rows = ROWS.clone()
    corrupt({"w": rows}, BAD, ~BAD, None, AdversaryConfig(behaviour="scale"), np.random.default_rng(0))
    assert torch.equal(rows, ROWS)


def test_attackers_come_from_the_seed():
    a = choose_attackers(100, 0.2, generator(7, "adversary"))
    assert len(a) == 20 and len(set(a.tolist())) == 20 and list(a) == sorted(a) and a.max() < 100
    assert np.array_equal(a, choose_attackers(100, 0.2, generator(7, "adversary")))
    assert not np.array_equal(a, choose_attackers(100, 0.2, generator(8, "adversary")))
    assert len(choose_attackers(32, 0.1, generator(0, "adversary"))) == 3  # round(3.2)
    assert len(choose_attackers(32, 0.0, generator(0, "adversary"))) == 0
    mask = attacker_mask(torch.tensor([5, 17, 40, 3]), np.array([3, 40]))
    assert mask.tolist() == [False, False, True, True]


def test_config_rejects_bad_values():
    with pytest.raises(pydantic.ValidationError):
        AdversaryConfig(fraction=1.0)
    with pytest.raises(pydantic.ValidationError):
        AdversaryConfig(behaviour="flip")
    with pytest.raises(pydantic.ValidationError):
        AdversaryConfig(noise=1.0)  # unknown key
