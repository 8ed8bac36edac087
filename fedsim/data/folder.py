"""`dataset = "folder"`: a user's own data, from files in `data_dir`.

Three layouts, recognised by what `data_dir` holds:

- **arrays**: `data_dir` is an `.npz` file, or a folder with `train.npz` (and optionally
  `test.npz`), holding `x` (examples, any shape), `y` (labels) and optionally `client`;
- **table**: `data_dir` is a `.csv` file, or a folder with `train.csv` (and optionally
  `test.csv`), with a header row: a `label` (or `y`) column, optionally a `client` column, every
  other column a numeric feature;
- **images**: a folder with one subfolder per class (`data_dir/cat/*.png`), or `train/` and
  `test/` folders laid out that way; PNG, JPEG or BMP, all of one size, read with Pillow (which
  matplotlib already depends on).

A `client` column gives the data set natural clients (the `natural` partition, which `auto` then
picks); without one, `auto` means Dirichlet label skew. Labels that are not integers from 0 are
numbered in sorted order. Without a test file, `test_size` examples (at most a fifth) are held out,
stratified by label, from the seed.

`fedsim validate` reads data up to 256 MiB in full, so a bad value is reported before a run as it
would be by one; larger data is checked by its headers. Reading is bounded (`MAX_BYTES` of input, `MAX_IMAGES` files, the uncompressed size an `.npz`
declares checked before anything is inflated), so a wrong path to a huge folder fails in a second
with one line instead of filling the machine's memory.
"""

from __future__ import annotations

import functools
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..registry import register_dataset
from .base import DataInfo, DataPool, describes
from .fashion_mnist import stratified_holdout

MAX_BYTES = 4 * 2**30  # input read for one data set (files, or an npz's uncompressed members)
MAX_IMAGES = 500_000
FULL_CHECK_BYTES = 256 * 2**20  # up to this much input, `validate` reads it all (see _describe)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
LABEL_COLUMNS = ("label", "y")
_HOLDOUT_PURPOSE = 0x464F_4C44  # "FOLD": the held-out split when there is no test file


def _root(cfg: Any) -> Path:
    chosen = getattr(cfg, "data_dir", None) or os.environ.get("FEDSIM_DATA")
    if not chosen:
        raise DataError('dataset "folder" reads data_dir (a folder, .npz or .csv file); set data_dir')
    path = Path(chosen).expanduser()
    if not path.exists():
        raise DataError(f"{path} not found (data_dir of dataset \"folder\")")
    return path


def _layout(root: Path) -> tuple[str, Path, Path | None]:
    """(kind, train source, test source or None)."""
    if root.is_file():
        kind = {".npz": "npz", ".csv": "csv"}.get(root.suffix.lower())
        if kind is None:
            raise DataError(f"{root}: expected a folder, an .npz or a .csv file")
        return kind, root, None
    for kind in ("npz", "csv"):
        train = root / f"train.{kind}"
        if train.is_file():
            test = root / f"test.{kind}"
            return kind, train, test if test.is_file() else None
    if (root / "train").is_dir():
        test = root / "test"
        return "images", root / "train", test if test.is_dir() else None
    if any(p.is_dir() for p in root.iterdir()):
        return "images", root, None
    raise DataError(
        f"{root}: found neither train.npz, train.csv nor class subfolders of images; see the README's Data section"
    )


def _check_size(paths: list[Path], what: Path) -> None:
    total = sum(p.stat().st_size for p in paths)
    if total > MAX_BYTES:
        raise DataError(f"{what}: {total} bytes to read, more than the limit of {MAX_BYTES} (fedsim.data.folder.MAX_BYTES)")


# ---- arrays ----------------------------------------------------------------------------------


def _npz_members(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of an .npz's arrays from their headers, and a size check, before loading."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            declared = sum(i.file_size for i in infos)
            if declared > MAX_BYTES:
                raise DataError(f"{path}: {declared} bytes uncompressed, more than the limit of {MAX_BYTES}")
            out = {}
            for info in infos:
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    shape, _, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                       else np.lib.format.read_array_header_2_0(f))
                out[info.filename[:-4]] = (tuple(shape), dtype)
            return out
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path} is not a readable .npz file ({exc.__class__.__name__}: {exc})") from None


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    members = _npz_members(path)
    for key in ("x", "y"):
        if key not in members:
            raise DataError(f"{path}: expected arrays 'x' and 'y' (and optionally 'client'), found {sorted(members) or 'none'}")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in ("x", "y", "client") if k in members}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path} is not a readable .npz file ({exc.__class__.__name__}: {exc})") from None


# ---- tables ----------------------------------------------------------------------------------


def _csv_columns(path: Path) -> list[str]:
    import pandas as pd

    try:
        return [str(c) for c in pd.read_csv(path, nrows=0).columns]
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise DataError(f"{path} is not a readable CSV file ({exc.__class__.__name__})") from None


def _label_column(path: Path, columns: list[str]) -> str:
    for name in LABEL_COLUMNS:
        if name in columns:
            return name
    raise DataError(f"{path}: expected a 'label' (or 'y') column, found {', '.join(columns[:10]) or 'no header'}")


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    import pandas as pd

    columns = _csv_columns(path)
    label = _label_column(path, columns)
    features = [c for c in columns if c not in (label, "client")]
    if not features:
        raise DataError(f"{path}: no feature columns besides '{label}'" + (" and 'client'" if "client" in columns else ""))
    try:
        frame = pd.read_csv(path)
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise DataError(f"{path} is not a readable CSV file ({exc.__class__.__name__}: {exc})") from None
    try:
        x = frame[features].to_numpy(dtype=np.float32)
    except (ValueError, TypeError):
        bad = next(c for c in features if not pd.api.types.is_numeric_dtype(frame[c]))
        raise DataError(f"{path}: column '{bad}' is not numeric (features must be numbers)") from None
    if np.isnan(x).any():
        row, col = map(int, np.argwhere(np.isnan(x))[0])
        raise DataError(f"{path}: empty or non-numeric value in column '{features[col]}', data row {row + 1}")
    out = {"x": x, "y": frame[label].to_numpy()}
    if "client" in frame.columns:
        out["client"] = frame["client"].to_numpy()
    return out


# ---- images ----------------------------------------------------------------------------------


def _image_files(root: Path) -> list[tuple[str, Path]]:
    """(class name, file) of every image under root's class subfolders, in a fixed order."""
    files: list[tuple[str, Path]] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                files.append((folder.name, f))
                if len(files) > MAX_IMAGES:
                    raise DataError(f"{root}: more than {MAX_IMAGES} images (fedsim.data.folder.MAX_IMAGES)")
    if not files:
        raise DataError(f"{root}: no {'/'.join(IMAGE_SUFFIXES)} images in class subfolders")
    return files


def _open_image(path: Path, mode: str | None = None) -> np.ndarray:
    """(channels, height, width) in [0, 1]: grey or RGB as the first image is (`mode`), alpha dropped."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert(mode or ("L" if img.mode in ("1", "L", "I", "I;16", "F") else "RGB"))
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable image ({exc.__class__.__name__})") from None
    return arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)


def _read_images(root: Path) -> dict[str, np.ndarray]:
    files = _image_files(root)
    _check_size([f for _, f in files], root)
    first = _open_image(files[0][1])
    x = np.empty((len(files), *first.shape), dtype=np.float32)
    for i, (_, f) in enumerate(files):
        img = first if i == 0 else _open_image(f, "L" if first.shape[0] == 1 else "RGB")
        if img.shape != first.shape:
            raise DataError(f"{f}: image of shape {img.shape} (channels, height, width) but {files[0][1]} is {first.shape}; "
                            "resize them to one size")
        x[i] = img
    return {"x": x, "y": np.array([name for name, _ in files])}


# ---- assembling ------------------------------------------------------------------------------


def _read(kind: str, source: Path) -> dict[str, np.ndarray]:
    if kind == "images":
        return _read_images(source)
    _check_size([source], source)
    return _read_npz(source) if kind == "npz" else _read_csv(source)


def _label_ids(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Integer labels from 0 stay as they are; anything else is numbered in sorted order."""
    both = np.concatenate([train.ravel(), test.ravel()])
    if both.dtype.kind in "iu" and (both.size == 0 or both.min() >= 0):
        return train.astype(np.int64), test.astype(np.int64), int(both.max()) + 1 if both.size else 1
    names, ids = np.unique(both.astype(str), return_inverse=True)
    return ids[: train.size].astype(np.int64), ids[train.size:].astype(np.int64), int(names.shape[0])


@functools.lru_cache(maxsize=2)
def _load(root: str, mtime: float, test_size: int, seed: int) -> DataPool:
    """Read once per process and (file, modification time): `validate` then `run` read once."""
    kind, train_src, test_src = _layout(Path(root))
    train = _read(kind, train_src)
    x, y = train["x"], np.asarray(train["y"])
    if y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise DataError(f"{train_src}: {x.shape[0]} examples but labels of shape {y.shape}")
    groups = train.get("client")
    if test_src is not None:
        test = _read(kind, test_src)
        x_test, y_test = test["x"], np.asarray(test["y"])
    else:
        n_test = min(int(test_size), y.shape[0] // 5)
        if n_test < 1:
            raise DataError(f"{train_src}: {y.shape[0]} examples are too few to hold out a test set; add a test file")
        rng = np.random.default_rng([seed, _HOLDOUT_PURPOSE])
        labels_for_split = np.unique(y.astype(str), return_inverse=True)[1]
        test_rows = stratified_holdout(labels_for_split, n_test, rng)
        keep = np.setdiff1d(np.arange(y.shape[0]), test_rows, assume_unique=True)
        x_test, y_test = x[test_rows], y[test_rows]
        x, y = x[keep], y[keep]
        groups = None if groups is None else groups[keep]
    y, y_test, num_classes = _label_ids(y, y_test)
    if groups is not None:  # client ids numbered in sorted order (numerically when they are numbers)
        groups = np.asarray(groups)
        groups = np.unique(groups if groups.dtype.kind in "iub" else groups.astype(str), return_inverse=True)[1]
    return DataPool(x.astype(np.float32, copy=False), y, x_test.astype(np.float32, copy=False), y_test,
                    num_classes, groups)


def _mtime(root: Path) -> float:
    return max([root.stat().st_mtime, *(p.stat().st_mtime for p in root.iterdir())]) if root.is_dir() else root.stat().st_mtime


def _input_bytes(kind: str, train_src: Path, test_src: Path | None) -> int:
    sources = [src for src in (train_src, test_src) if src is not None]
    if kind == "images":
        return sum(f.stat().st_size for src in sources for _, f in _image_files(src))
    return sum(src.stat().st_size for src in sources)


def _describe(cfg: Any, seed: int) -> DataInfo:
    """Data up to `FULL_CHECK_BYTES` is read in full (cached), so that `validate` finds a bad value
    exactly as `run` would; larger data is sized from headers and line counts, with the label and
    client columns read to count classes and natural clients."""
    root = _root(cfg)
    kind, train_src, test_src = _layout(root)
    if _input_bytes(kind, train_src, test_src) <= FULL_CHECK_BYTES:
        pool = load_folder(cfg, seed)
        natural = None if pool.groups is None else int(np.unique(pool.groups).shape[0])
        return DataInfo(tuple(int(d) for d in pool.x_train.shape[1:]), pool.num_classes, pool.num_train,
                        int(pool.y_test.shape[0]), natural_clients=natural, copies=3)
    if kind == "images":
        files = _image_files(train_src)
        _check_size([f for _, f in files], train_src)
        shape = _open_image(files[0][1]).shape
        n_train = len(files)
        n_test = len(_image_files(test_src)) if test_src else min(int(cfg.test_size), n_train // 5)
        classes = len({name for name, _ in files})
        natural = None
    elif kind == "npz":
        _check_size([train_src], train_src)
        members = _npz_members(train_src)
        if "x" not in members or "y" not in members:
            raise DataError(f"{train_src}: expected arrays 'x' and 'y' (and optionally 'client'), found {sorted(members) or 'none'}")
        shape, n_train = members["x"][0][1:], members["x"][0][0]
        n_test = _npz_members(test_src)["y"][0][0] if test_src else min(int(cfg.test_size), n_train // 5)
        with np.load(train_src, allow_pickle=False) as z:
            natural = int(np.unique(z["client"]).shape[0]) if "client" in members else None
            y_train = z["y"]
        y_test = np.zeros(0, y_train.dtype)
        if test_src is not None:
            with np.load(test_src, allow_pickle=False) as z:
                y_test = z["y"]
        classes = _label_ids(np.asarray(y_train), np.asarray(y_test))[2]
    else:
        _check_size([train_src], train_src)
        columns = _csv_columns(train_src)
        label = _label_column(train_src, columns)
        shape = (len([c for c in columns if c not in (label, "client")]),)
        n_train = _count_rows(train_src)
        n_test = _count_rows(test_src) if test_src else min(int(cfg.test_size), n_train // 5)
        import pandas as pd

        wanted = [label, "client"] if "client" in columns else [label]
        head = pd.read_csv(train_src, usecols=wanted)
        natural = int(head["client"].nunique()) if "client" in columns else None
        y_test = (pd.read_csv(test_src, usecols=[_label_column(test_src, _csv_columns(test_src))]).iloc[:, 0].to_numpy()
                  if test_src else np.zeros(0, np.int64))
        classes = _label_ids(head[label].to_numpy(), y_test)[2]
    if test_src is None:
        n_train -= n_test
    return DataInfo(tuple(int(d) for d in shape), int(classes), int(n_train), int(n_test),
                    natural_clients=natural, copies=3)


def _count_rows(path: Path) -> int:
    with open(path, "rb") as f:
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    return max(lines - 1, 0)


@register_dataset("folder")
@describes(_describe)
def load_folder(cfg: Any, seed: int) -> DataPool:
    """Your own data from `data_dir`: image class folders, .npz arrays or CSV tables."""
    root = _root(cfg)
    return _load(str(root.resolve()), _mtime(root), int(getattr(cfg, "test_size", 2000)), int(seed))
