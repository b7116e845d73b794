"""Corpus resolution, the by-file split, tokenize-and-cache, and the batch samplers."""
import random
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from ryzen_llm.data import (
    BatchSampler, eval_batches, prepare_data, resolve_corpus, split_files, split_text,
)
from ryzen_llm.tokenizer import EOS_TOKEN, Tokenizer

WORDS = "the a model token batch learns quickly slowly over under data byte pair merge".split()
WORDS += ["café", "日本"]  # some multi-byte UTF-8 too


def make_text(n_lines: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = (" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n_lines))
    return "".join(line + ".\n" for line in lines)


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    """12 text files (~6 KB each, two nested), plus hidden, binary, non-UTF-8 and empty files."""
    root = tmp_path / "corpus"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".git").mkdir()
    for i in range(10):
        (root / f"doc{i:02d}.txt").write_text(make_text(100, seed=i), encoding="utf-8")
    (root / "sub" / "a.md").write_text(make_text(100, seed=10), encoding="utf-8")
    (root / "sub" / "deeper" / "b.py").write_text(make_text(100, seed=11), encoding="utf-8")
    (root / ".hidden.txt").write_text("hidden\n")
    (root / ".git" / "config").write_text("hidden too\n")
    (root / "image.bin").write_bytes(b"\x89PNG\x00\x01\x02" * 100)
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    (root / "empty.txt").write_text("")
    return root


def text_files(root: Path) -> list[Path]:
    return sorted([*root.glob("doc*.txt"), root / "sub" / "a.md", root / "sub" / "deeper" / "b.py"],
                  key=lambda p: p.relative_to(root).parts)


# ------------------------------------------------------------------------------- resolve_corpus


def test_resolve_folder_skips_hidden_binary_and_empty(corpus_dir):
    assert resolve_corpus(str(corpus_dir)) == text_files(corpus_dir)


def test_resolve_single_file(corpus_dir):
    assert resolve_corpus(str(corpus_dir / "doc03.txt")) == [corpus_dir / "doc03.txt"]


def test_resolve_glob(corpus_dir):
    first_three = [corpus_dir / f"doc0{i}.txt" for i in range(3)]
    assert resolve_corpus(str(corpus_dir / "doc0[0-2].txt")) == first_three
    nested_py = [corpus_dir / "sub" / "deeper" / "b.py"]
    assert resolve_corpus(str(corpus_dir / "**" / "*.py")) == nested_py


def test_resolve_stops_at_max_bytes_and_warns(corpus_dir):
    sizes = [p.stat().st_size for p in text_files(corpus_dir)]
    with pytest.warns(UserWarning, match="max_bytes"):
        files = resolve_corpus(str(corpus_dir), max_bytes=sizes[0] + sizes[1] + sizes[2] // 2)
    assert files == text_files(corpus_dir)[:2]
    with pytest.raises(ValueError, match="max_bytes=10"):
        resolve_corpus(str(corpus_dir), max_bytes=10)


def test_resolve_stdlib_is_capped_sorted_and_deterministic():
    max_bytes = 300_000
    files = resolve_corpus("stdlib", max_bytes=max_bytes)
    root = Path(sysconfig.get_paths()["stdlib"])
    assert files == resolve_corpus("stdlib", max_bytes=max_bytes)
    assert len(files) > 5
    assert all(f.suffix == ".py" and f.is_relative_to(root) for f in files)
    assert not any({"site-packages", "dist-packages"} & set(f.parts) for f in files)
    assert sum(f.stat().st_size for f in files) <= max_bytes
    keys = [f.relative_to(root).parts for f in files]
    assert keys == sorted(keys)
    # Deterministic prefix: a bigger budget extends the same list.
    assert resolve_corpus("stdlib", max_bytes=2 * max_bytes)[: len(files)] == files


def test_resolve_stdlib_skips_installed_packages(tmp_path, monkeypatch):
    fake = tmp_path / "lib" / "python3.x"
    for rel in ["abc.py", "zz.py", "json/__init__.py", "json/notes.txt", "site-packages/pkg/mod.py",
                "dist-packages/mod.py", "json/dist-packages/mod.py", ".hidden/mod.py"]:
        (fake / rel).parent.mkdir(parents=True, exist_ok=True)
        (fake / rel).write_text("x = 1\n")
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(fake)})
    names = [f.relative_to(fake).as_posix() for f in resolve_corpus("stdlib")]
    assert names == ["abc.py", "json/__init__.py", "zz.py"]


def test_resolve_missing_names_spec(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        resolve_corpus(str(tmp_path / "no_such_dir"))
    with pytest.raises(FileNotFoundError, match=r"\*\.zzz"):
        resolve_corpus(str(tmp_path / "*.zzz"))


@pytest.mark.parametrize("contents", [{}, {"a.txt": b"", "b.txt": b""}, {"x.bin": b"\x00\x01"}])
def test_resolve_empty_corpus_names_spec(tmp_path, contents):
    root = tmp_path / "empty_corpus"
    root.mkdir()
    for name, blob in contents.items():
        (root / name).write_bytes(blob)
    with pytest.raises(ValueError, match="empty_corpus"):
        resolve_corpus(str(root))


# ---------------------------------------------------------------------------------------- split


def test_split_is_deterministic_disjoint_and_complete(corpus_dir):
    files = text_files(corpus_dir)
    train, val = split_files(files, val_fraction=0.2)
    assert (train, val) == split_files(files, val_fraction=0.2)
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(files)
    val_bytes = sum(p.stat().st_size for p in val)
    total = sum(p.stat().st_size for p in files)
    # By bytes, overshooting by at most one file.
    assert 0.2 * total <= val_bytes < 0.2 * total + max(p.stat().st_size for p in val)
    # Input order does not change which files go where.
    r_train, r_val = split_files(list(reversed(files)), val_fraction=0.2)
    assert set(r_train) == set(train) and set(r_val) == set(val)


def test_split_is_pinned(corpus_dir):
    # The split is a fixed function of relative paths and sizes (sha256, not Python's per-process
    # salted hash()), so every process, machine and later run agrees on it; this pins it.
    _, val = split_files(text_files(corpus_dir), 0.2)
    names = [p.relative_to(corpus_dir).as_posix() for p in val]
    assert names == ["doc02.txt", "doc03.txt", "doc07.txt"]


def test_split_depends_on_relative_paths_not_location(corpus_dir, tmp_path):
    moved = shutil.copytree(corpus_dir, tmp_path / "elsewhere" / "copy")
    _, val = split_files(text_files(corpus_dir), 0.2)
    _, moved_val = split_files(text_files(moved), 0.2)
    assert [p.relative_to(corpus_dir) for p in val] == [p.relative_to(moved) for p in moved_val]


def test_split_counts_bytes_not_files(tmp_path):
    # 40 one-line files and 4 big ones: 5% of the files could be only one-liners, 5% of the
    # bytes cannot.
    root = tmp_path / "mixed"
    root.mkdir()
    for i in range(40):
        (root / f"tiny{i:02d}.py").write_text("x = 1\n")
    for i in range(4):
        (root / f"big{i}.py").write_text(make_text(300, seed=i))
    files = sorted(root.iterdir())
    _, val = split_files(files, 0.05)
    assert sum(p.stat().st_size for p in val) >= 0.05 * sum(p.stat().st_size for p in files)


def test_split_keeps_one_file_each_side(corpus_dir):
    two = text_files(corpus_dir)[:2]
    for fraction in (0.01, 0.99):
        train, val = split_files(two, fraction)
        assert len(train) == 1 and len(val) == 1
    with pytest.raises(ValueError, match="val_fraction"):
        split_files(two, 0.0)


def test_split_text_at_line_boundary():
    text = "".join(f"line {i}\n" for i in range(100))
    train, val = split_text(text, 0.1)
    assert train + val == text
    assert train.endswith("\n") and val.startswith("line ")
    assert 0.05 < len(val) / len(text) < 0.15


# --------------------------------------------------------------------------------- prepare_data


def test_prepare_data_tokens_decode_to_train_and_val_files(corpus_dir, tmp_path):
    prepared = prepare_data(str(corpus_dir), vocab_size=300, seq_len=32,
                            cache_dir=tmp_path / "cache", val_fraction=0.2, progress=False)
    tok = prepared.tokenizer
    train_files, val_files = split_files(text_files(corpus_dir), 0.2)
    assert prepared.train_tokens.dtype == np.uint16 and isinstance(prepared.train_tokens, np.memmap)
    assert prepared.n_files == 12
    assert prepared.n_bytes == sum(p.stat().st_size for p in text_files(corpus_dir))
    assert prepared.vocab_size == tok.vocab_size == 300 and not prepared.from_cache
    assert int(prepared.train_tokens.max()) < tok.vocab_size
    # Documents joined by eos, in file order, each split holding exactly its own files.
    train_text = EOS_TOKEN.join(p.read_text() for p in train_files)
    assert tok.decode(prepared.train_tokens.tolist()) == train_text
    val_text = EOS_TOKEN.join(p.read_text() for p in val_files)
    assert tok.decode(prepared.val_tokens.tolist()) == val_text
    entry = prepared.cache_path
    assert entry.name == f"{prepared.corpus_hash[:16]}-v300"
    names = sorted(p.name for p in entry.iterdir())
    assert names == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]  # no temp files left


def test_prepare_data_second_call_hits_cache(corpus_dir, tmp_path, monkeypatch):
    kwargs = dict(vocab_size=300, seq_len=32, cache_dir=tmp_path / "cache", progress=False)
    first = prepare_data(str(corpus_dir), **kwargs)

    def no_training(*args, **kw):
        raise AssertionError("tokenizer retrained on a cache hit")

    monkeypatch.setattr(Tokenizer, "train", no_training)
    second = prepare_data(str(corpus_dir), **kwargs)
    assert second.from_cache and not first.from_cache
    assert second.corpus_hash == first.corpus_hash
    np.testing.assert_array_equal(second.train_tokens, first.train_tokens)
    np.testing.assert_array_equal(second.val_tokens, first.val_tokens)
    # The same corpus at another place on disk is the same cache entry.
    moved = shutil.copytree(corpus_dir, tmp_path / "moved")
    assert prepare_data(str(moved), **kwargs).from_cache
    # Without meta.json the entry is incomplete and gets rebuilt.
    monkeypatch.undo()
    (first.cache_path / "meta.json").unlink()
    assert not prepare_data(str(corpus_dir), **kwargs).from_cache


def test_prepare_data_without_build_reads_only_the_cache(corpus_dir, tmp_path):
    kwargs = dict(vocab_size=300, seq_len=32, cache_dir=tmp_path / "cache", progress=False)
    assert prepare_data(str(corpus_dir), build=False, **kwargs) is None
    assert not (tmp_path / "cache").exists()
    first = prepare_data(str(corpus_dir), **kwargs)
    again = prepare_data(str(corpus_dir), build=False, **kwargs)
    assert again.from_cache and again.corpus_hash == first.corpus_hash
    assert again.n_bytes == first.n_bytes
    np.testing.assert_array_equal(again.train_tokens, first.train_tokens)


def test_batches_from_the_cache_file_match_batches_from_memory(corpus_dir, tmp_path):
    """Windows of a cache memmap are read with pread (not through the mapping): same values."""
    prepared = prepare_data(str(corpus_dir), vocab_size=300, seq_len=16,
                            cache_dir=tmp_path / "cache", progress=False)
    on_disk, in_memory = prepared.train_tokens, np.array(prepared.train_tokens)
    for step in range(3):
        for a, b in zip(BatchSampler(on_disk, 4, 16, seed=3).batch(step),
                        BatchSampler(in_memory, 4, 16, seed=3).batch(step)):
            assert torch.equal(a, b)
    for (a, b), (c, d) in zip(eval_batches(on_disk, 2, 16, 3), eval_batches(in_memory, 2, 16, 3)):
        assert torch.equal(a, c) and torch.equal(b, d)
    # A view of the memmap (not the file's own mapping) takes the in-memory path.
    view = on_disk[5:]
    assert torch.equal(BatchSampler(view, 4, 16, seed=3).batch(0)[0],
                       BatchSampler(in_memory[5:], 4, 16, seed=3).batch(0)[0])


def test_prepare_data_changed_content_or_vocab_misses_cache(corpus_dir, tmp_path):
    kwargs = dict(seq_len=32, cache_dir=tmp_path / "cache", progress=False)
    first = prepare_data(str(corpus_dir), vocab_size=300, **kwargs)
    other_vocab = prepare_data(str(corpus_dir), vocab_size=320, **kwargs)
    assert not other_vocab.from_cache and other_vocab.cache_path != first.cache_path
    # Same folder name, but a split made with another val_fraction must not be reused.
    assert not prepare_data(str(corpus_dir), vocab_size=300, val_fraction=0.3, **kwargs).from_cache
    (corpus_dir / "doc00.txt").write_text("changed\n" * 50)
    changed = prepare_data(str(corpus_dir), vocab_size=300, **kwargs)
    assert not changed.from_cache and changed.corpus_hash != first.corpus_hash


def test_prepare_data_single_file_splits_at_line(corpus_dir, tmp_path):
    file = corpus_dir / "doc00.txt"
    prepared = prepare_data(str(file), vocab_size=300, seq_len=16, cache_dir=tmp_path,
                            progress=False)
    train_text = prepared.tokenizer.decode(prepared.train_tokens.tolist())
    val_text = prepared.tokenizer.decode(prepared.val_tokens.tolist())
    assert train_text + val_text == file.read_text()
    assert train_text.endswith("\n") and len(val_text) > 0


def test_prepare_data_too_short_says_how_many(corpus_dir, tmp_path):
    with pytest.raises(ValueError, match=r"(?s)corpus.*has \d+ tokens.*needs at least 100001"):
        prepare_data(str(corpus_dir), vocab_size=300, seq_len=100_000, cache_dir=tmp_path,
                     progress=False)


def test_prepare_data_rejects_vocab_beyond_uint16(corpus_dir, tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        prepare_data(str(corpus_dir), vocab_size=65536, seq_len=32, cache_dir=tmp_path,
                     progress=False)


def test_prepare_data_synthetic_is_seeded_and_uncached(tmp_path):
    a = prepare_data("synthetic", vocab_size=512, seq_len=64, cache_dir=tmp_path, seed=1)
    b = prepare_data("synthetic", vocab_size=512, seq_len=64, cache_dir=tmp_path, seed=1)
    c = prepare_data("synthetic", vocab_size=512, seq_len=64, cache_dir=tmp_path, seed=2)
    assert a.tokenizer is None and (len(a.train_tokens), len(a.val_tokens)) == (200_000, 20_000)
    assert a.train_tokens.dtype == np.uint16 and int(a.train_tokens.max()) < 512
    np.testing.assert_array_equal(a.train_tokens, b.train_tokens)
    assert not np.array_equal(a.train_tokens, c.train_tokens)
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------------- batches


@pytest.fixture
def counting_tokens() -> np.ndarray:
    """tokens[i] = i, so a window's content says where it starts."""
    return np.arange(5000, dtype=np.uint16)


def test_batch_is_a_function_of_seed_and_step(counting_tokens):
    sampler = BatchSampler(counting_tokens, batch_size=4, seq_len=33, seed=7)
    idx, targets = sampler.batch(3)
    assert idx.shape == targets.shape == (4, 33) and idx.dtype == targets.dtype == torch.int64
    for s in range(3):  # calling other steps first changes nothing: no hidden state
        sampler.batch(s)
    fresh = BatchSampler(counting_tokens, batch_size=4, seq_len=33, seed=7)
    assert torch.equal(fresh.batch(3)[0], idx) and torch.equal(sampler.batch(3)[1], targets)
    assert not torch.equal(sampler.batch(4)[0], idx)
    assert not torch.equal(BatchSampler(counting_tokens, 4, 33, seed=8).batch(3)[0], idx)


def test_batch_targets_are_next_tokens(counting_tokens):
    idx, targets = BatchSampler(counting_tokens, batch_size=8, seq_len=17, seed=0).batch(0)
    assert torch.equal(targets, idx + 1)
    assert torch.equal(idx[:, 1:], targets[:, :-1])


def test_batch_windows_reach_both_ends():
    tokens = np.arange(40, dtype=np.uint16)
    sampler = BatchSampler(tokens, batch_size=64, seq_len=30, seed=0)
    starts = torch.cat([sampler.batch(s)[0][:, 0] for s in range(20)])
    # The last start still leaves room for its final target.
    assert int(starts.min()) == 0 and int(starts.max()) == 40 - 30 - 1


def test_ranks_split_the_global_batch(counting_tokens):
    global_sampler = BatchSampler(counting_tokens, batch_size=12, seq_len=9, seed=3)
    global_idx, global_targets = global_sampler.batch(5)
    per_rank = BatchSampler(counting_tokens, batch_size=4, seq_len=9, seed=3)
    shards = [per_rank.batch(5, rank=r, world_size=3) for r in range(3)]
    for r, (idx, targets) in enumerate(shards):
        assert idx.shape == (4, 9)
        assert torch.equal(idx, global_idx[r::3]) and torch.equal(targets, global_targets[r::3])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(seq_len=5000), "5001"),
        (dict(seed=-1), "seed"),
    ],
)
def test_batch_sampler_rejects_bad_arguments(counting_tokens, kwargs, match):
    args = dict(tokens=counting_tokens, batch_size=2, seq_len=8, seed=0) | kwargs
    with pytest.raises(ValueError, match=match):
        BatchSampler(**args)


@pytest.mark.parametrize("rank, world_size", [(2, 2), (-1, 2), (0, 0)])
def test_batch_rejects_bad_rank(counting_tokens, rank, world_size):
    with pytest.raises(ValueError, match="rank"):
        BatchSampler(counting_tokens, 2, 8, 0).batch(0, rank=rank, world_size=world_size)


def test_eval_batches_are_fixed_and_evenly_spaced(counting_tokens):
    batches = eval_batches(counting_tokens, batch_size=4, seq_len=31, n_batches=5)
    again = eval_batches(counting_tokens, batch_size=4, seq_len=31, n_batches=5)
    assert len(batches) == 5
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    starts = torch.cat([idx[:, 0] for idx, _ in batches])
    assert int(starts[0]) == 0 and int(batches[-1][1][-1, -1]) == 4999  # first token to last token
    gaps = starts.diff()
    # Evenly spaced, and no two windows' inputs overlap.
    assert int(gaps.min()) >= 31 and int(gaps.max()) - int(gaps.min()) <= 1
    assert all(torch.equal(t, i + 1) for i, t in batches)


def test_eval_batches_shrink_when_tokens_are_few():
    tokens = np.arange(100, dtype=np.uint16)
    batches = eval_batches(tokens, batch_size=2, seq_len=10, n_batches=50)
    assert len(batches) == 4  # 9 non-overlapping windows fit: 4 full batches of 2
    one = eval_batches(tokens, batch_size=32, seq_len=40, n_batches=3)
    # Fewer rows than asked, but at least one batch.
    assert len(one) == 1 and one[0][0].shape == (2, 40)
    with pytest.raises(ValueError, match="101"):
        eval_batches(tokens, batch_size=1, seq_len=100, n_batches=1)
