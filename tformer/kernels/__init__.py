"""tformer's Triton kernels: fused causal attention for prefill and split-K attention for decode.

    from tformer.kernels import prefill_attention, decode_attention

They run on a CUDA GPU, or on the CPU under Triton's interpreter (`TRITON_INTERPRET=1` set before
Python imports triton) for testing. Needs triton: `pip install 'tformer[triton]'`.
"""

try:
    import triton  # noqa: F401
except ImportError as exc:
    raise ImportError("tformer.kernels needs triton: pip install 'tformer[triton]'") from exc

from tformer.kernels.decode import decode_attention
from tformer.kernels.prefill import prefill_attention

__all__ = ["decode_attention", "prefill_attention"]
