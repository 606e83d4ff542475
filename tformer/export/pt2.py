"""The `.pt2` format's own part of an export: the engine's step (the tensors of backend contract
v3's `Batch`) compiled ahead of time by AOTInductor into a package.

The package holds one compiled program for prefill and decode alike, the contract of
`tformer.backends.base.Backend.step`: inputs `input_ids (B, T)` (right-padded), `start (B,)`,
`lengths (B,)`, `rows (B,)` (all int64, contiguous), `span (P,)` (int64, any values: its length
P is how many slots each row attends, `max(lengths) <= P <= S`, so that a step reads the filled
slots only) and the per-layer caches `k`, `v` (tuples of `(R, H, S, Dh)` tensors: R cache rows of
S slots, updated in place: batch row b writes and reads cache row `rows[b]` only), output the
logits of each row's last new token `(B, V)`; B, T, P, R and S are dynamic. `tformer.load(dir, backend="aot")` runs it without re-tracing, and a C++ app can load
it with `torch::inductor::AOTIModelPackageLoader`. The cache is an input rather than module state,
so the caller owns it (the engine allocates it once). The fields that decide how it runs
(`tformer.config`, ...) are compiled into it as AOTInductor metadata (`runner.get_metadata()`, and
a JSON file inside the package that the loader reads before any native code runs; see
`tformer.export.integrity`).
"""

from __future__ import annotations

import json
import platform
import zipfile
from pathlib import Path

import torch

from tformer.config import ModelConfig
from tformer.errors import TformerError, one_line
from tformer.export.integrity import FIX, check_embedded
from tformer.export.writer import Step
from tformer.model import KVCache, TransformerLM


class AotStep(Step):
    """The step as the package runs it: the cache passed in and written in place."""

    def forward(self, input_ids, start, lengths, rows, span, k, v):
        return self.model.step(input_ids, start, lengths, rows, KVCache(list(k), list(v)), span=span.shape[0])


def write_artifact(model: TransformerLM, path: Path, embedded: dict[str, str], log) -> dict:
    """Compile `model` (CPU, in its dtype) into the package `path` with `embedded` as its
    AOTInductor metadata; returns the format's own tformer.json fields."""
    log("exporting with torch.export + AOTInductor (compiles C++; about half a minute)")
    _compile(model, path, embedded)
    return {"exporter": "torch.export + torch._inductor.aoti_compile_and_package", "versions": {"torch": torch.__version__}}


def validation_checks(path: Path) -> dict:
    """Nothing beyond comparing logits: the package has no checker of its own."""
    return {}


def contract(config: ModelConfig, dtype: str) -> dict[str, list[dict]]:
    """The package's inputs and outputs as `tformer.json` lists them (B, T, R, S: symbolic sizes;
    the caches are updated in place)."""
    kv = ["R", config.nhead, "S", config.head_dim]
    caches = [{"name": f"{kind}.{i}", "dtype": dtype, "shape": kv} for kind in ("k", "v") for i in range(config.n_layers)]
    return {
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["B", "T"]},
                   *({"name": name, "dtype": "int64", "shape": ["B"]} for name in ("start", "lengths", "rows")),
                   {"name": "span", "dtype": "int64", "shape": ["P"]},
                   *caches],
        "outputs": [{"name": "logits", "dtype": dtype, "shape": ["B", config.vocab_size]}],
    }  # fmt: skip


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
    # The engine's cache has up to `max_len + chunk` slots (chunk <= max_len) and runs steps of up to
    # `max_len` new tokens. Example sizes all different: the exporter would take equal ones for one size.
    batch, seq = Dim("batch", min=1, max=4096), Dim("seq", min=1, max=c.max_len)
    rows, slots = Dim("rows", min=1, max=4096), Dim("slots", min=2, max=2 * c.max_len)
    span = Dim("span", min=1, max=2 * c.max_len)
    kv = tuple({0: rows, 2: slots} for _ in range(c.n_layers))
    dynamic = {"input_ids": {0: batch, 1: seq}, "start": {0: batch}, "lengths": {0: batch}, "rows": {0: batch},
               "span": {0: span}, "k": kv, "v": kv}  # fmt: skip
    cache = KVCache.allocate(c, 5, 16, "cpu", model.decoder.weight.dtype)
    example = (torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 4]), torch.tensor([3, 6]), torch.tensor([3, 1]),
               torch.zeros(7, dtype=torch.long), tuple(cache.k), tuple(cache.v))  # fmt: skip
    try:
        with torch.inference_mode():
            program = torch.export.export(AotStep(model).eval(), example, dynamic_shapes=dynamic)
        # a copy: AOTInductor adds its device keys to the dict it is given
        configs = {"aot_inductor.metadata": dict(metadata)}
        torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)
    except Exception as exc:  # the exporter and compiler raise many types; report one line
        raise TformerError(f".pt2 export failed: {one_line(exc)}") from exc
