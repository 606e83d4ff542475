"""The public API: a loaded model on one backend, generating text and token ids.

`tformer.load(path)` returns a `Runtime`. It turns text into ids, sends them as requests to its
engine (through its `EngineFront`: the engine's one loop, stepped by the calling threads), and
turns the ids generated back into text (`Completion`), applying stop strings and streaming pieces
as they become whole characters.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import fields
from pathlib import Path

import torch

from tformer.backends import REFERENCE, Backend, backend_class, create_backend, default_device, export_backend_name, open_export
from tformer.checkpoint import load_model
from tformer.config import ModelConfig
from tformer.errors import TformerError
from tformer.engine import Engine, EngineFront, RequestOutput, SamplingParams
from tformer.engine.engine import CHUNK, DECODE_STEPS, DEFAULT_BATCH
from tformer.engine.output import Completion, Output, Piece
from tformer.inputs import as_int, as_one_prompt, as_path, as_prompts
from tformer.model import TransformerLM
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
    max_batch_size: int | None = None,
    max_len: int | None = None,
    decode_steps: int | None = None,
) -> Runtime:
    """Load a checkpoint and get a runtime that generates with it.

    path: tformer's `.safetensors` checkpoint, or the tutorial's `torch.save(model.state_dict())`
        file or a training-checkpoint dict (these need `nhead`), or a `tformer-export` directory.
    backend: which engine runs the decode step (see `tformer.backends.BACKENDS`); default "eager"
        for checkpoints, and for an export directory the backend that runs it ("onnx" or "aot").
    device: default CUDA when available, else CPU; for an export directory, the best device its
        backend can run on here (a .pt2 package: the CPU). dtype: default float32.
    tokenizer: a `tokenizer.json` path (or Tokenizer) to use instead of, or in the absence of, the
        checkpoint's own. Without any, give prompts as token ids.
    max_batch_size, max_len: the engine's size, fixed here (see `Runtime`): requests running at
        once (default 8), and the longest prompt plus new tokens (default: the model's context).
    decode_steps: decode steps run in a row while no request waits (default 8; see `Engine`).
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
        return _load_export(Path(path), backend, device, dtype, tokenizer, max_batch_size, max_len, decode_steps)
    model, own_tokenizer = load_model(path, nhead)
    return Runtime.from_model(model, tokenizer or own_tokenizer, backend or REFERENCE, device, dtype, max_batch_size,
                              max_len, decode_steps)  # fmt: skip


def _load_export(
    directory: Path, backend: str | None, device: torch.device | None, dtype, tokenizer: Tokenizer | None,
    max_batch_size: int | None, max_len: int | None, decode_steps: int | None,
) -> Runtime:  # fmt: skip
    runs_on = export_backend_name(directory)  # from the schema-checked tformer.json; the backend verifies it all
    if backend not in (None, runs_on):
        raise TformerError(f"{directory} is an export for backend '{runs_on}', not '{backend}'")
    engine = open_export(directory, device)
    if dtype is not None and resolve_dtype(dtype) != engine.dtype:
        raise TformerError(f"{directory} was exported as {engine.dtype}; export again with --dtype to change it")
    if tokenizer is None and engine.meta["tokenizer"]:  # its SHA-256 was verified with the rest
        tokenizer = Tokenizer.from_file(directory / "tokenizer.json")
    return Runtime(engine, tokenizer, max_batch_size, max_len, decode_steps)


class Runtime:
    """A model on a backend, served by a continuous-batching `Engine`. Two methods generate, as
    vLLM's `LLM.generate` does: `generate` (a batch of text or id prompts; an `Output` each) and
    `stream` (one prompt; `Piece`s as they come). Sampling options, for both, as a `SamplingParams`
    or its fields as keywords (max_new_tokens=128, temperature=1.0 (0 = greedy), top_k=None,
    top_p=None, seed=None, stop=(), stop_token_ids=(): the server's defaults too).

    The engine is sized once, here: `max_batch_size` cache rows (default 8; more prompts than
    rows wait for a free one) of `max_len` slots (default: the model's context, or as many as a
    quarter of the memory free now holds, if fewer: a warning says so). `decode_steps`: see `Engine`. A request needs
    `len(prompt) + max_new_tokens <= max_len`. Every call runs within these bounds, so a compiling
    backend compiles once, by `warmup`, never between calls.

    Every method sends its prompts to the engine as requests and steps it, a turn of the engine's
    one loop (`EngineCore`) at a time, until they are done. Any number of threads may call at
    once: their requests share the running batch, and whichever waits takes the next turn.
    """

    def __init__(
        self, backend: Backend, tokenizer: Tokenizer | None, max_batch_size: int | None = None,
        max_len: int | None = None, decode_steps: int | None = None,
    ):  # fmt: skip
        if tokenizer is not None and tokenizer.vocab_size > backend.config.vocab_size:
            raise TformerError(
                f"tokenizer has {tokenizer.vocab_size} ids but the model only {backend.config.vocab_size}; "
                "use the tokenizer the model was trained with"
            )
        self.backend = backend
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_id if tokenizer is not None else None
        rows = DEFAULT_BATCH if max_batch_size is None else as_int("max_batch_size", max_batch_size, minimum=1)
        max_len = default_max_len(backend, rows) if max_len is None else max_len
        self.engine = Engine(backend, rows, max_len, decode_steps=DECODE_STEPS if decode_steps is None else decode_steps)
        self.front = EngineFront(self.engine)  # its steps run in the calling threads (or a server's thread)

    @classmethod
    def from_model(
        cls,
        model: TransformerLM,
        tokenizer: Tokenizer | None = None,
        backend: str = REFERENCE,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        max_batch_size: int | None = None,
        max_len: int | None = None,
        decode_steps: int | None = None,
    ) -> Runtime:
        """A runtime around an in-memory model (the weights move to `device` / `dtype`)."""
        device = default_device(backend_class(backend)) if device is None else resolve_device(device)
        backend_ = create_backend(backend, model, device, resolve_dtype(dtype))
        return cls(backend_, tokenizer, max_batch_size, max_len, decode_steps)

    @property
    def config(self) -> ModelConfig:
        return self.backend.config

    def warmup(self, batch_sizes: Sequence[int] = (1,), max_prompt_len: int = 128, max_new_tokens: int = 128) -> float:
        """Have the backend compile what its steps over this engine may need (`Engine.warmup`, in
        the thread that steps: CUDA graphs belong to the thread that records them), then run one
        greedy generation per batch size at the longest expected request (cut to the engine's
        max_len), so that the first user request waits for no compiler. Returns the seconds taken."""
        began = time.perf_counter()
        self.front.call(self.engine.warmup)
        new = min(max_new_tokens, self.engine.max_len - 1)
        prompt = max(1, min(max_prompt_len, self.engine.max_len - new))
        for batch in batch_sizes:
            self.generate([[0] * prompt] * batch, max_new_tokens=new, temperature=0)
        return time.perf_counter() - began

    def generate(
        self, prompts: str | Sequence[str] | Sequence[Sequence[int]], params: SamplingParams | None = None, **sampling
    ) -> list[Output]:
        """Complete each prompt: its text, token ids and finish reason (`Output`), in prompt order.

        prompts: one string or a list of strings; or token ids, as a list of prompts (each a list
            or 1-D array/tensor of ids) or a 2-D integer array/tensor, one prompt per row (for one
            prompt pass `[ids]`). Id prompts need no tokenizer (without one, the text is "").
        params: a `SamplingParams`; or its fields as keywords (`temperature=0`), not both.
        """
        params = self._params(params, sampling)
        ids, outputs = self._run(self._ids(as_prompts(prompts)), params)
        completions = {i: Completion(self.tokenizer, params.stop) for i in ids}
        for out in outputs:
            completion = completions[out.request_id]
            if not completion.finished and completion.take([out]).finish_reason and not out.finished:
                self.front.abort(out.request_id)  # a stop string, before the engine's own end
        return [c.output() for c in completions.values()]

    def stream(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, **sampling
    ) -> Iterator[Piece]:
        """The completion of one prompt (a string, or a list or 1-D array/tensor of ids) as it is
        generated: `Piece`s whose texts and token ids join to `generate`'s, the last one with the
        finish reason. Input errors raise at call time, before the first piece."""
        params = self._params(params, sampling)
        _, outputs = self._run(self._ids([as_one_prompt(prompt)]), params)
        return self._pieces(Completion(self.tokenizer, params.stop), outputs)

    @staticmethod
    def _pieces(completion: Completion, outputs: Iterator[RequestOutput]) -> Iterator[Piece]:
        with contextlib.closing(outputs):  # leaving early (a stop string, a consumer) aborts the request
            for out in outputs:
                yield completion.take([out])
                if completion.finished:
                    return

    @staticmethod
    def _params(params: SamplingParams | None, sampling: dict) -> SamplingParams:
        """`params`, or a `SamplingParams` of the keyword options: one or the other."""
        if params is not None:
            if not isinstance(params, SamplingParams):
                raise TformerError(f"params must be a tformer.SamplingParams, got {type(params).__name__}; "
                                   "or pass options as keywords (temperature=0, stop=[...])")  # fmt: skip
            if sampling:
                raise TformerError(f"give params or keyword options ({', '.join(sorted(sampling))}), not both: "
                                   "set them in the SamplingParams (dataclasses.replace(params, ...))")  # fmt: skip
            return params
        known = {f.name for f in fields(SamplingParams)}
        unknown = sorted(set(sampling) - known)
        if unknown:
            raise TformerError(f"unknown sampling option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return SamplingParams(**sampling)

    def _run(self, prompts: list[list[int]], params: SamplingParams) -> tuple[list[Hashable], Iterator[RequestOutput]]:
        """Check everything, send the prompts to the engine as requests; their ids, and their
        outputs as they come (closing it early aborts what is left of its requests; an output
        with reason "error" raises TformerError)."""
        if not prompts:
            raise TformerError("no prompts given; pass at least one")
        if params.stop and self.tokenizer is None:
            raise TformerError("stop strings need a tokenizer, and this model has none: pass tokenizer='tokenizer.json' "
                               "to tformer.load (CLI: --tokenizer), or end on stop_token_ids")  # fmt: skip
        ids, outputs = self.front.requests(prompts, params, self.eos_id)
        return ids, _raising(outputs)

    def _ids(self, prompts: list[str] | list[list[int]]) -> list[list[int]]:
        """Each prompt's token ids: text is encoded (which takes a tokenizer), ids are as given."""
        if prompts and isinstance(prompts[0], str):
            if self.tokenizer is None:
                raise TformerError(
                    "this model has no tokenizer: pass tokenizer='tokenizer.json' to tformer.load "
                    "(CLI: --tokenizer), or give prompts as token ids (CLI: --ids)"
                )
            return [self.tokenizer.encode(p) for p in prompts]
        return prompts


def _raising(outputs: Iterator[RequestOutput]) -> Iterator[RequestOutput]:
    with contextlib.closing(outputs):  # closed early: the requests left are aborted
        for out in outputs:
            if out.finish_reason == "error":
                raise TformerError(f"generation failed: {out.error}")
            yield out


# The default max_len is the model's context, unless a quarter of the memory free now holds fewer slots.
MEMORY_SHARE = 4


def default_max_len(backend: Backend, rows: int) -> int:
    """The model's context, or fewer slots where the cache of `rows` rows would take more than a
    quarter of the memory free now (CUDA: the device's; the CPU: MemAvailable), rounded down to a
    multiple of 64 (and said in a warning)."""
    c = backend.config
    per_slot = 2 * c.n_layers * c.d_model * backend.dtype.itemsize * rows  # keys and values of every row
    free = _free_memory(backend.device)
    if free is None:
        return c.max_len
    fits = (free // MEMORY_SHARE) // per_slot - CHUNK  # the engine adds `CHUNK` slots per row
    if fits >= c.max_len:
        return c.max_len
    slots = max(64, fits // 64 * 64)
    warnings.warn(f"max_len {slots} instead of the model's context {c.max_len}: a cache of {rows} rows x {c.max_len} "
                  f"slots would take more than a quarter of the {free / 2**30:.1f} GiB free; pass max_len= to choose",
                  stacklevel=3)  # fmt: skip
    return slots


def _free_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
