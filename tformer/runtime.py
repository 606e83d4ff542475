"""The public API: a loaded model on one backend, generating text or token ids.

`tformer.load(path)` returns a `Runtime`. It turns text into ids, runs the shared generation loop
(`tformer.generate`) on the chosen backend, and turns ids back into text, applying stop strings
and streaming pieces as they become whole characters.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import fields
from pathlib import Path

import torch

from tformer.backends import REFERENCE, Backend, backend_class, create_backend, default_device, export_backend_name, open_export
from tformer.checkpoint import load_model
from tformer.config import ModelConfig
from tformer.errors import TformerError
from tformer.generate import SamplingParams, generate_tokens
from tformer.inputs import as_int, as_path, as_prompt, as_prompts, as_stop, as_text, as_texts
from tformer.model import TransformerLM
from tformer.text import StopText
from tformer.tokenizer import Tokenizer

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}  # fmt: skip


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None picks CUDA when present, else the CPU; asking for CUDA without it is an error, and so
    is any other device type (tformer's backends run on the CPU and CUDA only)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise TformerError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {type(device).__name__}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise TformerError(f"unknown device '{device}'; use 'cpu' or 'cuda'") from None
    if device.type not in ("cpu", "cuda"):
        raise TformerError(f"device '{device}' is not supported: tformer runs on 'cpu' or 'cuda'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TformerError("CUDA is not available on this machine; use device='cpu' (CLI: --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise TformerError(f"there is no {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """None means float32; names like 'bf16' or 'float16' are accepted."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise TformerError(f"unsupported dtype {dtype!r}; use one of: fp32, bf16, fp16")


def load(
    path: str | os.PathLike,
    backend: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    nhead: int | None = None,
    tokenizer: str | os.PathLike | Tokenizer | None = None,
) -> Runtime:
    """Load a checkpoint and get a runtime that generates with it.

    path: tformer's `.safetensors` checkpoint, or the tutorial's `torch.save(model.state_dict())`
        file or a training-checkpoint dict (these need `nhead`), or a `tformer-export` directory.
    backend: which engine runs the decode step (see `tformer.backends.BACKENDS`); default "eager"
        for checkpoints, and for an export directory the backend that runs it ("onnx" or "aot").
    device: default CUDA when available, else CPU; for an export directory, the best device its
        backend can run on here (a .pt2 package: the CPU). dtype: default float32.
    tokenizer: a `tokenizer.json` path (or Tokenizer) to use instead of, or in the absence of, the
        checkpoint's own. Without any, use the id methods (`generate_ids`, `stream_ids`).
    Integers may be Python, numpy or torch scalars. Raises TformerError for anything wrong with
    these inputs.
    """
    path = as_path("path", path)
    if device is not None:
        device = resolve_device(device)  # a bad device fails before a large file is read
    if backend is not None and not isinstance(backend, str):
        raise TformerError(f"backend must be a name such as 'eager' or 'onnx', got {type(backend).__name__}")
    if nhead is not None:
        nhead = as_int("nhead", nhead, minimum=1)
    if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.from_file(as_path("tokenizer", tokenizer, "a tokenizer.json path or a tformer.Tokenizer"))
    if Path(path).is_dir():
        return _load_export(Path(path), backend, device, dtype, tokenizer)
    model, own_tokenizer = load_model(path, nhead)
    return Runtime.from_model(model, tokenizer or own_tokenizer, backend or REFERENCE, device, dtype)


def _load_export(
    directory: Path, backend: str | None, device: torch.device | None, dtype, tokenizer: Tokenizer | None
) -> Runtime:
    runs_on = export_backend_name(directory)  # from the schema-checked tformer.json; the backend verifies it all
    if backend not in (None, runs_on):
        raise TformerError(f"{directory} is an export for backend '{runs_on}', not '{backend}'")
    engine = open_export(directory, device)
    if dtype is not None and resolve_dtype(dtype) != engine.dtype:
        raise TformerError(f"{directory} was exported as {engine.dtype}; export again with --dtype to change it")
    if tokenizer is None and engine.meta["tokenizer"]:  # its SHA-256 was verified with the rest
        tokenizer = Tokenizer.from_file(directory / "tokenizer.json")
    return Runtime(engine, tokenizer)


class Runtime:
    """A model on a backend. Sampling options, for every method: see `SamplingParams`
    (max_new_tokens=128, temperature=0.8 (0 = greedy), top_k=50, top_p=None, seed=None)."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer | None):
        if tokenizer is not None and tokenizer.vocab_size > backend.config.vocab_size:
            raise TformerError(
                f"tokenizer has {tokenizer.vocab_size} ids but the model only {backend.config.vocab_size}; "
                "use the tokenizer the model was trained with"
            )
        self.backend = backend
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_id if tokenizer is not None else None

    @classmethod
    def from_model(
        cls,
        model: TransformerLM,
        tokenizer: Tokenizer | None = None,
        backend: str = REFERENCE,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> Runtime:
        """A runtime around an in-memory model (the weights move to `device` / `dtype`)."""
        device = default_device(backend_class(backend)) if device is None else resolve_device(device)
        return cls(create_backend(backend, model, device, resolve_dtype(dtype)), tokenizer)

    @property
    def config(self) -> ModelConfig:
        return self.backend.config

    def warmup(self, batch_sizes: Sequence[int] = (1,), max_prompt_len: int = 128, max_new_tokens: int = 128) -> float:
        """Run one generation per batch size at the longest expected request, so that compiling
        backends compile (and size their caches) now rather than on the first user request.
        Later requests within these bounds then run without recompiling. Returns the seconds taken."""
        began = time.perf_counter()
        for batch in batch_sizes:
            self.generate_ids([[0] * max_prompt_len] * batch, max_new_tokens=max_new_tokens, temperature=0)
        return time.perf_counter() - began

    def generate_ids(self, prompts: Sequence[Sequence[int]], **sampling) -> list[list[int]]:
        """New token ids (EOS excluded) for each prompt; prompts may differ in length.

        prompts: a list of prompts, each a list (or 1-D array/tensor) of ids, or a 2-D integer
            array/tensor with one prompt per row. For one prompt pass `[ids]`.
        """
        prompts = as_prompts(prompts)
        out: list[list[int]] = [[] for _ in prompts]
        for step in self._steps(prompts, sampling):
            for row, token in zip(out, step):
                if token is not None and token != self.eos_id:
                    row.append(token)
        return out

    def stream_ids(self, prompt: Sequence[int], **sampling) -> Iterator[int]:
        """New token ids of one prompt (a list or 1-D array/tensor of ids), one at a time (EOS
        excluded). Input errors raise at call time."""
        steps = self._steps([as_prompt(prompt)], sampling)
        return (token for (token,) in itertools.takewhile(lambda s: s[0] not in (None, self.eos_id), steps))

    def generate(self, prompts: str | Sequence[str], stop: str | Sequence[str] | None = (), **sampling) -> list[str]:
        """Completion text for each prompt (a string or a list of strings; always returns a list).

        stop: strings that end a row's completion; the completion is cut before the first one.
        """
        prompts = as_texts(prompts)
        stop = as_stop(stop)
        rows = [StopText(self._text_tokenizer(), stop) for _ in prompts]
        for step in self._steps([self._encode(p) for p in prompts], sampling):
            for row, token in zip(rows, step):
                if token is not None:
                    row.push(token)
            if all(row.stopped or token is None for row, token in zip(rows, step)):
                break
        return [row.text for row in rows]

    def stream(self, prompt: str, stop: str | Sequence[str] | None = (), **sampling) -> Iterator[str]:
        """Pieces of the completion of one prompt as they are generated; they join to `generate`'s text.

        Input errors raise at call time, before the first piece.
        """
        row = StopText(self._text_tokenizer(), as_stop(stop))
        return self._stream_text(row, self._steps([self._encode(as_text("prompt", prompt))], sampling))

    @staticmethod
    def _stream_text(row: StopText, steps: Iterator[list[int | None]]) -> Iterator[str]:
        for (token,) in steps:
            if token is None:
                break
            row.push(token)
            if piece := row.ready():
                yield piece
            if row.stopped:
                return
        row.stopped = True  # generation is over: nothing more can complete a stop string
        if piece := row.ready():
            yield piece

    def _steps(self, prompts: list[list[int]], sampling: dict) -> Iterator[list[int | None]]:
        known = {f.name for f in fields(SamplingParams)}
        unknown = sorted(set(sampling) - known)
        if unknown:
            raise TformerError(f"unknown sampling option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return generate_tokens(self.backend, prompts, SamplingParams(**sampling), self.eos_id)

    def _text_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise TformerError(
                "this model has no tokenizer: pass tokenizer='tokenizer.json' to tformer.load "
                "(CLI: --tokenizer), or work on token ids (generate_ids / --ids)"
            )
        return self.tokenizer

    def _encode(self, prompt: str) -> list[int]:
        return self._text_tokenizer().encode(prompt)
