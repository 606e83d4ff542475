"""The serving benchmark behind `tformer-bench throughput`: a workload of requests through the
engine, continuous batching against static batching, per backend, side by side in one run.

A workload is N requests with prompt and output lengths drawn uniformly from ranges (seeded),
arriving all at once or as a Poisson process at a given rate. The same workload runs through the
engine twice per backend: with continuous batching (a request joins as soon as a row is free) and
with static batching of the same size (requests are admitted only into an empty batch, and each
batch steps all its rows until its longest request is done, as HF `generate` and tformer's old
loop did: the baseline row). Reported per run, with vLLM's names: request/s and output tokens/s over the whole
run, and the mean, median and p99 of TTFT (arrival to first token), TPOT (time per output token
after the first) and end-to-end latency (arrival to last token). Runs are interleaved over
`repeats` rounds (each round runs every row once, in rotated order); each row reports its
median run by output tokens/s, with the min-max of all rounds.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from tformer.bench.harness import device_name, versions
from tformer.bench.stats import Spread
from tformer.engine import Engine, SamplingParams
from tformer.errors import TformerError
from tformer.runtime import Runtime

MODES = ("continuous", "static")


@dataclass(frozen=True)
class Workload:
    """The requests of a run: `(arrival seconds after the start, prompt ids, output tokens)`."""

    requests: list[tuple[float, list[int], int]]

    @classmethod
    def draw(cls, count: int, prompt_len: tuple[int, int], output_len: tuple[int, int], vocab_size: int,
             rate: float | None, seed: int) -> Workload:  # fmt: skip
        """Lengths uniform in the inclusive ranges; arrivals all at 0 (`rate` None) or Poisson at
        `rate` requests per second."""
        rng = random.Random(seed)
        clock, requests = 0.0, []
        for _ in range(count):
            prompt = [rng.randrange(vocab_size) for _ in range(rng.randint(*prompt_len))]
            requests.append((clock, prompt, rng.randint(*output_len)))
            clock += rng.expovariate(rate) if rate else 0.0
        return cls(requests)

    @property
    def longest(self) -> int:
        return max(len(p) + n for _, p, n in self.requests)


@dataclass
class ThroughputRecord:
    """One row: a backend, continuous or static batching, over the whole workload. Times in ms."""

    backend: str
    mode: str  # "continuous" or "static" (the baseline)
    status: str  # "ok" or "skipped"
    reason: str = ""
    requests: int = 0
    batch_size: int = 0
    rate: float | None = None  # requests/s of the Poisson arrivals; None: all at once
    device: str = ""
    device_name: str = ""
    dtype: str = ""
    implementation: str = ""
    versions: dict[str, str | None] = field(default_factory=dict)
    cache_mib: float | None = None
    duration_s: float | None = None  # of the median run
    request_per_s: float | None = None
    output_tok_s: Spread | None = None  # median run, min-max over the rounds
    ttft_ms: dict[str, float] | None = None  # mean / p50 / p99 over the requests of the median run
    tpot_ms: dict[str, float] | None = None
    e2e_ms: dict[str, float] | None = None
    vs_static: float | None = None  # output tok/s over the static row's, same backend (medians)

    @property
    def flagged(self) -> bool:
        return False  # tokens are not compared here (the engine's tests do that): nothing to flag


def run_workload(engine: Engine, workload: Workload, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Drive `engine` through `workload` in real time: add each request when it arrives, step
    while any is unfinished. Returns the run's figures (a `ThroughputRecord`'s fields)."""
    pending = sorted(workload.requests, key=lambda r: r[0])
    times: dict[int, list[float]] = {}  # request id -> arrival, then each token's time
    began = clock()
    while pending or engine.has_unfinished():
        now = clock() - began
        while pending and pending[0][0] <= now:
            arrival, prompt, new = pending.pop(0)
            rid = engine.add_request(prompt, SamplingParams(max_new_tokens=new, temperature=0))
            times[rid] = [began + arrival]
        if not engine.has_unfinished():
            time.sleep(max(0.0, pending[0][0] - (clock() - began)))
            continue
        outputs = engine.step()
        stamp = clock()
        for out in outputs:
            if out.token is not None:
                times[out.request_id].append(stamp)
    duration = clock() - began
    tokens = sum(len(t) - 1 for t in times.values())
    ttft = [1000 * (t[1] - t[0]) for t in times.values()]
    tpot = [1000 * (t[-1] - t[1]) / (len(t) - 2) for t in times.values() if len(t) > 2]
    e2e = [1000 * (t[-1] - t[0]) for t in times.values()]
    return dict(duration_s=duration, request_per_s=len(times) / duration, tok_s=tokens / duration,
                ttft_ms=_summary(ttft), tpot_ms=_summary(tpot) if tpot else None, e2e_ms=_summary(e2e))  # fmt: skip


def _summary(values: Sequence[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=float)
    return {"mean": float(array.mean()), "p50": float(np.percentile(array, 50)), "p99": float(np.percentile(array, 99))}


def run_throughput(
    runtimes: dict[str, Runtime | str],
    workload: Workload,
    batch_size: int,
    repeats: int = 1,
    rate: float | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> list[ThroughputRecord]:
    """Every backend in `runtimes` (a Runtime, or the reason it could not be built) with continuous
    and with static batching, over the same workload, in interleaved rounds."""
    records: list[ThroughputRecord] = []
    engines = {}
    for name, runtime in runtimes.items():
        if isinstance(runtime, str):
            records += [ThroughputRecord(name, mode, "skipped", runtime) for mode in MODES]
            continue
        backend = runtime.backend
        if backend.untimed:
            records += [ThroughputRecord(name, mode, "skipped", backend.untimed) for mode in MODES]
            continue
        for mode in MODES:
            engine = Engine(backend, batch_size, workload.longest, static=mode == "static")
            progress(f"{name} {mode}: warm-up")
            run_workload(engine, Workload(workload.requests[: batch_size]))  # compiling backends compile here
            engines[name, mode] = engine
    runs: dict[tuple[str, str], list[dict]] = {key: [] for key in engines}
    order = list(engines)
    for round_ in range(repeats if order else 0):
        turn = round_ % len(order)
        for name, mode in order[turn:] + order[:turn]:
            progress(f"{name} {mode}: round {round_ + 1}/{repeats}")
            runs[name, mode].append(run_workload(engines[name, mode], workload))
    for (name, mode), results in runs.items():
        engine = engines[name, mode]
        median = sorted(results, key=lambda r: r["tok_s"])[len(results) // 2]
        backend = engine.backend
        records.append(ThroughputRecord(
            name, mode, "ok", requests=len(workload.requests), batch_size=batch_size, rate=rate,
            device=backend.device.type, device_name=device_name(backend.device),
            dtype=str(backend.dtype).removeprefix("torch."), implementation=backend.implementation,
            versions=versions(), cache_mib=None if engine.cache_bytes is None else engine.cache_bytes / 2**20,
            duration_s=median["duration_s"], request_per_s=median["request_per_s"],
            output_tok_s=Spread(median["tok_s"], min(r["tok_s"] for r in results), max(r["tok_s"] for r in results)),
            ttft_ms=median["ttft_ms"], tpot_ms=median["tpot_ms"], e2e_ms=median["e2e_ms"],
        ))  # fmt: skip
    for r in records:
        static = next((s for s in records if s.backend == r.backend and s.mode == "static" and s.output_tok_s), None)
        if r.output_tok_s and static:
            r.vs_static = r.output_tok_s.median / static.output_tok_s.median
    return records


def parse_range(text: str, name: str) -> tuple[int, int]:
    """"16:128" (inclusive) or "64" (fixed) -> (16, 128) / (64, 64)."""
    try:
        low, _, high = text.partition(":")
        pair = (int(low), int(high or low))
    except ValueError:
        raise TformerError(f"{name} must be N or LOW:HIGH (integers), got {text!r}") from None
    if not 1 <= pair[0] <= pair[1]:
        raise TformerError(f"{name} must satisfy 1 <= LOW <= HIGH, got {text!r}")
    return pair
