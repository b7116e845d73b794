"""Byte-level BPE tokenizer: a thin wrapper around Hugging Face `tokenizers`.

Byte-level means every input is first mapped to its UTF-8 bytes, so any text encodes with no
unknown token and decode(encode(s)) == s. The merges are learned by the Rust BPE trainer; this
file only fixes the settings (no prefix space, byte alphabet, our two special tokens) and adds
atomic saving and loading errors that name the file.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
N_BYTES = 256  # the initial alphabet: one token per byte value
TOKENIZER_FILENAME = "tokenizer.json"


class Tokenizer:
    """Byte-level BPE with `<|endoftext|>` (eos) and `<|pad|>` as special tokens.

    Text is encoded literally: a "<|endoftext|>" that appears inside the text is split into
    ordinary byte tokens, so a corpus cannot smuggle in document boundaries; the eos id is only
    ever inserted by the caller (see `eos_id`). decode() prints special ids as their names.
    """

    def __init__(self, hf_tokenizer: HFTokenizer):
        for name in SPECIAL_TOKENS:
            if hf_tokenizer.token_to_id(name) is None:
                raise ValueError(
                    f"tokenizer has no special token {name!r}; it was not made by Tokenizer.train"
                )
        # tokenizer.json does not record this setting (tokenizers 0.23), so set it on every load.
        hf_tokenizer.encode_special_tokens = True
        self._tok = hf_tokenizer

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int, show_progress: bool = False
    ) -> "Tokenizer":
        """Learn BPE merges from `texts` until the vocabulary (bytes + merges + specials) has
        `vocab_size` entries, or fewer if the texts run out of pairs worth merging."""
        min_vocab = N_BYTES + len(SPECIAL_TOKENS)
        if not isinstance(vocab_size, int) or vocab_size < min_vocab:
            raise ValueError(
                f"vocab_size must be an int >= {min_vocab} (256 byte tokens + "
                f"{len(SPECIAL_TOKENS)} special tokens), got vocab_size={vocab_size!r}"
            )
        tok = HFTokenizer(models.BPE())
        # add_prefix_space=False: a leading space would be invented on encode and kept on decode,
        # breaking the exact round trip.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
            show_progress=show_progress,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once; the Rust side spreads them over all cores."""
        # encode_batch_fast skips computing character offsets, which we never use.
        encodings = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self._tok.token_to_id(EOS_TOKEN)

    @property
    def pad_id(self) -> int:
        return self._tok.token_to_id(PAD_TOKEN)

    def save(self, path: str | os.PathLike) -> Path:
        """Write tokenizer.json atomically. `path` is a folder (created if needed) or a file
        name ending in .json. Returns the file written."""
        file = Path(path)
        if file.suffix != ".json":
            file = file / TOKENIZER_FILENAME
        file.parent.mkdir(parents=True, exist_ok=True)
        # A temp file in the same folder, then os.replace: a reader sees the old file or the new
        # one, never half of one, even if we are killed mid-write.
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self._tok.to_str())
            os.replace(tmp, file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return file

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load from a tokenizer.json file, or from a folder holding one."""
        file = Path(path)
        if file.is_dir():
            file = file / TOKENIZER_FILENAME
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer file at {str(file)!r} (from path={str(path)!r})")
        try:
            hf_tokenizer = HFTokenizer.from_str(file.read_text(encoding="utf-8"))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON or schema
            raise ValueError(
                f"tokenizer file {str(file)!r} is corrupt or not a tokenizer: {exc}"
            ) from exc
        try:
            return cls(hf_tokenizer)
        except ValueError as exc:
            raise ValueError(f"tokenizer file {str(file)!r}: {exc}") from exc

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, pad_id={self.pad_id})"
        )
