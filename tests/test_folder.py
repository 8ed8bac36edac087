"""dataset = "folder": a user's own images, .npz arrays or CSV tables, with natural clients from a
client column, and bounded reading."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from fedsim.cli import main
from fedsim.data import folder
from fedsim.data.base import build_federated_data
from fedsim.errors import DataError


def _arrays(n: int = 240, clients: int = 6):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + 2 * (x[:, 1] > 0)
    return x, y, np.arange(n) % clients


def _cfg(path: Path, num_clients: int = 6, partition: str = "auto", **extra) -> SimpleNamespace:
    return SimpleNamespace(dataset="folder", data_dir=str(path), num_clients=num_clients, partition=partition,
                           test_size=40, min_examples=2, alpha=0.5, **extra)


def test_npz_with_a_client_column_has_natural_clients(tmp_path: Path) -> None:
    x, y, client = _arrays()
    np.savez(tmp_path / "train.npz", x=x, y=y, client=client * 7)  # any ids: numbered in order
    np.savez(tmp_path / "test.npz", x=x[:30], y=y[:30])
    fed = build_federated_data(_cfg(tmp_path), seed=0)  # auto -> natural
    assert fed.num_clients == 6 and fed.num_classes == 4 and fed.feature_shape == (5,)
    for k in range(6):
        cx, cy = fed.client(k)
        assert np.array_equal(cx, x[client == k]) and np.array_equal(cy, y[client == k])
    assert np.array_equal(fed.x_test, x[:30])
    info = folder._describe(_cfg(tmp_path), 0)
    assert (info.num_train, info.num_test, info.natural_clients, info.num_classes) == (240, 30, 6, 4)


def test_csv_with_string_labels_and_clients_and_a_held_out_split(tmp_path: Path) -> None:
    x, y, client = _arrays()
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(5)])
    frame["label"] = np.array(["a", "b", "c", "d"])[y]
    frame["client"] = [f"user{k}" for k in client]
    frame.to_csv(tmp_path / "mine.csv", index=False)
    pool = folder.load_folder(_cfg(tmp_path / "mine.csv"), seed=1)
    assert pool.num_classes == 4 and pool.x_train.shape == (200, 5) and pool.x_test.shape == (40, 5)
    # held out stratified: every label in the test set
    assert set(pool.y_test.tolist()) == {0, 1, 2, 3}
    assert np.unique(pool.groups).shape[0] == 6
    both = np.concatenate([pool.x_train, pool.x_test])
    assert np.array_equal(np.sort(both[:, 0]), np.sort(x[:, 0]))  # nothing lost, nothing duplicated
    fed = build_federated_data(_cfg(tmp_path / "mine.csv", partition="iid", num_clients=4), 1)
    assert fed.num_clients == 4


def test_image_class_folders_default_to_dirichlet(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "eel"):
        (tmp_path / name).mkdir()
        for i in range(20):
            Image.fromarray((rng.random((6, 7, 3)) * 255).astype(np.uint8)).save(tmp_path / name / f"{i}.png")
    pool = folder.load_folder(_cfg(tmp_path), seed=0)
    assert pool.x_train.shape == (48, 3, 6, 7) and pool.num_classes == 3 and pool.groups is None
    assert 0.0 <= pool.x_train.min() and pool.x_train.max() <= 1.0
    first = np.asarray(Image.open(tmp_path / "cat" / "0.png"), dtype=np.float32) / 255
    both = np.concatenate([pool.x_train, pool.x_test])
    assert any(np.allclose(img, np.moveaxis(first, -1, 0)) for img in both)
    fed = build_federated_data(_cfg(tmp_path, num_clients=4), 0)  # auto -> dirichlet, no natural clients
    assert fed.num_clients == 4
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "dog" / "odd.png")
    folder._load.cache_clear()
    with pytest.raises(DataError, match=r"odd.png: image of shape \(3, 5, 5\) .* is \(3, 6, 7\); resize them"):
        folder.load_folder(_cfg(tmp_path), seed=0)


def test_bad_files_are_one_line_errors(tmp_path: Path, write_scenario, capsys, monkeypatch) -> None:
    x, y, client = _arrays()
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(5)])
    frame["f2"] = frame["f2"].astype(str)
    frame.loc[3, "f2"] = "oops"
    frame["label"] = y
    frame.to_csv(tmp_path / "bad.csv", index=False)
    frame.drop(columns=["label"]).to_csv(tmp_path / "nolabel.csv", index=False)
    np.savez(tmp_path / "nox.npz", y=y)
    cases = {
        tmp_path / "bad.csv": "column 'f2' is not numeric",
        tmp_path / "nolabel.csv": "expected a 'label' (or 'y') column",
        tmp_path / "nox.npz": "expected arrays 'x' and 'y'",
        tmp_path / "absent": "not found",
    }
    for path, expected in cases.items():
        scenario = write_scenario(f'[data]\ndataset = "folder"\ndata_dir = "{path}"\nnum_clients = 4\n'
                                  '[model]\nname = "logreg"\n[algorithm]\nname = "fedavg"\nclients_per_round = 2\n'
                                  '[system]\nexecutor = "inline"\n', f"{path.stem}.toml")
        for command in ("validate", "run"):
            assert main([command, str(scenario)] + (["--out", str(tmp_path / "runs")] if command == "run" else [])) == 2
            err = capsys.readouterr().err.strip()
            assert "\n" not in err and expected in err and str(scenario) in err, (command, err)
        folder._load.cache_clear()
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made
    # reading is bounded: the npz's declared size is checked before it is inflated
    np.savez_compressed(tmp_path / "big.npz", x=np.zeros((2000, 100), np.float32), y=np.zeros(2000, np.int64))
    monkeypatch.setattr(folder, "MAX_BYTES", 100_000)
    with pytest.raises(DataError, match="800000 bytes uncompressed|bytes uncompressed, more than the limit"):
        folder.load_folder(_cfg(tmp_path / "big.npz"), 0)


def test_num_clients_must_match_the_client_column(tmp_path: Path, write_scenario, capsys) -> None:
    x, y, client = _arrays()
    np.savez(tmp_path / "d.npz", x=x, y=y, client=client)
    scenario = write_scenario(f'[data]\ndataset = "folder"\ndata_dir = "{tmp_path / "d.npz"}"\nnum_clients = 5\n'
                              '[model]\nname = "logreg"\n[algorithm]\nname = "fedavg"\nclients_per_round = 2\n')
    assert main(["validate", str(scenario)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("data.partition: the data set has 6 natural clients but num_clients=5; set num_clients to 6")
    assert main(["validate", str(scenario), "--set", "data.num_clients=6"]) == 0


@pytest.mark.slow
def test_a_run_on_a_folder_of_arrays(tmp_path: Path, write_scenario) -> None:
    x, y, client = _arrays()
    np.savez(tmp_path / "d.npz", x=x, y=y, client=client)
    scenario = write_scenario(f'rounds = 3\n[data]\ndataset = "folder"\ndata_dir = "{tmp_path / "d.npz"}"\nnum_clients = 6\n'
                              '[model]\nname = "logreg"\n[algorithm]\nname = "fedavg"\nclients_per_round = 3\nlr = 0.5\n'
                              '[system]\nexecutor = "inline"\n')
    assert main(["run", str(scenario), "--out", str(tmp_path / "runs"), "--no-progress"]) == 0
    df = pd.read_csv(tmp_path / "runs" / "run" / "metrics.csv")
    assert df["test_accuracy"].iloc[-1] > df["test_accuracy"].iloc[0]


def test_header_only_description_agrees_with_reading_everything(tmp_path: Path, monkeypatch) -> None:
    """Large data is sized from headers and line counts: the same figures as a full read."""
    from PIL import Image

    x, y, client = _arrays()
    np.savez(tmp_path / "a.npz", x=x, y=y, client=client)
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(5)])
    frame["label"], frame["client"] = y, client
    (tmp_path / "csv").mkdir()
    frame.to_csv(tmp_path / "csv" / "train.csv", index=False)
    frame.iloc[:25].drop(columns=["client"]).to_csv(tmp_path / "csv" / "test.csv", index=False)
    for split, count in (("train", 12), ("test", 4)):
        for name in ("a", "b"):
            (tmp_path / "img" / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(np.full((4, 4), i, np.uint8)).save(tmp_path / "img" / split / name / f"{i}.png")
    for source in (tmp_path / "a.npz", tmp_path / "csv", tmp_path / "img"):
        full = folder._describe(_cfg(source), 0)
        monkeypatch.setattr(folder, "FULL_CHECK_BYTES", 0)
        headers = folder._describe(_cfg(source), 0)
        monkeypatch.undo()
        assert full == headers, source
    assert folder._describe(_cfg(tmp_path / "img"), 0).num_train == 24
