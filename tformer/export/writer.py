"""Writing an export directory, the same way for every format: the skeleton around a format's own
`write_artifact` (`tformer.export.formats` names the module).

A directory holds the artifact, `tokenizer.json` when there is a tokenizer, and `tformer.json`:
the fields that decide how the artifact runs (also embedded in it), its inputs and outputs, the
exporter and versions, the SHA-256 of every file, and the validation report. It appears complete
or not at all. Validation runs models, so it lives above the backends (`tformer.exporter`) and
comes in here as the `check` callback, run on the finished directory before it is published.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from tformer.errors import TformerError
from tformer.export.formats import EMBEDDED, EXPORT_DTYPES, Format
from tformer.export.integrity import verified_or_rebuilt
from tformer.files import atomic_directory, file_sha256, store_root
from tformer.model import TransformerLM
from tformer.tokenizer import Tokenizer

Log = Callable[[str], None]
# Validation of the finished directory and the model it was exported from: its report.
Check = Callable[[Path, TransformerLM], dict]


class Step(nn.Module):
    """The model wrapped in the calling convention of one format: what the format traces or
    compiles. A format's subclass defines `forward` with the artifact's inputs and outputs."""

    def __init__(self, model: TransformerLM):
        super().__init__()
        self.model = model


def write_export(
    model: TransformerLM,
    out_dir: str | os.PathLike,
    fmt: Format,
    tokenizer: Tokenizer | None = None,
    dtype: torch.dtype = torch.float32,
    force: bool = False,
    log: Log = lambda _: None,
    check: Check | None = None,
    **options,
) -> dict:
    """Export `model` in `dtype` to `out_dir` in format `fmt`; returns the `tformer.json` metadata.

    `options` go to the format's `write_artifact` (ONNX: `opset`). `check`, when given, validates
    the written directory; its report is stored under "validation", and its TformerError leaves
    nothing behind. An existing `out_dir` needs `force`.
    """
    module = importlib.import_module(fmt.module)
    if dtype not in EXPORT_DTYPES.values():
        raise TformerError(f"unsupported export dtype {dtype}; use fp32 or fp16")
    model = copy.deepcopy(model).to(device="cpu", dtype=dtype).eval()  # the caller's model is left alone
    meta = {
        "format": fmt.name,
        "format_version": fmt.version,
        "config": asdict(model.config),
        "dtype": str(dtype).removeprefix("torch."),
        "weights_sha256": weights_sha256(model),
    }
    with atomic_directory(out_dir, force) as tmp:
        began = time.perf_counter()
        embedded = {f"tformer.{key}": json.dumps(meta[key], sort_keys=True) for key in EMBEDDED}
        meta.update(module.write_artifact(model, tmp / fmt.artifact, embedded, log, **options))  # exporter, versions, ...
        export_s = time.perf_counter() - began
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer.json")
        meta.update(module.contract(model.config, meta["dtype"]))
        meta.update(
            tokenizer=tokenizer is not None,
            export_seconds=round(export_s, 1),
            files=_file_hashes(tmp),  # before validation, whose loads may add caches beside them
            validation=None,
        )
        _write_meta(tmp, meta)
        if check is not None:
            meta["validation"] = check(tmp, model)
            _write_meta(tmp, meta)
    return meta


def stored_export(model: TransformerLM, dtype: torch.dtype, fmt: Format, log: Log = lambda _: None) -> Path:
    """An export of `model` in tformer's store, made on first use (or when the stored one fails
    verification), reused while the weights, dtype, config, torch version and format are the
    same: what an export backend runs when it is given a checkpoint rather than a directory."""
    key = f"{weights_sha256(model)} {dtype} {model.config.to_json()} {torch.__version__} {fmt.name} {fmt.version}"
    directory = store_root() / fmt.key / hashlib.sha256(key.encode()).hexdigest()[:20]

    def export() -> None:
        log(f"exporting to {directory} (first use of these weights)")
        write_export(model, directory, fmt, dtype=dtype, force=True)

    verified_or_rebuilt(directory, export)
    return directory


def weights_sha256(model: TransformerLM) -> str:
    """A hash of the weights (names and bytes), independent of how a format stores them: it keys
    the store of exports and is embedded in every artifact."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _file_hashes(directory: Path) -> dict[str, str]:
    """The `files` field: name -> SHA-256 of every file the export wrote, all verified at load."""
    names = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != "tformer.json")
    return {name: file_sha256(directory / name) for name in names}


def _write_meta(directory: Path, meta: dict) -> None:
    (directory / "tformer.json").write_text(json.dumps(meta, indent=2))
