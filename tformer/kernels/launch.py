"""What both attention kernels share: where they may run, tile configs, and the input checks.

The kernels run on a CUDA GPU, or on the CPU under Triton's interpreter (`TRITON_INTERPRET=1`,
set before Python imports triton), which is how the test suite runs them. Triton decides at import
time whether `@triton.jit` compiles or interprets, so `INTERPRET` is read once, here, the same way.
"""

from __future__ import annotations

import functools
import math

import torch
import triton

from tformer.errors import TformerError

INTERPRET: bool = bool(triton.knobs.runtime.interpret)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128
INTERPRET_HINT = "to run the Triton kernels on the CPU for testing, set TRITON_INTERPRET=1 before starting Python"


def configs(gpu: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    """Autotune over `gpu` on a GPU; one config when interpreting, where time grows with the
    number of program instances rather than with FLOPs, so large tiles keep tests fast."""
    return [interpreter] if INTERPRET else gpu


def score_scale(head_dim: int) -> float:
    """1/sqrt(D) times log2(e): the kernels' softmax runs in base 2 (`exp2`) with the scale folded in."""
    return 1.4426950408889634 / math.sqrt(head_dim)


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def padded_head_dim(head_dim: int) -> int:
    """Head dims are padded (masked loads) to a power of two >= 16: `tl.dot` needs inner sizes >= 16."""
    return max(16, triton.next_power_of_2(head_dim))


def check_inputs(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None) -> None:
    """One-line errors for what the kernels cannot take, before anything is launched. q is
    `(B, H, Tq, D)`, the caches `(R, H, S, D)`; batch row b reads cache row `rows[b]` (default b).
    The values of `rows` are not checked: that would wait for the device."""
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise TformerError(f"{name}: expected q (B, H, Tq, D) and k, v caches of one shape (R, H, S, D); "
                           f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")  # fmt: skip
    if q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise TformerError(f"{name}: q {tuple(q.shape)} and k {tuple(k.shape)} differ in heads or head dim")
    if rows is None and q.shape[0] > k.shape[0]:
        raise TformerError(f"{name}: q has {q.shape[0]} rows but the cache only {k.shape[0]}; "
                           "pass rows, the cache row of each batch row")  # fmt: skip
    if not 1 <= q.shape[3] <= MAX_HEAD_DIM:
        raise TformerError(f"{name}: head dim {q.shape[3]} is not supported (1..{MAX_HEAD_DIM})")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TformerError(f"{name}: q, k, v must share one dtype of float32, float16, bfloat16; "
                           f"got {q.dtype}, {k.dtype}, {v.dtype}")  # fmt: skip
    if len({q.device, k.device, v.device}) != 1:
        raise TformerError(f"{name}: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    if q.device.type != "cuda" and not INTERPRET:
        raise TformerError(f"{name}: the Triton kernels need a CUDA GPU (tensors are on {q.device}); {INTERPRET_HINT}")
    if rows is not None:
        check_rows(name, "rows", rows, q)


def check_rows(name: str, what: str, t: torch.Tensor, q: torch.Tensor) -> None:
    """`t` must be a `(B,)` integer tensor on q's device."""
    if t.shape != (q.shape[0],) or t.dtype not in (torch.int32, torch.int64) or t.device != q.device:
        raise TformerError(f"{name}: {what} must be a ({q.shape[0]},) int32/int64 tensor on {q.device}; "
                           f"got {tuple(t.shape)} {t.dtype} on {t.device}")  # fmt: skip


def output(name: str, q: torch.Tensor, shape: tuple[int, ...], out: torch.Tensor | None) -> torch.Tensor:
    """`out` if given (checked), else a new contiguous tensor like q of `shape`."""
    if out is None:
        return torch.empty(shape, device=q.device, dtype=q.dtype)
    if tuple(out.shape) != shape or out.dtype != q.dtype or out.device != q.device:
        raise TformerError(f"{name}: out must be {shape} {q.dtype} on {q.device}; got {tuple(out.shape)} {out.dtype} on {out.device}")
    return out
