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
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tformer.config import ModelConfig
from tformer.errors import TformerError
from tformer.files import atomic_path
from tformer.model import TransformerLM
from tformer.tokenizer import Tokenizer

FORMAT_NAME = "tformer"
FORMAT_VERSION = 1
TRAINING_KEYS = ("model_state_dict", "state_dict", "model")
_LAYER_KEY = re.compile(r"transformer_encoder\.layers\.(\d+)\.")


@dataclass
class Checkpoint:
    """What a checkpoint file holds: weights (tutorial names), the config and maybe a tokenizer."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer | None
    kind: str  # "tformer", "state_dict" or "training checkpoint"


def save_checkpoint(
    path: str | os.PathLike, model: TransformerLM, tokenizer: Tokenizer | None = None
) -> None:
    """Write `model` (and its tokenizer) in tformer's safetensors format, atomically.

    The file appears complete or not at all (see `atomic_path`).
    """
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": model.config.to_json(),
    }
    if tokenizer is not None:
        metadata["tokenizer"] = tokenizer.to_json()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def load_checkpoint(path: str | os.PathLike, nhead: int | None = None) -> Checkpoint:
    """Read any supported checkpoint form and check it against the model it describes.

    nhead: required for files that are not tformer's own (the head count is not in the weights).
    Raises TformerError for a missing, empty, truncated, pickled-code, wrong-shape or extra-key
    file, naming the file and the problem.
    """
    path = Path(path)
    if not path.exists():
        raise TformerError(f"{path}: file not found")
    if path.is_dir():
        raise TformerError(f"{path}: is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise TformerError(f"{path}: file is empty (an interrupted save?); re-save the checkpoint")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic.startswith(b"PK") or magic[:1] == b"\x80":  # torch.save zip archive / legacy pickle
        state, kind, metadata = _read_torch(path)
    else:
        state, metadata = _read_safetensors(path)
        kind = "tformer" if metadata.get("format") == FORMAT_NAME else "state_dict"

    if kind == "tformer":
        version = int(metadata.get("format_version", "0"))
        if version > FORMAT_VERSION:
            raise TformerError(f"{path}: written by a newer tformer (format {version}); upgrade tformer")
        config = ModelConfig.from_json(metadata["config"])
        if nhead is not None and nhead != config.nhead:
            raise TformerError(f"{path}: nhead={nhead} conflicts with the checkpoint's nhead={config.nhead}; drop --nhead")
        tokenizer = Tokenizer.from_json(metadata["tokenizer"]) if "tokenizer" in metadata else None
    else:
        config = _infer_config(path, state, nhead)
        tokenizer = None
    _check_weights(path, state, config)
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise TformerError(
            f"{path}: tokenizer has {tokenizer.vocab_size} ids but the model only {config.vocab_size}"
        )
    return Checkpoint(config, state, tokenizer, kind)


def load_model(
    path: str | os.PathLike, nhead: int | None = None
) -> tuple[TransformerLM, Tokenizer | None]:
    """`TransformerLM` (eval mode, fp32, CPU) with the checkpoint's weights, and its tokenizer."""
    ckpt = load_checkpoint(path, nhead)
    model = TransformerLM(ckpt.config)
    model.load_state_dict(ckpt.state_dict, strict=True)
    return model.eval(), ckpt.tokenizer


def _read_torch(path: Path) -> tuple[dict[str, torch.Tensor], str, dict[str, str]]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        message = str(exc)
        if "Weights only load failed" in message or isinstance(exc, pickle.UnpicklingError):
            found = re.search(r"GLOBAL ([\w.]+)", message)
            what = f" ({found.group(1)})" if found else ""
            raise TformerError(
                f"{path}: refused: the file holds pickled Python objects{what}, not only tensors, and "
                "loading it could run code; re-save the weights with "
                "torch.save(model.state_dict(), path)"
            ) from None
        if "central directory" in message or "zip archive" in message or isinstance(exc, EOFError):
            raise TformerError(f"{path}: truncated or corrupt file (an interrupted save?); re-save the checkpoint") from None
        raise TformerError(f"{path}: cannot be read as a PyTorch checkpoint ({message.splitlines()[0]})") from None
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
    except (SafetensorError, OSError, ValueError) as exc:
        raise TformerError(
            f"{path}: not a readable checkpoint: neither a torch.save file nor a complete safetensors file ({exc})"
        ) from None
    return state, metadata


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


def _few(keys: list[str]) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
