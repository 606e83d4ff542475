"""Eager PyTorch: the model as written, over a preallocated cache of rows. The reference backend."""

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

    def allocate_cache(self, rows: int, slots: int) -> KVCache:
        return KVCache.allocate(self.config, rows, slots, self.device, self.dtype)

    def step(
        self, input_ids: torch.Tensor, start: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor, cache: KVCache
    ) -> torch.Tensor:
        # Attend over the filled slots only, not the whole preallocated row (a host-side length, one
        # tiny sync, halves the attention work of an average decode step), and read consecutive
        # cache rows as a view rather than a gathered copy.
        span = int(lengths.max())
        ids = rows.tolist()
        block = slice(ids[0], ids[0] + len(ids)) if ids == list(range(ids[0], ids[0] + len(ids))) else None
        return self.model.step(input_ids, start, lengths, rows, cache, span, block)
