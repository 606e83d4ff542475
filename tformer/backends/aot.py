"""AOTInductor: a `.pt2` package of the KV-cache step, run without tracing or compiling.

The package (see `tformer.export.pt2`) takes the preallocated per-layer cache as inputs and
updates it in place, so this backend is the eager one minus Python: `KVCache` buffers, one call
per step.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tformer.backends.base import FromExport
from tformer.config import ModelConfig
from tformer.errors import TformerError
from tformer.model import KVCache, TransformerLM


class AotBackend(FromExport):
    name = "aot"

    def __init__(self, model: TransformerLM, device: torch.device, dtype: torch.dtype):
        """Compile `model` into a package in the cache directory (first use only) and load it."""
        from tformer.export.pt2 import cached_export

        self._open(cached_export(model, dtype), device)

    def _open(self, directory: Path, device: torch.device) -> None:
        from tformer.export.artifact import read_meta

        meta = read_meta(directory)
        if meta["format"] != "tformer-pt2":
            raise TformerError(f"{directory} is not a .pt2 export")
        if device.type != "cpu":
            raise TformerError("this .pt2 package was compiled for the CPU; export it on the GPU to run it there")
        self.config = ModelConfig.from_json(json.dumps(meta["config"]))
        self.dtype = getattr(torch, meta["dtype"])
        self.device = device
        self.attention = "AOTInductor package (C++)"
        self.runner = torch._inductor.aoti_load_package(str(directory / "model.pt2"))

    def allocate_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache.allocate(self.config, batch, max_len, self.device, self.dtype)

    def step(self, input_ids: torch.Tensor, input_pos: torch.Tensor, start: torch.Tensor, cache: KVCache) -> torch.Tensor:
        # The compiled code assumes contiguous inputs: a (B, 1) slice of a bigger tensor is not.
        return self.runner(input_ids.contiguous(), input_pos.contiguous(), start.contiguous(), tuple(cache.k), tuple(cache.v))
