"""Backends by name. Each lives in its own module, imported only when asked for."""

from __future__ import annotations

import importlib

import torch

from tformer.backends.base import Backend
from tformer.errors import TformerError
from tformer.model import TransformerLM

# name -> "module:class"; the class is built as cls(model, device, dtype).
BACKENDS: dict[str, str] = {
    "eager": "tformer.backends.eager:EagerBackend",
    "compile": "tformer.backends.compile:CompileBackend",
    "aot": "tformer.backends.aot:AotBackend",
    "naive": "tformer.backends.naive:NaiveBackend",
    "onnx": "tformer.backends.onnx:OnnxBackend",
    "triton": "tformer.backends.triton:TritonBackend",
}


def backend_class(name: str) -> type:
    """The class of backend `name`, imported on first use."""
    if name not in BACKENDS:
        raise TformerError(f"unknown backend '{name}'; choose one of: {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def create_backend(name: str, model: TransformerLM, device: torch.device, dtype: torch.dtype) -> Backend:
    """Build backend `name` around `model` (weights are moved to `device` / `dtype`)."""
    return backend_class(name)(model, device, dtype)


__all__ = ["BACKENDS", "Backend", "backend_class", "create_backend"]
