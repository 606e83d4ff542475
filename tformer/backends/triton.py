"""Triton: the eager model with its attention replaced by tformer's own fused kernels.

Prefill runs `prefill_attention` (FlashAttention-style, causal, left-padding aware) over the
filled slots; each decode step runs `decode_attention` (flash-decoding, split along the cache)
over the whole preallocated cache with per-row lengths, so that no slice or mask is built per
step. Everything else (projections, norms, MLP) is the eager model's PyTorch.
"""

from __future__ import annotations

import torch

from tformer.backends.base import BackendBase
from tformer.model import KVCache, TransformerLM, row_positions


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
        self.config = model.config
        self.device = device
        self.dtype = dtype

    def allocate_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache.allocate(self.config, batch, max_len, self.device, self.dtype)

    def step(self, input_ids: torch.Tensor, input_pos: torch.Tensor, start: torch.Tensor, cache: KVCache) -> torch.Tensor:
        B, T = input_ids.shape
        filled = int(input_pos[-1]) + 1  # slots written once this step's keys are in

        if T == 1:
            lengths = torch.full((B,), filled, device=self.device, dtype=torch.int32)

            def attend(q, k, v):  # (B, H, 1, Dh) against the whole cache, rows cut at lengths
                return self.kernels.decode_attention(q, k, v, lengths, start)
        else:

            def attend(q, k, v):  # (B, H, T, Dh): the T queries sit at the end of the filled slots
                return self.kernels.prefill_attention(q, k[:, :, :filled], v[:, :, :filled], start)

        return self.model.run(input_ids, row_positions(input_pos, start).expand(B, T), None, cache, input_pos, attend)
