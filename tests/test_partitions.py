"""Label-quantity and two-dial Dirichlet partitions, the 'auto' default, heterogeneity figures and
the partition plot."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from fedsim.cli import main
from fedsim.data import partition as part
from fedsim.data.base import DataPool, build_federated_data
from fedsim.data.heterogeneity import figures, heterogeneity, label_counts
from fedsim.errors import DataError
from fedsim.scenario import load
from tests.conftest import SMALL


def _balanced(num_classes: int = 10, per_class: int = 100) -> DataPool:
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(num_classes), per_class))
    x = np.arange(labels.shape[0], dtype=np.float32)[:, None]
    return DataPool(x, labels, x[:4], labels[:4], num_classes)


def _cfg(scheme: str, num_clients: int = 10, **extra) -> SimpleNamespace:
    return SimpleNamespace(partition=scheme, num_clients=num_clients, **extra)


def _cover(parts: list[np.ndarray], n: int) -> None:
    everything = np.concatenate(parts)
    assert np.array_equal(np.sort(everything), np.arange(n))


# ---- label quantity (#C=k) -------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
def test_label_quantity_gives_each_client_exactly_k_classes(k: int) -> None:
    pool = _balanced()
    parts = part.partition(pool, _cfg("label_quantity", 20, classes_per_client=k), np.random.default_rng(4))
    assert len(parts) == 20
    held = [set(np.unique(pool.y_train[p]).tolist()) for p in parts]
    assert all(len(h) == k for h in held)
    assert all(i % 10 in h for i, h in enumerate(held))  # client i always holds class i mod C
    _cover(parts, pool.num_train)  # at least as many clients as classes: nothing is left out
    # each class is split evenly among the clients holding it
    for c in range(10):
        sizes = [int((pool.y_train[p] == c).sum()) for p, h in zip(parts, held) if c in h]
        assert max(sizes) - min(sizes) <= 1


def test_label_quantity_rejects_more_classes_than_the_data_has() -> None:
    with pytest.raises(DataError, match="classes_per_client <= 10"):
        part.partition(_balanced(), _cfg("label_quantity", 10, classes_per_client=11), np.random.default_rng(0))


# ---- Dirichlet over labels and sizes ----------------------------------------------------------


def test_dirichlet_sizes_covers_everything_and_skews_sizes_by_size_alpha() -> None:
    pool = _balanced(per_class=400)

    def size_spread(size_alpha: float) -> float:
        parts = part.partition(pool, _cfg("dirichlet_sizes", 20, alpha=100.0, size_alpha=size_alpha, min_examples=2),
                               np.random.default_rng(1))
        _cover(parts, pool.num_train)
        assert min(p.shape[0] for p in parts) >= 2
        sizes = np.array([p.shape[0] for p in parts])
        return float(sizes.std() / sizes.mean())

    assert size_spread(0.2) > 3 * size_spread(100.0)


def test_dirichlet_sizes_label_skew_follows_alpha() -> None:
    pool = _balanced(per_class=400)

    def emd(alpha: float) -> float:
        parts = part.partition(pool, _cfg("dirichlet_sizes", 20, alpha=alpha, size_alpha=100.0, min_examples=2),
                               np.random.default_rng(2))
        counts = np.stack([np.bincount(pool.y_train[p], minlength=10) for p in parts])
        return figures(counts)["label_emd_mean"]

    assert emd(0.1) > 1.0 > 0.3 > emd(100.0)


# ---- auto ------------------------------------------------------------------------------------


def test_auto_is_natural_with_groups_and_dirichlet_without() -> None:
    pool = _balanced()
    rng = lambda: np.random.default_rng(7)  # noqa: E731
    auto = part.partition(pool, _cfg("auto", 10, alpha=0.5, min_examples=2), rng())
    dirichlet = part.partition(pool, _cfg("dirichlet", 10, alpha=0.5, min_examples=2), rng())
    assert all(np.array_equal(a, b) for a, b in zip(auto, dirichlet))
    grouped = DataPool(pool.x_train, pool.y_train, pool.x_test, pool.y_test, 10, np.arange(1000) % 4)
    natural = part.partition(grouped, _cfg("auto", 4), rng())
    assert [set((np.arange(1000) % 4)[p].tolist()) for p in natural] == [{0}, {1}, {2}, {3}]


def test_default_partition_is_auto_and_synthetic_keeps_its_natural_clients(write_scenario) -> None:
    (spec,) = load(write_scenario(SMALL))
    assert spec.scenario.data.partition == "auto"
    auto = build_federated_data(spec.scenario.data, spec.scenario.seed)
    (nat,) = load(write_scenario(SMALL.replace('dataset = "synthetic"', 'dataset = "synthetic"\npartition = "natural"'), "n.toml"))
    natural = build_federated_data(nat.scenario.data, nat.scenario.seed)
    assert np.array_equal(auto.x, natural.x) and np.array_equal(auto.offsets, natural.offsets)


# ---- heterogeneity figures --------------------------------------------------------------------


def test_figures_on_known_distributions() -> None:
    iid = figures(np.full((4, 4), 25))
    assert iid["label_entropy_mean"] == pytest.approx(2.0)
    assert iid["label_emd_mean"] == pytest.approx(0.0)
    disjoint = figures(np.eye(4, dtype=np.int64) * 10)
    assert disjoint["label_entropy_mean"] == pytest.approx(0.0)
    assert disjoint["label_entropy_global"] == pytest.approx(2.0)
    assert disjoint["label_emd_mean"] == pytest.approx(1.5)  # |1 - 1/4| + 3 * 1/4
    assert disjoint["label_classes_mean"] == 1.0


def test_label_counts_of_a_federation_and_of_lazy_data() -> None:
    from fedsim.data.lazy import LazySyntheticData
    from fedsim.data.synthetic import synthetic_client

    fed = build_federated_data(SimpleNamespace(dataset="synthetic", num_clients=6, partition="natural",
                                               samples_per_client=30, test_size=10), 0)
    ids, counts = label_counts(fed)
    assert ids.tolist() == list(range(6))
    for k in range(6):
        assert counts[k].tolist() == np.bincount(fed.client(k)[1], minlength=10).tolist()
    lazy = LazySyntheticData(0, 5000, 20, 0.5, 0.5, fed.x_test, fed.y_test)
    ids, counts = label_counts(lazy, seed=1, max_clients=50)
    assert ids.shape == (50,) and counts.sum() == 50 * 20
    k = int(ids[3])
    assert counts[3].tolist() == np.bincount(synthetic_client(0, k, 20, 0.5, 0.5)[1], minlength=10).tolist()
    assert heterogeneity(lazy, 1)["label_stats_clients"] == 1000


@pytest.mark.slow
def test_summary_reports_heterogeneity(write_scenario, tmp_path) -> None:
    text = SMALL.replace("rounds = 4", "rounds = 1").replace(
        'dataset = "synthetic"', 'dataset = "synthetic"\npartition = "label_quantity"\nclasses_per_client = 1')
    assert main(["run", str(write_scenario(text)), "--out", str(tmp_path / "runs"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "runs" / "small" / "summary.json").read_text())
    assert summary["label_entropy_mean"] == pytest.approx(0.0)  # one class per client
    assert summary["label_classes_mean"] == 1.0
    assert summary["label_emd_mean"] > 1.0
    assert summary["label_stats_clients"] == 12


# ---- fedsim plot --partition ------------------------------------------------------------------


def test_plot_partition_draws_one_stacked_bar_per_client(write_scenario, tmp_path, capsys, monkeypatch) -> None:
    import matplotlib.axes

    drawn = []
    real_bar = matplotlib.axes.Axes.bar

    def spy(self, x, height, *args, **kwargs):
        drawn.append((np.asarray(x).copy(), np.asarray(height, dtype=float).copy()))
        return real_bar(self, x, height, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", spy)
    path = write_scenario(SMALL.replace('dataset = "synthetic"', 'dataset = "synthetic"\npartition = "iid"'))
    out = tmp_path / "partition.png"
    assert main(["plot", "--partition", str(path), "--set", "data.partition=label_quantity",
                 "--set", "data.classes_per_client=2", "-o", str(out)]) == 0
    assert out.stat().st_size > 5000 and out.read_bytes()[:4] == b"\x89PNG"
    line = capsys.readouterr().out
    assert str(out) in line and "mean label entropy" in line
    assert len(drawn) == 10  # one layer per class
    heights = np.stack([h for _, h in drawn], axis=1)  # (clients, classes)
    assert heights.shape == (12, 10)
    (spec,) = load(path, ["data.partition=label_quantity", "data.classes_per_client=2"])
    fed = build_federated_data(spec.scenario.data, spec.scenario.seed)
    assert np.array_equal(heights, label_counts(fed)[1])
    assert ((heights > 0).sum(axis=1) == 2).all()


def test_plot_partition_errors_are_one_line(write_scenario, capsys) -> None:
    path = write_scenario(SMALL.replace('dataset = "synthetic"', 'dataset = "synthetic"\npartition = "label_quantity"\nclasses_per_client = 11'))
    assert main(["plot", "--partition", str(path), "-o", "x.png"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "classes_per_client <= " in err and "got 11" in err and str(path) in err
    assert main(["plot"]) == 2
    assert "--partition" in capsys.readouterr().err
