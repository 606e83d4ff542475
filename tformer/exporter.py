"""Exporting a model and validating the export against PyTorch, for every format.

This sits above the backends because validation runs the export through the backend that will run
it in production (opened from the finished directory, verified like any other) and compares
it with the eager backend: the logits of every step of each of the format's `Case`s (a batch with
a right-padded row, fed in chunks: a prefill, then more tokens on top of the cache), then 32
greedy steps on a batch of prompts of different lengths, which must give identical tokens. The
directory is written by `tformer.export.writer`, which knows nothing of backends and calls
validation back before it publishes the directory, so a failed validation leaves nothing behind.
"""

from __future__ import annotations

import copy
import importlib
import os
from pathlib import Path

import torch

from tformer.backends import backend_class, check_device, open_export
from tformer.backends.batch import Batch
from tformer.errors import TformerError
from tformer.export.formats import Case, format_for, format_named
from tformer.export.integrity import verified_meta
from tformer.export.writer import Log, write_export
from tformer.model import TransformerLM
from tformer.runtime import Runtime
from tformer.tokenizer import Tokenizer

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2}  # max abs logit difference
GREEDY_STEPS = 32
GREEDY_LEN = 64  # the greedy check's engines: its longest prompt (7 tokens) and GREEDY_STEPS


def export_model(
    model: TransformerLM,
    out_dir: str | os.PathLike,
    format: str = "onnx",
    tokenizer: Tokenizer | None = None,
    dtype: torch.dtype = torch.float32,
    validate: bool = True,
    force: bool = False,
    log: Log = lambda _: None,
    device: torch.device = torch.device("cpu"),
    **options,
) -> dict:
    """Export `model` to `out_dir` in `format` ("onnx" or "pt2") and return its `tformer.json`.

    The artifact is built on the CPU (it does not depend on the device); `device` is where
    validation runs both PyTorch and the export (ONNX on CUDA needs onnxruntime-gpu; a `.pt2` runs
    on the CPU only). `options` are the format's own (ONNX: `opset`, 17-22, default 18). The
    directory appears complete or not at all; an existing one needs `force`. Validation (default
    on) failing raises TformerError naming the case.
    """
    fmt = format_for(format)
    unknown = sorted(set(options) - set(fmt.options))
    if unknown:
        raise TformerError(f"{', '.join(unknown)} does not apply to {fmt.key} exports")
    if validate:
        check_device(backend_class(fmt.backend), device)  # before minutes of export, not after
    check = (lambda directory, exported: validate_export(directory, exported, log, device)) if validate else None
    return write_export(model, out_dir, fmt, tokenizer, dtype, force, log, check, **options)


def validate_export(
    directory: str | os.PathLike, model: TransformerLM, log: Log = lambda _: None,
    device: torch.device = torch.device("cpu"),
) -> dict:
    """Check the export in `directory` against `model` (in the export's dtype) on `device`; raise
    TformerError naming the first case that differs. Returns the report stored in tformer.json:
    the format's own checks, per case the max abs logit difference and the tolerance, and the
    greedy comparison."""
    directory = Path(directory)
    meta = verified_meta(directory)
    fmt = format_named(meta["format"])
    exported = open_export(directory, device)
    dtype = exported.dtype
    eager = Runtime.from_model(copy.deepcopy(model), device=device, dtype=dtype, max_batch_size=3, max_len=GREEDY_LEN)
    report = {"device": device.type, **importlib.import_module(fmt.module).validation_checks(directory / fmt.artifact)}
    report["shapes"] = [_compare(case, exported, eager.backend, TOLERANCE[dtype], log) for case in fmt.cases]
    report["greedy"] = greedy_check(Runtime(exported, None, 3, GREEDY_LEN), eager, log)
    return report


def _compare(case: Case, exported, eager, tolerance: float, log: Log) -> dict:
    """Feed `case` through both backends step by step (contract v2) and return the largest
    difference of the last-token logits. Every chunk is one step for every row; row 1 (when there
    are several) takes up to 3 tokens fewer, so its new tokens are right-padded, and batch row b
    uses cache row B-1-b, so that rows are not simply in order."""
    vocab, total, width = exported.config.vocab_size, sum(case.chunks), max(case.chunks)
    g = torch.Generator().manual_seed(case.batch * 100 + total)
    ids = torch.randint(0, vocab, (case.batch, total), generator=g)
    device = exported.device
    rows = list(range(case.batch - 1, -1, -1))
    caches = [b.allocate_cache(case.batch, total + width) for b in (exported, eager)]
    done = [0] * case.batch  # tokens of each row in the cache
    diff = 0.0
    with torch.inference_mode():
        for size in case.chunks:
            count = [size - min(3, size - 1) if b == 1 else size for b in range(case.batch)]
            cols = torch.zeros(case.batch, size, dtype=torch.long)  # right-padded with id 0
            for b, n in enumerate(count):
                cols[b, :n] = ids[b, done[b] : done[b] + n]
            lengths = [d + n for d, n in zip(done, count)]
            batch = Batch.of(cols.to(device), done, lengths, rows)
            got, want = (b.step(batch, c) for b, c in zip((exported, eager), caches))
            diff = max(diff, float((got.double() - want.double()).abs().max()))
            done = lengths
    log(f"  {case.text}: max |export - torch| = {diff:.2e}  (tolerance {tolerance:g})")
    if diff > tolerance:
        raise TformerError(f"validation failed at {case.text}: max abs difference {diff:.3g} > tolerance {tolerance:g}")
    return {**case.label, "max_abs_diff": diff, "tolerance": tolerance, "ok": True}


def greedy_check(exported: Runtime, eager: Runtime, log: Log) -> dict:
    """32 greedy steps on a batch of 3 prompts of different lengths through the exported runtime
    and through eager must give the same tokens. Raises TformerError naming the first differing prompt."""
    prompts = [[t % eager.config.vocab_size for t in p] for p in ([1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13])]
    ours = [out.token_ids for out in exported.generate(prompts, max_new_tokens=GREEDY_STEPS, temperature=0)]
    theirs = [out.token_ids for out in eager.generate(prompts, max_new_tokens=GREEDY_STEPS, temperature=0)]
    log(f"  greedy {GREEDY_STEPS} steps, padded batch of 3: {'identical' if ours == theirs else 'DIFFERENT'}")
    differs = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    if differs:
        raise TformerError(f"validation failed: greedy tokens differ from PyTorch (prompt {differs[0]})")
    return {"steps": GREEDY_STEPS, "prompts": len(prompts), "identical": True}
