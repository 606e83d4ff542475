"""Fused causal attention for prefill: FlashAttention's one pass over K/V with an online softmax.

Each program owns BLOCK_M queries of one (batch, head) and walks the key blocks that any of them
may see: blocks before the row's first valid key (left padding) and blocks above the diagonal are
never loaded; only the boundary blocks (the one holding `start`, the diagonal ones, a ragged tail)
are masked, the blocks between run unmasked. Scores live in registers: no (Tq, Tk) matrix is ever
written. Softmax runs in base 2 with the scale folded in, accumulating in float32 whatever the
input dtype.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from tformer.errors import TformerError
from tformer.kernels.launch import INTERPRET, check_inputs, configs, output, padded_head_dim, score_scale

_CONFIGS = configs(
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
     for bm, bn, w, s in [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4), (64, 128, 4, 3)]],
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}),
)  # fmt: skip


@triton.jit
def _attend(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, offs_m, offs_d, d_mask,
            row_start, diag, n_keys, lo, hi, qk_scale,
            BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr):  # fmt: skip
    """Fold key blocks [lo, hi) into the running (acc, max, sum) of the BLOCK_M queries."""
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_range = offs_n < n_keys
        kt = tl.load(k_base + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kt,
                     mask=d_mask[:, None] & in_range[None, :], other=0.0)  # (D, BLOCK_N)  # fmt: skip
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                    mask=in_range[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_N, D)  # fmt: skip
        if DOT_F32:  # the interpreter's bf16 dot is wrong; fp32 tiles are exact there
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = s * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            seen = (offs_n[None, :] >= row_start) & (offs_n[None, :] <= diag + offs_m[:, None]) & in_range[None, :]
            s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet stays at 0
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc, m_i, l_i


@triton.autotune(configs=_CONFIGS, key=["seq_bucket", "HEAD_DIM", "HAS_START"])
@triton.jit
def _prefill_kernel(Q, K, V, O, START,
                    stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kt, stride_kd,
                    stride_vb, stride_vh, stride_vt, stride_vd, stride_ob, stride_oh, stride_ot, stride_od,
                    n_heads, n_queries, n_keys, qk_scale, seq_bucket,
                    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HAS_START: tl.constexpr,
                    IEEE: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    # seq_bucket (Tk rounded up to a power of two) only keys the autotuner: one tuning per bucket,
    # not per prompt length.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < n_queries) & d_mask[None, :], other=0.0)  # (BLOCK_M, D)  # fmt: skip
    if DOT_F32:
        q = q.to(tl.float32)
    row_start = 0
    if HAS_START:
        row_start = tl.load(START + b).to(tl.int32)
    diag = n_keys - n_queries  # query i sees keys row_start <= j <= diag + i
    # Key blocks: [lo, full_lo) holds row_start (masked), [full_lo, full_hi) is seen by every query
    # of this block (unmasked), [full_hi, hi) crosses the diagonal or the end (masked).
    hi = tl.minimum(n_keys, diag + m0 + BLOCK_M)
    lo = (row_start // BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(tl.cdiv(row_start, BLOCK_N) * BLOCK_N, hi)
    full_hi = tl.maximum(tl.minimum((diag + m0 + 1) // BLOCK_N, n_keys // BLOCK_N) * BLOCK_N, full_lo)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, offs_m,
                            offs_d, d_mask, row_start, diag, n_keys, lo, full_lo, qk_scale,
                            BLOCK_N, True, IEEE, DOT_F32)  # fmt: skip
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, offs_m,
                            offs_d, d_mask, row_start, diag, n_keys, full_lo, full_hi, qk_scale,
                            BLOCK_N, False, IEEE, DOT_F32)  # fmt: skip
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, offs_m,
                            offs_d, d_mask, row_start, diag, n_keys, full_hi, hi, qk_scale,
                            BLOCK_N, True, IEEE, DOT_F32)  # fmt: skip
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a query that sees no key (padding) gets 0
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=(offs_m[:, None] < n_queries) & d_mask[None, :])  # fmt: skip


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of `Tq` queries that sit at the end of `Tk` keys, fused in one kernel.

    q: `(B, H, Tq, D)`; k, v: `(B, H, Tk, D)` with `1 <= Tq <= Tk`; float32, float16 or bfloat16
        (all three alike), any strides, D in 1..128 (padded to a power of two >= 16 inside).
    start: optional `(B,)` int32/int64, the first valid key of each left-padded row (default 0).
    Query `i` of row `b` attends to keys `start[b] <= j <= Tk - Tq + i`: Tq == Tk is a plain causal
    prefill; Tq < Tk is a prefill after a cached prefix of `Tk - Tq` keys. Scores are scaled by
    `1/sqrt(D)`. A query that sees no key at all (padding before `start`) gets zeros.
    out: optional `(B, H, Tq, D)` tensor of q's dtype to write into (any strides).
    Returns `(B, H, Tq, D)` in q's dtype (`out` when given); accumulation is float32.
    """
    check_inputs("prefill_attention", q, k, v, start)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if not 1 <= Tq <= Tk:
        raise TformerError(f"prefill_attention: need 1 <= Tq <= Tk, got Tq {Tq}, Tk {Tk}")
    out = output("prefill_attention", q, (B, H, Tq, D), out)
    start_arg = start.contiguous() if start is not None else out  # never read without HAS_START
    grid = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * H)  # noqa: E731
    _prefill_kernel[grid](
        q, k, v, out, start_arg, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, Tq, Tk, score_scale(D), triton.next_power_of_2(Tk),
        HEAD_DIM=D, D_PAD=padded_head_dim(D), HAS_START=start is not None,
        IEEE=q.dtype == torch.float32, DOT_F32=INTERPRET,
    )  # fmt: skip
    return out
