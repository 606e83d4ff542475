"""The kernel benchmark behind `tformer-bench kernels`: our attention kernels vs SDPA vs naive.

Each case (prefill or decode, batch, heads, sequence length, head dim, dtype) times three
implementations on the same random inputs: tformer's Triton kernel, PyTorch's
`scaled_dot_product_attention` (which picks FlashAttention / cuDNN / efficient kernels itself) and
a naive matmul-softmax-matmul that materializes the scores. Before timing, our output is compared
with SDPA's; a mismatch flags the row. Prefill is reported in TFLOP/s (causal: only the query-key
pairs that count), decode in GB/s of K/V read, next to the device's measured copy bandwidth.
On a GPU, times come from `triton.testing.do_bench` (CUDA events, L2 flushed between runs).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tformer.bench.stats import Spread
from tformer.errors import TformerError

IMPLS = ("tformer", "sdpa", "naive")
KINDS = ("prefill", "decode")
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}  # ours vs SDPA, relative
NAIVE_MAX_BYTES = 4 << 30  # the naive scores matrix beyond this is skipped, not run out of memory


@dataclass
class KernelRecord:
    """One row: one implementation on one case. Times in ms."""

    kind: str  # "prefill" (Tq = Tk = seq, causal) or "decode" (one query, a full cache of seq keys)
    impl: str  # "tformer", "sdpa" or "naive"
    batch: int
    heads: int
    seq: int
    head_dim: int
    dtype: str
    status: str = "ok"  # "ok", "mismatch" (our output differs from SDPA's), "skipped"
    reason: str = ""
    ms: Spread | None = None
    tflops: float | None = None  # prefill
    gb_s: float | None = None  # decode: K/V bytes read per second
    copy_fraction: float | None = None  # decode: gb_s / the device's measured copy bandwidth
    vs_sdpa: float | None = None  # SDPA's median time / this row's
    max_rel_err: float | None = None  # tformer rows: vs SDPA, max |diff| / max |SDPA|
    versions: dict[str, str | None] = field(default_factory=dict)

    @property
    def flagged(self) -> bool:
        return self.status == "mismatch"


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v with the `(B, H, Tq, Tk)` scores in memory (float32 softmax)."""
    scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
    if causal:
        Tq, Tk = q.shape[2], k.shape[2]
        seen = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
        scores = scores.masked_fill(~seen, float("-inf"))
    return torch.softmax(scores, -1).to(q.dtype) @ v


def time_ms(fn: Callable[[], object], device: torch.device) -> Spread:
    """Median, min and max milliseconds of `fn`, after a warm-up (where autotuning happens)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        median, low, high = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.0, 1.0])
        return Spread(median=median, min=low, max=high)
    fn()
    samples = []
    for _ in range(3):
        began = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - began) * 1e3)
    return Spread.of(samples)


def copy_bandwidth_gb_s(device: torch.device) -> float | None:
    """Device-to-device copy of 1 GiB: bytes read + written per second (the decode roofline)."""
    if device.type != "cuda":
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device).median
    del src, dst
    return 2 * (1 << 30) / (ms * 1e-3) / 1e9


def run_kernel_benchmarks(
    kinds: Sequence[str],
    batches: Sequence[int],
    heads: Sequence[int],
    seqs: Sequence[int],
    head_dims: Sequence[int],
    dtypes: Sequence[torch.dtype],
    device: torch.device,
    impls: Sequence[str] = IMPLS,
    seed: int = 0,
    progress: Callable[[str], None] = lambda _: None,
    versions: dict | None = None,
) -> tuple[list[KernelRecord], float | None]:
    """Every case x implementation; returns the records and the copy bandwidth (GB/s, GPU only)."""
    from tformer.kernels import decode_attention, prefill_attention  # triton is needed from here on

    copy_bw = copy_bandwidth_gb_s(device)
    records: list[KernelRecord] = []
    for kind, B, H, T, D, dtype in itertools.product(kinds, batches, heads, seqs, head_dims, dtypes):
        name = str(dtype).removeprefix("torch.")
        progress(f"{kind}  batch {B}  heads {H}  seq {T}  head dim {D}  {name}")
        g = torch.Generator(device=device).manual_seed(seed)
        k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g) for _ in range(2))
        q = torch.randn(B, H, T if kind == "prefill" else 1, D, device=device, dtype=dtype, generator=g)
        causal = kind == "prefill"
        lengths = torch.full((B,), T, device=device, dtype=torch.int32)  # decode: row b reads cache row b, all T keys
        start = torch.zeros((B,), device=device, dtype=torch.int32)  # prefill: T queries from position 0
        run = {
            "tformer": (lambda: prefill_attention(q, k, v, start)) if causal
            else (lambda: decode_attention(q, k, v, lengths)),
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
            "naive": lambda: naive_attention(q, k, v, causal),
        }
        case = dict(kind=kind, batch=B, heads=H, seq=T, head_dim=D, dtype=name, versions=versions or {})
        rows = {impl: KernelRecord(impl=impl, **case) for impl in impls}
        scores_bytes = B * H * q.shape[2] * T * 4  # the naive float32 (Tq, Tk) matrices
        if "naive" in rows and scores_bytes > NAIVE_MAX_BYTES:
            rows["naive"].status, rows["naive"].reason = "skipped", f"scores would need {scores_bytes / 2**30:.0f} GiB"
        reference = run["sdpa"]()
        try:
            ours = run["tformer"]()
        except TformerError as exc:  # a shape our kernels do not take: the row says why
            if "tformer" in rows:
                rows["tformer"].status, rows["tformer"].reason = "skipped", str(exc)
        else:
            err = float((ours.float() - reference.float()).abs().max() / reference.float().abs().max())
            if "tformer" in rows:
                rows["tformer"].max_rel_err = err
                if not err <= TOLERANCE[dtype]:
                    rows["tformer"].status, rows["tformer"].reason = "mismatch", f"differs from SDPA by {err:.2g} (relative)"
        for impl, row in rows.items():
            if row.status != "skipped":
                row.ms = time_ms(run[impl], device)
                _fill_rates(row, q, copy_bw)
        sdpa = rows.get("sdpa")
        for row in rows.values():
            if row.ms and sdpa is not None and sdpa.ms:
                row.vs_sdpa = sdpa.ms.median / row.ms.median
        records += rows.values()
    return records, copy_bw


def _fill_rates(row: KernelRecord, q: torch.Tensor, copy_bw: float | None) -> None:
    seconds = row.ms.median * 1e-3
    B, H, T, D = row.batch, row.heads, row.seq, row.head_dim
    if row.kind == "prefill":
        pairs = T * (T + 1) / 2  # causal: query i sees i + 1 keys
        row.tflops = 4 * B * H * pairs * D / seconds / 1e12  # two matmuls, 2 FLOPs per multiply-add
    else:
        bytes_read = (2 * T + 2) * B * H * D * q.element_size()  # K and V, plus q in and the output out
        row.gb_s = bytes_read / seconds / 1e9
        row.copy_fraction = row.gb_s / copy_bw if copy_bw else None
