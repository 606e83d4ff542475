"""What the engine costs on the host, apart from the model: `tformer-bench engine`.

Two measurements, both of `Engine.step` as servers and `Runtime` drive it:
- over `NullBackend`, which does no model work (its logits are a slice of one preallocated
  tensor), the engine's own steps per second: scheduling, the step's `Batch`, sampling, outputs.
  That is the ceiling of any backend's steps per second, and on a GPU, where a step's kernels
  take tens of microseconds, what decides tokens per second.
- over each real backend, its host overhead per step: the time of a decode step minus the
  backend call within it (timed around the call; on CUDA after a synchronize, so the call's own
  time includes its kernels).
Rounds are interleaved and every figure is min / median / max over them (`Spread`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tformer.backends.base import Backend, BackendBase
from tformer.backends.batch import Batch
from tformer.bench.stats import Spread
from tformer.config import ModelConfig
from tformer.engine import Engine, EngineCore, SamplingParams
from tformer.engine.engine import CHUNK, DECODE_STEPS
from tformer.engine.core import STOP, Add


class NullBackend(BackendBase):
    """A backend that does no model work: each step's logits are the first B rows of one
    preallocated `(rows, V)` tensor, whose argmax is token 1."""

    name = "null"
    implementation = "no model: preallocated logits"

    def __init__(self, config: ModelConfig, rows: int, device: torch.device = torch.device("cpu")):
        self.config, self.device, self.dtype = config, device, torch.float32
        self.logits = torch.zeros(rows, config.vocab_size, device=device)
        self.logits[:, 1] = 1.0

    def allocate_cache(self, rows: int, slots: int) -> None:
        return None

    def step(self, batch: Batch, cache: None) -> torch.Tensor:
        return self.logits[: batch.size]


@dataclass
class HostRecord:
    """One row of `tformer-bench engine`: `backend` at `batch_size` rows decoding together."""

    backend: str
    batch_size: int
    steps: int  # decode steps timed per round
    step_us: Spread  # a whole engine step
    backend_us: Spread | None  # the backend call within it (None over the null backend: it is ~0)
    host_us: Spread  # the step minus the backend call: what the engine costs
    steps_per_s: float  # of the median step

    @property
    def flagged(self) -> bool:
        return False


def time_decode(
    backend: Backend, batch_size: int, steps: int, clock: Callable[[], float] = time.perf_counter,
    decode_steps: int = DECODE_STEPS,
) -> tuple[float, float]:  # fmt: skip
    """(seconds of `steps` decode steps of `batch_size` greedy requests through the engine's one
    loop, `EngineCore.run`, on a fresh engine running `decode_steps` of them per turn; seconds of
    the backend calls within them). Timed from the loop's first output (the prefill's turn) to its
    last."""
    # Slots for the prompt and every token, and at least CHUNK, so that one prefill step takes
    # every prompt (its token budget is 4 chunks) and all rows then decode together.
    max_len = min(backend.config.max_len, max(steps + 8, CHUNK))
    engine = Engine(backend, max_batch_size=batch_size, max_len=max_len, decode_steps=decode_steps)
    call = backend.step
    sync = torch.cuda.synchronize if backend.device.type == "cuda" else (lambda: None)
    inner, calls, stamps = [0.0], [0], []

    def timed(batch: Batch, cache) -> torch.Tensor:
        sync()
        began = clock()
        logits = call(batch, cache)
        sync()
        inner[0] += clock() - began
        calls[0] += 1
        return logits

    def emit(outputs, stats) -> None:
        if outputs:
            stamps.append(clock())
            if len(stamps) == 1:
                inner[0], calls[0] = 0.0, 0  # the prefill's call is not timed

    params = SamplingParams(max_new_tokens=steps + 1, temperature=0)
    prompt = engine.check([1, 2, 3], params)
    inbox = [[Add(i, prompt, params) for i in range(batch_size)], [STOP]]
    backend.step = timed  # an instance attribute: the class's step is untouched
    try:
        EngineCore(engine).run(Listed(inbox), emit)
    finally:
        del backend.step
    if calls[0] != steps:
        raise RuntimeError(f"the requests took {calls[0]} decode steps, not {steps}")
    return stamps[-1] - stamps[0], inner[0]


class Listed:
    """An inbox of messages given in advance: each `take` the next list, the last one (STOP)
    only once the engine is idle."""

    def __init__(self, batches: list[list]):
        self.batches = batches

    def take(self, wait: bool) -> list:
        return self.batches.pop(0) if wait or len(self.batches) > 1 else []


def run_host_path(
    backends: dict[str, Backend], batch_sizes: Sequence[int], steps: int, repeats: int,
    progress: Callable[[str], None] = lambda _: None, decode_steps: int = DECODE_STEPS,
) -> list[HostRecord]:  # fmt: skip
    """Every backend at every batch size, in interleaved rounds (the engine running `decode_steps`
    steps per turn); one record each: figures per decode step."""
    keys = [(name, b) for name in backends for b in batch_sizes]
    samples: dict[tuple[str, int], list[tuple[float, float]]] = {k: [] for k in keys}
    for name, b in keys:  # a first, untimed round: allocation, lazy initialisation
        time_decode(backends[name], b, min(steps, 8), decode_steps=decode_steps)
    for r in range(repeats):
        for i in range(len(keys)):
            name, b = keys[(r + i) % len(keys)]
            progress(f"round {r + 1}/{repeats}  {name} batch {b}")
            samples[name, b].append(time_decode(backends[name], b, steps, decode_steps=decode_steps))
    records = []
    for (name, b), runs in samples.items():
        step = [1e6 * total / steps for total, _ in runs]
        inner = [1e6 * call / steps for _, call in runs]
        null = isinstance(backends[name], NullBackend)
        records.append(HostRecord(name, b, steps, Spread.of(step), None if null else Spread.of(inner),
                                  Spread.of([s - c for s, c in zip(step, inner)]), 1e6 / Spread.of(step).median))  # fmt: skip
    return records
