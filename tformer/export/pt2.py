"""AOTInductor export: the KV-cache step compiled ahead of time into a `.pt2` package.

The package holds one compiled program for prefill and decode alike: inputs `input_ids (B, T)`,
`input_pos (T,)`, `start (B,)` (all int64, contiguous) and the per-layer caches `k`, `v` (tuples
of `(B, H, S, Dh)` tensors, updated in place), output logits `(B, T, V)`; B, T and S are dynamic.
`tformer.load(dir, backend="aot")` runs it without re-tracing, and a C++ app can load it with
`torch::inductor::AOTIModelPackageLoader`. The cache is an input rather than module state, so the
caller sees it and can reset it. The fields that decide how it runs (`tformer.config`, ...) are
compiled into it as AOTInductor metadata (`runner.get_metadata()`, and a JSON file inside the
package that the loader reads before any native code runs; see `tformer.export.integrity`).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from tformer.config import ModelConfig
from tformer.errors import TformerError, one_line
from tformer.export.artifact import (
    TOLERANCE, base_meta, cache_dir, embedded_metadata, export_copy, file_hashes, greedy_check, write_meta,
)  # fmt: skip
from tformer.export.integrity import FIX, check_embedded, verified_or_rebuilt
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
    meta = base_meta(FORMAT_NAME, model)
    with atomic_directory(out_dir, force) as tmp:
        began = time.perf_counter()
        log("exporting with torch.export + AOTInductor (compiles C++; about half a minute)")
        _compile(model, tmp / "model.pt2", embedded_metadata(meta))
        export_s = time.perf_counter() - began
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer.json")
        meta.update(
            **contract(model.config, meta["dtype"]),
            tokenizer=tokenizer is not None,
            exporter="torch.export + torch._inductor.aoti_compile_and_package",
            versions={"torch": torch.__version__},
            export_seconds=round(export_s, 1),
            files=file_hashes(tmp),
            validation=None,
        )
        write_meta(tmp, meta)
        if validate:
            meta["validation"] = validate_pt2(tmp, model, log)
            write_meta(tmp, meta)
    return meta


def contract(config: ModelConfig, dtype: str) -> dict[str, list[str]]:
    """The package's inputs and outputs as `tformer.json` lists them."""
    cache = f"{config.n_layers} x (B, {config.nhead}, S, {config.head_dim}) {dtype}"
    return {
        "inputs": ["input_ids (B, T) int64", "input_pos (T,) int64", "start (B,) int64", f"k: {cache}", f"v: {cache}"],
        "outputs": [f"logits (B, T, {config.vocab_size}) {dtype}"],
    }


def check_artifact(path: Path, meta: dict) -> None:
    """`model.pt2` against `tformer.json` (`meta`): the metadata compiled into it, read from the
    JSON copies AOTInductor packs beside the program (with zipfile: no native code runs), which
    must also say it was compiled for the CPU."""
    try:
        with zipfile.ZipFile(path) as package:
            found = [json.loads(package.read(name)) for name in package.namelist()
                     if "/aotinductor/" in name and name.endswith("_metadata.json")]  # fmt: skip
    except Exception as exc:  # zipfile raises many types (BadZipFile, zlib.error, EOFError, ...)
        raise TformerError(f"{path}: not a readable .pt2 package ({one_line(exc)}); {FIX}") from None
    if not found or not all(isinstance(m, dict) for m in found):
        raise TformerError(f"{path}: no AOTInductor metadata in the package; {FIX}")
    for embedded in found:
        check_embedded(meta, embedded, path)
        if embedded.get("AOTI_DEVICE_KEY", "cpu") != "cpu":
            raise TformerError(f"{path}: compiled for {embedded.get('AOTI_DEVICE_KEY')!r}, not the CPU; {FIX}")
        _check_runs_here(path, embedded, meta["versions"].get("torch", ""))


_ISA_LEVEL = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}  # x86 vector extensions, each implying the one before


def _check_runs_here(path: Path, embedded: dict, built_by: str) -> None:
    """A package is machine code for one torch, one architecture and one vector extension: run
    elsewhere it can die of an illegal instruction or an ABI mismatch, so refuse it first."""
    machine, here = embedded.get("AOTI_MACHINE"), platform.machine()
    if machine and machine != here:
        raise TformerError(f"{path} was compiled for {machine}, this machine is {here}; re-export it here")
    needs = max((_ISA_LEVEL.get(word.split("_")[0], 0) for word in str(embedded.get("AOTI_CPU_ISA", "")).split()), default=0)
    has = _ISA_LEVEL.get(torch.backends.cpu.get_cpu_capability().split("_")[0], 0)
    if needs > has:
        raise TformerError(
            f"{path} was compiled for {embedded['AOTI_CPU_ISA']}, which this CPU lacks "
            f"({torch.backends.cpu.get_cpu_capability()}); re-export it on this machine"
        )
    if built_by.split(".")[:2] != torch.__version__.split(".")[:2]:
        raise TformerError(
            f"{path} was compiled by torch {built_by} (field 'versions' of tformer.json), this is torch "
            f"{torch.__version__}: AOTInductor packages run on the torch that built them; re-export it"
        )


def _compile(model: TransformerLM, path: Path, metadata: dict[str, str]) -> None:
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
        # a copy: AOTInductor adds its device keys to the dict it is given
        configs = {"aot_inductor.metadata": dict(metadata)}
        torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)
    except Exception as exc:  # the exporter and compiler raise many types; report one line
        raise TformerError(f".pt2 export failed: {one_line(exc)}") from exc


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


def cached_export(model: TransformerLM, dtype: torch.dtype) -> tuple[Path, dict]:
    """A `.pt2` export of `model` in tformer's cache directory and its verified metadata, compiled
    on first use (or when the cached one fails verification) only."""
    directory = cache_dir(model, dtype, "pt2")
    return directory, verified_or_rebuilt(
        directory, lambda: export_pt2(model, directory, dtype=dtype, validate=False, force=True)
    )
