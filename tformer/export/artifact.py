"""What every export directory shares: `tformer.json`, the weights' hash, the cache of exports."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from tformer.errors import TformerError
from tformer.files import cache_root
from tformer.model import TransformerLM

FORMAT_VERSION = 1
ARTIFACTS = {"tformer-onnx": "model.onnx", "tformer-pt2": "model.pt2"}  # format -> file it runs
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2}  # validation: max abs logit difference


def export_copy(model: TransformerLM, dtype: torch.dtype) -> TransformerLM:
    """The model to export: a CPU copy in `dtype` (the caller's model is left alone)."""
    if dtype not in TOLERANCE:
        raise TformerError(f"unsupported export dtype {dtype}; use fp32 or fp16")
    return copy.deepcopy(model).to(device="cpu", dtype=dtype).eval()


def weights_sha256(model: TransformerLM) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_meta(directory: Path, meta: dict) -> None:
    (directory / "tformer.json").write_text(json.dumps(meta, indent=2))


def read_meta(directory: str | os.PathLike) -> dict:
    """`tformer.json` of an export directory, checked to be one this tformer can run."""
    path = Path(directory) / "tformer.json"
    if not path.is_file():
        raise TformerError(f"{directory}: not a tformer export (no tformer.json); create one with tformer-export")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TformerError(f"{path}: unreadable ({exc})") from None
    if meta.get("format") not in ARTIFACTS:
        raise TformerError(f"{path}: unknown export format {meta.get('format')!r}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise TformerError(f"{path}: written by a newer tformer; upgrade tformer")
    if not (Path(directory) / ARTIFACTS[meta["format"]]).is_file():
        raise TformerError(f"{directory}: {ARTIFACTS[meta['format']]} is missing; export again")
    return meta


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
