"""AOTInductor: a `.pt2` package of the KV-cache step, run without tracing or compiling.

The package (see `tformer.export.pt2`) takes the preallocated per-layer cache as inputs and
updates it in place, so this backend is the eager one minus Python: `KVCache` buffers, one call
per step.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tformer.backends.base import FromExport
from tformer.errors import TformerError
from tformer.model import KVCache, TransformerLM


class AotBackend(FromExport):
    name = "aot"
    export_format = "tformer-pt2"

    def __init__(self, model: TransformerLM, device: torch.device, dtype: torch.dtype):
        """Compile `model` into a package in the cache directory (first use only) and load it."""
        from tformer.export.pt2 import cached_export

        self._open(cached_export(model, dtype), device)

    def _open(self, directory: Path, device: torch.device) -> None:
        self._read_export(directory)
        if device.type != "cpu":
            raise TformerError("tformer .pt2 packages are compiled for the CPU; use device='cpu' (CUDA packages are not supported yet)")
        self.device = device
        self.attention = "AOTInductor package (C++)"
        self.runner = torch._inductor.aoti_load_package(str(directory / "model.pt2"))

    def allocate_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache.allocate(self.config, batch, max_len, self.device, self.dtype)

    def step(self, input_ids: torch.Tensor, input_pos: torch.Tensor, start: torch.Tensor, cache: KVCache) -> torch.Tensor:
        # The compiled code assumes contiguous inputs: a (B, 1) slice of a bigger tensor is not.
        return self.runner(input_ids.contiguous(), input_pos.contiguous(), start.contiguous(), tuple(cache.k), tuple(cache.v))
