"""Server optimisers (FedOpt, Reddi et al. ICLR 2021, Algorithm 2; FedAvgM) against updates
computed by hand, the FedAvg identity, and their state through a weights-only checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from fedsim import FedAdagrad, FedAdam, FedYogi, ServerOptConfig, ServerSGD, build_server_optimizer
from fedsim import checkpoint


def scalar(x: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([x], dtype=torch.float64)}


def value(params) -> float:
    return float(params["w"][0])


def random_params(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(4, 3, generator=g),
        "layer.bias": torch.randn(4, generator=g),
        "bn.num_batches_tracked": torch.tensor(seed, dtype=torch.int64),
    }


def test_default_sgd_returns_the_combined_model_itself():
    x, c = random_params(0), random_params(1)
    # the arithmetic route would not be exact: the identity has to be a special case
    assert not torch.equal(x["layer.weight"] + (c["layer.weight"] - x["layer.weight"]), c["layer.weight"])
    for opt in (ServerSGD(), build_server_optimizer("sgd"), ServerOptConfig().build()):
        assert opt.step(x, c, round=1) is c
        assert opt.state_dict() == {"momentum_buffer_": {}}


def test_fedavgm_momentum_by_hand():
    opt = ServerSGD(lr=0.5, momentum=0.9)
    # round 1: Delta = 0.4, b = 0.4, x = 1 + 0.5 * 0.4 = 1.2
    x1 = opt.step(scalar(1.0), scalar(1.4), round=1)
    assert value(x1) == pytest.approx(1.2, abs=1e-15)
    # round 2: Delta = 1.0 - 1.2 = -0.2, b = 0.9 * 0.4 - 0.2 = 0.16, x = 1.2 + 0.5 * 0.16 = 1.28
    x2 = opt.step(x1, scalar(1.0), round=2)
    assert value(x2) == pytest.approx(1.28, abs=1e-15)
    assert float(opt.momentum_buffer_["w"][0]) == pytest.approx(0.16, abs=1e-15)


def test_fedadam_two_steps_by_hand():
    opt = FedAdam(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    # step 1: Delta = 0.5; m = 0.1 * 0.5 = 0.05; v = 0.99 * tau^2 + 0.01 * 0.25 = 0.00250099
    x1 = opt.step(scalar(1.0), scalar(1.5), round=1)
    expected1 = 1.0 + 0.1 * 0.05 / (math.sqrt(0.00250099) + 1e-3)
    assert value(x1) == pytest.approx(expected1, abs=1e-14)
    # step 2: Delta = -0.1; m = 0.9 * 0.05 - 0.01 = 0.035; v = 0.99 * 0.00250099 + 0.01 * 0.01 = 0.0025759801
    x2 = opt.step(x1, scalar(expected1 - 0.1), round=2)
    expected2 = expected1 + 0.1 * 0.035 / (math.sqrt(0.0025759801) + 1e-3)
    assert value(x2) == pytest.approx(expected2, abs=1e-14)
    assert float(opt.v_["w"][0]) == pytest.approx(0.0025759801, abs=1e-16)


def test_fedyogi_two_steps_by_hand_with_both_signs():
    opt = FedYogi(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    # step 1: Delta^2 = 0.25 > v = 1e-6, sign = -1: v = 1e-6 + 0.01 * 0.25 = 0.002501; m = 0.05
    x1 = opt.step(scalar(1.0), scalar(1.5), round=1)
    expected1 = 1.0 + 0.1 * 0.05 / (math.sqrt(0.002501) + 1e-3)
    assert value(x1) == pytest.approx(expected1, abs=1e-14)
    # step 2: Delta = -0.01, Delta^2 = 1e-4 < v, sign = +1: v = 0.002501 - 0.01 * 1e-4 = 0.0025
    # m = 0.9 * 0.05 + 0.1 * (-0.01) = 0.044; x = x1 + 0.1 * 0.044 / (0.05 + 0.001)
    x2 = opt.step(x1, scalar(expected1 - 0.01), round=2)
    assert float(opt.v_["w"][0]) == pytest.approx(0.0025, abs=1e-16)
    assert value(x2) == pytest.approx(expected1 + 0.0044 / 0.051, abs=1e-14)
    # Adam forgets the large first update faster: its v after the same two steps is smaller
    adam = FedAdam(lr=0.1)
    adam.step(scalar(1.0), scalar(1.5), round=1)
    adam.step(x1, scalar(expected1 - 0.01), round=2)
    assert float(adam.v_["w"][0]) < 0.0025


def test_fedadagrad_step_by_hand_without_momentum():
    opt = FedAdagrad(lr=0.1, tau=1e-3)
    # beta1 = 0: m = Delta = 0.5; v = tau^2 + 0.25
    x1 = opt.step(scalar(1.0), scalar(1.5), round=1)
    assert value(x1) == pytest.approx(1.0 + 0.1 * 0.5 / (math.sqrt(1e-6 + 0.25) + 1e-3), abs=1e-14)
    # v accumulates: + 0.04
    opt.step(x1, scalar(value(x1) + 0.2), round=2)
    assert float(opt.v_["w"][0]) == pytest.approx(1e-6 + 0.25 + 0.04, abs=1e-15)


@pytest.mark.parametrize("make", [
    lambda: ServerSGD(lr=0.7, momentum=0.9),
    lambda: FedAdam(lr=0.05),
    lambda: FedYogi(lr=0.05),
    lambda: FedAdagrad(lr=0.05),
])
def test_state_round_trips_through_a_weights_only_checkpoint(make, tmp_path):
    rounds = [random_params(seed) for seed in range(4)]
    opt = make()
    x = rounds[0]
    for r, c in enumerate(rounds[1:3], start=1):
        x = opt.step(x, c, round=r)
    assert all(t.dtype == torch.float32 for state in opt.state_dict().values() for t in state.values())
    assert set(next(iter(opt.state_dict().values()))) == {"layer.weight", "layer.bias"}  # the counter has no moments

    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    fresh = make()
    fresh.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    # and through the engine's checkpoint format (STATE attributes)
    checkpoint.save(tmp_path / "ckpt.pt", {"opt": checkpoint.capture(opt)})
    restored = make()
    checkpoint.restore(restored, checkpoint.load(tmp_path / "ckpt.pt")["opt"])

    expected = opt.step(x, rounds[3], round=3)
    for other in (fresh, restored):
        got = other.step(x, rounds[3], round=3)
        assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert not torch.equal(make().step(x, rounds[3], round=3)["layer.weight"], expected["layer.weight"])


@pytest.mark.parametrize("opt", [ServerSGD(lr=0.5, momentum=0.5), FedAdam(lr=0.1), FedYogi(lr=0.1), FedAdagrad(lr=0.1)])
def test_integer_tensors_pass_through_from_combined(opt):
    out = opt.step(random_params(2), random_params(7), round=1)
    assert out["bn.num_batches_tracked"].dtype == torch.int64
    assert int(out["bn.num_batches_tracked"]) == 7


def test_combined_with_other_names_is_one_clear_error():
    x = random_params(0)
    c = {k: v for k, v in random_params(1).items() if k != "layer.bias"}
    with pytest.raises(ValueError, match=r"FedAdam: .*missing \['layer.bias'\]"):
        FedAdam(lr=0.1).step(x, c, round=1)


def test_factory_and_config_name_what_was_expected():
    with pytest.raises(ValueError, match="unknown server optimizer 'adamw'; expected one of adagrad, adam, sgd, yogi"):
        build_server_optimizer("adamw", lr=0.1)
    with pytest.raises(ValueError, match="server optimizer 'sgd' takes lr, momentum; got beta1"):
        build_server_optimizer("sgd", beta1=0.9)
    with pytest.raises(ValueError, match="'yogi' needs lr"):
        build_server_optimizer("yogi")
    with pytest.raises(ValidationError, match="beta2 does not apply to server optimizer 'sgd'"):
        ServerOptConfig(name="sgd", beta2=0.9)
    with pytest.raises(ValidationError, match="greater than 0"):
        ServerOptConfig(name="adam", lr=-1.0)
    with pytest.raises(ValidationError, match="Extra inputs"):
        ServerOptConfig(name="adam", lr=0.1, betas=0.9)

    yogi = ServerOptConfig(name="yogi", lr=0.3, tau=1e-2).build()
    assert isinstance(yogi, FedYogi) and (yogi.lr, yogi.beta1, yogi.beta2, yogi.tau) == (0.3, 0.9, 0.99, 1e-2)
    adagrad = ServerOptConfig(name="adagrad", lr=0.2).build()
    assert isinstance(adagrad, FedAdagrad) and adagrad.beta1 == 0.0
    avgm = ServerOptConfig(momentum=0.9).build()
    assert isinstance(avgm, ServerSGD) and (avgm.lr, avgm.momentum) == (1.0, 0.9)


@pytest.mark.parametrize("opt", [ServerSGD(lr=0.5, momentum=0.9), FedAdam(lr=0.1), FedYogi(lr=0.1), FedAdagrad(lr=0.1)])
def test_tensors_the_rule_did_not_produce_pass_through_without_state(opt):
    """ServerRounds steps on {**global, **combined}: a frozen base weight outside the batch is the
    global tensor itself, and keeps neither moments nor a step."""
    x, c = random_params(0), random_params(1)
    frozen = x["layer.weight"]
    out = opt.step(x, {**c, "layer.weight": frozen}, round=1)
    assert out["layer.weight"] is frozen
    assert all("layer.weight" not in state and "layer.bias" in state for state in opt.state_dict().values())
    # an equal but distinct tensor is a coordinate like any other
    opt.step(x, {**c, "layer.weight": frozen.clone()}, round=2)
    assert all("layer.weight" in state for state in opt.state_dict().values())
