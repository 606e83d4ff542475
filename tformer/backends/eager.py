"""Eager PyTorch: the model as written, over a preallocated cache of rows. The reference backend."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tformer.backends.base import BackendBase
from tformer.model import KVCache, TransformerLM, attention_bias, column_major_weights, row_block

# What one more SDPA call costs on the CPU, in attended (row, slot) pairs: ~12 us a call against
# ~0.075 us a pair, which is reading one slot's key and value (d_model 256, float32) at the ~27
# GB/s of a 2-core VM once a step's cache no longer fits in its caches. A decode step is split
# into runs of rows, each attended over its own longest row, where that saves more than this.
SPLIT_COST = 160


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
        ids, host_lengths = rows.tolist(), lengths.tolist()
        span = max(host_lengths)
        block = row_block(ids)
        decode = input_ids.shape[1] == 1
        if decode and min(host_lengths) == span:  # every row attends to all `span` slots: no mask to build or apply
            return self.model.step(input_ids, start, lengths, rows, cache, span, block, unmasked)
        runs = runs_of_rows(host_lengths) if decode and len(ids) > 2 and self.device.type == "cpu" else []
        if len(runs) < 2:
            return self.model.step(input_ids, start, lengths, rows, cache, span, block)
        bias = attention_bias(start[:, None], torch.arange(span, device=self.device), None, self.dtype)  # (B, 1, 1, S)

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # q (B, H, 1, Dh); k, v (B, H, span, Dh): each run of rows over its own span only.
            return torch.cat([F.scaled_dot_product_attention(q[a:b], k[a:b, :, :s], v[a:b, :, :s],
                                                             attn_mask=bias[a:b, :, :, :s])
                              for a, b, s in runs])  # fmt: skip

        return self.model.step(input_ids, start, lengths, rows, cache, span, block, attend)


def unmasked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of every query to every key: a decode step whose rows all have the same length
    (batch 1 always)."""
    return F.scaled_dot_product_attention(q, k, v)


def runs_of_rows(lengths: list[int], split_cost: int = SPLIT_COST) -> list[tuple[int, int, int]]:
    """Cut batch rows `0..B-1` of a decode step into consecutive runs `(first, end, span)`, each to
    be attended over its own longest row (`span`), minimizing the attended (row, slot) pairs plus
    `split_cost` per run. Rows of a continuous batch differ widely in length: one long request
    would otherwise make every short row read (masked) slots up to its length. O(B^2): 10 us at
    B = 16, 100 us at B = 64 (a decode step at B = 64 takes ~10 ms here)."""
    n = len(lengths)
    best, cut = [0] * (n + 1), [0] * (n + 1)  # best[j]: cost of rows 0..j-1; its last run starts at cut[j]
    for j in range(1, n + 1):
        longest, best[j] = 0, -1
        for i in range(j - 1, -1, -1):
            longest = max(longest, lengths[i])
            cost = best[i] + (j - i) * longest + split_cost
            if best[j] < 0 or cost < best[j]:
                best[j], cut[j] = cost, i
    runs, j = [], n
    while j:
        runs.append((cut[j], j, max(lengths[cut[j] : j])))
        j = cut[j]
    return runs[::-1]
