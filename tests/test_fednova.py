"""FedNova's normalised averaging (Wang et al., NeurIPS 2020) against hand computations, and equal
steps giving FedAvg's weighted mean bit for bit."""

from __future__ import annotations

import pytest
import torch

from fedsim import ClientResult, WeightedMean, make_batch
from fedsim.algorithms.fednova import FedNovaRule, fednova_combine, normalizing_factors


def scalar_models(values):
    return {"w": torch.tensor(values, dtype=torch.float64).reshape(-1, 1)}


def test_normalizing_factors_by_hand():
    assert normalizing_factors([1, 2, 4]).tolist() == [1.0, 2.0, 4.0]
    # momentum 0.5: step k moves by (1 - 0.5^k) / 0.5 = 1, 1.5, 1.75, 1.875 gradients; a_i sums them
    a = normalizing_factors([1, 2, 4], momentum=0.5)
    assert a.tolist() == pytest.approx([1.0, 1.0 + 1.5, 1.0 + 1.5 + 1.75 + 1.875], abs=1e-15)


def test_fednova_weights_for_steps_1_2_4_by_hand():
    g = {"w": torch.tensor([1.0], dtype=torch.float64)}
    models = scalar_models([0.9, 0.6, 0.2])
    p = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    # d = [0.1 / 1, 0.4 / 2, 0.8 / 4] = [0.1, 0.2, 0.2]; tau_eff = 0.5 + 0.5 + 1 = 2
    # w = 1 - 2 * (0.05 + 0.05 + 0.05) = 0.7  (FedAvg: 0.45 + 0.15 + 0.05 = 0.65)
    out = fednova_combine(g, models, [1, 2, 4], p)
    assert float(out["w"][0]) == pytest.approx(0.7, abs=1e-15)
    assert float(torch.sum(p[:, None] * models["w"])) == pytest.approx(0.65, abs=1e-15)
    # with momentum 0.5: a = [1, 2.5, 6.125], tau_eff = 0.5 + 0.625 + 1.53125 = 2.65625
    out = fednova_combine(g, models, [1, 2, 4], p, momentum=0.5)
    expected = 1.0 - 2.65625 * (0.5 * 0.1 + 0.25 * 0.4 / 2.5 + 0.25 * 0.8 / 6.125)
    assert float(out["w"][0]) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fednova_removes_the_objective_inconsistency(momentum):
    """Clients with constant gradients g_i run tau_i steps of (momentum) SGD. FedAvg's average moves
    along sum p_i tau_i g_i, a surrogate objective; FedNova along tau_eff * sum p_i g_i, the true one."""
    lr, steps = 0.05, [1, 3, 8]
    p = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    grads = torch.tensor([[1.0, -2.0], [0.5, 0.0], [-1.0, 3.0]], dtype=torch.float64)
    w_global = torch.tensor([0.3, -0.1], dtype=torch.float64)
    finals = []
    for g, tau in zip(grads, steps):
        w, buf = w_global.clone(), torch.zeros(2, dtype=torch.float64)
        for _ in range(tau):
            buf = momentum * buf + g
            w = w - lr * buf
        finals.append(w)
    out = fednova_combine({"w": w_global}, {"w": torch.stack(finals)}, steps, p, momentum=momentum)
    tau_eff = float((p * normalizing_factors(steps, momentum)).sum())
    expected = w_global - tau_eff * lr * (p[:, None] * grads).sum(0)
    assert torch.allclose(out["w"], expected, atol=1e-13, rtol=0)
    fedavg = (p[:, None] * torch.stack(finals)).sum(0)
    assert not torch.allclose(fedavg, expected, atol=1e-3)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_equal_steps_give_fedavg_bit_for_bit(momentum):
    gen = torch.Generator().manual_seed(0)
    global_params = {"a.weight": torch.randn(5, 4, generator=gen), "a.bias": torch.randn(5, generator=gen),
                     "bn.num_batches_tracked": torch.tensor(3)}
    results = [
        ClientResult(client_id=k, num_examples=n, metrics={}, extras={"steps": torch.tensor(7)}, steps=7,
                     params={"a.weight": torch.randn(5, 4, generator=gen), "a.bias": torch.randn(5, generator=gen),
                             "bn.num_batches_tracked": torch.tensor(9)})
        for k, n in enumerate([13, 7, 29, 1])
    ]
    # every client returns exactly 0 on one coordinate the global model holds at 0.5: FedAvg gives 0;
    # the general expression would add (1 - sum_i c_i) * 0.5, and 1 - sum_i c_i is a few 1e-16 here
    global_params["a.bias"][0] = 0.5
    for r in results:
        r.params["a.bias"][0] = 0.0
    batch = make_batch(results)
    fedavg = WeightedMean()(global_params, batch, round=1)
    assert float(fedavg["a.bias"][0]) == 0.0
    nova = FedNovaRule(momentum=momentum)(global_params, batch, round=1)
    assert nova.keys() == fedavg.keys()
    for name in fedavg:
        assert torch.equal(nova[name], fedavg[name]), name
    # and with unequal steps the same batch gives something else
    results[0].extras["steps"] = torch.tensor(2)
    other = FedNovaRule(momentum=momentum)(global_params, make_batch(results), round=1)
    assert not torch.allclose(other["a.weight"], fedavg["a.weight"], atol=1e-4)
    assert int(other["bn.num_batches_tracked"]) == 9


def test_bad_inputs_are_one_clear_error():
    g = {"w": torch.zeros(1, dtype=torch.float64)}
    models = scalar_models([0.1, 0.2])
    with pytest.raises(ValueError, match="must sum to one"):
        fednova_combine(g, models, [1, 2], torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match="at least one local step"):
        fednova_combine(g, models, [0, 2], torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="one weight and one step count per client"):
        fednova_combine(g, models, [1, 2, 3], torch.tensor([0.5, 0.5]))
    batch = make_batch([ClientResult(client_id=0, params={"w": torch.zeros(1)}, num_examples=3, metrics={}, steps=2)])
    with pytest.raises(ValueError, match=r"extras\['steps'\]"):
        FedNovaRule()({"w": torch.zeros(1)}, batch, round=1)


def test_the_step_count_a_client_sends_is_counted_in_its_upload(tmp_path):
    # extras travel with the model: the engine counts every tensor among them by default
    import fedsim
    from tests.conftest import SMALL

    fedavg = fedsim.run(SMALL, out=tmp_path / "fedavg").metrics
    fednova = fedsim.run(SMALL.replace('name = "fedavg"', 'name = "fednova"'), out=tmp_path / "fednova").metrics
    per_round = 4 * 8  # four clients, one int64 step count each
    assert (fednova["bytes_sent"] - fedavg["bytes_sent"]).tolist() == [per_round * r for r in fednova["round"]]
