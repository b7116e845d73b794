"""Corpus -> tokens -> batches.

    resolve_corpus   a spec ("stdlib", a file, a folder, a glob) -> sorted list of text files
    split_files      deterministic train/val split by file
    prepare_data     train the tokenizer on the train split, encode both splits, cache as uint16
    BatchSampler     random training windows, a pure function of (seed, step)
    eval_batches     a fixed set of evenly spaced validation windows

The cache entry for a corpus lives in <cache_dir>/<corpus_hash[:16]>-v<vocab_size>/ and holds
train.bin and val.bin (raw uint16 token ids), tokenizer.json and meta.json. Every file is
written to a temp file and os.replace'd into place; meta.json is written last, so an entry
counts as complete only when meta.json is there.
"""
from __future__ import annotations

import codecs
import glob
import hashlib
import json
import mmap
import os
import sysconfig
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from ryzen_llm.tokenizer import Tokenizer

CACHE_FORMAT_VERSION = 1  # bump when the layout or the encoding rules of a cache entry change
SYNTHETIC_TRAIN_TOKENS = 200_000
SYNTHETIC_VAL_TOKENS = 20_000
BINARY_SNIFF_BYTES = 8 * 1024
ENCODE_CHUNK_CHARS = 4_000_000  # text handed to one encode_batch call: bounds peak memory
UINT16_MAX_VOCAB = 65535
_SKIP_DIRS = {"site-packages", "dist-packages"}


# ----------------------------------------------------------------------------------------------
# Finding the corpus files


def _is_text_file(path: Path) -> bool:
    """False if the first 8 KiB hold a NUL byte or are not UTF-8."""
    with open(path, "rb") as f:
        head = f.read(BINARY_SNIFF_BYTES)
    if b"\0" in head:
        return False
    try:
        # final=False: a multi-byte character cut in half by the 8 KiB limit is not an error.
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _files_under(root: Path) -> list[Path]:
    """All non-hidden files under root, in sorted order of their relative path."""
    files = [p for p in root.rglob("*") if p.is_file() and not _is_hidden(p, root)]
    return sorted(files, key=lambda p: p.relative_to(root).parts)


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place stops os.walk from descending into installed third-party packages.
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        files += [Path(dirpath) / name for name in filenames if name.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).parts)


def resolve_corpus(spec: str, max_bytes: int = 24_000_000) -> list[Path]:
    """Turn a corpus spec into a sorted list of non-empty text files totalling <= max_bytes.

    spec is "stdlib" (this interpreter's standard-library .py files, without site-packages),
    a text file, a folder (every file under it, recursively, skipping hidden and binary files),
    or a glob pattern (recursive ** allowed). Files are taken whole, in sorted order, until the
    next one would pass max_bytes; so the same spec always gives the same list. When that cap
    drops files of a user corpus, a warning says so (the stdlib is capped by design).
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got max_bytes={max_bytes!r} (spec={spec!r})")
    if spec == "stdlib":
        candidates = _stdlib_files()
    else:
        path = Path(spec).expanduser()
        if path.is_file():
            candidates = [path]
        elif path.is_dir():
            candidates = _files_under(path)
        elif any(c in spec for c in "*?["):
            matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
            if not matches:
                raise FileNotFoundError(f"corpus glob {spec!r} matched nothing")
            candidates = []
            for m in map(Path, matches):
                candidates += _files_under(m) if m.is_dir() else [m] if m.is_file() else []
            candidates = sorted(set(candidates))
        else:
            raise FileNotFoundError(
                f"corpus {spec!r} is not 'stdlib', 'synthetic', an existing file or folder, "
                f"or a glob"
            )

    files, total = [], 0
    for p in candidates:
        if not p.is_file():  # a broken symlink found by os.walk
            continue
        size = p.stat().st_size
        if size == 0 or not _is_text_file(p):
            continue
        if total + size > max_bytes:
            if not files:
                raise ValueError(
                    f"corpus {spec!r}: its first file {str(p)!r} has {size} bytes, more than "
                    f"max_bytes={max_bytes}; raise max_bytes"
                )
            if spec != "stdlib":
                warnings.warn(
                    f"corpus {spec!r}: stopped at max_bytes={max_bytes}; "
                    f"{str(p)!r} and later files left out"
                )
            break
        files.append(p)
        total += size
    if not files:
        raise ValueError(
            f"corpus {spec!r} has no non-empty text files "
            f"({len(candidates)} candidates were empty or binary)"
        )
    return files


def _common_root(files: Sequence[Path]) -> Path:
    return Path(os.path.commonpath([str(Path(f).resolve().parent) for f in files]))


def _relative_names(files: Sequence[Path]) -> list[str]:
    """Paths relative to the files' common folder, so a corpus hashes and splits the same
    wherever it is on disk."""
    root = _common_root(files)
    return [Path(f).resolve().relative_to(root).as_posix() for f in files]


# ----------------------------------------------------------------------------------------------
# Train / validation split


def split_files(files: Sequence[Path], val_fraction: float = 0.05) -> tuple[list[Path], list[Path]]:
    """Split by whole file. Files are ordered by the sha256 of their path relative to the
    common folder, and taken into validation in that order until they hold at least
    val_fraction of the bytes; at least one file goes to each side.

    Splitting by file keeps near-duplicate neighbouring text out of both sides. Counting bytes,
    not files, keeps a validation set made of a few tiny files (an empty __init__.py) from
    being too short to evaluate on; it can overshoot the fraction by at most one file. sha256,
    unlike Python's salted hash(), gives the same split in every process and on every machine.
    Both lists keep the input order. With a single file there is nothing to split by: this
    returns ([file], []) and prepare_data splits that file's text at a line boundary instead
    (see split_text).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got val_fraction={val_fraction!r}")
    files = list(files)
    if len(files) < 2:
        return files, []
    scores = [hashlib.sha256(name.encode("utf-8")).hexdigest() for name in _relative_names(files)]
    sizes = [Path(f).stat().st_size for f in files]
    target = val_fraction * sum(sizes)
    val_idx, val_bytes = set(), 0
    for i in sorted(range(len(files)), key=lambda i: (scores[i], i)):
        if len(val_idx) == len(files) - 1 or (val_idx and val_bytes >= target):
            break
        val_idx.add(i)
        val_bytes += sizes[i]
    train = [f for i, f in enumerate(files) if i not in val_idx]
    val = [f for i, f in enumerate(files) if i in val_idx]
    return train, val


def split_text(text: str, val_fraction: float = 0.05) -> tuple[str, str]:
    """Split one text into (train, val): val is the tail, starting at the first line boundary
    at or after the (1 - val_fraction) point. With no line break there, split mid-line."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got val_fraction={val_fraction!r}")
    cut = int(len(text) * (1.0 - val_fraction))
    newline = text.find("\n", cut)
    if newline != -1 and newline + 1 < len(text):
        cut = newline + 1
    return text[:cut], text[cut:]


# ----------------------------------------------------------------------------------------------
# Tokenize and cache


@dataclass
class PreparedData:
    tokenizer: Tokenizer | None  # None for the synthetic corpus
    train_tokens: np.ndarray  # (N_train,) uint16, a read-only memmap for real corpora
    val_tokens: np.ndarray  # (N_val,) uint16
    corpus_hash: str  # sha256 over relative paths + contents
    source: str  # the spec it came from
    n_files: int
    n_bytes: int
    vocab_size: int  # ids are < vocab_size: the tokenizer's size, or the synthetic one
    from_cache: bool = False  # True when loaded from an existing cache entry, nothing retrained
    cache_path: Path | None = None  # the cache entry folder (None for synthetic)


def default_cache_dir() -> Path:
    return Path(os.environ.get("RYZEN_LLM_CACHE") or Path.home() / ".cache" / "ryzen_llm")


def _hash_corpus(names: Sequence[str], contents: Iterable[bytes]) -> tuple[str, int]:
    """(sha256 hex digest, total bytes) of the corpus. contents may be a generator: one file's
    bytes are alive at a time."""
    h = hashlib.sha256()
    n_bytes = 0
    for name, data in zip(names, contents):
        n_bytes += len(data)
        # Lengths make the framing unambiguous: ("ab", "c") and ("a", "bc") hash differently.
        for part in (name.encode("utf-8"), data):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
    return h.hexdigest(), n_bytes


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _encode_documents(
    tokenizer: Tokenizer, texts: list[str], desc: str, progress: bool
) -> np.ndarray:
    """Encode each text and join them with eos between documents. -> (N,) uint16"""
    from tqdm.auto import tqdm

    pieces: list[np.ndarray] = []
    eos = np.array([tokenizer.eos_id], dtype=np.uint16)
    total_chars = sum(len(t) for t in texts)
    bar = tqdm(total=total_chars, unit="char", unit_scale=True, desc=desc, disable=not progress)
    start = 0
    while start < len(texts):
        # Chunks of a few MB: encode_batch runs them in parallel, and only one chunk's token
        # objects are alive at a time.
        end, chunk_chars = start, 0
        while end < len(texts) and (
            end == start or chunk_chars + len(texts[end]) <= ENCODE_CHUNK_CHARS
        ):
            chunk_chars += len(texts[end])
            end += 1
        for i, ids in enumerate(tokenizer.encode_batch(texts[start:end]), start):
            if i > 0:
                pieces.append(eos)
            pieces.append(np.asarray(ids, dtype=np.uint16))
        bar.update(chunk_chars)
        start = end
    bar.close()
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16)


def _check_long_enough(tokens: np.ndarray, split: str, seq_len: int, spec: str) -> None:
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"data {spec!r}: the {split} split has {len(tokens)} tokens, but seq_len={seq_len} "
            f"needs at least {seq_len + 1}; use a bigger corpus, a smaller seq_len, "
            f"or a different val_fraction"
        )


def _load_cache_entry(
    entry: Path, vocab_size: int, val_fraction: float
) -> tuple[Tokenizer, np.ndarray, np.ndarray] | None:
    """The cached tokenizer and token arrays, or None if the entry is missing, incomplete or
    was made with other settings."""
    meta_file = entry / "meta.json"
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if (meta.get("format_version"), meta.get("vocab_size"), meta.get("val_fraction")) != (
            CACHE_FORMAT_VERSION, vocab_size, val_fraction,
        ):
            return None
        arrays = []
        for split in ("train", "val"):
            file = entry / f"{split}.bin"
            if file.stat().st_size != 2 * meta[f"n_{split}_tokens"]:
                return None
            arrays.append(np.memmap(file, dtype=np.uint16, mode="r"))
        return Tokenizer.load(entry / "tokenizer.json"), arrays[0], arrays[1]
    except (OSError, ValueError, KeyError) as exc:
        warnings.warn(f"ignoring broken cache entry {str(entry)!r} ({exc}); rebuilding it")
        return None


def split_texts(files: list[Path], texts: dict[Path, str],
                val_fraction: float) -> tuple[list[str], list[str]]:
    """(train texts, validation texts) of a corpus's files (texts: each file's text): split by
    file (split_files), or a single file's text at a line boundary (split_text)."""
    if len(files) == 1:
        train_text, val_text = split_text(texts[files[0]], val_fraction)
        return [train_text], [val_text]
    train_files, val_files = split_files(files, val_fraction)
    return [texts[f] for f in train_files], [texts[f] for f in val_files]


def encode_corpus(spec: str, tokenizer: Tokenizer, split: str = "all",
                  max_bytes: int = 24_000_000, val_fraction: float = 0.05,
                  progress: bool = True) -> np.ndarray:
    """The tokens (N,) uint16 of a corpus spec (resolve_corpus) encoded with `tokenizer`, its
    documents joined by eos as in the cache: "all" of it, or its "val" split (the files, or the
    tail of a single file, that prepare_data holds out with the same max_bytes and
    val_fraction). For evaluating a model on its own tokenizer; nothing is cached."""
    if split not in ("all", "val"):
        raise ValueError(f"split: expected 'all' or 'val', got {split!r}")
    files = resolve_corpus(spec, max_bytes)
    texts = {f: f.read_bytes().decode("utf-8", errors="replace") for f in files}
    chosen = split_texts(files, texts, val_fraction)[1] if split == "val" else list(texts.values())
    return _encode_documents(tokenizer, chosen, f"encode {split}", progress)


def _build_cache_entry(entry: Path, spec: str, files: list[Path], names: list[str],
                       corpus_hash: str, n_bytes: int, vocab_size: int, val_fraction: float,
                       progress: bool) -> tuple[Tokenizer, np.ndarray, np.ndarray]:
    """Splits the corpus, trains the tokenizer on the train split, encodes both splits and
    writes the cache entry (meta.json last); returns the tokenizer and memmaps of the tokens."""
    contents = [f.read_bytes() for f in files]
    if _hash_corpus(names, contents)[0] != corpus_hash:
        raise RuntimeError(f"corpus {spec!r} changed while it was being read; run again")
    # Invalid UTF-8 deep inside a file (past the 8 KiB sniff) becomes U+FFFD, not a crash.
    texts = {f: c.decode("utf-8", errors="replace") for f, c in zip(files, contents)}
    train_texts, val_texts = split_texts(files, texts, val_fraction)
    tokenizer = Tokenizer.train(train_texts, vocab_size, show_progress=progress)
    train = _encode_documents(tokenizer, train_texts, "encode train", progress)
    val = _encode_documents(tokenizer, val_texts, "encode val", progress)

    entry.mkdir(parents=True, exist_ok=True)
    _atomic_write(entry / "train.bin", train.tobytes())
    _atomic_write(entry / "val.bin", val.tobytes())
    tokenizer.save(entry / "tokenizer.json")
    meta = {
        "format_version": CACHE_FORMAT_VERSION,
        "source": spec,
        "corpus_hash": corpus_hash,
        "vocab_size": vocab_size,
        "tokenizer_vocab_size": tokenizer.vocab_size,
        "val_fraction": val_fraction,
        "n_files": len(files),
        "n_bytes": n_bytes,
        "n_train_tokens": int(len(train)),
        "n_val_tokens": int(len(val)),
    }
    # Last, so that its presence means every other file of the entry is complete.
    _atomic_write(entry / "meta.json", json.dumps(meta, indent=2).encode("utf-8"))
    return (tokenizer, np.memmap(entry / "train.bin", dtype=np.uint16, mode="r"),
            np.memmap(entry / "val.bin", dtype=np.uint16, mode="r"))


def prepare_data(
    spec: str,
    vocab_size: int,
    seq_len: int,
    cache_dir: str | os.PathLike | None = None,
    max_bytes: int = 24_000_000,
    val_fraction: float = 0.05,
    seed: int = 0,
    progress: bool = True,
    build: bool = True,
) -> PreparedData | None:
    """Tokenized train and val tokens for a corpus spec (see resolve_corpus), or "synthetic".

    "synthetic" is uniform random ids (seeded by `seed`, nothing cached) for tests and speed
    runs. A real corpus is split by file, the tokenizer is trained on the train split only (so
    validation loss is honest), both splits are encoded and cached; a later call with the same
    corpus contents, vocab_size and val_fraction loads the cache and trains nothing.
    build=False returns None instead of building a missing cache entry.
    """
    if not isinstance(vocab_size, int) or not 2 <= vocab_size <= UINT16_MAX_VOCAB:
        raise ValueError(
            f"vocab_size must be an int in [2, {UINT16_MAX_VOCAB}] (tokens are stored as uint16), "
            f"got vocab_size={vocab_size!r}"
        )
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got seq_len={seq_len!r}")

    if spec == "synthetic":
        rng = np.random.default_rng(seed)
        train = rng.integers(0, vocab_size, SYNTHETIC_TRAIN_TOKENS, dtype=np.uint16)
        val = rng.integers(0, vocab_size, SYNTHETIC_VAL_TOKENS, dtype=np.uint16)
        for split, tokens in (("train", train), ("val", val)):
            _check_long_enough(tokens, split, seq_len, spec)
        corpus_hash = hashlib.sha256(f"synthetic:{seed}:{vocab_size}".encode()).hexdigest()
        return PreparedData(None, train, val, corpus_hash, spec, 0, 0, vocab_size)

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got val_fraction={val_fraction!r}")
    files = resolve_corpus(spec, max_bytes)
    names = _relative_names(files)
    # Hashed a file at a time: a cache hit never holds the whole corpus in memory.
    corpus_hash, n_bytes = _hash_corpus(names, (f.read_bytes() for f in files))
    entry = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = entry.expanduser() / f"{corpus_hash[:16]}-v{vocab_size}"

    cached = _load_cache_entry(entry, vocab_size, val_fraction)
    if cached is not None:
        tokenizer, train, val = cached
        from_cache = True
    elif not build:
        return None
    else:
        tokenizer, train, val = _build_cache_entry(entry, spec, files, names, corpus_hash,
                                                   n_bytes, vocab_size, val_fraction, progress)
        from_cache = False

    for split, tokens in (("train", train), ("val", val)):
        _check_long_enough(tokens, split, seq_len, spec)
    return PreparedData(
        tokenizer, train, val, corpus_hash, spec, len(files), n_bytes,
        vocab_size=tokenizer.vocab_size, from_cache=from_cache, cache_path=entry,
    )


# ----------------------------------------------------------------------------------------------
# Batches


def _gather_rows(tokens: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    """tokens[s : s + width] for each start s -> (len(starts), width) int64.

    From a token file's memmap the rows are read with pread: every page read through the
    mapping would stay in this process's resident set (RssFile) for as long as the mapping
    lives, which over a training run's random windows is most of the file."""
    if isinstance(tokens, np.memmap) and isinstance(tokens.base, mmap.mmap) and tokens.filename:
        item = tokens.dtype.itemsize
        rows = np.empty((len(starts), width), dtype=tokens.dtype)
        with open(tokens.filename, "rb", buffering=0) as f:
            for i, s in enumerate(starts.tolist()):
                rows[i] = np.frombuffer(os.pread(f.fileno(), width * item, tokens.offset + s * item),
                                        dtype=tokens.dtype)
        return rows.astype(np.int64)
    return tokens[starts[:, None] + np.arange(width)].astype(np.int64)


def _windows(
    tokens: np.ndarray, starts: np.ndarray, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather windows of seq_len + 1 tokens; split them into inputs and next-token targets."""
    rows = torch.from_numpy(_gather_rows(tokens, starts, seq_len + 1))  # (B, T+1)
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # (B, T), (B, T)


def _check_tokens(tokens: np.ndarray, seq_len: int) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got seq_len={seq_len!r}")
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"tokens has {len(tokens)} tokens, but seq_len={seq_len} needs at least {seq_len + 1}"
        )


class BatchSampler:
    """Random training windows whose content depends only on (seed, step).

    Each step draws one global batch of batch_size * world_size window starts from a fresh
    generator seeded by (seed, step); rank r keeps rows r::world_size. So batch_size is the
    per-rank batch, a run resumed at step N sees exactly the batches it would have seen, and
    each row of the global batch goes to exactly one rank. The global batch depends on
    world_size, so the same step under another world size gives other windows.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
        _check_tokens(tokens, seq_len)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got batch_size={batch_size!r}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy SeedSequence), got seed={seed!r}")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed

    def batch(
        self, step: int, rank: int = 0, world_size: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (idx, targets), both (batch_size, seq_len) int64; targets is idx one token on."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got step={step!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need world_size >= 1 and 0 <= rank < world_size, "
                f"got rank={rank!r}, world_size={world_size!r}"
            )
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, step]))
        # The last valid start leaves room for seq_len inputs plus one more target token.
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size * world_size)
        return _windows(self.tokens, starts[rank::world_size], self.seq_len)


def eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, n_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed list of (idx, targets) batches of non-overlapping windows spread evenly from the
    start to the end of `tokens`. If there are not n_batches * batch_size windows, returns as
    many full batches as fit, or one smaller batch if not even one full batch fits."""
    _check_tokens(tokens, seq_len)
    if batch_size < 1 or n_batches < 1:
        raise ValueError(
            f"batch_size and n_batches must be >= 1, "
            f"got batch_size={batch_size!r}, n_batches={n_batches!r}"
        )
    available = (len(tokens) - 1) // seq_len  # windows whose inputs do not overlap
    n_windows = min(n_batches * batch_size, available)
    if n_windows >= batch_size:
        n_windows -= n_windows % batch_size
    # start_i = floor(i * last / (n - 1)) in integers: n_windows <= available makes the spacing
    # >= seq_len, and flooring keeps neighbours that far apart (float linspace could round under).
    last = len(tokens) - seq_len - 1
    starts = np.arange(n_windows, dtype=np.int64) * last // max(n_windows - 1, 1)
    return [
        _windows(tokens, starts[i : i + batch_size], seq_len)
        for i in range(0, n_windows, batch_size)
    ]
