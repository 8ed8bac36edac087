"""[privacy] and [compression] in real runs: the epsilon a run records is the library's for its
(q, sigma, steps); DP-FedAvg's update is clipped and noised as stated; local DP-SGD is the same
hand-computed step on both training paths, with the stated noise; the ledger charges compressed
messages to the byte, in server rounds and per arrival in FedAsync, FedBuff and FedCompass; error
feedback gives back what top-k dropped, each client's memory kept across its arrivals; CHOCO with
the identity is D-PSGD; resumed runs give the same curves and state; combinations that make no
sense are refused."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import dp_accounting
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dp_accounting.rdp import RdpAccountant

import fedsim
from fedsim.compression import CompressionConfig, index_bytes
from fedsim.errors import FedsimError
from fedsim.models import build_model
from fedsim.params import UpdateBatch
from fedsim.privacy import PrivacyConfig, update_noise_multiplier
from fedsim.privacy_engine import ServerPrivacy
from fedsim.testing import check_flow
from fedsim.training import (
    ClientResult,
    SGDTrainer,
    TrainJob,
    dp_noise_draw,
    dp_noise_generator,
    get_params,
    minibatches,
)
from fedsim.upload_compression import UploadCompression
from fedsim.vectorized import train_chunk

N, M, HIDDEN, FEATURES, CLASSES = 12, 4, 16, 60, 10
D = FEATURES * HIDDEN + HIDDEN + HIDDEN * CLASSES + CLASSES  # the MLP's coordinates
MODEL_BYTES = 4 * D


def scenario(algorithm: dict | None = None, *, rounds: int = 3, topology: bool = False, **tables) -> dict:
    raw = {
        "name": "run", "seed": 5, "rounds": rounds,
        "data": {"dataset": "synthetic", "num_clients": N, "samples_per_client": 40, "test_size": 200},
        "model": {"name": "mlp", "hidden": [HIDDEN]},
        "algorithm": {k: v for k, v in {"name": "fedavg", "clients_per_round": M, "lr": 0.1, "batch_size": 8,
                                         "local_steps": 3, **(algorithm or {})}.items() if v is not None},
        "system": {"executor": "inline"},
        **tables,
    }
    if topology:
        raw["algorithm"].pop("clients_per_round")
        raw["topology"] = {"name": "ring"}
    return raw


def library_epsilon(q: float, sigma: float, steps: int, delta: float, *, fixed: tuple[int, int] | None = None) -> float:
    """dp-accounting called directly, as its documentation shows."""
    if fixed is None:
        acc = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    else:
        acc = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        event = dp_accounting.SampledWithoutReplacementDpEvent(fixed[0], fixed[1], dp_accounting.GaussianDpEvent(sigma))
    acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return acc.get_epsilon(delta)


# ---------------------------------------------------------------------------------------------
# DP-FedAvg


@pytest.mark.parametrize("sampling", ["poisson", "fixed"])
def test_dp_fedavg_run_records_the_library_epsilon_per_evaluation(tmp_path, sampling):
    raw = scenario(privacy={"clip_norm": 0.5, "noise_multiplier": 1.1, "sampling": sampling, "delta": 1e-4})
    result = fedsim.run(raw, out=tmp_path, progress=False)
    m = result.metrics
    assert list(m["round"]) == [0, 1, 2, 3]
    assert m["epsilon"].iloc[0] == 0.0
    fixed = (N, M) if sampling == "fixed" else None
    for r in (1, 2, 3):
        expected = library_epsilon(M / N, 1.1, r, 1e-4, fixed=fixed)
        assert m["epsilon"].iloc[r] == pytest.approx(expected, rel=1e-9)
    assert result.summary["epsilon"] == pytest.approx(m["epsilon"].iloc[-1])
    assert result.summary["privacy"]["mode"] == "server"
    if sampling == "poisson":  # cohorts vary in size: the download bytes say so
        per_round = np.diff(m["bytes_sent"]) / (2 * MODEL_BYTES)
        assert set(per_round) != {M}
    else:
        assert (np.diff(m["bytes_sent"]) == 2 * M * MODEL_BYTES).all()


def _fake_ctx(seed: int = 0):
    return SimpleNamespace(generator=lambda purpose, *ids: fedsim.generator(seed, purpose, *ids))


def test_dp_fedavg_merge_clips_every_update_and_adds_the_stated_noise():
    params = {"w": torch.zeros(200, 500), "b": torch.zeros(7)}
    g = torch.Generator().manual_seed(1)
    scale = torch.tensor([10.0, 0.001, 3.0])  # two updates far above C = 2, one far below
    models = {"w": torch.randn(3, 200, 500, generator=g) * scale[:, None, None],
              "b": torch.randn(3, 7, generator=g) * scale[:, None]}
    batch = UpdateBatch(params=models, num_examples=torch.ones(3, dtype=torch.int64),
                        client_ids=torch.arange(3), staleness=torch.zeros(3, dtype=torch.int64))
    quiet = ServerPrivacy(PrivacyConfig(clip_norm=2.0, noise_multiplier=0.0), num_clients=40, clients_per_round=4)
    new, figures = quiet.merge(_fake_ctx(), params, batch, round=1)
    # hand computation: each update scaled to norm <= 2, summed, divided by the expected cohort 4
    norms = torch.sqrt(models["w"].reshape(3, -1).double().pow(2).sum(1) + models["b"].double().pow(2).sum(1))
    factor = torch.clamp(2.0 / norms, max=1.0).float()
    expected_w = (models["w"] * factor[:, None, None]).sum(0) / 4
    assert torch.allclose(new["w"], expected_w, atol=1e-6)
    assert figures["clipped_fraction"] == pytest.approx(2 / 3)
    total = math.sqrt(float(new["w"].double().pow(2).sum() + new["b"].double().pow(2).sum()))
    assert total <= 3 * 2.0 / 4 + 1e-6
    # with z = 1.5 and the updates set to zero, the model moves by noise of std z C / (qN) = 0.75
    noisy = ServerPrivacy(PrivacyConfig(clip_norm=2.0, noise_multiplier=1.5), num_clients=40, clients_per_round=4)
    zero = UpdateBatch(params={k: torch.zeros_like(v) for k, v in models.items()}, num_examples=batch.num_examples,
                       client_ids=batch.client_ids, staleness=batch.staleness)
    moved, _ = noisy.merge(_fake_ctx(7), params, zero, round=1)
    assert moved["w"].shape == (200, 500)
    assert abs(float(moved["w"].std()) - 0.75) < 0.75 * 0.01
    assert abs(float(moved["w"].mean())) < 0.01
    # an empty Poisson cohort still releases noise, and counts for the accountant
    empty, _ = noisy.merge(_fake_ctx(7), params, None, round=2)
    assert float(empty["w"].std()) == pytest.approx(0.75, rel=0.01)
    assert noisy.accountant.events == [(0.1, 1.5, 2)]


def test_adaptive_clipping_raises_the_update_noise_and_moves_the_clip_norm(tmp_path):
    raw = scenario(privacy={"clip_norm": 0.01, "noise_multiplier": 0.8, "adaptive": True, "count_noise_std": 1.0,
                            "sampling": "fixed"}, rounds=4)
    m = fedsim.run(raw, out=tmp_path, progress=False).metrics
    # updates are far above C = 0.01: nothing fits, so C grows by about exp(0.2 * 0.5) a round
    clip = list(m["clip_norm"].iloc[1:])
    assert clip[0] == 0.01 and all(b > a for a, b in zip(clip, clip[1:]))
    assert clip[1] / clip[0] == pytest.approx(math.exp(0.1), rel=0.2)
    assert (m["clipped_fraction"].iloc[1:] == 1.0).all()
    # the accountant charges z = 0.8, the total of both releases (Andrew et al., Theorem 1)
    assert m["epsilon"].iloc[-1] == pytest.approx(library_epsilon(M / N, 0.8, 4, 1e-5, fixed=(N, M)), rel=1e-9)
    server = ServerPrivacy(PrivacyConfig(noise_multiplier=0.8, adaptive=True, count_noise_std=1.0), N, M)
    assert server.update_noise == pytest.approx(update_noise_multiplier(0.8, 1.0)) and server.update_noise > 0.8


# ---------------------------------------------------------------------------------------------
# local DP-SGD


def _by_hand_step(model, params, x, y, idx, clip, sigma, lr, xi):
    """One DP-SGD step computed example by example with autograd."""
    names = [n for n, _ in model.named_parameters()]
    total = {n: torch.zeros_like(params[n]) for n in names}
    for i in idx:
        w = {n: params[n].clone().requires_grad_(True) for n in names}
        out = torch.func.functional_call(model, w, (torch.from_numpy(x[i : i + 1]),))
        loss = F.cross_entropy(out, torch.from_numpy(y[i : i + 1]))
        grads = torch.autograd.grad(loss, [w[n] for n in names])
        norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads))
        factor = min(1.0, clip / float(norm))
        for n, g in zip(names, grads):
            total[n] += g * factor
    return {n: params[n] - lr * (total[n] + sigma * clip * xi[n]) / len(idx) for n in names}


def test_local_dp_sgd_is_the_hand_computed_step_on_both_paths():
    model = build_model("mlp", {"hidden": [HIDDEN]}, (FEATURES,), CLASSES, 0)
    params = get_params(model)
    data_rng = np.random.default_rng(0)
    x = data_rng.normal(size=(30, FEATURES)).astype(np.float32) * 3
    y = data_rng.integers(0, CLASSES, 30)
    trainer = SGDTrainer(lr=0.5, batch_size=8, local_steps=1, dp_clip=0.3, dp_noise=1.2)
    job = TrainJob(0, 1)
    # what the job's generator gives: its minibatch, then the noise's seed
    rng = np.random.default_rng(42)
    idx = next(iter(list(minibatches(30, 8, 1, rng))))
    xi = dp_noise_draw({n: p.shape for n, p in model.named_parameters()}, torch.float32, dp_noise_generator(rng))
    expected = _by_hand_step(model, params, x, y, idx, 0.3, 1.2, 0.5, xi)
    sequential = trainer.train(model, params, x, y, job, np.random.default_rng(42)).params
    [vectorised] = train_chunk(model, trainer, [params], [(x, y)], [job], [np.random.default_rng(42)])
    for n in expected:
        assert torch.allclose(sequential[n], expected[n], atol=1e-6), n
        assert torch.allclose(vectorised.params[n], expected[n], atol=1e-6), n
    # the noise is what moved the weights beyond the clipped gradient: sigma C / B per coordinate
    plain = _by_hand_step(model, params, x, y, idx, 0.3, 0.0, 0.5, xi)
    noise = torch.cat([((plain[n] - sequential[n]) / 0.5).reshape(-1) for n in expected])
    assert noise.numel() == D
    assert float(noise.std()) == pytest.approx(1.2 * 0.3 / 8, rel=0.03)


def test_local_dp_sgd_run_reports_each_clients_library_epsilon_on_the_vmap_path(tmp_path):
    privacy = {"mode": "local", "clip_norm": 1.0, "noise_multiplier": 1.3, "delta": 1e-5}
    runs = {}
    for vectorize in (True, False):
        raw = scenario({"clients_per_round": N}, privacy=privacy)
        raw["system"]["vectorize"] = vectorize
        runs[vectorize] = fedsim.run(raw, out=tmp_path / str(vectorize), progress=False)
    fast, slow = runs[True], runs[False]
    assert fast.summary["training"][0]["engine"] == "vmap"  # not the stacked MLP backward
    assert np.allclose(fast.metrics["test_loss"], slow.metrics["test_loss"], atol=1e-5)
    # every client trained 3 steps a round for 3 rounds, batches of 8 out of its 40 examples
    expected = library_epsilon(8 / 40, 1.3, 9, 1e-5)
    assert fast.summary["privacy"]["client_epsilon"] == pytest.approx([expected] * N, rel=1e-9)
    assert fast.metrics["epsilon"].iloc[-1] == pytest.approx(expected, rel=1e-9)
    assert fast.metrics["epsilon"].iloc[1] == pytest.approx(library_epsilon(8 / 40, 1.3, 3, 1e-5), rel=1e-9)


def test_local_dp_sgd_runs_on_a_graph(tmp_path):
    raw = scenario({"name": "dpsgd"}, topology=True, privacy={"mode": "local", "noise_multiplier": 1.0})
    result = fedsim.run(raw, out=tmp_path, progress=False)
    # every node trains every round: 3 rounds of 3 local steps
    assert result.metrics["epsilon"].iloc[-1] == pytest.approx(library_epsilon(8 / 40, 1.0, 9, 1e-5), rel=1e-9)


# ---------------------------------------------------------------------------------------------
# compression


def _upload(name: str, **kw) -> int:
    """The exact size of one upload of the MLP's update (float32; layer shapes as in the model)."""
    shapes = [(HIDDEN, FEATURES), (HIDDEN,), (CLASSES, HIDDEN), (CLASSES,)]
    if name == "top_k":
        k = round(kw["ratio"] * D)
        return k * 4 + k * index_bytes(D)
    if name == "random_k":
        return round(kw["ratio"] * D) * 4 + 8
    if name == "qsgd":
        bits = 1 + math.ceil(math.log2(kw["levels"] + 1))
        return sum(4 + math.ceil(math.prod(s) * bits / 8) for s in shapes)
    if name == "sign":
        return sum(4 + math.ceil(math.prod(s) / 8) for s in shapes)
    return MODEL_BYTES


@pytest.mark.parametrize("cfg", [{"name": "top_k", "ratio": 0.05}, {"name": "random_k", "ratio": 0.1},
                                 {"name": "qsgd", "levels": 4}, {"name": "sign", "error_feedback": True},
                                 {"name": "identity"}])
def test_the_ledger_charges_each_upload_its_exact_compressed_size(tmp_path, cfg):
    result = fedsim.run(scenario(compression=cfg), out=tmp_path, progress=False)
    per_round = np.diff(result.metrics["bytes_sent"])
    kw = {k: v for k, v in cfg.items() if k not in ("name", "error_feedback")}
    assert (per_round == M * (MODEL_BYTES + _upload(cfg["name"], **kw))).all(), per_round
    assert result.summary["total_bytes"] == 3 * M * (MODEL_BYTES + _upload(cfg["name"], **kw))


def test_top_k_with_error_feedback_gives_back_what_it_dropped_over_rounds():
    compression = UploadCompression(CompressionConfig(name="top_k", ratio=0.02, error_feedback=True))
    lossy = UploadCompression(CompressionConfig(name="top_k", ratio=0.02))
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(50, 40, generator=g), "b": torch.zeros(40)}
    truth = {k: torch.zeros_like(v) for k, v in params.items()}
    received = {k: torch.zeros_like(v) for k, v in params.items()}
    without = {k: torch.zeros_like(v) for k, v in params.items()}
    gap = lambda acc: math.sqrt(sum(float((acc[k] - truth[k]).pow(2).sum()) for k in params))  # noqa: E731
    ctx = _fake_ctx()
    gaps = {}
    for round in range(1, 401):
        update = {k: torch.randn(v.shape, generator=g) * 0.1 + 0.01 for k, v in params.items()}
        result = ClientResult(3, {k: params[k] + update[k] for k in params}, 10, {})
        [sent], sizes = compression.apply(ctx, params, [result], round)
        [lost], _ = lossy.apply(ctx, params, [result], round)
        for k in params:
            truth[k] += update[k]
            received[k] += sent.params[k] - params[k]
            without[k] += lost.params[k] - params[k]
        assert sizes[3] == 41 * 4 + 41 * 2  # k = 2% of 2,040 coordinates, 2-byte indices
        if round in (200, 400):
            gaps[round] = (gap(received), gap(without))
    memory = compression.memory.get(3)
    for k in params:  # what was sent plus what is still owed is the full sum, to float rounding
        assert torch.allclose(received[k] + memory[k], truth[k], atol=1e-3)
    # with error feedback what is owed stays bounded as rounds go by; without, the loss keeps growing
    assert gaps[400][0] < 1.2 * gaps[200][0]
    assert gaps[400][1] > 1.3 * gaps[200][1]
    assert gaps[400][0] < 0.25 * gaps[400][1]


# ---------------------------------------------------------------------------------------------
# compression in the event-driven servers: per arrival, from the model the job started with

ASYNC = {
    "fedbuff": {"name": "fedbuff", "clients_per_round": None, "buffer_size": 4},
    "fedasync": {"name": "fedasync", "clients_per_round": None},
    "fedcompass": {"name": "fedcompass", "clients_per_round": None, "q_max": 6, "q_min": 2},
}


def _async_run(algorithm: dict, compression: dict, rounds: int = 3):
    """Builds and steps a real event-driven run, recording every upload the engine compressed
    (client, the true update w_end - w_start, what was sent) and every batch a merge received."""
    from fedsim.coordinator import RunContext, RunOptions
    from fedsim.scenario import validate

    spec = validate(scenario(algorithm, rounds=rounds, compression=compression), "<test>", {})
    ctx = RunContext(spec, RunOptions(executor="inline"))
    flow = spec.algorithm.build(spec.algorithm_config, ctx)
    uploads, merged = [], []
    apply = flow.compression.apply

    def spy(ctx_, params, results, round, job=None):
        out, sizes = apply(ctx_, params, results, round, job=job)
        (r,), (o,) = results, out
        uploads.append((r.client_id, {k: r.params[k] - params[k] for k in params},
                        {k: o.params[k] - params[k] for k in params}, sizes[r.client_id]))
        return out, sizes

    flow.compression.apply = spy
    ctx.batch_hooks.append(lambda batch, params, round: merged.append(batch) or batch)
    for round in range(1, rounds + 1):
        flow.step(round)
    return ctx, flow, uploads, merged


@pytest.mark.parametrize("algorithm", sorted(ASYNC))
@pytest.mark.parametrize("cfg", [{"name": "top_k", "ratio": 0.05}, {"name": "sign"}], ids=["top_k", "sign"])
def test_event_driven_servers_charge_each_upload_its_compressed_size_and_merge_what_arrived(algorithm, cfg):
    """The ledger: every client sent exactly (its finished jobs) x the compressed size, the server
    received their sum and sent full models. The merges: each update row is a compressed message
    (top-k: k nonzero coordinates; sign: one magnitude per tensor), the one its client sent."""
    ctx, flow, uploads, merged = _async_run(ASYNC[algorithm], cfg)
    size = _upload(cfg["name"], **{k: v for k, v in cfg.items() if k != "name"})
    pending = np.bincount([c for c, _ in flow._pending], minlength=N)
    arrived = flow.jobs_started - pending
    assert arrived.sum() >= 2 * N and len(uploads) == arrived.sum()
    assert (ctx.ledger.sent[:N] == arrived * size).all(), (ctx.ledger.sent[:N], arrived)
    assert ctx.ledger.received[-1] == arrived.sum() * size
    assert ctx.ledger.sent[-1] == flow.jobs_started.sum() * MODEL_BYTES
    sent = {(c, tuple(float(t.abs().sum()) for t in s.values())): s for c, _, s, _ in uploads}
    rows = 0
    for batch in merged:
        for i, client in enumerate(batch.client_ids.tolist()):
            row = {k: t[i] for k, t in batch.params.items()}
            if algorithm == "fedasync":  # merges w - w_c: the update plus the drift since the job began
                continue
            # w_start - w_end as the server rebuilt it: the negation of the message
            match = sent[(client, tuple(float(t.abs().sum()) for t in row.values()))]
            assert all(torch.equal(row[k], -match[k]) for k in row)
            if cfg["name"] == "top_k":
                assert sum(int((t != 0).sum()) for t in row.values()) == round(0.05 * D)
            else:
                # one magnitude per tensor (the server's w_start + c rounds it in the last bits)
                assert all(torch.allclose(t.abs(), t.abs().max().expand_as(t), rtol=1e-4, atol=0) for t in row.values())
            rows += 1
    assert algorithm == "fedasync" or rows >= N
    ctx.close()


def test_fedbuff_keeps_each_clients_error_memory_across_its_arrivals():
    """Top-k with error feedback in FedBuff: per client, what it sent over all its arrivals plus
    its error memory now is the sum of its true updates (nothing dropped is lost, nothing is
    mixed up between clients), for clients with several arrivals."""
    cfg = {"name": "top_k", "ratio": 0.02, "error_feedback": True}
    ctx, flow, uploads, _ = _async_run(ASYNC["fedbuff"], cfg, rounds=4)
    memory = flow.compression.memory.states
    assert sorted(memory) == sorted({c for c, *_ in uploads})
    repeated = [c for c in memory if sum(1 for u in uploads if u[0] == c) >= 2]
    assert len(repeated) >= N // 2
    for client in memory:
        mine = [u for u in uploads if u[0] == client]
        for name in memory[client]:
            truth = sum(u[1][name] for u in mine)
            sent = sum(u[2][name] for u in mine)
            assert torch.allclose(sent + memory[client][name], truth, atol=1e-5), (client, name)
            assert float(memory[client][name].abs().sum()) > 0
    ctx.close()


@pytest.mark.parametrize("algorithm", sorted(ASYNC))
def test_event_driven_servers_accept_compression_and_change_their_runs(tmp_path, algorithm):
    """No longer refused: a real run completes, and its uploads, and so its curve, differ from
    the uncompressed run's."""
    plain = fedsim.run(scenario(ASYNC[algorithm]), out=tmp_path / "p", progress=False)
    packed = fedsim.run(scenario(ASYNC[algorithm], compression={"name": "sign"}), out=tmp_path / "c", progress=False)
    assert packed.summary["total_bytes"] < plain.summary["total_bytes"]
    assert not np.allclose(packed.metrics["test_loss"], plain.metrics["test_loss"])


# ---------------------------------------------------------------------------------------------
# CHOCO-SGD


def test_choco_with_the_identity_is_d_psgd(tmp_path):
    plain = fedsim.run(scenario({"name": "dpsgd"}, topology=True), out=tmp_path / "d", progress=False).metrics
    choco = fedsim.run(scenario({"name": "choco", "gamma": 1.0}, topology=True), out=tmp_path / "c", progress=False).metrics
    # x + 1 * (W x_hat - x_hat) with x_hat = x is W x up to float rounding: equal to 1e-6
    for column in ("test_accuracy", "test_loss", "min_node_accuracy", "avg_model_loss", "consensus_distance", "train_loss"):
        assert np.allclose(choco[column], plain[column], atol=1e-6, rtol=0, equal_nan=True), column
    assert (choco["bytes_sent"] == plain["bytes_sent"]).all()


def test_choco_charges_each_nodes_compressed_messages(tmp_path):
    raw = scenario({"name": "choco", "gamma": 0.3}, topology=True, compression={"name": "top_k", "ratio": 0.05})
    result = fedsim.run(raw, out=tmp_path, progress=False)
    # a ring: every node sends its q_i to 2 neighbours per round
    assert (np.diff(result.metrics["bytes_sent"]) == N * 2 * _upload("top_k", ratio=0.05)).all()
    assert result.metrics["consensus_distance"].iloc[-1] > 0


def test_choco_rescales_qsgd_into_a_contraction():
    from fedsim.algorithms.choco import RescaledQSGD

    g = torch.Generator().manual_seed(0)
    x = {"w": torch.randn(400, 100, generator=g)}
    plain, size = fedsim.QSGD(levels=4)(x, np.random.default_rng(1))
    scaled, scaled_size = RescaledQSGD(fedsim.QSGD(levels=4))(x, np.random.default_rng(1))
    tau = 1 + min(40_000 / 16, 200 / 4)  # = 51
    assert torch.allclose(scaled["w"], plain["w"] / tau) and scaled_size == size
    error = lambda q: float((q["w"] - x["w"]).pow(2).sum() / x["w"].pow(2).sum())  # noqa: E731
    assert error(plain) > 1 and error(scaled) < 1  # unbiased QSGD expands the error; rescaled, it contracts


# ---------------------------------------------------------------------------------------------
# resume


@pytest.mark.slow
@pytest.mark.parametrize("tables", [
    {"privacy": {"noise_multiplier": 0.7, "adaptive": True, "count_noise_std": 1.0, "clip_norm": 0.1}},
    {"privacy": {"mode": "local", "noise_multiplier": 0.7}},
    {"compression": {"name": "top_k", "ratio": 0.05, "error_feedback": True}},
    {"compression": {"name": "qsgd", "levels": 2}},
], ids=["dp_fedavg_adaptive", "local_dp_sgd", "top_k_error_feedback", "qsgd"])
def test_private_and_compressed_runs_resume_to_the_same_curves_and_state(tables):
    check_flow("fedavg", scenario(rounds=4, **copy.deepcopy(tables)), rounds=4, resume_from=2)


@pytest.mark.slow
def test_fedbuff_with_error_feedback_resumes_to_the_same_curves_and_memories():
    """The error memories (and jobs in flight) survive a checkpoint: same curves, same state."""
    raw = scenario(ASYNC["fedbuff"], rounds=4, compression={"name": "top_k", "ratio": 0.02, "error_feedback": True})
    check_flow("fedbuff", raw, rounds=4, resume_from=2)


@pytest.mark.slow
def test_choco_resumes_to_the_same_curves_and_state():
    raw = scenario({"name": "choco", "gamma": 0.4}, topology=True, compression={"name": "qsgd", "levels": 4})
    check_flow("choco", raw, rounds=4, resume_from=2)


# ---------------------------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize("raw, says", [
    (scenario({"name": "dpsgd"}, topology=True, privacy={}), "privacy.mode"),
    (scenario(privacy={}, aggregator={"name": "mean"}), "aggregator"),
    (scenario({"name": "scaffold"}, privacy={}), "payload"),
    (scenario({"sampler": "hash"}, privacy={}), "not random"),
    (scenario({"name": "fedbuff", "local_steps": 2, "clients_per_round": None}, privacy={}), "privacy.mode"),
    (scenario({"name": "fedprox", "mu": 0.1}, privacy={"mode": "local"}), "term of its own"),
    (scenario({"name": "dpsgd"}, topology=True, compression={"name": "top_k"}), "choco"),
    (scenario({"name": "scaffold"}, compression={"name": "top_k"}), "compression"),
    (scenario({"name": "choco"}, topology=True, compression={"name": "top_k", "error_feedback": True}),
     "error_feedback"),
    (scenario(privacy={"noise_multiplier": -1.0}), "privacy.noise_multiplier"),
    (scenario(compression={"name": "top_k", "ratio": 2.0}), "compression.ratio"),
    (scenario(compression={"name": "gzip"}), "compression.name"),
])
def test_combinations_that_make_no_sense_are_refused_in_one_line(tmp_path, raw, says):
    with pytest.raises(FedsimError) as info:
        fedsim.run(raw, out=tmp_path, progress=False)
    assert info.value.exit_code == 2
    message = str(info.value)
    assert says in message and "\n" not in message
