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

Fairness on a shared, noisy machine: every row is set up first; then, per batch size, the timed
repeats run in rounds, each round running every row once, in an order rotated by one each round.
A slow minute then costs every row about one repeat instead of costing one row all of its
repeats, and the median ignores it. Two rows that their spread cannot tell apart are marked
(`Record.noisy`). Memory is measured per row in a process of its own (see `isolated`), because in
one process each row would inherit what the rows before it left resident.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tformer.backends import BACKENDS, BASELINE, REFERENCE
from tformer.bench.ct2 import ct2_generation
from tformer.bench.floor import floor_generation
from tformer.bench.hf import hf_generation
from tformer.bench.memory import PeakMemory
from tformer.bench.stats import Spread, percentiles
from tformer.checkpoint import save_checkpoint
from tformer.config import ModelConfig
from tformer.engine import SamplingParams
from tformer.errors import TformerError, one_line
from tformer.model import TransformerLM
from tformer.runtime import Runtime

HF_ROW = "hf"  # the peer row: HF transformers' generate, not a tformer backend
CT2_ROW = "ct2"  # the anchor: CTranslate2 running the same weights, what users would pick for speed
FLOOR_ROW = "floor"  # a bare decode loop of the same model: what the engine around it costs
ALL_BACKENDS = (FLOOR_ROW, *BACKENDS, HF_ROW, CT2_ROW)  # the default rows: the floor, every backend, the peers
CHECK_PROMPTS, CHECK_PROMPT_LEN, CHECK_NEW_TOKENS = 2, 8, 16
# A pause before each timed run, so that thread pools a run leaves spinning have gone to sleep
# before the next one starts: onnxruntime's workers spin for ~35 ms of CPU after a run (its default,
# and what makes it fast), torch's OpenMP threads ~10 ms. On the 2-core CI CPU eager ran 1.6x
# slower right after an onnx run (batch 1), and as fast as after eager once 50 ms had passed.
SETTLE_S = 0.1

# A generation to time: called with `tick`, which it must call once per step, after the step's
# new tokens are on the host (`tick(n)` once for n steps whose tokens arrive together: a multi-step
# decode's; `tick(at=t)` for a step whose tokens arrived at `time.perf_counter()` t, read in the
# process that generated them: the ct2 row's).
Generation = Callable[[Callable[..., None]], None]
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Clock:
    """Where timed runs read the time and pause: the machine's own by default. Tests pass a fake
    one, so that what the benchmark computes from its timings never depends on the machine's speed."""

    now: Callable[[], float] = time.perf_counter
    sleep: Callable[[float], None] = time.sleep


SYSTEM_CLOCK = Clock()


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
    # e2e tokens/s of each timed run, in round order: run r of every row at this batch size ran in
    # the same round, side by side (pairs across rows share that round's noise).
    e2e_samples: list[float] = field(default_factory=list)
    peak_mem_mib: float | None = None
    mem_source: str = ""  # what peak_mem_mib measures, and in which process
    cache_mib: float | None = None  # the engine's preallocated KV cache (its rows sized to the batch)
    mem_base_mib: float | None = None  # measured in its own process: what that held before the row's setup
    matches_eager: bool | None = None  # greedy tokens vs eager; None: not comparable (other weights)
    vs_naive: float | None = None  # e2e tokens/s ratios at the same batch size
    vs_eager: float | None = None
    vs_floor: float | None = None
    vs_ct2: float | None = None
    noisy: str = ""  # why its speed cannot be ranked against the next row's at this batch size ("": it can)

    @property
    def flagged(self) -> bool:
        return self.status == "mismatch"


def versions() -> dict[str, str | None]:
    """Installed versions of what the rows may run on, read without importing the packages."""
    found: dict[str, str | None] = {"torch": torch.__version__}
    for name, dists in {"triton": ("triton",), "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
                        "transformers": ("transformers",), "ctranslate2": ("ctranslate2",)}.items():  # fmt: skip
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
    """A greedy generation through tformer's engine on `runtime` (no EOS: full length). All prompts
    are admitted at once (the benchmark sizes the runtime's rows to its largest batch), so every
    engine step gives each of them one token: `tick(n)` when a turn's n steps are out of the engine
    (as the turn ends), and the run returns once the last is done."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)

    def run(tick: Callable[..., None]) -> None:
        stamps = Ticker(tick, len(prompts))
        runtime.front.send(prompts, params, None, stamps)
        runtime.front.wait(lambda: stamps.flush() or stamps.done.is_set())  # checked after each turn
        if stamps.error:
            raise RuntimeError(f"the generation failed: {stamps.error}")

    return run


class Ticker:
    """Takes a generation's outputs as the engine's turns emit them: `flush` (after each turn)
    ticks once for the steps every request of the batch got in it, `done` once all have finished."""

    def __init__(self, tick: Callable[..., None], requests: int):
        self.tick, self.requests, self.seen, self.finished, self.ticked = tick, requests, 0, 0, 0
        self.error: str | None = None
        self.done = threading.Event()

    def flush(self) -> None:
        if steps := self.seen // self.requests - self.ticked:
            self.tick(steps)
            self.ticked += steps

    def put_nowait(self, output) -> None:
        self.seen += 1
        self.finished += output.finished
        if output.finish_reason == "error":
            self.error = output.error
        if self.finished == self.requests:
            self.done.set()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Samples:
    """What the timed runs of one row at one batch size measured, run by run."""

    ttft_ms: list[float] = field(default_factory=list)
    gaps_ms: list[float] = field(default_factory=list)
    decode_tok_s: list[float] = field(default_factory=list)
    e2e_tok_s: list[float] = field(default_factory=list)
    peak_mib: list[float] = field(default_factory=list)

    def add(self, start: float, stamps: list[float], batch_size: int, peak_mib: float) -> None:
        """One run that began at `start` and got each step's tokens at `stamps` (perf_counter; the
        same time for steps whose tokens arrived together). ITL: the gaps between arrivals."""
        self.ttft_ms.append(1000 * (stamps[0] - start))
        gaps = np.diff(stamps)
        self.gaps_ms.extend(1000 * gaps[gaps > 0])
        if len(stamps) > 1:
            self.decode_tok_s.append(batch_size * (len(stamps) - 1) / (stamps[-1] - stamps[0]))
        self.e2e_tok_s.append(batch_size * len(stamps) / (stamps[-1] - start))
        self.peak_mib.append(peak_mib)

    def figures(self) -> dict:
        """The Record fields these samples fill."""
        return dict(
            ttft_ms=Spread.of(self.ttft_ms),
            itl_ms=percentiles(self.gaps_ms) if self.gaps_ms else None,
            decode_tok_s=Spread.of(self.decode_tok_s) if self.decode_tok_s else None,
            e2e_tok_s=Spread.of(self.e2e_tok_s),
            e2e_samples=list(self.e2e_tok_s),
            peak_mem_mib=max(self.peak_mib),
        )


def time_interleaved(
    runs: Sequence[Generation], batch_size: int, new_tokens: int, repeats: int, warmup: int, device: torch.device,
    progress: Callable[[int, str], None] | None = None, clock: Clock = SYSTEM_CLOCK,
) -> list[dict]:
    """The figures of a Record for each of `runs`, generations at one batch size.

    First each one's warm-up runs (timed apart: `warmup_s`), then `repeats` rounds: round r runs
    every generation once, starting with the (r mod n)-th, so that a noisy spell of the machine
    slows one round of every row rather than every repeat of one row. Each timed run starts after
    a pause (`SETTLE_S`), so that none pays for the threads its predecessor left spinning.
    `progress(i, what)` is told what generation i is doing; `clock` times the runs. Memory: the
    peak during each run (reset before it), in this process.
    """
    note = progress or (lambda i, what: None)
    memory = PeakMemory(device)
    figures = []
    for i, run in enumerate(runs):
        began = clock.now()
        for w in range(warmup):
            note(i, f"warm-up {w + 1}/{warmup}")
            run(lambda n=1, at=None: None)
        _sync(device)
        figures.append(dict(warmup_s=clock.now() - began))
    samples = [Samples() for _ in runs]
    for r in range(repeats):
        for i in [(r + k) % len(runs) for k in range(len(runs))]:
            note(i, f"round {r + 1}/{repeats}")
            stamps: list[float] = []
            _sync(device)
            clock.sleep(SETTLE_S)
            memory.reset()
            start = clock.now()
            runs[i](lambda n=1, at=None: stamps.extend([clock.now() if at is None else at] * n))
            if len(stamps) != new_tokens:
                raise RuntimeError(f"the generation made {len(stamps)} steps, expected {new_tokens}")
            samples[i].add(start, stamps, batch_size, memory.peak_mib())
    shared = " (the other rows' memory included)" if len(runs) > 1 else ""
    for figure, sample in zip(figures, samples):
        figure.update(sample.figures(), mem_source=f"{memory.source} during its runs, in this process{shared}")
    return figures


@dataclass
class Entrant:
    """A row set up for timing: what it runs, and how to make a generation of it."""

    name: str
    make_run: Callable[[list[list[int]], int], Generation]  # (prompts, new_tokens) -> a generation
    device: torch.device
    dtype: torch.dtype
    implementation: str
    notes: Callable[[], Sequence[str]]  # read after the runs: a backend may add notes while running
    setup_s: float | None = None
    matches_eager: bool | None = None  # None: not checked, or not comparable (other weights)
    reason: str = ""  # why its tokens differ from eager's, or what the row is
    compiles: bool = False
    cache_bytes: Callable[[], int | None] = lambda: None  # the engine's KV cache, read after the runs

    @classmethod
    def of(cls, runtime: Runtime, setup_s: float | None = None, matches_eager: bool | None = None, reason: str = "") -> Entrant:
        backend = runtime.backend
        return cls(
            backend.name, lambda prompts, n: loop_generation(runtime, prompts, n), backend.device, backend.dtype,
            backend.implementation, lambda: backend.notes, setup_s, matches_eager, reason, backend.traits.compiles,
            lambda: runtime.engine.cache_bytes,
        )  # fmt: skip

    def record(self, batch_size: int, prompt_len: int, new_tokens: int, repeats: int, warmup: int, figures: dict) -> Record:
        return Record(
            backend=self.name, batch_size=batch_size, prompt_len=prompt_len, new_tokens=new_tokens,
            status="mismatch" if self.matches_eager is False else "ok", reason=self.reason, device=self.device.type,
            device_name=device_name(self.device), dtype=str(self.dtype).removeprefix("torch."),
            implementation=self.implementation, notes=list(self.notes()), versions=versions(), repeats=repeats,
            warmup=warmup, setup_s=self.setup_s, matches_eager=self.matches_eager,
            cache_mib=None if (nbytes := self.cache_bytes()) is None else nbytes / 2**20, **figures,
        )  # fmt: skip


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
    entrant = Entrant.of(runtime)
    prompts = make_prompts(runtime.config.vocab_size, batch_size, prompt_len, seed)
    [figures] = time_interleaved([entrant.make_run(prompts, new_tokens)], batch_size, new_tokens, repeats, warmup,
                                 entrant.device, progress and (lambda _, what: progress(what)))  # fmt: skip
    return entrant.record(batch_size, prompt_len, new_tokens, repeats, warmup, figures)


def greedy_mismatch(runtime: Runtime, reference: Runtime, seed: int = 0) -> str | None:
    """None when `runtime` generates the same greedy tokens as `reference` on the check's
    prompts (see `check_generation`); otherwise where they first differ."""
    ours, theirs = check_generation(runtime, seed), check_generation(reference, seed)
    for row, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            step = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return f"greedy tokens differ from eager (prompt {row}, step {step})"
    return None


def check_generation(runtime: Runtime, seed: int = 0) -> list[list[int]]:
    """The generation of the correctness check (2 prompts x 8 ids, 16 new tokens): part of a
    row's setup, where compiling backends compile for its shapes."""
    prompts = make_prompts(runtime.config.vocab_size, CHECK_PROMPTS, CHECK_PROMPT_LEN, seed + 1)
    return [out.token_ids for out in runtime.generate(prompts, max_new_tokens=CHECK_NEW_TOKENS, temperature=0)]


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
    clock: Clock = SYSTEM_CLOCK,
) -> list[Record]:
    """Every backend at every batch size, side by side in one process, with ratios filled in.

    Every row is set up (and checked against eager) first; then, per batch size, their timed
    repeats run in interleaved rounds (see `time_interleaved`). `build(name)` makes a runtime
    (default: `Runtime.from_model(model, backend=name, ...)`); a backend whose construction raises
    TformerError (unknown name, no GPU, missing package), or that says it is `untimed` (the
    reason), becomes a skipped record carrying the reason. Memory: with the default `build`, each
    row's peak in a process of its own that sets up only that row (`run_alone`); with a custom
    one, which another process cannot rebuild, the peak during its runs in this process.
    `warm_setup` also records that process's setup time for compiling backends (`warm_setup_s`:
    caches warm). `clock` times the runs (see `Clock`).
    """
    note = progress or (lambda _: None)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if build is None:  # the model as given, before the backends move it to their device and dtype
            checkpoint = Path(tmp) / "model.safetensors"
            save_checkpoint(checkpoint, model)
        entrants, records = _set_up(model, backends, batch_sizes, prompt_len, new_tokens, device, dtype, seed, note,
                                    build)  # fmt: skip
        for batch in batch_sizes:
            prompts = make_prompts(model.config.vocab_size, batch, prompt_len, seed)
            runs = [e.make_run(prompts, new_tokens) for e in entrants]
            figures = time_interleaved(runs, batch, new_tokens, repeats, warmup, device,
                                       lambda i, what: note(f"batch {batch}  {what}  {entrants[i].name}"), clock)  # fmt: skip
            records += [e.record(batch, prompt_len, new_tokens, repeats, warmup, f) for e, f in zip(entrants, figures)]
        for e in entrants if checkpoint else ():
            note(f"{e.name}: peak memory in a process of its own")
            alone = run_alone(checkpoint, e.name, device, dtype, batch_sizes, prompt_len, new_tokens, seed)
            for r in (r for r in records if r.backend == e.name):
                r.peak_mem_mib, r.mem_source = alone["peak_mib"].get(str(r.batch_size)), alone["source"]
                r.mem_base_mib = alone["base_mib"]
                r.warm_setup_s = alone["setup_s"] if warm_setup and e.compiles else None
    order = {name: i for i, name in enumerate(backends)}
    records.sort(key=lambda r: (order.get(r.backend, len(order)), r.batch_size))
    _fill_ratios(records)
    mark_noisy(records)
    return records


def _set_up(
    model: TransformerLM, backends: Sequence[str], batch_sizes: Sequence[int], prompt_len: int, new_tokens: int,
    device: torch.device, dtype: torch.dtype, seed: int, note: Progress, build: Callable[[str], Runtime] | None,
) -> tuple[list[Entrant], list[Record]]:
    """(the rows that can be timed, set up and checked against eager; skipped records for the rest)."""
    rows, slots = max(batch_sizes), max(prompt_len + new_tokens, CHECK_PROMPT_LEN + CHECK_NEW_TOKENS)
    build = build or (lambda name: Runtime.from_model(model, backend=name, device=device, dtype=dtype, max_batch_size=rows,
                                                      max_len=slots))  # fmt: skip
    note("eager: setting up (also the reference for the correctness check)")
    began = time.perf_counter()
    reference = build(REFERENCE)
    eager_setup_s = time.perf_counter() - began
    entrants: list[Entrant] = []
    skipped: list[Record] = []
    for name in backends:
        began = time.perf_counter()
        note(f"{name}: setting up")
        try:
            if name == HF_ROW:
                entrants.append(hf_entrant(model.config, prompt_len + new_tokens, device, dtype))
                continue
            if name in (FLOOR_ROW, CT2_ROW):
                entrants.append((floor_entrant if name == FLOOR_ROW else ct2_entrant)(model, reference, seed))
                continue
            runtime = reference if name == REFERENCE else build(name)
        except TformerError as exc:
            skipped += _skipped(name, batch_sizes, prompt_len, new_tokens, str(exc))
            continue
        if runtime.backend.untimed:  # runs, but timing it would mean nothing
            skipped += _skipped(name, batch_sizes, prompt_len, new_tokens, runtime.backend.untimed)
            continue
        mismatch = greedy_mismatch(runtime, reference, seed)  # compiling backends compile here too
        setup_s = (eager_setup_s if name == REFERENCE else 0.0) + time.perf_counter() - began
        entrants.append(Entrant.of(runtime, setup_s, mismatch is None, mismatch or ""))
    return entrants, skipped


def hf_entrant(config: ModelConfig, max_positions: int, device: torch.device, dtype: torch.dtype) -> Entrant:
    """The hf row, set up (raises TformerError without transformers, which only this imports)."""
    began = time.perf_counter()
    make_run, implementation, version = hf_generation(config, max_positions, device, dtype)
    reason = f"transformers {version} GPT2LMHeadModel.generate, same sizes, random weights (tokens not comparable)"
    return Entrant(HF_ROW, make_run, device, dtype, implementation, lambda: (), time.perf_counter() - began, None, reason)


def floor_entrant(model: TransformerLM, reference: Runtime, seed: int = 0) -> Entrant:
    """The floor row over `model` on the reference's device and dtype, checked for eager's tokens."""
    began = time.perf_counter()
    make_run, implementation = floor_generation(model, reference.backend.device, reference.backend.dtype)
    return _checked_entrant(FLOOR_ROW, make_run, implementation, lambda: (), reference, seed, began)


def ct2_entrant(model: TransformerLM, reference: Runtime, seed: int = 0) -> Entrant:
    """The ct2 row: `model` converted to CTranslate2, on the reference's device and dtype, checked
    for eager's tokens (raises TformerError without ctranslate2, which only this imports)."""
    began = time.perf_counter()
    make_run, implementation, notes = ct2_generation(model, reference.backend.device, reference.backend.dtype)
    return _checked_entrant(CT2_ROW, make_run, implementation, notes, reference, seed, began)


def _checked_entrant(
    name: str, make_run: Callable[[list[list[int]], int], Generation], implementation: str,
    notes: Callable[[], Sequence[str]], reference: Runtime, seed: int, began: float,
) -> Entrant:  # fmt: skip
    """A row that runs the same weights outside tformer's engine (its generation returns the
    tokens), with the check's greedy tokens compared to the reference's."""
    device, dtype = reference.backend.device, reference.backend.dtype
    prompts = make_prompts(reference.config.vocab_size, CHECK_PROMPTS, CHECK_PROMPT_LEN, seed + 1)
    ours = make_run(prompts, CHECK_NEW_TOKENS)(lambda n=1, at=None: None)
    same = ours == check_generation(reference, seed)
    reason = "" if same else "greedy tokens differ from eager"
    return Entrant(name, make_run, device, dtype, implementation, notes, time.perf_counter() - began, same, reason)


def run_alone(
    checkpoint: Path, name: str, device: torch.device, dtype: torch.dtype, batch_sizes: Sequence[int],
    prompt_len: int, new_tokens: int, seed: int,
) -> dict:
    """Row `name` in a fresh process (`python -m tformer.bench.isolated`): its setup seconds there
    and its peak memory per batch size. A failure there is reported in `source`, not raised: the
    timings stand without it."""
    spec = dict(checkpoint=str(checkpoint), backend=name, device=str(device), dtype=str(dtype).removeprefix("torch."),
                batch_sizes=sorted(batch_sizes), prompt_len=prompt_len, new_tokens=new_tokens, seed=seed)  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "tformer.bench.isolated", json.dumps(spec)], capture_output=True, text=True)
    try:
        if done.returncode != 0:
            raise RuntimeError((done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1])
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (RuntimeError, ValueError, IndexError) as exc:
        return dict(setup_s=None, base_mib=None, peak_mib={}, source=f"not measured: its own process failed ({one_line(exc)})")


def _skipped(name: str, batch_sizes: Sequence[int], prompt_len: int, new_tokens: int, reason: str) -> list[Record]:
    return [Record(name, b, prompt_len, new_tokens, "skipped", reason, versions=versions()) for b in batch_sizes]


def _fill_ratios(records: list[Record]) -> None:
    def e2e(name: str, batch: int) -> float | None:
        row = next((r for r in records if r.backend == name and r.batch_size == batch and r.status == "ok"), None)
        return row.e2e_tok_s.median if row else None

    for r in records:
        if r.e2e_tok_s is None:
            continue
        naive, eager, floor, ct2 = (e2e(name, r.batch_size) for name in (BASELINE, REFERENCE, FLOOR_ROW, CT2_ROW))
        r.vs_naive = r.e2e_tok_s.median / naive if naive else None
        r.vs_eager = r.e2e_tok_s.median / eager if eager else None
        r.vs_floor = r.e2e_tok_s.median / floor if floor else None
        r.vs_ct2 = r.e2e_tok_s.median / ct2 if ct2 else None


def mark_noisy(records: list[Record]) -> None:
    """Rank the rows of each batch size by median e2e tokens/s, and mark each pair of neighbours
    that their repeats cannot tell apart: the slower one's fastest repeat reaches the faster one's
    median. Noise on a shared machine only ever slows a run down, so a row's upper half (median to
    fastest) is where its speed is; one slowed repeat (of 3 or more) moves neither end of it."""
    for batch in {r.batch_size for r in records}:
        ranked = sorted((r for r in records if r.batch_size == batch and r.status == "ok" and r.e2e_tok_s),
                        key=lambda r: r.e2e_tok_s.median, reverse=True)  # fmt: skip
        for faster, slower in zip(ranked, ranked[1:]):
            if slower.e2e_tok_s.max >= faster.e2e_tok_s.median:
                why = (f"{slower.backend}'s fastest repeat ({slower.e2e_tok_s.max:.4g} tok/s) reaches {faster.backend}'s "
                       f"median ({faster.e2e_tok_s.median:.4g}): too noisy to rank {faster.backend} above {slower.backend}")  # fmt: skip
                for r in (faster, slower):
                    r.noisy = f"{r.noisy}; {why}" if r.noisy else why
