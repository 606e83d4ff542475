"""Eager PyTorch: the model as written, over a preallocated cache of rows. The reference backend."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tformer.backends.base import BackendBase
from tformer.backends.batch import Batch
from tformer.model import KVCache, TransformerLM, column_major_weights


class EagerBackend(BackendBase):
    name = "eager"
    implementation = "torch scaled_dot_product_attention (float mask)"

    def __init__(self, model: TransformerLM, device: torch.device, dtype: torch.dtype):
        self.model = model.to(device=device, dtype=dtype).eval()
        if device.type == "cpu":
            column_major_weights(self.model)
        self.weights = self.model.weights()  # read once: attribute reads cost ~15% of a small step
        self.config = model.config
        self.device = device
        self.dtype = dtype

    def allocate_cache(self, rows: int, slots: int) -> KVCache:
        return KVCache.allocate(self.config, rows, slots, self.device, self.dtype)

    def step(self, batch: Batch, cache: KVCache) -> torch.Tensor:
        # Attend over the filled slots only (`span`), not the whole preallocated row: that halves
        # the attention work of an average decode step. Consecutive cache rows are read as a view.
        # A decode whose rows all have the same length (batch 1 always) needs no mask at all.
        attend = unmasked if batch.decode and batch.uniform else None
        return self.model.step(batch.input_ids, batch.start, batch.lengths, batch.rows, cache, batch.span,
                               batch.block, attend, self.weights, batch.aligned)  # fmt: skip


def unmasked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of every query to every key: a decode step whose rows all have the same length."""
    return F.scaled_dot_product_attention(q, k, v)
