"""Triton kernels vs float64 attention written out here, and the triton backend vs eager.

Each test has a "cpu" and a "cuda" case, and exactly one of them runs: on a GPU the kernels are
compiled for it; without one they run under Triton's interpreter (conftest sets
TRITON_INTERPRET=1), which triton chooses once per process, at import. Inputs are
fresh random tensors per case; outputs are pre-filled with NaN so that an element the kernel fails
to write fails the comparison. Error = max |out - ref| / max |ref| over every element, padding
queries included (the kernels define their output as zeros there).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from tformer.errors import TformerError  # noqa: E402
from tformer.kernels import decode_attention, prefill_attention  # noqa: E402
from tformer.runtime import Runtime  # noqa: E402

from conftest import CUDA, cuda_case  # noqa: E402

INTERPRETED = pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(
    CUDA, reason="with a GPU the kernels are compiled for it: triton interprets only in a process without one"))  # fmt: skip
DEVICES = [INTERPRETED, cuda_case()]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}  # bf16: the interpreter truncates stores
DTYPES = list(TOLERANCE)


def reference(q, k, v, start, key_end):
    """Float64 softmax(q k^T / sqrt(D)) v where query i of row b sees keys start[b] <= j < key_end(b, i);
    queries that see nothing get zeros."""
    q, k, v = (t.double().cpu() for t in (q, k, v))
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    scores = q @ k.transpose(-1, -2) / D**0.5  # (B, H, Tq, Tk)
    j = torch.arange(Tk)
    seen = torch.stack([torch.stack([(j >= start[b]) & (j < key_end(b, i)) for i in range(Tq)])
                        for b in range(B)])  # (B, Tq, Tk)  # fmt: skip
    scores = scores.masked_fill(~seen[:, None], float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0) @ v


def relative_error(out, ref) -> float:
    return float((out.double().cpu() - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def poisoned(shape, dtype, device):
    return torch.full(shape, float("nan"), device=device, dtype=dtype)


def random(*shape, dtype, seed, device):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def run_prefill(device, B, H, Tq, Tk, D, dtype, start=None, seed=0):
    q, k, v = (random(B, H, t, D, dtype=dtype, seed=seed + i, device=device) for i, t in enumerate((Tq, Tk, Tk)))
    start_t = None if start is None else torch.tensor(start, device=device)
    out = prefill_attention(q, k, v, start_t, out=poisoned((B, H, Tq, D), dtype, device))
    ref = reference(q, k, v, start or [0] * B, lambda b, i: Tk - Tq + i + 1)
    return out, ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, D", [(1, 32), (7, 16), (37, 64), (129, 128)])
def test_prefill_causal(T, D, dtype, device):
    out, ref = run_prefill(device, 2, 2, T, T, D, dtype, seed=T)
    assert out.dtype == dtype and out.shape == (2, 2, T, D)
    assert relative_error(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("D", [16, 24, 32, 64, 80, 128])
def test_prefill_head_dims_including_padded_ones(D, device):
    out, ref = run_prefill(device, 1, 3, 37, 37, D, torch.float32, seed=D)
    assert relative_error(out, ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_left_padding_and_offset_into_a_longer_cache(dtype, device):
    # Row 0 unpadded, row 1 padded past the first key block, row 2 padded so far that its first
    # queries see no key at all; 37 queries at the end of 129 keys (a prefill after a prefix).
    out, ref = run_prefill(device, 3, 2, 37, 129, 32, dtype, start=[0, 70, 110], seed=5)
    assert relative_error(out, ref) < TOLERANCE[dtype]
    assert torch.all(out[2, :, :110 - 92].float() == 0)  # queries 0..17 of row 2 see nothing: zeros


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_reads_any_strides(device):
    B, H, T, D = 2, 2, 37, 32
    qkv = random(B, T, 3, H, D, dtype=torch.float32, seed=3, device=device)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, T, D) views, as the model makes them
    out = prefill_attention(q, k, v, torch.tensor([0, 4], device=device))
    assert relative_error(out, reference(q, k, v, [0, 4], lambda b, i: i + 1)) < 1e-5


def run_decode(device, B, H, Tmax, D, dtype, lengths, start=None, seed=0):
    q = random(B, H, 1, D, dtype=dtype, seed=seed, device=device)
    k, v = (random(B, H, Tmax, D, dtype=dtype, seed=seed + i, device=device) for i in (1, 2))
    start_t = None if start is None else torch.tensor(start, device=device)
    lengths_t = torch.tensor(lengths, device=device)
    out = decode_attention(q, k, v, lengths_t, start_t, out=poisoned((B, H, 1, D), dtype, device))
    return out, reference(q, k, v, start or [0] * B, lambda b, i: lengths[b])


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
def test_decode_split_cache_with_left_padding(dtype, device):
    # 600 slots = 3 splits of 256 (interpreted): row 1's valid keys start in the middle of the second split,
    # row 2 starts in the last split it reads, and its last split is empty.
    out, ref = run_decode(device, 3, 2, 600, 64, dtype, lengths=[600, 541, 400], start=[0, 300, 390], seed=9)
    assert relative_error(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_decode_never_reads_past_the_cache(device):
    # lengths beyond the cache are read as the cache's length: the keys are views into a larger
    # buffer whose next slots hold NaN, which would poison the output if read.
    q = random(2, 2, 1, 32, dtype=torch.float32, seed=1, device=device)
    buffer = torch.full((2, 2, 300, 32), float("nan"), device=device)
    buffer[:, :, :257] = random(2, 2, 257, 32, dtype=torch.float32, seed=2, device=device)
    k = v = buffer[:, :, :257]
    out = decode_attention(q, k, v, torch.tensor([257, 400], device=device))
    assert relative_error(out, reference(q, k, v, [0, 0], lambda b, i: 257)) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("D", [24, 80])
def test_decode_padded_head_dims(D, device):
    out, ref = run_decode(device, 1, 2, 200, D, torch.float32, lengths=[173], seed=D)
    assert relative_error(out, ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_are_one_line_errors(device):
    q = torch.zeros(1, 2, 4, 16, device=device)
    with pytest.raises(TformerError, match="Tq <= Tk"):
        prefill_attention(q, q[:, :, :2], q[:, :, :2])
    with pytest.raises(TformerError, match="one shape"):
        prefill_attention(q, q, q[:, :, :3])
    with pytest.raises(TformerError, match="head dim 160"):
        prefill_attention(*[torch.zeros(1, 1, 2, 160, device=device)] * 3)
    with pytest.raises(TformerError, match="dtype"):
        prefill_attention(q, q.half(), q)
    with pytest.raises(TformerError, match="start must be a \\(1,\\) int32/int64"):
        prefill_attention(q, q, q, torch.zeros(2, dtype=torch.long, device=device))
    with pytest.raises(TformerError, match="one query per row"):
        decode_attention(q, q, q, torch.tensor([4], device=device))
    with pytest.raises(TformerError, match="lengths must be"):
        decode_attention(q[:, :, :1], q, q, torch.tensor([4.0], device=device))
    with pytest.raises(TformerError, match="out must be"):
        prefill_attention(q, q, q, out=torch.zeros(1, 2, 4, 8, device=device))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gives")
def test_without_gpu_or_interpreter_the_error_names_the_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch\nfrom tformer.kernels import prefill_attention\nq = torch.zeros(1, 1, 2, 16)\n"
            "try:\n    prefill_attention(q, q, q)\nexcept ValueError as e:\n    print(e)")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "need a CUDA GPU" in result.stdout and "TRITON_INTERPRET=1" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("device", DEVICES)
def test_triton_backend_greedy_equals_eager(trained, device):
    model, tokenizer = trained
    eager = Runtime.from_model(copy.deepcopy(model), tokenizer, backend="eager", device=device)
    triton = Runtime.from_model(copy.deepcopy(model), tokenizer, backend="triton", device=device)
    assert "Triton" in triton.backend.implementation
    prompts = [tokenizer.encode(text) for text in ("def main(", "import os\nclass ", "x")]
    assert len({len(p) for p in prompts}) == 3  # different lengths: a left-padded batch
    want = eager.generate_ids(prompts, max_new_tokens=12, temperature=0)
    got = triton.generate_ids(prompts, max_new_tokens=12, temperature=0)
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
