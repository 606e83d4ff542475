"""Byte-level BPE tokenizer, trained and run by the `tokenizers` library.

Byte-level BPE is lossless for any Unicode text (every byte has a token, so nothing maps to an
unknown id), and its `tokenizer.json` is the format that every runtime and language reads, which
is why the ONNX export ships it as is. tformer keeps the JSON inside its checkpoints.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from tokenizers.decoders import DecodeStream

from tformer.errors import TformerError

EOS_TOKEN = "<|endoftext|>"


class Tokenizer:
    """Text <-> token ids. `eos_id` is the id of `<|endoftext|>`, or None if the vocabulary has none."""

    def __init__(self, tokenizer: HFTokenizer):
        self._tok = tokenizer
        self.eos_id: int | None = tokenizer.token_to_id(EOS_TOKEN)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Learn a byte-level BPE of `vocab_size` ids (256 bytes + EOS + merges) from `texts`."""
        if vocab_size < 257:
            raise TformerError(f"vocab_size must be at least 257 (256 bytes + EOS) for byte-level BPE, got {vocab_size}")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        try:
            return cls(HFTokenizer.from_str(text))
        except Exception as exc:  # the Rust side raises plain Exception subclasses
            raise TformerError(f"not a valid tokenizer.json: {exc}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise TformerError(f"{path}: tokenizer file not found; pass the path of a tokenizer.json")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TformerError(f"{path}: cannot read tokenizer ({exc})") from None
        try:
            return cls.from_json(text)
        except TformerError as exc:
            raise TformerError(f"{path}: {exc}") from None

    def to_json(self) -> str:
        return self._tok.to_str()

    def save(self, path: str | os.PathLike) -> None:
        """Write a standalone `tokenizer.json` (what the ONNX export ships)."""
        self._tok.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @functools.cached_property
    def longest_token_bytes(self) -> int:
        """The most UTF-8 bytes of text that one token stands for (its vocabulary string, whose
        byte-level characters are each at least one byte): a text of more than n times this
        takes more than n tokens, which a server checks before it tokenizes a long text."""
        return max(1, max(len(token.encode()) for token in self._tok.get_vocab(with_added_tokens=True)))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def text_stream(self) -> TextStream:
        """An incremental decoder for one sequence of ids (see `TextStream`)."""
        return TextStream(self._tok)


class TextStream:
    """Turns ids into text one at a time, for streaming.

    Byte-level tokens can split a character (an emoji is 4 bytes, often 2 tokens): `push` returns
    "" until the bytes add up to whole characters, so a stream never shows a broken character.
    """

    def __init__(self, tokenizer: HFTokenizer):
        self._tok = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)

    def push(self, token: int) -> str:
        return self._stream.step(self._tok, token) or ""
