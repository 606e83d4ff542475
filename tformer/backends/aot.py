"""AOTInductor: a `.pt2` package of the KV-cache step, run without tracing or compiling.

The package (see `tformer.export.pt2`) takes the preallocated per-layer cache as inputs and
updates it in place, so this backend is the eager one minus Python: `KVCache` buffers, one call
per step.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tformer.backends.base import FromExport
from tformer.errors import TformerError, one_line
from tformer.export.integrity import FIX, check_embedded
from tformer.model import KVCache, TransformerLM


class AotBackend(FromExport):
    name = "aot"
    export_format = "tformer-pt2"

    def __init__(self, model: TransformerLM, device: torch.device, dtype: torch.dtype):
        """Compile `model` into a package in the cache directory (first use only) and load it."""
        from tformer.export.pt2 import cached_export

        self._check_device(device)
        self._open(*cached_export(model, dtype), device)

    @staticmethod
    def default_device() -> torch.device:
        return torch.device("cpu")

    def _check_device(self, device: torch.device) -> None:
        if device.type != "cpu":
            raise TformerError("tformer .pt2 packages are compiled for the CPU; use device='cpu' (CUDA packages are not supported yet)")

    def _open(self, directory: Path, meta: dict, device: torch.device) -> None:
        self._adopt(directory, meta)
        self.device = device
        self.attention = "AOTInductor package (C++)"
        path = directory / "model.pt2"
        try:
            self.runner = torch._inductor.aoti_load_package(str(path))
        except Exception as exc:  # a verified package that this torch cannot load: one line, not its traceback
            raise TformerError(f"{path}: torch {torch.__version__} cannot load it ({one_line(exc)}); {FIX}") from None
        check_embedded(meta, self.runner.get_metadata(), path)  # the compiled program is the one described

    def allocate_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache.allocate(self.config, batch, max_len, self.device, self.dtype)

    def step(self, input_ids: torch.Tensor, input_pos: torch.Tensor, start: torch.Tensor, cache: KVCache) -> torch.Tensor:
        # The compiled code assumes contiguous inputs: a (B, 1) slice of a bigger tensor is not.
        return self.runner(input_ids.contiguous(), input_pos.contiguous(), start.contiguous(), tuple(cache.k), tuple(cache.v))
