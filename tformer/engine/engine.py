"""The engine: continuous batching of requests over one backend.

    engine = Engine(backend, max_batch_size=8, max_len=512)
    rid = engine.add_request([12, 7, 99], SamplingParams(max_new_tokens=50, temperature=0))
    while engine.has_unfinished():
        for out in engine.step():          # RequestOutput(request_id, token, finish_reason)
            ...

Requests join and leave the running batch at every step, each in its own cache row at its own
position (see `Scheduler`). The engine is thread-safe: any thread may add or abort requests or
step it; one lock serializes steps, so a backend never runs two at once. `Runtime` drives it for
its methods; `AsyncEngine` drives it from a background thread for the server.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tformer.backends.base import Backend
from tformer.engine.request import Request, RequestOutput, State, check_prompt
from tformer.engine.runner import ModelRunner
from tformer.engine.sampling import SamplingParams, sample
from tformer.engine.scheduler import Scheduler
from tformer.engine.static import StaticScheduler
from tformer.errors import TformerError, one_line
from tformer.inputs import as_int

DEFAULT_BATCH = 8
CHUNK = 256  # prompt tokens of one request prefilled per step; also the spare slots of each row
_REQUEST_IDS = itertools.count()  # unique across engines: an id never names another engine's request


@dataclass(frozen=True)
class EngineStats:
    """What the engine itself holds (`Engine.stats`): requests running and waiting, cache rows in
    use, and requests it has aborted so far. A server reports these, not its own bookkeeping, so
    that its metrics show what the engine did (a disconnect that never reached it shows)."""

    running: int
    waiting: int
    rows_in_use: int
    aborts: int


class Engine:
    def __init__(
        self, backend: Backend, max_batch_size: int = DEFAULT_BATCH, max_len: int | None = None, static: bool = False
    ):  # fmt: skip
        """Allocate the cache once: `max_batch_size` rows of `max_len` slots (default: the model's
        context). A request needs `len(prompt) + max_new_tokens <= max_len`. `static`: batch
        statically, as HF `generate` does (admit only into an empty batch; finished rows keep
        stepping until the batch is done): the baseline of `tformer-bench throughput`."""
        context = backend.config.max_len
        self.max_batch_size = as_int("max_batch_size", max_batch_size, minimum=1)
        self.max_len = as_int("max_len", context if max_len is None else max_len, minimum=2, maximum=context)
        self.chunk = min(CHUNK, self.max_len)
        self.backend = backend
        self.runner = ModelRunner(backend, self.max_batch_size, self.max_len, self.chunk)
        self.scheduler = (StaticScheduler if static else Scheduler)(self.max_batch_size, self.chunk)
        self._requests: dict[int, Request] = {}
        self._aborted: list[tuple[Request, RequestOutput]] = []  # delivered by the next step
        self._aborts = 0  # requests ended by `abort` (not those already finished when it came)
        self._lock = threading.RLock()

    @property
    def cache_bytes(self) -> int | None:
        """What the preallocated cache takes (None where the backend keeps something else)."""
        nbytes = getattr(self.runner.cache, "nbytes", None)
        return nbytes if isinstance(nbytes, int) else None

    def __repr__(self) -> str:
        size = f", cache {self.cache_bytes / 2**20:.1f} MiB" if self.cache_bytes is not None else ""
        return (f"Engine({self.backend.name} on {self.backend.device}, max_batch_size={self.max_batch_size}, "
                f"max_len={self.max_len}{size})")  # fmt: skip

    def adapt_threads(self) -> None:
        """On the CPU, from now on run each step too small to gain from torch's threads (fewer than
        `runner.PARALLEL_MACS` multiply-adds: a decode of a few rows of a small model) on one
        thread, and the others on as many as torch has now. One thread spins no idle core that a
        server's HTTP side needs (measured: a one-client stream's inter-token latency over HTTP,
        1.50x the engine's alone with 2 threads, 1.22x with one). Only where the engine owns its
        process (`tformer serve`'s engine process): torch's thread count is process-wide."""
        if self.backend.device.type == "cpu":
            self.runner.threads = torch.get_num_threads()

    def warmup(self) -> None:
        """Have the backend compile now whatever steps over this engine's cache may need (see
        `Backend.warmup`), so that requests never wait for a compiler."""
        with self._lock:
            self.backend.warmup(self.runner.cache)

    def add_request(
        self,
        prompt: Sequence[int],
        params: SamplingParams = SamplingParams(),
        eos_id: int | None = None,
        stop: Sequence[Sequence[int]] = (),
        on_output: Callable[[RequestOutput], None] | None = None,
    ) -> int:
        """Queue a request; returns its id. `prompt`: token ids (checked here: a request that can
        never fit is refused at once with the numbers). `stop`: token sequences that end it.
        `on_output(output)` is called, from whichever thread steps the engine, for each of its outputs."""
        prompt = [int(t) for t in prompt]
        context = self.backend.config.max_len
        check_prompt(prompt, params.max_new_tokens, self.backend.config.vocab_size, self.max_len, limit="this engine's max_len",
                     fix=f"shorten the prompt, lower max_new_tokens, or give the engine a larger max_len (up to the "
                         f"model's context, {context})")  # fmt: skip
        stops = tuple(tuple(int(t) for t in s) for s in stop)
        if any(not s for s in stops):
            raise TformerError("stop token sequences must not be empty")
        generator = None if params.seed is None else torch.Generator(self.backend.device).manual_seed(params.seed)
        with self._lock:
            request = Request(next(_REQUEST_IDS), prompt, params, eos_id, stops, on_output, generator)
            self._requests[request.id] = request
            self.scheduler.add(request)
        return request.id

    def abort(self, request_id: int) -> bool:
        """End a waiting or running request now and free its row; False if it had already finished.
        Its last output (no token, reason "abort") comes with the next step."""
        with self._lock:
            request = self._requests.pop(request_id, None)
            if request is None:
                return False
            self._aborted.append(self._end(request, "abort"))
            self._aborts += 1
            return True

    def stats(self) -> EngineStats:
        """Requests running and waiting, cache rows in use, aborts so far. Read without the step
        lock (each number is one read), so that a metrics scrape never waits for a step."""
        scheduler = self.scheduler
        return EngineStats(len(scheduler.running), len(scheduler.waiting),
                           self.max_batch_size - len(scheduler.free_rows), self._aborts)  # fmt: skip

    def fail_all(self, error: str) -> None:
        """End every request with reason "error" (its output says `error`): what a server does when
        a step fails outside any backend call, so that no caller waits forever."""
        with self._lock:
            self._aborted += [self._end(request, "error", error) for request in self._requests.values()]
            self._requests.clear()

    def has_unfinished(self) -> bool:
        with self._lock:
            return self.scheduler.has_unfinished() or bool(self._aborted)

    @torch.inference_mode()  # the backend call and the sampling of its logits alike
    def step(self) -> list[RequestOutput]:
        """Prefill newly admitted requests and decode every running one; each request that produced
        a token (and each aborted since the last step) gets one output."""
        with self._lock:
            finished, self._aborted = self._aborted, []
            plan = self.scheduler.schedule()
            prefill = [r for r, _ in plan.prefill]
            if plan.prefill and (logits := self._call(self.runner.prefill, plan.prefill, prefill, finished)) is not None:
                for request, n in plan.prefill:
                    request.prefilled += n
                finished += self._sample(logits, prefill)
            if plan.decode:
                # In row order: with every row busy that is rows 0..B-1, which a backend reads as one
                # view of the cache instead of gathering a copy of each row (see EagerBackend.step).
                # Padding rows (static batching) step too; their logits are unused.
                batch = sorted(plan.decode + plan.padding, key=lambda r: r.row)
                if (logits := self._call(self.runner.decode, batch, plan.decode, finished)) is not None:
                    finished += self._sample(logits, batch)
            self.scheduler.compact(self.runner.move)
            for request, output in finished:
                if output.finished:
                    self._requests.pop(request.id, None)
                if request.on_output is not None:
                    request.on_output(output)
            return [output for _, output in finished]

    def _call(self, call, work, requests: list[Request], finished: list) -> torch.Tensor | None:
        """`call(work)`; if it raises, fail `requests` (the ones it touched) with the error and
        return None. The engine goes on serving the others: a server must survive one bad step."""
        try:
            return call(work)
        except Exception as exc:  # noqa: BLE001 - any backend failure, reported to its requests
            finished += [self._end(request, "error", one_line(exc)) for request in requests]
            return None

    def _end(self, request: Request, reason: str, error: str | None = None) -> tuple[Request, RequestOutput]:
        """End `request` without a token (abort, error), freeing its row; its last output."""
        self.scheduler.finish(request, reason)
        return request, RequestOutput(request.id, None, reason, error)

    def _sample(self, logits: torch.Tensor, batch: list[Request]) -> list[tuple[Request, RequestOutput]]:
        """Sample every row of `logits` (one per request of `batch`) in one pass, and record the
        tokens of the requests that decode: one still prefilling its prompt, or a padding row
        (static batching: finished), draws a token that is dropped, which costs less than picking
        rows out first."""
        tokens = sample(logits, [r.params for r in batch], [r.generator for r in batch])
        outputs = []
        for request, token in zip(batch, tokens):
            if request.state is not State.RUNNING or request.prefilling:
                continue
            reason = request.finish_after(token)
            if reason is not None:
                self.scheduler.finish(request, reason)
            outputs.append((request, RequestOutput(request.id, token, reason)))
        return outputs
