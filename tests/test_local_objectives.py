"""Local-objective terms of FedProx, SCAFFOLD, FedDyn, MOON and Ditto: values and gradients against
hand computations, the methods' client and server updates, and each term under `torch.func.vmap`
over a stack of clients equal to its per-client value (what the vectorised trainer relies on)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from fedsim import ServerSGD, stack
from fedsim.algorithms import ditto, feddyn, fedprox, moon, scaffold


def f64(x):
    return torch.tensor(x, dtype=torch.float64)


# ---------------------------------------------------------------- FedProx, Ditto


def test_prox_term_value_and_gradient_by_hand():
    w = {"a": f64([1.0, 2.0]), "b": f64([[3.0]])}
    g = {"a": f64([0.0, 0.0]), "b": f64([[1.0]]), "frozen": f64([5.0])}  # extra names are ignored
    # ||w - g||^2 = 1 + 4 + 4 = 9; mu/2 * 9 with mu = 0.5
    assert float(fedprox.prox_term(w, g, 0.5)) == pytest.approx(2.25, abs=1e-15)
    gw = grad(fedprox.prox_term)(w, g, 0.5)
    assert gw["a"].tolist() == [0.5, 1.0] and gw["b"].tolist() == [[1.0]]  # mu (w - w_global)
    assert float(fedprox.prox_term(w, g, 0.0)) == 0.0


def test_ditto_personal_step_is_sgd_on_the_regularised_objective():
    # by hand: v = 1, grad F = 0.5, w = 0, lr = 0.1, lambda = 2: 1 - 0.1 (0.5 + 2) = 0.75
    out = ditto.personal_step({"v": f64([1.0])}, {"v": f64([0.5])}, {"v": f64([0.0])}, lr=0.1, lam=2.0)
    assert float(out["v"][0]) == pytest.approx(0.75, abs=1e-15)
    # and equal to one SGD step on F(v) + ditto_term, F(v) = 0.5 * 3 * (v - 1)^2, through autograd
    v, w = {"v": f64([0.4, -1.0])}, {"v": f64([0.1, 0.2])}

    def objective(p):
        return 0.5 * 3.0 * ((p["v"] - 1.0) ** 2).sum() + ditto.ditto_term(p, w, 2.0)

    def F(p):
        return 0.5 * 3.0 * ((p["v"] - 1.0) ** 2).sum()

    by_autograd = v["v"] - 0.1 * grad(objective)(v)["v"]
    assert torch.allclose(ditto.personal_step(v, grad(F)(v), w, lr=0.1, lam=2.0)["v"], by_autograd, atol=1e-15)


# ---------------------------------------------------------------- SCAFFOLD


def test_scaffold_one_round_on_a_quadratic_by_hand():
    """N = 3 clients, clients 0 and 1 sampled; f_i(y) = a_i / 2 (y - b_i)^2 with a = (1, 2),
    b = (1, -1); x = 0, c = 0.5, c_0 = 0.2, c_1 = -0.4; K = 2 steps of lr 0.1; eta_g = 0.5.

    client 0: g = -1, step -1 - 0.2 + 0.5 = -0.7 -> y = 0.07; g = -0.93, step -0.63 -> y = 0.133
              c_0+ = 0.2 - 0.5 + (0 - 0.133) / 0.2 = -0.965
    client 1: g = 2, step 2 + 0.4 + 0.5 = 2.9 -> y = -0.29; g = 1.42, step 2.32 -> y = -0.522
              c_1+ = -0.4 - 0.5 + 0.522 / 0.2 = 1.71
    server:   x = 0 + 0.5 * mean(0.133, -0.522) = -0.09725
              c = 0.5 + (1/3) ((-0.965 - 0.2) + (1.71 + 0.4)) = 0.815
    """
    a, b = [1.0, 2.0], [1.0, -1.0]
    x, c = {"w": f64([0.0])}, {"w": f64([0.5])}
    c_i = [{"w": f64([0.2])}, {"w": f64([-0.4])}]
    lr, K = 0.1, 2
    ys, new_c = [], []
    for k in range(2):
        def loss(p, k=k):
            return 0.5 * a[k] * ((p["w"] - b[k]) ** 2).sum() + scaffold.correction_term(p, c, c_i[k])

        y = dict(x)
        for _ in range(K):  # the trainer's plain SGD, the correction entering through autograd
            y = {"w": y["w"] - lr * grad(loss)(y)["w"]}
        ys.append(y)
        new_c.append(scaffold.client_control_update(c_i[k], c, x, y, steps=K, lr=lr))
    assert [float(y["w"][0]) for y in ys] == pytest.approx([0.133, -0.522], abs=1e-15)
    assert [float(ci["w"][0]) for ci in new_c] == pytest.approx([-0.965, 1.71], abs=1e-14)
    # option II's c_i+ is the mean of the raw local gradients: (-1 - 0.93) / 2 and (2 + 1.42) / 2
    assert float(new_c[0]["w"][0]) == pytest.approx((-1.0 - 0.93) / 2, abs=1e-14)

    combined = {"w": stack(ys)["w"].mean(0)}
    x_new = ServerSGD(lr=0.5).step(x, combined, round=1)
    assert float(x_new["w"][0]) == pytest.approx(-0.09725, abs=1e-15)
    deltas = stack([{"w": n["w"] - o["w"]} for n, o in zip(new_c, c_i)])
    c_new = scaffold.server_control_update(c, deltas, num_clients=3)
    assert float(c_new["w"][0]) == pytest.approx(0.815, abs=1e-14)


def test_scaffold_correction_gradient_is_c_minus_c_i():
    w = {"a": f64([1.0, -2.0])}
    c, c_i = {"a": f64([0.3, 0.1]), "other": f64([9.0])}, {"a": f64([0.5, -0.2])}
    assert grad(scaffold.correction_term)(w, c, c_i)["a"].tolist() == pytest.approx([-0.2, 0.3], abs=1e-15)


# ---------------------------------------------------------------- FedDyn


def test_feddyn_gradient_correction_by_hand():
    w, w_g, g_k = {"t": f64([2.0, -1.0])}, {"t": f64([1.0, 1.0])}, {"t": f64([0.3, -0.6])}
    # d/dtheta [-<g_k, theta> + alpha/2 ||theta - theta_g||^2] = -g_k + alpha (theta - theta_g), alpha = 0.5
    got = grad(feddyn.dyn_term)(w, w_g, g_k, 0.5)["t"]
    assert got.tolist() == pytest.approx([-0.3 + 0.5 * 1.0, 0.6 + 0.5 * -2.0], abs=1e-15)


def test_feddyn_client_state_is_the_local_gradient_at_the_local_minimiser():
    """L(theta) = a/2 (theta - b)^2 with a = 2, b = 1; g_k = 0.3, alpha = 0.5, theta_g = 0. The local
    objective's minimiser solves 2 (theta - 1) - 0.3 + 0.5 theta = 0: theta* = 2.3 / 2.5 = 0.92, where
    grad L = 2 (0.92 - 1) = -0.16 = 0.3 - 0.5 * 0.92, the state update."""
    g_k, w_g, alpha = {"t": f64([0.3])}, {"t": f64([0.0])}, 0.5

    def objective(p):
        return 0.5 * 2.0 * ((p["t"] - 1.0) ** 2).sum() + feddyn.dyn_term(p, w_g, g_k, alpha)

    theta = {"t": f64([0.0])}
    for _ in range(200):  # gradient descent on the local objective, built from the term
        theta = {"t": theta["t"] - 0.3 * grad(objective)(theta)["t"]}
    assert float(theta["t"][0]) == pytest.approx(0.92, abs=1e-12)
    updated = feddyn.client_state_update(g_k, theta, w_g, alpha)
    assert float(updated["t"][0]) == pytest.approx(-0.16, abs=1e-12)
    assert float(updated["t"][0]) == pytest.approx(2.0 * (float(theta["t"][0]) - 1.0), abs=1e-12)


def test_feddyn_server_h_is_the_mean_of_every_clients_state():
    m, alpha, gen = 4, 0.1, torch.Generator().manual_seed(0)
    w_g = {"t": torch.randn(3, dtype=torch.float64, generator=gen)}
    g = [{"t": torch.zeros(3, dtype=torch.float64)} for _ in range(m)]
    h = {"t": torch.zeros(3, dtype=torch.float64)}
    for sampled in ([0, 2], [1, 2, 3], [3]):
        local = [{"t": w_g["t"] + torch.randn(3, dtype=torch.float64, generator=gen)} for _ in sampled]
        for k, w_k in zip(sampled, local):
            g[k] = feddyn.client_state_update(g[k], w_k, w_g, alpha)
        h = feddyn.server_state_update(h, w_g, stack(local), alpha, num_clients=m)
        assert torch.allclose(h["t"], stack(g)["t"].mean(0), atol=1e-14)
        mean = stack(local)["t"].mean(0)
        w_g = feddyn.server_model({"t": mean}, h, alpha)
        assert torch.allclose(w_g["t"], mean - h["t"] / alpha, atol=1e-14)
    assert feddyn.server_model({"t": f64([1.0]), "n": torch.tensor(4)}, {"t": f64([0.2])}, 0.5)["n"] == 4


# ---------------------------------------------------------------- MOON


def test_moon_loss_on_fixed_representations_by_hand():
    # row 1: sim(z, z_glob) = 1, sim(z, z_prev) = 0 -> -log(e^2 / (e^2 + e^0)) = log(1 + e^-2)
    # row 2: sim = 1/sqrt(2) and -1 -> log(1 + e^(-2 - sqrt(2)))      (tau = 0.5)
    z = f64([[1.0, 0.0], [1.0, 1.0]])
    z_glob = f64([[1.0, 0.0], [1.0, 0.0]])
    z_prev = f64([[0.0, 1.0], [-1.0, -1.0]])
    row1, row2 = math.log(1 + math.exp(-2)), math.log(1 + math.exp(-2 - math.sqrt(2)))
    assert float(moon.model_contrastive_loss(z, z_glob, z_prev, 0.5)) == pytest.approx((row1 + row2) / 2, abs=1e-15)
    assert float(moon.model_contrastive_loss(3 * z, z_glob, z_prev, 0.5)) == pytest.approx((row1 + row2) / 2, abs=1e-15)
    masked = moon.model_contrastive_loss(z, z_glob, z_prev, 0.5, mask=f64([1.0, 0.0]))
    assert float(masked) == pytest.approx(row1, abs=1e-15)
    # as the official code computes it: cross-entropy over [sim_glob, sim_prev] / tau, label 0
    logits = torch.stack([torch.cosine_similarity(z, z_glob, dim=-1), torch.cosine_similarity(z, z_prev, dim=-1)], 1) / 0.5
    ce = torch.nn.functional.cross_entropy(logits, torch.zeros(2, dtype=torch.long))
    assert float(ce) == pytest.approx((row1 + row2) / 2, abs=1e-15)


def tiny_encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def test_moon_term_differentiates_the_local_model_only():
    model = tiny_encoder()

    def represent(params, x):
        return functional_call(model, params, (x,))

    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    w_glob = {n: t + 0.1 for n, t in w.items()}
    w_prev = {n: t - 0.2 for n, t in w.items()}
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    value = moon.moon_term(represent, w, x, w_glob, w_prev, mu=5.0, temperature=0.5)
    expected = 5.0 * moon.model_contrastive_loss(represent(w, x), represent(w_glob, x), represent(w_prev, x), 0.5)
    assert float(value) == pytest.approx(float(expected), abs=1e-14)
    g_glob = grad(lambda wg: moon.moon_term(represent, w, x, wg, w_prev, mu=5.0, temperature=0.5))(w_glob)
    assert all(float(t.abs().max()) == 0.0 for t in g_glob.values())
    assert max(float(t.abs().max()) for t in grad(lambda p: moon.moon_term(represent, p, x, w_glob, w_prev, mu=5.0, temperature=0.5))(w).values()) > 0


# ---------------------------------------------------------------- vmap over a stack of clients


def three_clients(seed: int, **shapes):
    gen = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(*s, generator=gen) for n, s in shapes.items()} for _ in range(3)]


SHAPES = {"l.weight": (4, 3), "l.bias": (4,)}


def check_vmapped(term, in_dims, per_client_args, shared_args):
    """vmap(term) and vmap(grad(term)) over the stacked clients equal the per-client results."""
    stacked = [stack(list(column)) if isinstance(column[0], dict) else torch.stack(list(column)) for column in zip(*per_client_args)]
    args, it = [], iter(stacked)
    for dim, shared in zip(in_dims, shared_args):
        args.append(next(it) if dim == 0 else shared)
    values = vmap(term, in_dims=in_dims)(*args)
    grads = vmap(grad(term), in_dims=in_dims)(*args)
    assert values.shape == (3,)
    for k, client_args in enumerate(per_client_args):
        it = iter(client_args)
        call = [next(it) if dim == 0 else shared for dim, shared in zip(in_dims, shared_args)]
        assert torch.allclose(values[k], term(*call), atol=1e-6, rtol=1e-6)
        g = grad(term)(*call)
        assert all(torch.allclose(grads[n][k], g[n], atol=1e-6, rtol=1e-6) for n in g)
    assert not torch.allclose(values[0], values[1])  # the clients really differ


def test_prox_and_ditto_terms_vmap_over_clients():
    w = three_clients(0, **SHAPES)
    w_global = three_clients(1, **SHAPES)[0]
    check_vmapped(lambda p, g: fedprox.prox_term(p, g, 0.1), (0, None), [(p,) for p in w], [None, w_global])
    check_vmapped(lambda p, g: ditto.ditto_term(p, g, 2.0), (0, None), [(p,) for p in w], [None, w_global])


def test_scaffold_term_vmaps_over_clients():
    w, c_i = three_clients(0, **SHAPES), three_clients(2, **SHAPES)
    c = three_clients(3, **SHAPES)[0]
    check_vmapped(scaffold.correction_term, (0, None, 0), list(zip(w, c_i)), [None, c, None])


def test_feddyn_term_vmaps_over_clients():
    w, g_k = three_clients(0, **SHAPES), three_clients(4, **SHAPES)
    w_global = three_clients(5, **SHAPES)[0]
    check_vmapped(lambda p, wg, g: feddyn.dyn_term(p, wg, g, 0.01), (0, None, 0), list(zip(w, g_k)), [None, w_global, None])


def test_moon_term_vmaps_over_clients():
    model = tiny_encoder().float()

    def represent(params, x):
        return functional_call(model, params, (x,))

    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    w, w_prev = three_clients(0, **shapes), three_clients(6, **shapes)
    w_glob = three_clients(7, **shapes)[0]
    gen = torch.Generator().manual_seed(8)
    xs = [torch.randn(6, 3, generator=gen) for _ in range(3)]
    masks = [torch.tensor([1.0] * 6), torch.tensor([1.0] * 4 + [0.0] * 2), torch.tensor([1.0] * 5 + [0.0])]

    def term(p, x, wg, wp, mask):
        return moon.moon_term(represent, p, x, wg, wp, mu=5.0, temperature=0.5, mask=mask)

    check_vmapped(term, (0, 0, None, 0, 0), list(zip(w, xs, w_prev, masks)), [None, None, w_glob, None, None])



class _VectorLoss:
    def loss(self, w, start, inputs):
        return torch.stack([((w[n] - start[n]) ** 2).sum() for n in w])  # one per tensor: not summed

    def initial_state(self, start):
        return {}

    def after(self, start, end, inputs, steps, lr):
        return {}, {}


class _ListAfter(_VectorLoss):
    def loss(self, w, start, inputs):
        return sum(((w[n] - start[n]) ** 2).sum() for n in w)

    def after(self, start, end, inputs, steps, lr):
        return [{}, {}]


@pytest.mark.parametrize("objective,words", [
    (_VectorLoss(), "_VectorLoss.loss returned a tensor of shape (4,); expected a scalar tensor"),
    (_ListAfter(), "_ListAfter.after returned list; expected a tuple (state: dict of tensors, extras: dict)"),
])
@pytest.mark.parametrize("vectorize", [False, True])
def test_an_objective_returning_the_wrong_thing_is_named_on_both_paths(objective, words, vectorize):
    from fedsim.data import build_federated_data
    from fedsim.errors import ClientError
    from fedsim.executor import InlineExecutor, WorkerSpec
    from fedsim.models import build_model
    from fedsim.training import SGDTrainer, TrainJob, get_params

    data = build_federated_data(SimpleNamespace(dataset="synthetic", num_clients=4, partition="natural",
                                                samples_per_client=20, synthetic_alpha=0.5, synthetic_beta=0.5,
                                                test_size=10), 0)
    trainer = SGDTrainer(lr=0.1, batch_size=8, local_steps=2, objective=objective)
    spec = WorkerSpec("mlp", {"hidden": [8]}, data.feature_shape, 10, 0, trainer, vectorize=vectorize)
    params = get_params(build_model("mlp", {"hidden": [8]}, data.feature_shape, 10, 0))
    with pytest.raises(ClientError) as caught:
        InlineExecutor(data, spec).train(params, [TrainJob(c, 1) for c in range(4)])
    assert f"trainer SGDTrainer (objective {type(objective).__name__}) raised" in str(caught.value)
    assert words in str(caught.value) and "on client 0 in round 1" in str(caught.value)
