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
from collections.abc import Callable
from dataclasses import dataclass, field

from tformer.bench.harness import device_name, versions
from tformer.bench.latency import RequestTiming, serving_metrics
from tformer.bench.stats import Spread
from tformer.engine import Engine, EngineCore, RequestOutput, SamplingParams
from tformer.engine.core import STOP, Add
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
        `rate` requests per second. Arrivals come from a random stream of their own, so that the
        same seed at any rate draws the same requests (a sweep over rates compares like with like)."""
        rng, gaps = random.Random(seed), random.Random(f"arrivals-{seed}")
        clock, requests = 0.0, []
        for _ in range(count):
            prompt = [rng.randrange(vocab_size) for _ in range(rng.randint(*prompt_len))]
            requests.append((clock, prompt, rng.randint(*output_len)))
            clock += gaps.expovariate(rate) if rate else 0.0
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
    """Drive `engine` through `workload` in real time (see `drive_workload`). Returns the run's
    figures (a `ThroughputRecord`'s fields)."""
    timings, duration = drive_workload(engine, workload, clock)
    figures = serving_metrics(timings, duration)
    return dict(duration_s=duration, request_per_s=figures["request_throughput"], tok_s=figures["output_throughput"],
                ttft_ms=figures["ttft_ms"], tpot_ms=figures["tpot_ms"], e2e_ms=figures["e2el_ms"])  # fmt: skip


def drive_workload(
    engine: Engine, workload: Workload, clock: Callable[[], float] = time.perf_counter, max_concurrency: int | None = None
) -> tuple[list[RequestTiming], float]:  # fmt: skip
    """Run the engine's one loop (`EngineCore.run`) over `workload`, each request sent when it
    arrives; each request's timing (sent: its arrival, or when a slot freed if `max_concurrency`
    requests were in flight then, as a client's semaphore would hold it; a token's time: when the
    loop emitted the step that made it) and the run's seconds."""
    arrivals = Arrivals(engine, workload, clock, max_concurrency)
    EngineCore(engine).run(arrivals, arrivals.emit)
    return list(arrivals.timings.values()), clock() - arrivals.began


class Arrivals:
    """The benchmark's inbox for `EngineCore.run`: each request of a workload as an `Add` message
    once its arrival time has come (and, with `max_concurrency`, a slot is free), STOP once every
    request is done; `emit` stamps each step's outputs."""

    def __init__(self, engine: Engine, workload: Workload, clock: Callable[[], float], max_concurrency: int | None):
        self.engine, self.clock, self.max_concurrency = engine, clock, max_concurrency
        self.pending = sorted(workload.requests, key=lambda r: r[0])
        self.timings: dict[int, RequestTiming] = {}
        self.in_flight: set[int] = set()
        self.blocked_at = -1.0  # when an arrived request last found max_concurrency requests in flight
        self.began = clock()

    def take(self, wait: bool) -> list:
        if wait and not self.pending and not self.in_flight:
            return [STOP]
        if wait and self.pending and not self.in_flight:  # idle until the next arrival
            time.sleep(max(0.0, self.pending[0][0] - (self.clock() - self.began)))
        now, messages = self.clock() - self.began, []
        while self.pending and self.pending[0][0] <= now and (self.max_concurrency is None or
                                                              len(self.in_flight) < self.max_concurrency):  # fmt: skip
            arrival, prompt, new = self.pending.pop(0)
            params = SamplingParams(max_new_tokens=new, temperature=0)
            request_id = len(self.timings)
            self.timings[request_id] = RequestTiming(len(prompt), sent=self.began + (now if arrival <= self.blocked_at else arrival))
            self.in_flight.add(request_id)
            checked = self.engine.check(prompt, params)
            messages.append(Add(request_id, checked, params))
        if self.pending and self.pending[0][0] <= now:
            self.blocked_at = now
        return messages

    def emit(self, outputs: list[RequestOutput], stats) -> None:
        stamp = self.clock()
        for out in outputs:
            timing = self.timings[out.request_id]
            if out.token is not None:
                timing.token_times.append(stamp)
            if out.finished:
                timing.end = stamp
                self.in_flight.discard(out.request_id)


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
