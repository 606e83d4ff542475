"""Triton kernels vs float64 attention written out here, and the triton backend vs eager.

Each test has a "cpu" and a "cuda" case, and exactly one of them runs: on a GPU the kernels are
compiled for it; without one they run under Triton's interpreter (conftest sets
TRITON_INTERPRET=1), which triton chooses once per process, at import. Inputs are
fresh random tensors per case. The caches are `(R, H, S, D)` views into longer buffers: the cache
rows that no batch row reads and the slots past S hold NaN, and so do outputs before the kernel
writes them, so that reading what it must not or skipping an element fails the comparison.
Error = max |out - ref| / max |ref| over every element the kernels define (a prefill's padding
queries past the cache's end are only checked to be finite).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("triton")

from tformer.errors import TformerError  # noqa: E402
from tformer.kernels import decode_attention, prefill_attention  # noqa: E402
from tformer.runtime import Runtime  # noqa: E402

from conftest import CUDA, cuda_case, token_ids  # noqa: E402

INTERPRETED = pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(
    CUDA, reason="with a GPU the kernels are compiled for it: triton interprets only in a process without one"))  # fmt: skip
DEVICES = [INTERPRETED, cuda_case()]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}  # bf16: the interpreter truncates stores
DTYPES = list(TOLERANCE)


def reference(q, k_cache, v_cache, rows, key_end):
    """Float64 softmax(q k^T / sqrt(D)) v where query t of batch row b sees keys 0 <= j < key_end(b, t)
    of cache row rows[b]; a query that sees nothing gets zeros."""
    q, k, v = (t.double().cpu() for t in (q, k_cache[rows], v_cache[rows]))
    B, H, T, D = q.shape
    scores = q @ k.transpose(-1, -2) / D**0.5  # (B, H, T, S)
    j = torch.arange(k.shape[2])
    seen = torch.stack([torch.stack([j < key_end(b, t) for t in range(T)]) for b in range(B)])  # (B, T, S)
    scores = scores.masked_fill(~seen[:, None], float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0) @ v


def relative_error(out, ref) -> float:
    return float((out.double().cpu() - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def poisoned(shape, dtype, device):
    return torch.full(shape, float("nan"), device=device, dtype=dtype)


def random(*shape, dtype, seed, device):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def cache_rows(R, H, S, D, used, dtype, seed, device):
    """k, v caches `(R, H, S, D)`: random in rows `used`, NaN in every other row and past slot S
    (they are views into a longer buffer), so that reading anything else poisons the output."""
    k, v = (poisoned((R, H, S + 64, D), dtype, device) for _ in range(2))
    for i, t in enumerate((k, v)):
        t[sorted(set(used)), :, :S] = random(len(set(used)), H, S, D, dtype=dtype, seed=seed + i, device=device)
    return k[:, :, :S], v[:, :, :S]


def run_prefill(device, B, H, T, S, D, dtype, start, rows=None, R=None, seed=0):
    """q `(B, H, T, D)` against a cache of R rows of S slots; the reference for query t of row b:
    keys 0..start[b] + t of cache row rows[b] (default b), the cache's end cutting it short."""
    row_ids = list(range(B)) if rows is None else rows
    k, v = cache_rows(R or B, H, S, D, row_ids, dtype, seed, device)
    q = random(B, H, T, D, dtype=dtype, seed=seed + 2, device=device)
    rows_t = None if rows is None else torch.tensor(rows, device=device)
    start_t = torch.tensor(start, device=device)
    out = prefill_attention(q, k, v, start_t, rows_t, out=poisoned((B, H, T, D), dtype, device))
    return out, reference(q, k, v, row_ids, lambda b, t: start[b] + t + 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, D", [(1, 32), (7, 16), (37, 64), (129, 128)])
def test_prefill_causal(T, D, dtype, device):
    out, ref = run_prefill(device, 2, 2, T, T, D, dtype, start=[0, 0], seed=T)
    assert out.dtype == dtype and out.shape == (2, 2, T, D)
    assert relative_error(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("D", [16, 24, 32, 64, 80, 128])
def test_prefill_head_dims_including_padded_ones(D, device):
    out, ref = run_prefill(device, 1, 3, 37, 37, D, torch.float32, start=[0], seed=D)
    assert relative_error(out, ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_rows_out_of_order_at_their_own_offsets(dtype, device):
    # Batch rows read cache rows 3, 0, 2 of 5 (rows 1 and 4 are NaN): a fresh prompt, the next
    # chunk of one whose first 70 keys are cached (its queries start inside the second key block),
    # and one whose last 7 queries are padding past the cache's 200 slots: they must read nothing
    # beyond it, and stay finite.
    out, ref = run_prefill(device, 3, 2, 37, 200, 32, dtype, start=[0, 70, 170], rows=[3, 0, 2], R=5, seed=5)
    assert torch.isfinite(out).all()
    assert relative_error(out[:2], ref[:2]) < TOLERANCE[dtype]
    assert relative_error(out[2, :, :30], ref[2, :, :30]) < TOLERANCE[dtype]  # row 2's queries inside the cache


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_reads_any_strides(device):
    B, H, T, D = 2, 2, 37, 32
    qkv = random(B, T, 3, H, D, dtype=torch.float32, seed=3, device=device)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, T, D) views, as the model makes them
    out = prefill_attention(q, k, v, torch.tensor([0, 0], device=device), torch.tensor([1, 0], device=device))
    assert relative_error(out, reference(q, k, v, [1, 0], lambda b, t: t + 1)) < 1e-5


def run_decode(device, B, H, S, D, dtype, lengths, rows=None, R=None, seed=0):
    """One query per batch row against a cache of R rows of S slots: keys 0..lengths[b]-1 of cache
    row rows[b] (default b)."""
    row_ids = list(range(B)) if rows is None else rows
    k, v = cache_rows(R or B, H, S, D, row_ids, dtype, seed, device)
    q = random(B, H, 1, D, dtype=dtype, seed=seed + 2, device=device)
    rows_t = None if rows is None else torch.tensor(rows, device=device)
    lengths_t = torch.tensor(lengths, device=device)
    out = decode_attention(q, k, v, lengths_t, rows_t, out=poisoned((B, H, 1, D), dtype, device))
    return out, reference(q, k, v, row_ids, lambda b, t: lengths[b])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L, D", [(1, 16), (7, 32), (37, 64), (129, 128)])
def test_decode_against_cache_lengths(L, D, dtype, device):
    # The cache is longer than what is filled: slots past `lengths` hold values that must not count.
    out, ref = run_decode(device, 2, 2, L + 20, D, dtype, lengths=[L, max(1, L // 2)], seed=L)
    assert out.dtype == dtype and out.shape == (2, 2, 1, D)
    assert relative_error(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_split_cache_rows_out_of_order(dtype, device):
    # 600 slots = 3 splits of 256 (interpreted); batch rows read cache rows 4, 1, 4, 1 of 5 (0, 2 and
    # 3 are NaN): the whole cache, a length in the middle of the second split (the third is empty),
    # one inside the first split. A row of length 0 gets zeros.
    out, ref = run_decode(device, 4, 2, 600, 64, dtype, lengths=[600, 300, 100, 0], rows=[4, 1, 4, 1], R=5, seed=9)
    assert relative_error(out, ref) < TOLERANCE[dtype]
    assert torch.all(out[3] == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_never_reads_past_the_cache(device):
    # lengths beyond the cache are read as the cache's length: past slot 257 the buffer holds NaN.
    out, ref = run_decode(device, 2, 2, 257, 32, torch.float32, lengths=[257, 400], rows=[1, 0], seed=1)
    assert relative_error(out, ref) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("D", [24, 80])
def test_decode_padded_head_dims(D, device):
    out, ref = run_decode(device, 1, 2, 200, D, torch.float32, lengths=[173], seed=D)
    assert relative_error(out, ref) < TOLERANCE[torch.float32]


def far_apart_rows(dtype, device, directory):
    """A cache `(5, 1, 64, 16)` whose rows lie 2^30 elements apart, so that row 4 starts at element
    2^32, where an int32 offset `row * stride` wraps around to 0: onto row 0. Rows 0 and 4 hold
    different random values. Its 8 GiB are real GPU memory on a GPU; on the CPU they are a sparse
    file in `directory`, mapped, of which only the pages of rows 0 and 4 are ever touched."""
    R, H, S, D = 5, 1, 64, 16
    stride = 2**30
    size = (R - 1) * stride + H * S * D
    if device == "cuda":
        storage = torch.empty(size, dtype=dtype, device=device)
    else:
        path = directory / "cache"
        with open(path, "wb") as f:
            f.truncate(size * dtype.itemsize)  # a hole: no disk blocks, no memory until written
        storage = torch.from_file(str(path), shared=True, size=size, dtype=dtype)
    cache = storage.as_strided((R, H, S, D), (stride, S * D, D, 1))
    for row in (0, 4):
        cache[row] = random(H, S, D, dtype=dtype, seed=row, device=device)
    return cache


@pytest.mark.parametrize("device", DEVICES)
def test_row_offsets_past_2_to_the_31_elements_are_int64(device, tmp_path):
    # A row index times the row stride is 2^32 here: computed in int32 it wraps to 0 and the
    # kernels would read row 0 for batch row 0, which the comparison catches (rows 0 and 4 differ).
    # This is the overflow of a real cache such as 128 rows x 16 heads x 8k slots x 128.
    cache = far_apart_rows(torch.float16, device, tmp_path)
    rows, start, lengths = [4, 0], [56, 40], [64, 30]
    q = random(2, 1, 8, 16, dtype=torch.float16, seed=7, device=device)
    rows_t, tolerance = torch.tensor(rows, device=device), TOLERANCE[torch.float16]
    out = prefill_attention(q, cache, cache, torch.tensor(start, device=device), rows_t)
    assert relative_error(out, reference(q, cache, cache, rows, lambda b, t: start[b] + t + 1)) < tolerance
    out = decode_attention(q[:, :, :1], cache, cache, torch.tensor(lengths, device=device), rows_t)
    assert relative_error(out, reference(q[:, :, :1], cache, cache, rows, lambda b, t: lengths[b])) < tolerance


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_are_one_line_errors(device):
    q = torch.zeros(1, 2, 4, 16, device=device)
    start = torch.zeros(1, dtype=torch.long, device=device)
    with pytest.raises(TformerError, match="T <= S"):
        prefill_attention(q, q[:, :, :2], q[:, :, :2], start)
    with pytest.raises(TformerError, match="one shape"):
        prefill_attention(q, q, q[:, :, :3], start)
    with pytest.raises(TformerError, match="head dim 160"):
        prefill_attention(*[torch.zeros(1, 1, 2, 160, device=device)] * 3, start)
    with pytest.raises(TformerError, match="dtype"):
        prefill_attention(q, q.half(), q, start)
    with pytest.raises(TformerError, match="start must be a \\(1,\\) int32/int64"):
        prefill_attention(q, q, q, torch.zeros(2, dtype=torch.long, device=device))
    with pytest.raises(TformerError, match="q has 2 rows but the cache only 1; pass rows"):
        prefill_attention(q.expand(2, -1, -1, -1), q, q, start.expand(2))
    with pytest.raises(TformerError, match="rows must be a \\(1,\\) int32/int64"):
        prefill_attention(q, q, q, start, torch.zeros(1, device=device))
    with pytest.raises(TformerError, match="one query per row"):
        decode_attention(q, q, q, torch.tensor([4], device=device))
    with pytest.raises(TformerError, match="lengths must be"):
        decode_attention(q[:, :, :1], q, q, torch.tensor([4.0], device=device))
    with pytest.raises(TformerError, match="out must be"):
        prefill_attention(q, q, q, start, out=torch.zeros(1, 2, 4, 8, device=device))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gives")
def test_without_gpu_or_interpreter_the_error_names_the_interpreter(monkeypatch):
    """As in a process started without TRITON_INTERPRET (which triton, and `launch.INTERPRET`, read
    once, at import): CPU tensors are refused in one line that says how to interpret them."""
    monkeypatch.setattr("tformer.kernels.launch.INTERPRET", False)
    q = torch.zeros(1, 1, 2, 16)
    with pytest.raises(TformerError, match="need a CUDA GPU") as info:
        prefill_attention(q, q, q, torch.zeros(1, dtype=torch.long))
    assert "TRITON_INTERPRET=1" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_backend_greedy_equals_eager(trained, device):
    model, tokenizer = trained
    eager = Runtime.from_model(copy.deepcopy(model), tokenizer, backend="eager", device=device)
    triton = Runtime.from_model(copy.deepcopy(model), tokenizer, backend="triton", device=device)
    assert "Triton" in triton.backend.implementation
    prompts = [tokenizer.encode(text) for text in ("def main(", "import os\nclass ", "x")]
    assert len({len(p) for p in prompts}) == 3  # different lengths: rows at different positions
    want = token_ids(eager, prompts, max_new_tokens=12, temperature=0)
    got = token_ids(triton, prompts, max_new_tokens=12, temperature=0)
    assert got == want
    assert len({tuple(ids) for ids in want}) == 3  # the rows differ: a real comparison


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_benchmark_cli(tmp_path, monkeypatch, device):
    from click.testing import CliRunner

    from tformer.bench.cli import main as bench

    monkeypatch.setattr("tformer.bench.kernels.NAIVE_MAX_BYTES", 40_000)  # the 200-key prefill's scores are over
    out = tmp_path / "kernels.json"
    result = CliRunner().invoke(bench, [
        "kernels", "--seq", "64,100", "--batch", "1", "--heads", "2", "--head-dim", "16", "--dtype", "fp32,bf16",
        "--device", device, "--json", str(out),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    records = json.loads(out.read_text())["records"]
    assert len(records) == 2 * 2 * 2 * 3  # kinds x seqs x dtypes x implementations
    ours = [r for r in records if r["impl"] == "tformer"]
    assert all(r["status"] == "ok" and r["max_rel_err"] < 2e-2 and r["ms"]["median"] > 0 for r in ours)
    assert all(r["tflops"] > 0 for r in ours if r["kind"] == "prefill")
    assert all(r["gb_s"] > 0 for r in ours if r["kind"] == "decode")
    skipped = [r for r in records if r["status"] == "skipped"]
    assert {(r["kind"], r["impl"], r["seq"]) for r in skipped} == {("prefill", "naive", 100)}
    assert "skipped prefill naive" in result.output and "GiB" in result.output
    bad = CliRunner().invoke(bench, ["kernels", "--kinds", "prefil"])
    assert bad.exit_code == 2 and "unknown kind(s) prefil" in bad.output
