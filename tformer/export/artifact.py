"""What every export directory shares on the writing side: the format version, the hashes
recorded in `tformer.json`, the metadata embedded in the artifact, the cache of exports.
(Reading an export back, untrusted, is `tformer.export.integrity`.)"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from tformer.errors import TformerError
from tformer.files import cache_root
from tformer.model import TransformerLM

FORMAT_VERSION = 2  # 2: SHA-256 of every file, metadata embedded in the artifact, strict schema
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2}  # validation: max abs logit difference
# tformer.json fields that are also embedded in the artifact, so that the two can be compared
EMBEDDED = ("format", "format_version", "config", "dtype", "weights_sha256")


def export_copy(model: TransformerLM, dtype: torch.dtype) -> TransformerLM:
    """The model to export: a CPU copy in `dtype` (the caller's model is left alone)."""
    if dtype not in TOLERANCE:
        raise TformerError(f"unsupported export dtype {dtype}; use fp32 or fp16")
    return copy.deepcopy(model).to(device="cpu", dtype=dtype).eval()


def weights_sha256(model: TransformerLM) -> str:
    """A hash of the weights (names and bytes), independent of how a format stores them: it keys
    the cache of exports and is embedded in every artifact."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 1 MiB chunks (a model needs not fit in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def base_meta(fmt: str, model: TransformerLM) -> dict:
    """The fields of `tformer.json` that every format writes first (and embeds in its artifact)."""
    return {
        "format": fmt,
        "format_version": FORMAT_VERSION,
        "config": asdict(model.config),
        "dtype": str(model.decoder.weight.dtype).removeprefix("torch."),
        "weights_sha256": weights_sha256(model),
    }


def embedded_metadata(meta: dict) -> dict[str, str]:
    """What an artifact carries about itself (ONNX `metadata_props`, AOTInductor's metadata):
    the fields that decide how it runs, as JSON strings under `tformer.<field>`."""
    return {f"tformer.{key}": json.dumps(meta[key], sort_keys=True) for key in EMBEDDED}


def file_hashes(directory: Path) -> dict[str, str]:
    """The `files` field of `tformer.json`: name -> SHA-256 of every file the export wrote (taken
    before validation, whose loads add caches beside them), all verified at load."""
    names = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != "tformer.json")
    return {name: file_sha256(directory / name) for name in names}


def write_meta(directory: Path, meta: dict) -> None:
    (directory / "tformer.json").write_text(json.dumps(meta, indent=2))


def cache_dir(model: TransformerLM, dtype: torch.dtype, kind: str) -> Path:
    """Where the `kind` export of these weights in `dtype` lives in tformer's cache; it changes
    with the weights, dtype, config and torch version."""
    key = f"{weights_sha256(model)} {dtype} {model.config.to_json()} {torch.__version__} {FORMAT_VERSION}"
    return cache_root() / kind / hashlib.sha256(key.encode()).hexdigest()[:20]


GREEDY_STEPS = 32


def greedy_check(exported, eager, log: Callable[[str], None]) -> dict:
    """The end-to-end part of every export's validation: 32 greedy steps on a left-padded batch of
    3 prompts through the exported runtime and through eager must give the same tokens.
    `exported`, `eager`: `tformer.Runtime`s. Raises TformerError naming the first differing prompt."""
    prompts = [[t % eager.config.vocab_size for t in p] for p in ([1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13])]
    ours = exported.generate_ids(prompts, max_new_tokens=GREEDY_STEPS, temperature=0)
    theirs = eager.generate_ids(prompts, max_new_tokens=GREEDY_STEPS, temperature=0)
    log(f"  greedy {GREEDY_STEPS} steps, padded batch of 3: {'identical' if ours == theirs else 'DIFFERENT'}")
    differs = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    if differs:
        raise TformerError(f"validation failed: greedy tokens differ from PyTorch (prompt {differs[0]})")
    return {"steps": GREEDY_STEPS, "prompts": len(prompts), "identical": True}
