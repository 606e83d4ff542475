"""Fused causal attention for prefill: FlashAttention's one pass over K/V with an online softmax.

Batch row b feeds T new queries to cache row `rows[b]`, at positions `start[b], start[b]+1, ...`
(a prompt, or the next chunk of one), and the caller has already written their keys into that
row: the kernel reads every key it needs from the cache, earlier chunks' and this step's alike.
Each program owns BLOCK_M queries of one (batch row, head) and walks the key blocks that any of
them may see: blocks above the diagonal are never loaded, only the boundary blocks (the diagonal
ones, the end of the cache) are masked, the blocks below run unmasked. Scores live in registers:
no (T, S) matrix is ever written. Softmax runs in base 2 with the scale folded in, accumulating in
float32 whatever the input dtype.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from tformer.errors import TformerError
from tformer.kernels.launch import INTERPRET, check_inputs, check_rows, configs, output, padded_head_dim, score_scale

_CONFIGS = configs(
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
     for bm, bn, w, s in [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4), (64, 128, 4, 3)]],
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}),
)  # fmt: skip


@triton.jit
def _attend(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, offs_m, offs_d, d_mask,
            first, n_slots, lo, hi, qk_scale,
            BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr):  # fmt: skip
    """Fold key blocks [lo, hi) into the running (acc, max, sum) of the BLOCK_M queries; query m
    sits at position first + m. Every query sees key 0, in the first block folded, so the running
    max is finite from then on."""
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        in_range = offs_n < n_slots
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
            seen = (offs_n[None, :] <= first + offs_m[:, None]) & in_range[None, :]
            s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc, m_i, l_i


@triton.autotune(configs=_CONFIGS, key=["query_bucket", "HEAD_DIM"])
@triton.jit
def _prefill_kernel(Q, K, V, O, START, ROWS,
                    stride_qb, stride_qh, stride_qt, stride_qd, stride_kr, stride_kh, stride_kt, stride_kd,
                    stride_vr, stride_vh, stride_vt, stride_vd, stride_ob, stride_oh, stride_ot, stride_od,
                    n_heads, n_queries, n_slots, qk_scale, query_bucket,
                    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HAS_ROWS: tl.constexpr,
                    IEEE: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    # query_bucket (T rounded up to a power of two) only keys the autotuner: one tuning per bucket,
    # not per prompt length. Every index is int64 before it meets a stride: row * stride of a
    # large cache passes 2^31 elements.
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    row = b
    if HAS_ROWS:
        row = tl.load(ROWS + b).to(tl.int64)
    first = tl.load(START + b).to(tl.int64)  # query m sits at position first + m and sees keys 0..first + m
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_d = tl.arange(0, D_PAD).to(tl.int64)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < n_queries) & d_mask[None, :], other=0.0)  # (BLOCK_M, D)  # fmt: skip
    if DOT_F32:
        q = q.to(tl.float32)
    # Key blocks: [0, full_hi) is seen by every query of this block (unmasked), [full_hi, hi)
    # crosses the diagonal or the end of the cache (masked).
    hi = tl.minimum(n_slots, first + m0 + BLOCK_M)
    full_hi = tl.minimum((first + m0 + 1) // BLOCK_N, n_slots // BLOCK_N) * BLOCK_N
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    k_base = K + row * stride_kr + h * stride_kh
    v_base = V + row * stride_vr + h * stride_vh
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, offs_m,
                            offs_d, d_mask, first, n_slots, 0, full_hi, qk_scale,
                            BLOCK_N, False, IEEE, DOT_F32)  # fmt: skip
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, offs_m,
                            offs_d, d_mask, first, n_slots, full_hi, hi, qk_scale,
                            BLOCK_N, True, IEEE, DOT_F32)  # fmt: skip
    out = acc / l_i[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=(offs_m[:, None] < n_queries) & d_mask[None, :])  # fmt: skip


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    start: torch.Tensor,
    rows: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of T new queries per batch row against its row of a KV cache, fused in one
    kernel.

    q: `(B, H, T, D)`; k_cache, v_cache: `(R, H, S, D)` with `1 <= T <= S`; float32, float16 or
        bfloat16 (all three alike), any strides, D in 1..128 (padded to a power of two >= 16 inside).
    start: `(B,)` int32/int64: query t of batch row b sits at position `start[b] + t` and attends to
        keys `0..start[b] + t` of its cache row, which must already hold the keys of this step's
        queries. start 0 with T = S is a plain causal prefill; start > 0 continues a row whose
        earlier keys are in the cache (the next chunk of a prompt).
    rows: optional `(B,)` int32/int64, the cache row of each batch row, in `0..R-1` (default: row b,
        then B <= R). Rows may repeat and come in any order.
    Scores are scaled by `1/sqrt(D)`. Keys past the end of the cache are never read: a query
    beyond a row's real tokens (padding of a right-padded batch) gets a finite output of no meaning
    and reads nothing out of bounds. out: optional `(B, H, T, D)` tensor of q's dtype to write
    into (any strides).
    Returns `(B, H, T, D)` in q's dtype (`out` when given); accumulation is float32.
    """
    check_inputs("prefill_attention", q, k_cache, v_cache, rows)
    check_rows("prefill_attention", "start", start, q)
    B, H, T, D = q.shape
    S = k_cache.shape[2]
    if not 1 <= T <= S:
        raise TformerError(f"prefill_attention: need 1 <= T <= S (queries per row, cache slots), got T {T}, S {S}")
    out = output("prefill_attention", q, (B, H, T, D), out)
    start = start.contiguous()
    rows_arg = rows.contiguous() if rows is not None else start  # never read without HAS_ROWS
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, start, rows_arg, *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        H, T, S, score_scale(D), triton.next_power_of_2(T),
        HEAD_DIM=D, D_PAD=padded_head_dim(D), HAS_ROWS=rows is not None,
        IEEE=q.dtype == torch.float32, DOT_F32=INTERPRET,
    )  # fmt: skip
    return out
