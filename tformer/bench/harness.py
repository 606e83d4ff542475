"""The benchmark harness: time generation on any runtime and return comparable records.

`benchmark_runtime(runtime, ...)` times one runtime at one batch size; `run_benchmarks(model, ...)`
builds every requested backend around one model (plus HF transformers as the peer row), checks
each against eager before timing, and fills in the ratios between rows. Both return `Record`s, the
same ones `tformer-bench` prints and writes as JSON/CSV.

What is timed: whole greedy generations of `new_tokens` tokens from random prompts of
`prompt_len` ids (fixed seed). A clock reading is taken each time the new tokens of a step reach
the host (the loop copies them there to check EOS, which also synchronizes a GPU):
time to first token = prefill + first sample; inter-token latency = the gaps after it. Warm-up
runs (where compilation happens) are timed apart and never mixed into the figures.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tformer.backends import BACKENDS, BASELINE, REFERENCE
from tformer.bench.memory import PeakMemory
from tformer.bench.stats import Spread, percentiles
from tformer.checkpoint import save_checkpoint
from tformer.errors import TformerError
from tformer.generate import SamplingParams, generate_tokens
from tformer.model import TransformerLM
from tformer.runtime import Runtime

HF_ROW = "hf"  # the peer row: HF transformers' generate, not a tformer backend
ALL_BACKENDS = (*BACKENDS, HF_ROW)  # the default rows: every backend, then the peer
CHECK_PROMPTS, CHECK_PROMPT_LEN, CHECK_NEW_TOKENS = 2, 8, 16

# A generation to time: called with `tick`, which it must call once per step, after the step's
# new tokens are on the host.
Generation = Callable[[Callable[[], None]], None]
Progress = Callable[[str], None]


@dataclass
class Record:
    """One row: a backend at one batch size. Times in ms, throughput in tokens/s (all rows)."""

    backend: str
    batch_size: int
    prompt_len: int
    new_tokens: int
    status: str  # "ok", "mismatch" (tokens differ from eager: figures flagged), "skipped"
    reason: str = ""
    device: str = ""
    device_name: str = ""
    dtype: str = ""
    implementation: str = ""  # what runs the step
    notes: list[str] = field(default_factory=list)  # what the backend reported while running (e.g. CUDA graphs skipped)
    versions: dict[str, str | None] = field(default_factory=dict)
    repeats: int = 0
    warmup: int = 0
    setup_s: float | None = None  # building the backend (export, compilation) and the correctness check
    warmup_s: float | None = None  # the untimed warm-up runs (compilation on first call)
    warm_setup_s: float | None = None  # compiling backends: the same setup in a second process, caches warm
    ttft_ms: Spread | None = None
    itl_ms: dict[str, float] | None = None  # p50 / p90 / p99 over all gaps of all timed runs
    decode_tok_s: Spread | None = None  # tokens after the first / time after the first
    e2e_tok_s: Spread | None = None  # all new tokens / whole generation
    peak_mem_mib: float | None = None
    mem_source: str = ""
    matches_eager: bool | None = None  # greedy tokens vs eager; None: not comparable (other weights)
    vs_naive: float | None = None  # e2e tokens/s ratios at the same batch size
    vs_eager: float | None = None

    @property
    def flagged(self) -> bool:
        return self.status == "mismatch"


def versions() -> dict[str, str | None]:
    """Installed versions of what the rows may run on, read without importing the packages."""
    found: dict[str, str | None] = {"torch": torch.__version__}
    for name, dists in {"triton": ("triton",), "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
                        "transformers": ("transformers",)}.items():  # fmt: skip
        found[name] = next((v for d in dists if (v := _dist_version(d))), None)
    return found


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def make_prompts(vocab_size: int, batch_size: int, prompt_len: int, seed: int = 0) -> list[list[int]]:
    """Deterministic random prompts of equal length (every backend, naive included, can serve them)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch_size, prompt_len), generator=g).tolist()


def loop_generation(runtime: Runtime, prompts: list[list[int]], new_tokens: int) -> Generation:
    """A greedy generation through tformer's own loop on `runtime`'s backend (no EOS: full length)."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)

    def run(tick: Callable[[], None]) -> None:
        for _ in generate_tokens(runtime.backend, prompts, params):
            tick()

    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_generation(
    run: Generation, batch_size: int, new_tokens: int, repeats: int, warmup: int, device: torch.device,
    progress: Progress | None = None,
) -> dict:
    """Warm-up runs (timed apart), then `repeats` timed runs: the figures of a Record."""
    note = progress or (lambda _: None)
    began = time.perf_counter()
    for i in range(warmup):
        note(f"warm-up {i + 1}/{warmup}")
        run(lambda: None)
    _sync(device)
    warmup_s = time.perf_counter() - began
    memory = PeakMemory(device)
    memory.reset()
    ttft, gaps, decode, e2e = [], [], [], []
    for i in range(repeats):
        note(f"repeat {i + 1}/{repeats}")
        stamps: list[float] = []
        _sync(device)
        start = time.perf_counter()
        run(lambda: stamps.append(time.perf_counter()))
        if len(stamps) != new_tokens:
            raise RuntimeError(f"the generation made {len(stamps)} steps, expected {new_tokens}")
        ttft.append(1000 * (stamps[0] - start))
        gaps.extend(1000 * np.diff(stamps))
        if new_tokens > 1:
            decode.append(batch_size * (new_tokens - 1) / (stamps[-1] - stamps[0]))
        e2e.append(batch_size * new_tokens / (stamps[-1] - start))
    return dict(
        warmup_s=warmup_s,
        ttft_ms=Spread.of(ttft),
        itl_ms=percentiles(gaps) if gaps else None,
        decode_tok_s=Spread.of(decode) if decode else None,
        e2e_tok_s=Spread.of(e2e),
        peak_mem_mib=memory.peak_mib(),
        mem_source=memory.source,
    )


def benchmark_runtime(
    runtime: Runtime,
    batch_size: int = 1,
    prompt_len: int = 32,
    new_tokens: int = 64,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    progress: Progress | None = None,
) -> Record:
    """Time `runtime` at one batch size; a Record without the cross-row fields (ratios, check)."""
    backend = runtime.backend
    prompts = make_prompts(runtime.config.vocab_size, batch_size, prompt_len, seed)
    figures = time_generation(
        loop_generation(runtime, prompts, new_tokens), batch_size, new_tokens, repeats, warmup, backend.device, progress
    )
    return Record(
        backend=backend.name, batch_size=batch_size, prompt_len=prompt_len, new_tokens=new_tokens, status="ok",
        device=backend.device.type, device_name=device_name(backend.device),
        dtype=str(backend.dtype).removeprefix("torch."),
        implementation=backend.implementation, notes=list(backend.notes), versions=versions(), repeats=repeats,
        warmup=warmup, **figures,
    )  # fmt: skip


def greedy_mismatch(runtime: Runtime, reference: Runtime, seed: int = 0) -> str | None:
    """None when `runtime` generates the same greedy tokens as `reference` on a short check
    (2 prompts x 8 ids, 16 new tokens); otherwise where they first differ."""
    prompts = make_prompts(runtime.config.vocab_size, CHECK_PROMPTS, CHECK_PROMPT_LEN, seed + 1)
    ours = runtime.generate_ids(prompts, max_new_tokens=CHECK_NEW_TOKENS, temperature=0)
    theirs = reference.generate_ids(prompts, max_new_tokens=CHECK_NEW_TOKENS, temperature=0)
    for row, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            step = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return f"greedy tokens differ from eager (prompt {row}, step {step})"
    return None


def warm_setup_seconds(model: TransformerLM, backend: str, device: torch.device, dtype: torch.dtype) -> float:
    """What a second process pays to set `backend` up (and compile for the correctness check's
    batch) once this one has filled the caches: the cold/warm split users of compilers care about."""
    code = (
        "import sys, time\nimport tformer\nbegan = time.perf_counter()\n"
        "rt = tformer.load(sys.argv[1], backend=sys.argv[2], device=sys.argv[3], dtype=sys.argv[4])\n"
        f"rt.generate_ids([[1] * {CHECK_PROMPT_LEN}] * {CHECK_PROMPTS}, max_new_tokens={CHECK_NEW_TOKENS}, temperature=0)\n"
        "print(time.perf_counter() - began)\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        save_checkpoint(path, model)
        args = [sys.executable, "-c", code, str(path), backend, device.type, str(dtype).removeprefix("torch.")]
        done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"second-process setup of {backend} failed: {done.stderr.strip().splitlines()[-1:]}")
    return float(done.stdout.split()[-1])


def run_benchmarks(
    model: TransformerLM,
    backends: Sequence[str] = ALL_BACKENDS,
    batch_sizes: Sequence[int] = (1, 8),
    prompt_len: int = 32,
    new_tokens: int = 64,
    device: torch.device = torch.device("cpu"),
    dtype: torch.dtype = torch.float32,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    progress: Progress | None = None,
    build: Callable[[str], Runtime] | None = None,
    warm_setup: bool = False,
) -> list[Record]:
    """Every backend at every batch size, side by side in one process, with ratios filled in.

    `build(name)` makes a runtime (default: `Runtime.from_model(model, backend=name, ...)`); a
    backend whose construction raises TformerError (unknown name, no GPU, missing package), or
    that says it is `untimed` (the reason), becomes a skipped record carrying the reason.
    `warm_setup` also times the setup of compiling backends in a second process once the caches
    are warm (`warm_setup_s`).
    """
    from tformer.bench.hf import hf_generation  # transformers is imported only if hf runs

    custom_build = build is not None
    build = build or (lambda name: Runtime.from_model(model, backend=name, device=device, dtype=dtype))
    note = progress or (lambda _: None)
    note("eager: setting up (also the reference for the correctness check)")
    began = time.perf_counter()
    reference = build(REFERENCE)
    eager_setup_s = time.perf_counter() - began
    records: list[Record] = []
    for name in backends:
        if name == HF_ROW:
            records += _hf_records(hf_generation, model, batch_sizes, prompt_len, new_tokens, device, dtype,
                                   repeats, warmup, seed, note)  # fmt: skip
            continue
        began = time.perf_counter()
        try:
            note(f"{name}: setting up")
            runtime = reference if name == REFERENCE else build(name)
        except TformerError as exc:
            records += _skipped(name, batch_sizes, prompt_len, new_tokens, str(exc))
            continue
        if runtime.backend.untimed:  # runs, but timing it would mean nothing
            records += _skipped(name, batch_sizes, prompt_len, new_tokens, runtime.backend.untimed)
            continue
        mismatch = greedy_mismatch(runtime, reference, seed)  # compiling backends compile here too
        setup_s = (eager_setup_s if name == REFERENCE else 0.0) + time.perf_counter() - began
        rows = []
        for batch in batch_sizes:
            record = benchmark_runtime(runtime, batch, prompt_len, new_tokens, repeats, warmup, seed,
                                       lambda what: note(f"{name}  batch {batch}  {what}"))  # fmt: skip
            record.setup_s, record.matches_eager = setup_s, mismatch is None
            if mismatch:
                record.status, record.reason = "mismatch", mismatch
            rows.append(record)
        if warm_setup and runtime.backend.traits.compiles and not custom_build:
            note(f"{name}: setting up again in a second process, with the compile caches now warm")
            warm = warm_setup_seconds(model, name, device, dtype)
            for record in rows:
                record.warm_setup_s = warm
        records += rows
    _fill_ratios(records)
    return records


def _hf_records(hf_generation, model, batch_sizes, prompt_len, new_tokens, device, dtype, repeats, warmup, seed, note):
    began = time.perf_counter()
    try:
        note(f"{HF_ROW}: setting up")
        make_run, implementation, version = hf_generation(model.config, prompt_len + new_tokens, device, dtype)
    except TformerError as exc:
        return _skipped(HF_ROW, batch_sizes, prompt_len, new_tokens, str(exc))
    setup_s = time.perf_counter() - began
    records = []
    for batch in batch_sizes:
        prompts = make_prompts(model.config.vocab_size, batch, prompt_len, seed)
        figures = time_generation(make_run(prompts, new_tokens), batch, new_tokens, repeats, warmup, device,
                                  lambda what: note(f"{HF_ROW}  batch {batch}  {what}"))  # fmt: skip
        records.append(Record(
            backend=HF_ROW, batch_size=batch, prompt_len=prompt_len, new_tokens=new_tokens, status="ok",
            reason=f"transformers {version} GPT2LMHeadModel.generate, same sizes, random weights (tokens not comparable)",
            device=device.type, device_name=device_name(device), dtype=str(dtype).removeprefix("torch."),
            implementation=implementation, versions=versions(), repeats=repeats, warmup=warmup, setup_s=setup_s, **figures,
        ))  # fmt: skip
    return records


def _skipped(name: str, batch_sizes: Sequence[int], prompt_len: int, new_tokens: int, reason: str) -> list[Record]:
    return [Record(name, b, prompt_len, new_tokens, "skipped", reason, versions=versions()) for b in batch_sizes]


def _fill_ratios(records: list[Record]) -> None:
    def e2e(name: str, batch: int) -> float | None:
        row = next((r for r in records if r.backend == name and r.batch_size == batch and r.status == "ok"), None)
        return row.e2e_tok_s.median if row else None

    for r in records:
        if r.e2e_tok_s is None:
            continue
        naive, eager = e2e(BASELINE, r.batch_size), e2e(REFERENCE, r.batch_size)
        r.vs_naive = r.e2e_tok_s.median / naive if naive else None
        r.vs_eager = r.e2e_tok_s.median / eager if eager else None
