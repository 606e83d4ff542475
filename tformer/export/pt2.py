"""AOTInductor export: the KV-cache step compiled ahead of time into a `.pt2` package.

The package holds one compiled program for prefill and decode alike: inputs `input_ids (B, T)`,
`input_pos (T,)`, `start (B,)` (all int64, contiguous) and the per-layer caches `k`, `v` (tuples
of `(B, H, S, Dh)` tensors, updated in place), output logits `(B, T, V)`; B, T and S are dynamic.
`tformer.load(dir, backend="aot")` runs it without re-tracing, and a C++ app can load it with
`torch::inductor::AOTIModelPackageLoader`. The cache is an input rather than module state, so the
caller sees it and can reset it.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from tformer.errors import TformerError
from tformer.export.artifact import (
    FORMAT_VERSION, TOLERANCE, cache_dir, export_copy, greedy_check, weights_sha256, write_meta,
)  # fmt: skip
from tformer.files import atomic_directory
from tformer.model import KVCache, TransformerLM
from tformer.tokenizer import Tokenizer

FORMAT_NAME = "tformer-pt2"


class AotStep(nn.Module):
    """The step as the package runs it: the cache passed in and written in place."""

    def __init__(self, model: TransformerLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids, input_pos, start, k, v):
        return self.model(input_ids, input_pos, start, KVCache(list(k), list(v)))


def export_pt2(
    model: TransformerLM,
    out_dir: str | os.PathLike,
    tokenizer: Tokenizer | None = None,
    dtype: torch.dtype = torch.float32,
    validate: bool = True,
    force: bool = False,
    log: Callable[[str], None] = lambda _: None,
) -> dict:
    """Write `model.pt2`, `tokenizer.json` (when given) and `tformer.json` into `out_dir`, atomically."""
    model = export_copy(model, dtype)
    c = model.config
    with atomic_directory(out_dir, force) as tmp:
        began = time.perf_counter()
        log("exporting with torch.export + AOTInductor (compiles C++; about half a minute)")
        _compile(model, tmp / "model.pt2")
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "config": c.__dict__,
            "dtype": str(dtype).removeprefix("torch."),
            "inputs": ["input_ids (B, T) int64", "input_pos (T,) int64", "start (B,) int64",
                       f"k: {c.n_layers} x (B, {c.nhead}, S, {c.head_dim})", f"v: {c.n_layers} x (B, {c.nhead}, S, {c.head_dim})"],
            "outputs": [f"logits (B, T, {c.vocab_size})"],
            "tokenizer": tokenizer is not None,
            "exporter": "torch.export + torch._inductor.aoti_compile_and_package",
            "versions": {"torch": torch.__version__},
            "weights_sha256": weights_sha256(model),
            "export_seconds": round(time.perf_counter() - began, 1),
            "validation": None,
        }  # fmt: skip
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer.json")
        write_meta(tmp, meta)
        if validate:
            meta["validation"] = validate_pt2(tmp, model, log)
            write_meta(tmp, meta)
    return meta


def _compile(model: TransformerLM, path: Path) -> None:
    from torch.export import Dim

    c = model.config
    batch, seq, slots = Dim("batch", min=1, max=4096), Dim("seq", min=1, max=c.max_len), Dim("slots", min=2, max=c.max_len)
    kv = tuple({0: batch, 2: slots} for _ in range(c.n_layers))
    dynamic = {"input_ids": {0: batch, 1: seq}, "input_pos": {0: seq}, "start": {0: batch}, "k": kv, "v": kv}
    cache = KVCache.allocate(c, 2, 16, "cpu", model.decoder.weight.dtype)
    example = (torch.zeros(2, 4, dtype=torch.long), torch.arange(4), torch.tensor([0, 1]), tuple(cache.k), tuple(cache.v))
    try:
        with torch.inference_mode():
            program = torch.export.export(AotStep(model).eval(), example, dynamic_shapes=dynamic)
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    except Exception as exc:  # the exporter and compiler raise many types; report one line
        raise TformerError(f".pt2 export failed: {str(exc).splitlines()[0]}") from exc


def validate_pt2(directory: Path, model: TransformerLM, log: Callable[[str], None] = lambda _: None) -> dict:
    """The package against the model: logits of a prefill and 4 decode steps for batch 1 and 3
    (one row padded) and prompts of 1 and 17 tokens, then 32 greedy steps on a padded batch."""
    from tformer.backends.aot import AotBackend
    from tformer.runtime import Runtime

    backend = AotBackend.from_directory(directory, torch.device("cpu"))
    eager = Runtime.from_model(copy.deepcopy(model), device="cpu", dtype=model.decoder.weight.dtype)
    tolerance, rows = TOLERANCE[model.decoder.weight.dtype], []
    for batch in (1, 3):
        for prompt in (1, 17):
            g = torch.Generator().manual_seed(batch * 100 + prompt)
            ids = torch.randint(0, model.config.vocab_size, (batch, prompt + 4), generator=g)
            start = torch.tensor([min(3, prompt - 1) if b == 1 else 0 for b in range(batch)])
            caches = [backend.allocate_cache(batch, prompt + 4), eager.backend.allocate_cache(batch, prompt + 4)]
            diff = 0.0
            with torch.inference_mode():
                for cols in [slice(0, prompt)] + [slice(t, t + 1) for t in range(prompt, prompt + 4)]:
                    pos = torch.arange(cols.start, cols.stop)
                    got = backend.step(ids[:, cols], pos, start, caches[0])
                    want = eager.backend.step(ids[:, cols], pos, start, caches[1])
                    real = pos[None, :] >= start[:, None]  # (B, T): padding columns' logits are meaningless
                    diff = max(diff, float((got.double() - want.double()).abs()[real].max()))
            rows.append(dict(batch=batch, prompt=prompt, decode_steps=4, max_abs_diff=diff, tolerance=tolerance, ok=diff <= tolerance))
            log(f"  batch {batch}  prompt {prompt:2d} + 4 steps: max |pt2 - torch| = {diff:.2e}  (tolerance {tolerance:g})")
            if diff > tolerance:
                raise TformerError(f"validation failed at batch {batch}, prompt {prompt}: max abs difference {diff:.3g}")
    return {"shapes": rows, "greedy": greedy_check(Runtime(backend, None), eager, log)}


def cached_export(model: TransformerLM, dtype: torch.dtype) -> Path:
    """A `.pt2` export of `model` in tformer's cache directory, compiled on first use only."""
    directory = cache_dir(model, dtype, "pt2")
    if not (directory / "tformer.json").is_file():
        export_pt2(model, directory, dtype=dtype, validate=False, force=True)
    return directory
