"""Compression: exact message sizes, what each scheme reconstructs, error feedback recovering the
full sum, and CHOCO-SGD's gossip (plain mixing with the identity, average kept, consensus reached)."""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest
import torch

from fedsim.compression import (
    QSGD,
    CompressionConfig,
    Identity,
    RandomK,
    ScaledSign,
    TopK,
    build_compressor,
    choco_gossip,
    compress_stacked,
    error_feedback,
    index_bytes,
)
from fedsim.decentralized import mixing_operator


def update(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(10, 20, generator=g), "b": torch.randn(5, generator=g), "n": torch.tensor([1, 2, 3])}


def rng(seed=0):
    return np.random.default_rng(seed)


def test_byte_counts_are_exact():
    u = update()  # 205 float32 coordinates, 3 int64 sent raw (24 bytes)
    assert Identity()(u, rng())[1] == 205 * 4 + 24
    # top-k 10%: k = round(20.5) = 20 values (4 bytes) + 20 one-byte indices (205 <= 256)
    assert TopK(ratio=0.1)(u, rng())[1] == 20 * 4 + 20 * 1 + 24
    # random-k: the same 20 values and one 8-byte seed, no indices
    assert RandomK(ratio=0.1)(u, rng())[1] == 20 * 4 + 8 + 24
    # QSGD s = 4: 1 sign + ceil(log2 5) = 3 level bits; a: 4 + 200 * 4 / 8 = 104, b: 4 + ceil(20 / 8) = 7
    assert QSGD(levels=4)(u, rng())[1] == 104 + 7 + 24
    # QSGD s = 1: 2 bits per coordinate; a: 4 + 50, b: 4 + ceil(10 / 8) = 6
    assert QSGD(levels=1)(u, rng())[1] == 54 + 6 + 24
    # sign: a float32 scale and a bit per coordinate: a: 4 + 25, b: 4 + 1
    assert ScaledSign()(u, rng())[1] == 29 + 5 + 24
    # 70,000 coordinates need 4-byte indices; float64 values are 8 bytes each
    big = {"w": torch.randn(70_000, dtype=torch.float64)}
    assert TopK(k=7)(big, rng())[1] == 7 * 8 + 7 * 4
    assert [index_bytes(d) for d in (1, 256, 257, 65536, 65537, 2**32 + 1)] == [1, 1, 2, 2, 4, 8]


def test_top_k_keeps_the_largest_coordinates_of_the_whole_update():
    u = {"a": torch.tensor([[0.1, -5.0], [0.2, 0.0]]), "b": torch.tensor([3.0, -0.3, 0.05])}
    out, _ = TopK(k=3)(u, rng())
    assert torch.equal(out["a"], torch.tensor([[0.0, -5.0], [0.0, 0.0]]))
    assert torch.equal(out["b"], torch.tensor([3.0, -0.3, 0.0]))


def test_random_k_keeps_k_exact_coordinates_and_unbiased_scales_them():
    u = {"w": torch.arange(1.0, 101.0)}
    out, _ = RandomK(k=10)(u, rng(3))
    kept = out["w"] != 0
    assert int(kept.sum()) == 10 and torch.equal(out["w"][kept], u["w"][kept])
    again, _ = RandomK(k=10)(u, rng(3))
    assert torch.equal(again["w"], out["w"])  # the seed decides the indices
    scaled, _ = RandomK(k=10, unbiased=True)(u, rng(3))
    assert torch.equal(scaled["w"][kept], 10 * u["w"][kept])


def test_qsgd_levels_and_unbiasedness():
    u = {"w": torch.tensor([0.3, -0.4, 0.0, 1.2, -0.05])}
    norm = float(u["w"].norm())
    out, _ = QSGD(levels=4)(u, rng())
    levels = out["w"].abs() / norm * 4
    assert torch.allclose(levels, levels.round(), atol=1e-5)  # every value is norm * l / s
    assert torch.equal(torch.sign(out["w"])[out["w"] != 0], torch.sign(u["w"])[out["w"] != 0])
    mean = torch.stack([QSGD(levels=4)(u, rng(i))[0]["w"] for i in range(4000)]).mean(0)
    assert torch.allclose(mean, u["w"], atol=0.02)  # E[Q(v)] = v


def test_scaled_sign():
    out, _ = ScaledSign()({"w": torch.tensor([1.0, -3.0, 0.0, 4.0])}, rng())
    assert torch.equal(out["w"], torch.tensor([2.0, -2.0, 2.0, 2.0]))  # ||v||_1 / d = 2; zero sent as +


@pytest.mark.parametrize("compressor", [TopK(ratio=0.05), ScaledSign(), RandomK(ratio=0.1)], ids=repr)
def test_error_feedback_recovers_the_full_sum(compressor):
    """What was sent plus what is still in memory is always the sum of the updates; once the updates
    stop, the memory drains and what was sent is the whole sum."""
    g = torch.Generator().manual_seed(0)
    memory, sent_total, true_total = None, torch.zeros(60, dtype=torch.float64), torch.zeros(60, dtype=torch.float64)
    for t in range(30):
        u = {"w": torch.randn(60, generator=g, dtype=torch.float64)}
        sent, _, memory = error_feedback(compressor, u, memory, rng(t))
        sent_total += sent["w"]
        true_total += u["w"]
        assert torch.allclose(sent_total + memory["w"], true_total, atol=1e-10)
    if isinstance(compressor, TopK):  # top-k drains at least k coordinates a round
        for t in range(100):
            sent, _, memory = error_feedback(compressor, {"w": torch.zeros(60, dtype=torch.float64)}, memory, rng(t))
            sent_total += sent["w"]
        assert torch.allclose(sent_total, true_total, atol=1e-10) and float(memory["w"].abs().max()) < 1e-10


def test_top_k_without_error_feedback_loses_what_it_drops():
    g = torch.Generator().manual_seed(1)
    updates = [{"w": torch.randn(60, generator=g, dtype=torch.float64)} for _ in range(30)]
    sent = sum(TopK(ratio=0.05)(u, rng())[0]["w"] for u in updates)
    true = sum(u["w"] for u in updates)
    assert (sent - true).norm() > 0.5 * true.norm()


def test_compress_stacked_uses_one_generator_per_row():
    stacked = {"w": torch.arange(40.0).reshape(2, 20)}
    out, sizes = compress_stacked(RandomK(k=3), stacked, [rng(1), rng(2)])
    assert sizes == [3 * 4 + 8] * 2
    assert torch.equal(out["w"][0], RandomK(k=3)({"w": stacked["w"][0]}, rng(1))[0]["w"])
    with pytest.raises(ValueError, match="2 rows need 2 generators"):
        compress_stacked(RandomK(k=3), stacked, [rng(1)])


def _ring(n=8):
    return mixing_operator(nx.cycle_graph(n), "metropolis_hastings")


def test_choco_with_the_identity_and_gamma_one_is_plain_mixing():
    g = torch.Generator().manual_seed(2)
    W = _ring()
    x = {"a": torch.randn(8, 3, 4, generator=g), "b": torch.randn(8, 5, generator=g)}
    x_hat = {k: torch.randn_like(v) for k, v in x.items()}  # whatever the copies held before
    new_x, new_hat, sizes = choco_gossip(x, x_hat, W, 1.0, Identity(), [rng(i) for i in range(8)])
    dense = W.to_dense()
    for k in x:
        assert torch.allclose(new_x[k], (dense @ x[k].reshape(8, -1)).reshape(x[k].shape), atol=1e-6)
        assert torch.allclose(new_hat[k], x[k], atol=1e-6)  # x_hat + (x - x_hat)
    assert sizes == [(12 + 5) * 4] * 8


def test_choco_keeps_the_average_and_reaches_consensus_with_top_k():
    """Koloskova et al. 2019, Theorem 2: CHOCO-Gossip converges linearly to the average for a
    symmetric doubly stochastic W and any contraction Q, given a small enough gamma."""
    g = torch.Generator().manual_seed(3)
    W = _ring()
    x = {"w": torch.randn(8, 20, generator=g, dtype=torch.float64)}
    x_hat = {"w": torch.zeros(8, 20, dtype=torch.float64)}
    average = x["w"].mean(0)
    start = float((x["w"] - average).norm())
    for t in range(600):
        x, x_hat, sizes = choco_gossip(x, x_hat, W, 0.2, TopK(ratio=0.25), [rng(1000 * t + i) for i in range(8)])
        assert torch.allclose(x["w"].mean(0), average, atol=1e-10)
    assert float((x["w"] - average).norm()) < 1e-3 * start
    assert sizes == [5 * 8 + 5 * 1] * 8  # k = 5 float64 values and 5 one-byte indices


def test_build_compressor_from_config():
    assert build_compressor(CompressionConfig(name="top_k", ratio=0.1)) == TopK(ratio=0.1)
    assert build_compressor(CompressionConfig(name="qsgd", levels=4)) == QSGD(levels=4)
    assert isinstance(build_compressor(CompressionConfig()), Identity)
    assert math.isclose(CompressionConfig(name="random_k", ratio=0.5, unbiased=True).ratio, 0.5)


def test_choco_follows_the_formula_when_rows_do_not_sum_to_one():
    """x_i + gamma sum_j w_ij (x_hat_j - x_hat_i): a row that lost weight (a message that did not
    arrive) pulls less, it does not pull towards zero. x = (0, 4), w = [[.5, .25], [.25, .5]]:
    x_0 <- 0 + .25 (4 - 0) = 1, x_1 <- 4 + .25 (0 - 4) = 3."""
    W = torch.tensor([[0.5, 0.25], [0.25, 0.5]]).to_sparse()
    x = {"w": torch.tensor([[0.0], [4.0]])}
    new_x, _, _ = choco_gossip(x, {"w": torch.zeros(2, 1)}, W, 1.0, Identity(), [rng(0), rng(1)])
    assert torch.equal(new_x["w"], torch.tensor([[1.0], [3.0]]))
