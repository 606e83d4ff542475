"""Eager PyTorch: the model as written, over a preallocated cache. The reference backend."""

from __future__ import annotations

import torch

from tformer.backends.base import BackendBase
from tformer.model import KVCache, TransformerLM, column_major_weights


class EagerBackend(BackendBase):
    name = "eager"
    implementation = "torch scaled_dot_product_attention (float mask)"

    def __init__(self, model: TransformerLM, device: torch.device, dtype: torch.dtype):
        self.model = model.to(device=device, dtype=dtype).eval()
        if device.type == "cpu":
            column_major_weights(self.model)
        self.config = model.config
        self.device = device
        self.dtype = dtype

    def allocate_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache.allocate(self.config, batch, max_len, self.device, self.dtype)

    def step(
        self, input_ids: torch.Tensor, input_pos: torch.Tensor, start: torch.Tensor, cache: KVCache
    ) -> torch.Tensor:
        # Attend over the filled slots only, not the whole preallocated cache: a host-side length
        # (one tiny sync) halves the attention work of an average decode step.
        return self.model(input_ids, input_pos, start, cache.prefix(int(input_pos[-1]) + 1))
