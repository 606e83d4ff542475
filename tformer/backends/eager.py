"""Eager PyTorch: the model as written, over a preallocated cache. The reference backend."""

from __future__ import annotations

import torch

from tformer.model import KVCache, TransformerLM


class EagerBackend:
    name = "eager"

    def __init__(self, model: TransformerLM, device: torch.device, dtype: torch.dtype):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.config = model.config
        self.device = device
        self.dtype = dtype

    def allocate_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache.allocate(self.config, batch, max_len, self.device, self.dtype)

    def step(
        self, input_ids: torch.Tensor, input_pos: torch.Tensor, start: torch.Tensor, cache: KVCache
    ) -> torch.Tensor:
        return self.model(input_ids, input_pos, start, cache)
