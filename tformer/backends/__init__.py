"""Backends by name, and the factory that builds them. Each lives in its own module, imported only
when asked for; what generic code needs to know about one is in its `traits`."""

from __future__ import annotations

import importlib
import os

import torch

from tformer.backends.base import Backend, Traits
from tformer.errors import TformerError
from tformer.export.formats import FORMATS, format_named
from tformer.export.integrity import read_meta
from tformer.export.writer import stored_export
from tformer.model import TransformerLM

# name -> "module:class"; the class is built as cls(model, device, dtype), or for a backend whose
# traits name an export format, cls(directory, device).
BACKENDS: dict[str, str] = {
    "eager": "tformer.backends.eager:EagerBackend",
    "compile": "tformer.backends.compile:CompileBackend",
    "aot": "tformer.backends.aot:AotBackend",
    "onnx": "tformer.backends.onnx:OnnxBackend",
    "triton": "tformer.backends.triton:TritonBackend",
    "naive": "tformer.backends.naive:NaiveBackend",
}
REFERENCE = "eager"  # the backend every other is checked against, and the default
BASELINE = "naive"  # the tutorial's own loop: what speed-ups are measured from


def backend_class(name: str) -> type:
    """The class of backend `name`, imported on first use."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise TformerError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def create_backend(name: str, model: TransformerLM, device: torch.device, dtype: torch.dtype) -> Backend:
    """Build backend `name` around `model` (weights are moved to `device` / `dtype`). A backend that
    runs an export is given one: made from `model` in tformer's store on first use."""
    cls = backend_class(name)
    check_device(cls, device)
    if cls.traits.export_format:
        return cls(stored_export(model, dtype, FORMATS[cls.traits.export_format]), device)
    return cls(model, device, dtype)


def open_export(directory: str | os.PathLike, device: torch.device | None = None) -> Backend:
    """The backend that runs export `directory` (its format says which), on `device` (default:
    `default_device` of that backend). The directory is verified before anything runs it."""
    cls = backend_class(export_backend_name(directory))
    device = default_device(cls) if device is None else device
    check_device(cls, device)
    return cls(directory, device)


def export_backend_name(directory: str | os.PathLike) -> str:
    """Which backend runs export `directory` (from its schema-checked tformer.json)."""
    return format_named(read_meta(directory)["format"]).backend


def default_device(cls: type) -> torch.device:
    """Where backend class `cls` runs best here when no device is named: CUDA when there is one
    and the backend can use it, else the CPU."""
    cuda = torch.device("cuda")
    usable = torch.cuda.is_available() and "cuda" in cls.traits.devices and cls.unavailable(cuda) is None
    return cuda if usable else torch.device("cpu")


def check_device(cls: type, device: torch.device) -> None:
    """TformerError if backend class `cls` cannot run on `device` here, saying why and what to do."""
    if device.type not in cls.traits.devices:
        raise TformerError(
            f"the {cls.name} backend runs on {' or '.join(cls.traits.devices)}, not {device.type}"
            + ("; use device='cpu' (CLI: --device cpu)" if "cpu" in cls.traits.devices else "")
        )
    reason = cls.unavailable(device)
    if reason:
        raise TformerError(reason)


__all__ = ["BACKENDS", "BASELINE", "REFERENCE", "Backend", "Traits", "backend_class", "check_device", "create_backend", "default_device",
           "export_backend_name", "open_export"]  # fmt: skip
