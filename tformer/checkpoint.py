"""Reading and writing model checkpoints, which are untrusted input.

Two kinds of file are read:
- tformer's own format: a safetensors file whose metadata holds the config, the tokenizer JSON and
  a format version, so it describes itself completely;
- what users of the tutorial already have: `torch.save(model.state_dict(), path)`, or a training
  checkpoint dict with the state dict under `model_state_dict`, `state_dict` or `model` (also a
  bare state dict in safetensors). Sizes are inferred from the weights; the head count cannot be,
  so it must be given.

`torch.load` always runs with `weights_only=True`: a pickled module, or any file that would run
code, is refused with instructions to re-save it, and is never executed. Every problem raises
`TformerError` naming the file and the fix.

Integrity, because a flipped byte must never load as a different model: tformer's own files carry
a SHA-256 of their metadata and tensors, checked at load; a `torch.save` zip has a CRC-32 per
entry, which torch itself never checks, so tformer checks them (Python's `zipfile`) before
unpickling. Weights must be finite: a NaN or infinity is refused, naming the tensor.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from tformer.config import ModelConfig
from tformer.errors import TformerError, TformerNote, one_line
from tformer.files import atomic_path
from tformer.model import TransformerLM
from tformer.tokenizer import Tokenizer

FORMAT_NAME = "tformer"
FORMAT_VERSION = 2  # 2: content_sha256 over metadata and tensors (1 had none)
TRAINING_KEYS = ("model_state_dict", "state_dict", "model")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel / DataParallel, torch.compile
_LAYER_KEY = re.compile(r"transformer_encoder\.layers\.(\d+)\.")


@dataclass
class Checkpoint:
    """What a checkpoint file holds: weights (tutorial names), the config and maybe a tokenizer."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer | None
    kind: str  # "tformer", "state_dict" or "training checkpoint"
    nhead_supplied: bool = False  # the head count came from a user (no weight shape reveals it), not from training
    integrity: str = "none"  # what was verified: "SHA-256", "CRC-32" or "none"
    notes: list[str] = field(default_factory=list)  # what was adapted on the way in, for the user to see


def save_checkpoint(
    path: str | os.PathLike, model: TransformerLM, tokenizer: Tokenizer | None = None, nhead_supplied: bool = False
) -> None:
    """Write `model` (and its tokenizer) in tformer's safetensors format, atomically.

    The file appears complete or not at all (see `atomic_path`). Non-finite weights are refused:
    a file that would be refused at load is never written. `nhead_supplied` records that the head
    count came from the user (`tformer convert --nhead`), which `tformer info` shows.
    """
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    _check_finite(Path(path), tensors, "refusing to save it")
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": model.config.to_json(),
    }
    if tokenizer is not None:
        metadata["tokenizer"] = tokenizer.to_json()
    if nhead_supplied:
        metadata["nhead_supplied"] = "true"
    metadata["content_sha256"] = content_sha256(tensors, metadata)
    data = safetensors_bytes(tensors, metadata=metadata)  # our bytes, written to our own temporary file
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def content_sha256(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """SHA-256 of a checkpoint's content: every metadata entry but the hash itself, then every
    tensor's name, dtype, shape and bytes, in name order (so it does not depend on file layout)."""
    digest = hashlib.sha256()

    def put(text: str) -> None:
        digest.update(f"{len(text)}:{text}".encode())

    for key in sorted(metadata):
        if key != "content_sha256":
            put(key)
            put(metadata[key])
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        put(f"{name} {str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}")
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def load_checkpoint(path: str | os.PathLike, nhead: int | None = None) -> Checkpoint:
    """Read any supported checkpoint form and check it against the model it describes.

    nhead: required for files that are not tformer's own (the head count is not in the weights).
    Raises TformerError for a missing, empty, truncated, corrupt, pickled-code, wrong-shape,
    extra-key or non-finite file, naming the file and the problem.
    """
    path = Path(path)
    if not path.exists():
        raise TformerError(f"{path}: file not found")
    if path.is_dir():
        raise TformerError(f"{path}: is a directory, not a checkpoint file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(9)
    except OSError as exc:
        raise TformerError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    if size == 0:
        raise TformerError(f"{path}: file is empty (an interrupted save?); re-save the checkpoint")
    integrity = "none"
    # safetensors: an 8-byte header length, then the JSON header; its first byte can be b"\x80" or b"P".
    safetensors = magic[8:9] == b"{" and int.from_bytes(magic[:8], "little") <= size - 8
    if not safetensors and (magic.startswith(b"PK") or magic[:1] == b"\x80"):  # torch.save zip / legacy pickle
        if magic.startswith(b"PK"):
            _verify_zip(path)
            integrity = "CRC-32 of every zip entry"
        state, kind, metadata = _read_torch(path)
    else:
        state, metadata = _read_safetensors(path)
        # A damaged "format" value must not turn a tformer file into an unchecked plain state_dict.
        ours = metadata.get("format") == FORMAT_NAME or "content_sha256" in metadata
        kind = "tformer" if ours else "state_dict"
    state, notes = _unwrap(state)
    for note in notes:
        warnings.warn(f"{path}: {note}", TformerNote, stacklevel=2)

    nhead_supplied = kind != "tformer"
    if kind == "tformer":
        config, tokenizer, nhead_supplied = _read_own_metadata(path, state, metadata)
        integrity = "SHA-256 of metadata and tensors" if "content_sha256" in metadata else "none (format 1)"
        if nhead is not None and nhead != config.nhead:
            raise TformerError(f"{path}: nhead={nhead} conflicts with the checkpoint's nhead={config.nhead}; drop --nhead")
    else:
        config = _infer_config(path, state, nhead)
        tokenizer = None
    _check_weights(path, state, config)
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise TformerError(
            f"{path}: tokenizer has {tokenizer.vocab_size} ids but the model only {config.vocab_size}"
        )
    return Checkpoint(config, state, tokenizer, kind, nhead_supplied, integrity, notes)


def load_model(
    path: str | os.PathLike, nhead: int | None = None
) -> tuple[TransformerLM, Tokenizer | None]:
    """`TransformerLM` (eval mode, fp32, CPU) with the checkpoint's weights, and its tokenizer."""
    ckpt = load_checkpoint(path, nhead)
    return _build(ckpt), ckpt.tokenizer


def _build(ckpt: Checkpoint) -> TransformerLM:
    model = TransformerLM(ckpt.config)
    model.load_state_dict(ckpt.state_dict, strict=True)
    return model.eval()


def convert_checkpoint(
    source: str | os.PathLike, target: str | os.PathLike, nhead: int | None = None,
    tokenizer: Tokenizer | None = None,
) -> Checkpoint:
    """Rewrite any checkpoint form as tformer's own file at `target`: the head count is then given
    once (`nhead`, for files that do not store it), the tokenizer travels inside (`tokenizer`
    replaces the checkpoint's own) and a content hash protects it. Returns what was read."""
    ckpt = load_checkpoint(source, nhead)
    tokenizer = tokenizer or ckpt.tokenizer
    if tokenizer is not None and tokenizer.vocab_size > ckpt.config.vocab_size:
        raise TformerError(f"the tokenizer has {tokenizer.vocab_size} ids but {source} only {ckpt.config.vocab_size}; "
                           "use the tokenizer the model was trained with")  # fmt: skip
    save_checkpoint(target, _build(ckpt), tokenizer, nhead_supplied=ckpt.nhead_supplied)
    return ckpt


def _read_own_metadata(
    path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]
) -> tuple[ModelConfig, Tokenizer | None, bool]:
    """Config, tokenizer and whether nhead was user-supplied, from a tformer file whose content
    hash has been checked (format 2 on; format 1 files carry no hash)."""
    version = metadata.get("format_version", "")
    if version not in {str(v) for v in range(1, FORMAT_VERSION + 1)}:
        newer = version.isdigit() and int(version) > FORMAT_VERSION
        raise TformerError(
            f"{path}: written by a newer tformer (format {version}); upgrade tformer" if newer
            else f"{path}: corrupt tformer metadata (format_version {version[:20]!r}); re-save the checkpoint"
        )
    if version != "1":
        recorded = metadata.get("content_sha256")
        if recorded is None:
            raise TformerError(f"{path}: corrupt tformer metadata (no content hash); re-save the checkpoint")
        if content_sha256(state, metadata) != recorded:
            raise TformerError(
                f"{path}: content does not match its SHA-256 (the file was corrupted or edited after saving); "
                "re-save the checkpoint or restore it from a good copy"
            )
    try:
        config = ModelConfig.from_dict(json.loads(metadata["config"]))
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise TformerError(f"{path}: corrupt tformer metadata (config: {str(exc).splitlines()[0]})") from None
    try:
        tokenizer = Tokenizer.from_json(metadata["tokenizer"]) if "tokenizer" in metadata else None
    except TformerError as exc:
        raise TformerError(f"{path}: corrupt tformer metadata (tokenizer: {exc})") from None
    return config, tokenizer, metadata.get("nhead_supplied") == "true"


def _verify_zip(path: Path) -> None:
    """Check every entry of a `torch.save` zip against its CRC-32: torch reads entries without
    checking them, so a flipped byte would otherwise load as different weights or a garbled pickle."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as exc:  # BadZipFile, zlib.error, EOFError, NotImplementedError, OSError, ...: all mean corrupt
        raise TformerError(f"{path}: truncated or corrupt file ({one_line(exc)}); re-save the checkpoint") from None
    if bad is not None:
        raise TformerError(f"{path}: corrupt file (entry '{bad}' fails its CRC-32 check); re-save the checkpoint")


def _read_torch(path: Path) -> tuple[dict[str, torch.Tensor], str, dict[str, str]]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # A class or function named in the pickle (zip entries passed their CRC: it is really there).
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            raise TformerError(
                f"{path}: refused: the file holds pickled Python objects ({found.group(1)}), not only tensors, and "
                "loading it could run code; re-save the weights with "
                "torch.save(model.state_dict(), path)"
            ) from None
        raise TformerError(f"{path}: truncated or corrupt PyTorch checkpoint ({one_line(exc)}); re-save it") from None
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj), "state_dict", {}
    if isinstance(obj, dict):
        for key in TRAINING_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner), "training checkpoint", {}
        found = ", ".join(sorted(map(str, obj))[:8]) or "nothing"
    else:
        found = type(obj).__name__
    raise TformerError(
        f"{path}: no model weights found (found {found}); expected a state_dict, or a dict holding one "
        f"under {' / '.join(TRAINING_KEYS)}"
    )


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # SafetensorError, OSError (mmap of a bad size), ValueError, ...
        raise TformerError(
            f"{path}: not a readable checkpoint: neither a torch.save file nor a complete safetensors file "
            f"({one_line(exc)})"
        ) from None
    return state, metadata


def _unwrap(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Strip the prefixes that wrappers add to every key: a state_dict saved from a
    DistributedDataParallel model (`module.`) or from `torch.compile`'s result (`_orig_mod.`)."""
    notes = []
    for prefix in WRAPPER_PREFIXES:
        while state and all(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
            notes.append(f"stripped the '{prefix}' prefix that a wrapper added to every weight name")
    return state, notes


def _require(path: Path, state: dict[str, torch.Tensor], key: str, ndim: int) -> torch.Tensor:
    if key not in state:
        raise TformerError(f"{path}: missing weight '{key}': not a checkpoint of the tutorial's TransformerModel")
    tensor = state[key]
    if tensor.ndim != ndim:
        raise TformerError(f"{path}: weight '{key}' has shape {tuple(tensor.shape)}, expected {ndim} dimensions")
    return tensor


def _infer_config(path: Path, state: dict[str, torch.Tensor], nhead: int | None) -> ModelConfig:
    """Sizes from the weights; `nhead` from the caller, since no weight shape reveals it."""
    vocab_size, d_model = _require(path, state, "encoder.weight", 2).shape
    max_len = _require(path, state, "pos_encoder.pe", 3).shape[0]
    d_ff = _require(path, state, "transformer_encoder.layers.0.linear1.weight", 2).shape[0]
    n_layers = 1 + max(int(m.group(1)) for k in state if (m := _LAYER_KEY.match(k)))
    if nhead is None:
        raise TformerError(
            f"{path}: the head count is not stored in a plain state_dict; pass nhead= (CLI: --nhead N), "
            f"a divisor of d_model={d_model}"
        )
    try:
        return ModelConfig(int(vocab_size), int(d_model), nhead, int(d_ff), n_layers, int(max_len))
    except TformerError as exc:
        raise TformerError(f"{path}: {exc}") from None


def _check_weights(path: Path, state: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """Exactly the expected names and shapes, floating point: else one error listing what is off."""
    with torch.device("meta"):
        expected = TransformerLM(config).state_dict()
    missing = sorted(expected.keys() - state.keys())
    extra = sorted(state.keys() - expected.keys())
    if missing:
        raise TformerError(f"{path}: missing weights {_few(missing)} for a {config.n_layers}-layer model")
    if extra:
        raise TformerError(f"{path}: unexpected weights {_few(extra)}; is this the tutorial's TransformerModel?")
    for key, ref in expected.items():
        if state[key].shape != ref.shape:
            raise TformerError(
                f"{path}: weight '{key}' has shape {tuple(state[key].shape)}, expected {tuple(ref.shape)}"
            )
        if not state[key].is_floating_point():
            raise TformerError(f"{path}: weight '{key}' has dtype {state[key].dtype}, expected floating point")
    _check_finite(path, state, "re-save it from an earlier, healthy checkpoint")


def _check_finite(path: Path, state: Mapping[str, torch.Tensor], fix: str) -> None:
    """NaN or infinite weights (a diverged training run) make every output garbage: refuse them."""
    for key, tensor in state.items():
        # A float64 sum is NaN or infinite exactly when some element is (no overflow from finite
        # weights), and costs a fraction of an elementwise isfinite over the whole tensor.
        if tensor.is_floating_point() and not math.isfinite(tensor.sum(dtype=torch.float64)):
            bad = int((~torch.isfinite(tensor)).sum())
            raise TformerError(f"{path}: weight '{key}' holds {bad} NaN or infinite value(s) (a diverged training run?); {fix}")


def _few(keys: list[str]) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
