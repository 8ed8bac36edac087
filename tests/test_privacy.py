"""DP-FedAvg, adaptive clipping, the accountant and local DP-SGD: clipped norms never exceed the
bound, the noise has the stated standard deviation, epsilon is the library's, and per-example
gradients run under vmap over examples and over clients."""

from __future__ import annotations

import math
from statistics import NormalDist

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.rdp import RdpAccountant
from torch.func import vmap

from fedsim.privacy import (
    PrivacyAccountant,
    PrivacyConfig,
    adaptive_clip_norm,
    clip_per_example,
    clip_updates,
    dp_fedavg_aggregate,
    dp_sgd_gradient,
    epsilon,
    per_example_gradients,
    poisson_sample,
    privatize,
    standard_normal_like,
    update_noise_multiplier,
    update_norms,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clipped_norms_never_exceed_the_bound(dtype):
    g = torch.Generator().manual_seed(0)
    n = 2000
    scales = torch.logspace(-4, 6, n, dtype=dtype)[:, None]  # from far below to far above C
    stacked = {"w": torch.randn(n, 37, generator=g, dtype=dtype) * scales,
               "b": torch.randn(n, 3, 5, generator=g, dtype=dtype) * scales[:, :, None]}
    for clip in [1e-3, 0.7, 1.0, 123.0]:
        clipped, norms = clip_updates(stacked, clip)
        after = update_norms(clipped)
        assert (after <= clip).all(), float((after - clip).max())
        big = norms > clip  # clipped ones land on the bound, the others are untouched
        assert torch.allclose(after[big], torch.full_like(after[big], clip), rtol=1e-5)
        assert torch.equal(clipped["w"][~big], stacked["w"][~big])
        assert big.any() and (~big).any()


def test_dp_fedavg_divides_the_clipped_sum_by_the_expected_cohort():
    # deltas (3, 4) -> clipped to norm 1: (0.6, 0.8); (0.3, 0) kept; expected cohort 4 (not 2)
    deltas = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.0]], dtype=torch.float64)}
    out, norms = dp_fedavg_aggregate(deltas, clip_norm=1.0, noise_multiplier=0.0, expected_clients=4,
                                     rng=np.random.default_rng(0))
    assert torch.allclose(out["w"], torch.tensor([0.9, 0.8], dtype=torch.float64) / 4, atol=1e-12)
    assert torch.allclose(norms, torch.tensor([5.0, 0.3], dtype=torch.float64))


def test_server_noise_has_the_stated_std():
    # std = z C / (qN) = 1.5 * 2 / 10 = 0.3; sample std of 10^6 normals: standard error 0.0002
    deltas = {"w": torch.zeros(5, 1000, 1000)}  # noise is drawn per model: 10^6 normals
    out, _ = dp_fedavg_aggregate(deltas, clip_norm=2.0, noise_multiplier=1.5, expected_clients=10,
                                 rng=np.random.default_rng(3))
    assert out["w"].shape == (1000, 1000)  # one model's noise, not one per client
    assert abs(float(out["w"].std()) - 0.3) < 0.002 and abs(float(out["w"].mean())) < 0.002
    again, _ = dp_fedavg_aggregate(deltas, clip_norm=2.0, noise_multiplier=1.5, expected_clients=10,
                                   rng=np.random.default_rng(3))
    assert torch.equal(out["w"], again["w"])


def test_adaptive_clipping_hand_computation_and_convergence_to_the_quantile():
    norms = torch.tensor([1.0, 5.0, 20.0, 30.0], dtype=torch.float64)
    quiet = dict(target_quantile=0.5, lr=0.2, count_noise_std=1e-12, expected_clients=4)
    # C = 25: 3 of 4 fit, b = 0.75, C <- 25 exp(-0.2 (0.75 - 0.5)) = 25 exp(-0.05)
    assert adaptive_clip_norm(25.0, norms, rng=np.random.default_rng(0), **quiet) == pytest.approx(25 * math.exp(-0.05))
    # C = 3: 1 of 4 fits, b = 0.25: C grows by exp(0.05)
    assert adaptive_clip_norm(3.0, norms, rng=np.random.default_rng(0), **quiet) == pytest.approx(3 * math.exp(0.05))
    # iterated from far below, C settles between the 30% and 70% quantiles of 100 norms 1..100
    many = torch.arange(1.0, 101.0, dtype=torch.float64)
    rng = np.random.default_rng(1)
    c = 0.01
    for _ in range(400):
        c = adaptive_clip_norm(c, many, target_quantile=0.5, lr=0.2, count_noise_std=5.0, expected_clients=100, rng=rng)
    assert 30 < c < 70


def test_update_noise_multiplier_matches_andrew_et_al_theorem_1():
    # z = 1, sigma_b = 1: (1 - 1/4)^-1/2
    assert update_noise_multiplier(1.0, 1.0) == pytest.approx(0.75**-0.5)
    with pytest.raises(ValueError, match="must exceed"):
        update_noise_multiplier(2.0, 0.5)


def _library_epsilon(event, steps, delta, relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE):
    accountant = RdpAccountant(neighboring_relation=relation)
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("q, sigma, steps", [(0.01, 1.1, 1000), (0.1, 0.8, 50), (0.004, 4.0, 10_000)])
def test_accountant_epsilon_is_the_library_value(q, sigma, steps):
    expected = _library_epsilon(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps, 1e-5)
    assert epsilon(q, sigma, steps, 1e-5) == expected
    fixed = _library_epsilon(
        dp_accounting.SampledWithoutReplacementDpEvent(1000, round(q * 1000), dp_accounting.GaussianDpEvent(sigma)),
        steps, 1e-5, dp_accounting.NeighboringRelation.REPLACE_ONE)
    assert epsilon(q, sigma, steps, 1e-5, sampling="fixed", population=1000) == fixed


def test_accountant_brackets_the_exact_gaussian_composition():
    """Without sampling (q = 1), T Gaussian releases with multiplier sigma are one Gaussian with
    mu = sqrt(T) / sigma, whose exact delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)
    (Balle and Wang 2018). RDP's epsilon lies between that exact value and the classic RDP bound
    min_alpha T alpha / (2 sigma^2) + log(1/delta) / (alpha - 1) (Mironov 2017, Prop. 3)."""
    sigma, steps, delta = 5.0, 20, 1e-5
    mu = math.sqrt(steps) / sigma
    phi = NormalDist().cdf

    def exact_delta(eps):
        return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)

    lo, hi = 0.0, 50.0
    for _ in range(200):  # exact_delta falls as eps grows
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if exact_delta(mid) > delta else (lo, mid)
    classic = min(steps * a / (2 * sigma**2) + math.log(1 / delta) / (a - 1) for a in np.linspace(1.01, 200, 20000))
    rdp = epsilon(1.0, sigma, steps, delta)
    assert hi <= rdp <= classic


def test_accountant_composes_changing_rounds_and_survives_a_checkpoint():
    acc = PrivacyAccountant(1e-5)
    acc.step(0.01, 1.0, 100).step(0.01, 1.0, 100).step(0.02, 2.0, 50)
    assert acc.events == [(0.01, 1.0, 200), (0.02, 2.0, 50)]
    manual = RdpAccountant()
    manual.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.0)), 200))
    manual.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(2.0)), 50))
    assert acc.epsilon() == manual.get_epsilon(1e-5)
    restored = PrivacyAccountant(1e-5)
    restored.load_state_dict(acc.state_dict())
    assert restored.epsilon() == acc.epsilon()
    assert epsilon(0.01, 1.0, 400, 1e-5) > epsilon(0.01, 1.0, 200, 1e-5) > epsilon(0.01, 2.0, 200, 1e-5)
    assert epsilon(0.01, 0.0, 10, 1e-5) == math.inf


def test_poisson_sampling_rate():
    rng = np.random.default_rng(0)
    sizes = [len(poisson_sample(1000, 0.05, rng)) for _ in range(200)]
    assert abs(np.mean(sizes) - 50) < 1.5 and np.std(sizes) > 3  # binomial: mean 50, std 6.9


def _model():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.randn(3, generator=g)}


def _loss(params, x, y):
    logits = params["w"] @ x + params["b"]
    return torch.nn.functional.cross_entropy(logits[None], y[None])


def test_per_example_gradients_match_autograd_one_example_at_a_time():
    params = _model()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
    grads = per_example_gradients(_loss, params, x, y)
    for i in range(6):
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        _loss(p, x[i], y[i]).backward()
        for k in p:
            assert torch.allclose(grads[k][i], p[k].grad, atol=1e-6)


def test_per_example_clipping_bounds_every_example():
    g = torch.Generator().manual_seed(2)
    grads = {"w": torch.randn(500, 3, 4, generator=g) * torch.logspace(-3, 3, 500)[:, None, None],
             "b": torch.randn(500, 3, generator=g)}
    clipped = clip_per_example(grads, 0.5)
    assert (update_norms(clipped) <= 0.5).all()
    small = update_norms(grads) <= 0.5
    assert small.any() and torch.equal(clipped["w"][small], grads["w"][small])


def test_dp_sgd_gradient_runs_under_vmap_over_clients():
    """A chunk of 3 clients, each with its own model, batch and noise: vmap over clients gives what
    one client at a time gives; without noise it is the mean clipped per-example gradient."""
    g = torch.Generator().manual_seed(3)
    models = {k: torch.stack([v + 0.1 * i for i in range(3)]) for k, v in _model().items()}
    x, y = torch.randn(3, 8, 4, generator=g), torch.randint(0, 3, (3, 8), generator=g)
    noise = {k: torch.stack([standard_normal_like({k: v[0]}, np.random.default_rng(i))[k] for i in range(3)])
             for k, v in models.items()}

    def one(params, xb, yb, xi):
        return dp_sgd_gradient(_loss, params, xb, yb, xi, max_norm=0.3, noise_multiplier=1.2)

    chunk = vmap(one)(models, x, y, noise)
    for c in range(3):
        alone = one({k: v[c] for k, v in models.items()}, x[c], y[c], {k: v[c] for k, v in noise.items()})
        for k in alone:
            assert torch.allclose(chunk[k][c], alone[k], atol=1e-6)
    params = {k: v[0] for k, v in models.items()}
    zero = {k: torch.zeros_like(v) for k, v in params.items()}
    clipped = clip_per_example(per_example_gradients(_loss, params, x[0], y[0]), 0.3)
    plain = dp_sgd_gradient(_loss, params, x[0], y[0], zero, max_norm=0.3, noise_multiplier=1.2)
    for k in plain:
        assert torch.allclose(plain[k], clipped[k].mean(0), atol=1e-7)


def test_local_noise_has_the_stated_std():
    # zero gradients: the result is sigma C xi / B, std 2.0 * 0.5 / 4 = 0.25
    grads = {"w": torch.zeros(4, 1000, 1000)}
    xi = standard_normal_like({"w": grads["w"][0]}, np.random.default_rng(4))
    out = privatize(grads, 0.5, 2.0, xi)
    assert abs(float(out["w"].std()) - 0.25) < 0.002 and abs(float(out["w"].mean())) < 0.002


def test_privacy_config_defaults_and_validation():
    cfg = PrivacyConfig()
    assert cfg.target_quantile == 0.5 and cfg.clip_lr == 0.2 and cfg.sampling == "poisson"
    with pytest.raises(Exception):
        PrivacyConfig(clip_norm=0.0)
