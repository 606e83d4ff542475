"""Decode attention: one new query per row against a long KV cache, split along the cache.

Batch row b reads cache row `rows[b]` (requests own cache rows; a step runs any subset of them,
in any order), slots `0..lengths[b]-1`. One query per (batch, head) is far too little work for a
GPU if one program walks the whole cache: batch 1 with 8 heads would run 8 programs on 132 SMs.
Flash-decoding splits the cache into chunks, lets one program per (batch, head, chunk) compute a
partial softmax (its max, its sum and its unnormalized weighted values), then a second small
kernel merges the partials exactly.
A single query row is below `tl.dot`'s minimum of 16, and decode is bound by reading the cache, so
the scores are a broadcast multiply and a row sum in float32.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from tformer.errors import TformerError
from tformer.kernels.launch import (
    INTERPRET, check_inputs, check_rows, configs, output, padded_head_dim, score_scale, sm_count,
)  # fmt: skip

SPLIT_KEYS = 128  # chunks are multiples of this many keys

_CONFIGS = configs(
    [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
     for bn, w, s in [(64, 4, 2), (128, 4, 2), (64, 4, 4), (128, 8, 3), (32, 2, 4)]],
    triton.Config({"BLOCK_N": 64}),
)  # fmt: skip


@triton.autotune(configs=_CONFIGS, key=["keys_per_split", "HEAD_DIM"])
@triton.jit
def _split_kernel(Q, K, V, LENGTHS, ROWS, PART_O, PART_M, PART_L,
                  stride_qb, stride_qh, stride_qd, stride_kr, stride_kh, stride_kt, stride_kd,
                  stride_vr, stride_vh, stride_vt, stride_vd,
                  n_heads, n_slots, n_splits, keys_per_split, qk_scale,
                  HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HAS_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Partial softmax of one (batch row, head) over keys [split * keys_per_split, next split) of
    its cache row. Every index is int64 before it meets a stride: row * stride of a large cache
    passes 2^31 elements."""
    pid_bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    row = b
    if HAS_ROWS:
        row = tl.load(ROWS + b).to(tl.int64)
    offs_d = tl.arange(0, D_PAD).to(tl.int64)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d * stride_qd, mask=d_mask, other=0.0).to(tl.float32)
    lo = split * keys_per_split
    length = tl.minimum(tl.load(LENGTHS + b).to(tl.int64), n_slots)  # never read past the cache
    hi = tl.minimum(lo + keys_per_split, length)
    k_base = K + row * stride_kr + h * stride_kh
    v_base = V + row * stride_vr + h * stride_vh
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([D_PAD], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        n_mask = offs_n < hi
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], 1) * qk_scale  # (BLOCK_N,), log2 units
        s = tl.where(n_mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))  # finite: every block holds a key below hi
        p = tl.exp2(s - m_new)
        alpha = tl.exp2(m_i - m_new)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        l_i = l_i * alpha + tl.sum(p, 0)
        m_i = m_new
    part = pid_bh * n_splits + split  # a split with no keys stores max -inf, sum 0, values 0
    tl.store(PART_O + part * D_PAD + offs_d, acc)
    tl.store(PART_M + part, m_i)
    tl.store(PART_L + part, l_i)


@triton.jit
def _merge_kernel(PART_O, PART_M, PART_L, O, stride_ob, stride_oh, stride_od, n_heads, n_splits,
                  HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr):  # fmt: skip
    """Merge the partials of one (batch row, head): rescale each to the global max, then normalize."""
    pid_bh = tl.program_id(0).to(tl.int64)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_s = tl.arange(0, SPLITS_PAD).to(tl.int64)
    offs_d = tl.arange(0, D_PAD).to(tl.int64)
    s_mask = offs_s < n_splits
    part = pid_bh * n_splits + offs_s
    m = tl.load(PART_M + part, mask=s_mask, other=float("-inf"))
    l = tl.load(PART_L + part, mask=s_mask, other=0.0)  # noqa: E741
    o = tl.load(PART_O + part[:, None] * D_PAD + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # empty splits weigh 0
    total = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total == 0.0, 1.0, total)  # no key at all: zeros
    tl.store(O + b * stride_ob + h * stride_oh + offs_d * stride_od, out.to(O.dtype.element_ty),
             mask=offs_d < HEAD_DIM)  # fmt: skip


def _num_splits(batch_heads: int, max_keys: int, device: torch.device) -> int:
    """Enough chunks to fill the GPU (two programs per SM) but no chunk under SPLIT_KEYS keys.
    Interpreted, up to 4 chunks: enough to exercise the merge, few enough to stay quick."""
    most = triton.cdiv(max_keys, SPLIT_KEYS)
    if INTERPRET:
        return min(most, 4)
    return max(1, min(most, triton.cdiv(2 * sm_count(torch.cuda.current_device() if device.index is None else device.index), batch_heads)))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    rows: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one new query per batch row over its row of a KV cache (flash-decoding: split,
    then merge).

    q: `(B, H, 1, D)`; k_cache, v_cache: `(R, H, S, D)`, any strides; float32, float16 or bfloat16
        (all alike); D in 1..128.
    lengths: `(B,)` int32/int64, the number of filled slots of each batch row's cache row (the new
        token's key included), `0 <= lengths[b]` (values past S are read as S).
    rows: optional `(B,)` int32/int64, the cache row of each batch row, in `0..R-1` (default: row b,
        then B <= R). Rows may repeat and come in any order.
    Batch row `b` attends to keys `0 <= j < lengths[b]` of cache row `rows[b]`, scaled by
    `1/sqrt(D)`; other slots and rows are never read. out: optional `(B, H, 1, D)` tensor of q's
    dtype to write into (any strides).
    Returns `(B, H, 1, D)` in q's dtype (`out` when given; float32 accumulation); zeros for a row
    of length 0.
    """
    check_inputs("decode_attention", q, k_cache, v_cache, rows)
    check_rows("decode_attention", "lengths", lengths, q)
    B, H, Tq, D = q.shape
    S = k_cache.shape[2]
    if Tq != 1:
        raise TformerError(f"decode_attention: expected one query per row (B, H, 1, D), got Tq {Tq}; use prefill_attention")
    splits = _num_splits(B * H, S, q.device)
    keys_per_split = triton.cdiv(triton.cdiv(S, splits), SPLIT_KEYS) * SPLIT_KEYS
    splits = triton.cdiv(S, keys_per_split)
    d_pad = padded_head_dim(D)
    part_o = torch.empty((B * H, splits, d_pad), device=q.device, dtype=torch.float32)
    part_m = torch.empty((B * H, splits), device=q.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    out = output("decode_attention", q, (B, H, 1, D), out)
    lengths = lengths.contiguous()
    rows_arg = rows.contiguous() if rows is not None else lengths  # never read without HAS_ROWS
    _split_kernel[(B * H, splits)](
        q, k_cache, v_cache, lengths, rows_arg, part_o, part_m, part_l,
        q.stride(0), q.stride(1), q.stride(3), *k_cache.stride(), *v_cache.stride(),
        H, S, splits, keys_per_split, score_scale(D), HEAD_DIM=D, D_PAD=d_pad, HAS_ROWS=rows is not None,
    )  # fmt: skip
    _merge_kernel[(B * H,)](
        part_o, part_m, part_l, out, out.stride(0), out.stride(1), out.stride(3), H, splits,
        HEAD_DIM=D, D_PAD=d_pad, SPLITS_PAD=max(2, triton.next_power_of_2(splits)),
    )  # fmt: skip
    return out
