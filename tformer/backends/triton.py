"""Triton: the eager model with its attention replaced by tformer's own fused kernels.

The model writes each step's keys and values into the batch rows' cache rows as usual; then, in
place of SDPA, the kernels read straight from the whole cache, each batch row from its own cache
row (`rows`), so no row is gathered or copied and no mask is built per step. A step of one new
token per row (a decode, or a prefill of a one-token chunk) runs `decode_attention`
(flash-decoding, split along the cache) over slots `0..lengths[b]-1`; a longer step runs
`prefill_attention` (FlashAttention-style, causal from each row's `start`). Everything else
(projections, norms, MLP) is the eager model's PyTorch.
"""

from __future__ import annotations

import torch

from tformer.backends.base import BackendBase
from tformer.backends.batch import Batch
from tformer.model import KVCache, TransformerLM

# The cache view's `block`: the rows every layer's cache update returns (as a view, not a copy):
# all of them, `(R, H, S, Dh)`, which the kernels index with the step's `rows` themselves.
EVERY_ROW = slice(None)


class TritonBackend(BackendBase):
    name = "triton"
    implementation = "tformer Triton kernels (fused causal prefill, split-K decode)"

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        try:
            from tformer.kernels import launch
        except ImportError:
            return "the triton backend needs triton: pip install 'tformer[triton]'"
        if device.type != "cuda" and not launch.INTERPRET:
            return f"the triton backend needs a CUDA GPU (device is {device}); {launch.INTERPRET_HINT}"
        return None

    def __init__(self, model: TransformerLM, device: torch.device, dtype: torch.dtype):
        from tformer import kernels  # the factory has checked that triton is there

        self.kernels = kernels
        # Interpreted, it is correct but takes seconds per token: benchmarks list it, never time it.
        self.untimed = None if device.type == "cuda" else "runs under the Triton interpreter here (no GPU): a test mode"
        self.model = model.to(device=device, dtype=dtype).eval()
        self.weights = self.model.weights()  # read once, as the eager backend does
        self.config = model.config
        self.device = device
        self.dtype = dtype

    def allocate_cache(self, rows: int, slots: int) -> KVCache:
        return KVCache.allocate(self.config, rows, slots, self.device, self.dtype)

    def step(self, batch: Batch, cache: KVCache) -> torch.Tensor:
        start, lengths, rows = batch.start, batch.lengths, batch.rows
        if batch.decode:  # row b's one new token sits at slot start[b] = lengths[b] - 1

            def attend(q, k, v):  # q (B, H, 1, Dh); k, v the whole cache (R, H, S, Dh)
                return self.kernels.decode_attention(q, k, v, lengths, rows)
        else:

            def attend(q, k, v):  # q (B, H, T, Dh): column t of row b at position start[b] + t
                return self.kernels.prefill_attention(q, k, v, start, rows)

        return self.model.step(batch.input_ids, start, lengths, rows, cache, block=EVERY_ROW, attend=attend,
                               weights=self.weights)  # fmt: skip
