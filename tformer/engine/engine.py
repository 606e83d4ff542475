"""The engine: continuous batching of requests over one backend.

    engine = Engine(backend, max_batch_size=8, max_len=512)
    rid = engine.add_request([12, 7, 99], SamplingParams(max_new_tokens=50, temperature=0))
    while engine.has_unfinished():
        for out in engine.step():          # RequestOutput(request_id, token, finish_reason)
            ...

Requests join and leave the running batch at every step, each in its own cache row at its own
position (see `Scheduler`). One thread at a time uses an engine: `EngineCore` (tformer.engine.core)
runs the one loop that steps it, a turn at a time in the threads that call a `Runtime`, on a
thread of its own for a server in one process, in the main thread of `tformer serve`'s engine
process; other threads reach it through the core's inbox, never the engine.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from tformer.backends.base import Backend
from tformer.engine.request import Request, RequestOutput, State, check_prompt
from tformer.engine.runner import ModelRunner
from tformer.engine.sampling import Sampler, SamplingParams
from tformer.engine.scheduler import Scheduler
from tformer.engine.static import StaticScheduler
from tformer.errors import TformerError, one_line
from tformer.inputs import as_int

DEFAULT_BATCH = 8
DECODE_STEPS = 8  # chosen by measurement: docs/benchmarks/2026-12-03-multi-step-decode-cpu-2core.md
CHUNK = 256  # prompt tokens of one request prefilled per step; also the spare slots of each row
_REQUEST_IDS = itertools.count()  # for `add_request` without an id of the caller's


@dataclass(frozen=True)
class EngineStats:
    """What the engine itself holds (`Engine.stats`): requests running and waiting, cache rows in
    use, and so far the requests it has aborted and the tokens it has generated. A server reports
    these, not its own bookkeeping, so that its metrics show what the engine did (a disconnect
    that never reached it shows)."""

    running: int
    waiting: int
    rows_in_use: int
    aborts: int
    tokens: int = 0


class Engine:
    def __init__(
        self, backend: Backend, max_batch_size: int = DEFAULT_BATCH, max_len: int | None = None, static: bool = False,
        decode_steps: int = DECODE_STEPS,
    ):  # fmt: skip
        """Allocate the cache once: `max_batch_size` rows of `max_len` slots (default: the model's
        context). A request needs `len(prompt) + max_new_tokens <= max_len`. `static`: batch
        statically, as HF `generate` does (admit only into an empty batch; finished rows keep
        stepping until the batch is done): the baseline of `tformer-bench throughput`.
        `decode_steps`: decode steps run in a row, with no bookkeeping in between, while every
        running request decodes and none waits for a row (vLLM's multi-step scheduling): never
        past any running request's max_new_tokens; tokens after an EOS or a stop id are dropped. The
        outputs are those of single steps; they come `decode_steps` at a time, and new requests
        and aborts wait as long."""
        context = backend.config.max_len
        self.max_batch_size = as_int("max_batch_size", max_batch_size, minimum=1)
        self.decode_steps = as_int("decode_steps", decode_steps, minimum=1)
        self.max_len = as_int("max_len", context if max_len is None else max_len, minimum=2, maximum=context)
        self.chunk = min(CHUNK, self.max_len)
        self.backend = backend
        self.runner = ModelRunner(backend, self.max_batch_size, self.max_len, self.chunk)
        self.scheduler = (StaticScheduler if static else Scheduler)(self.max_batch_size, self.chunk)
        self._requests: dict[Hashable, Request] = {}
        self._aborted: list[RequestOutput] = []  # delivered by the next step
        self._aborts = 0  # requests ended by `abort` (not those already finished when it came)
        self._tokens = 0  # generated, EOS and stop tokens included

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
        self.backend.warmup(self.runner.cache)

    def check(self, prompt: Sequence[int], params: SamplingParams, label: str = "the prompt") -> list[int]:
        """The prompt's ids as plain ints, or TformerError naming `label` for a request that can
        never run here: an empty prompt, an id outside the vocabulary (the prompt's or a stop
        token id), `len(prompt) + max_new_tokens` over this engine's max_len. Whoever sends a
        request checks it once, in its own thread (`add_request` does)."""
        prompt = [int(t) for t in prompt]
        config, context = self.backend.config, self.backend.config.max_len
        if self.max_len == context:
            check_prompt(prompt, params.max_new_tokens, config.vocab_size, context, label)
        else:
            check_prompt(prompt, params.max_new_tokens, config.vocab_size, self.max_len, label,
                         limit="this engine's max_len",
                         fix=f"shorten the prompt, lower max_new_tokens, or load with a larger max_len (up to the "
                             f"model's context, {context})")  # fmt: skip
        if bad := [t for t in params.stop_token_ids if t >= config.vocab_size]:
            raise TformerError(f"stop_token_ids {bad} are outside the vocabulary [0, {config.vocab_size}); "
                               "use ids of this model's tokenizer")  # fmt: skip
        return prompt

    def add_request(
        self, prompt: Sequence[int], params: SamplingParams = SamplingParams(), eos_id: int | None = None,
        request_id: Hashable | None = None,
    ) -> Hashable:  # fmt: skip
        """Check (`check`) and queue a request; returns its id (`request_id`, or a new one).
        It ends at `eos_id`, at any of `params.stop_token_ids` or at `params.max_new_tokens`."""
        prompt = self.check(prompt, params)
        return self.add_checked(next(_REQUEST_IDS) if request_id is None else request_id, prompt, params, eos_id)

    def add_checked(
        self, request_id: Hashable, prompt: list[int], params: SamplingParams, eos_id: int | None = None
    ) -> Hashable:
        """Queue a request its sender has checked (`check`), under the sender's own id."""
        if request_id in self._requests:
            raise TformerError(f"request id {request_id!r} is already in use")
        generator = None if params.seed is None else torch.Generator(self.backend.device).manual_seed(params.seed)
        request = Request(request_id, prompt, params, eos_id, generator)
        self._requests[request_id] = request
        self.scheduler.add(request)
        return request_id

    def abort(self, request_id: Hashable) -> bool:
        """End a waiting or running request now and free its row; False if it had already finished.
        Its last output (no token, reason "abort") comes with the next step."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return False
        self._aborted.append(self._end(request, "abort"))
        self._aborts += 1
        return True

    def abort_all(self) -> None:
        """Abort every request (a server at the end of its grace period)."""
        for request_id in list(self._requests):
            self.abort(request_id)

    def stats(self) -> EngineStats:
        """Requests running and waiting, cache rows in use, aborts and tokens so far."""
        scheduler = self.scheduler
        return EngineStats(len(scheduler.running), len(scheduler.waiting),
                           self.max_batch_size - len(scheduler.free_rows), self._aborts, self._tokens)  # fmt: skip

    def fail_all(self, error: str) -> None:
        """End every request with reason "error" (its output says `error`): what a server does when
        a step fails outside any backend call, so that no caller waits forever."""
        self._aborted += [self._end(request, "error", error) for request in self._requests.values()]
        self._requests.clear()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted)

    @torch.inference_mode()  # the backend call and the sampling of its logits alike
    def step(self) -> list[RequestOutput]:
        """Prefill newly admitted requests and decode every running one; each request that produced
        a token (and each aborted since the last step) gets an output for each token. When every
        running request decodes and none waits for a row, that is up to `decode_steps` decode
        steps in a row (see `__init__`), their outputs in the order single steps give them."""
        finished, self._aborted = self._aborted, []
        scheduler = self.scheduler
        plan = scheduler.schedule()
        prefill = [r for r, _ in plan.prefill]
        if plan.prefill and (logits := self._call(self.runner.prefill, plan.prefill, prefill, finished)) is not None:
            for request, n in plan.prefill:
                request.prefill(n)
            finished += self._record(self._sampler(prefill)(logits)[None], prefill)
        if plan.decode:
            # In row order: with every row busy that is rows 0..B-1, which a backend reads as one
            # view of the cache instead of gathering a copy of each row (see EagerBackend.step).
            # Padding rows (static batching) step too; their tokens are dropped.
            batch = sorted(plan.decode + plan.padding, key=lambda r: r.row)
            steps = 1
            if self.decode_steps > 1 and not (plan.prefill or plan.padding or scheduler.waiting):
                steps = min(self.decode_steps, *(r.params.max_new_tokens - len(r.output) for r in batch))
            decode = lambda requests: self.runner.decode(requests, self._sampler(requests), steps)  # noqa: E731
            if (tokens := self._call(decode, batch, plan.decode, finished)) is not None:
                finished += self._record(tokens, batch)
        scheduler.compact(self.runner.move)
        for output in finished:
            if output.finished:
                self._requests.pop(output.request_id, None)
        return finished

    def _call(self, call, work, requests: list[Request], finished: list[RequestOutput]) -> torch.Tensor | None:
        """`call(work)`; if it raises, fail `requests` (the ones it touched) with the error and
        return None. The engine goes on serving the others: a server must survive one bad step."""
        try:
            return call(work)
        except Exception as exc:  # noqa: BLE001 - any backend failure, reported to its requests
            finished += [self._end(request, "error", one_line(exc)) for request in requests]
            return None

    def _end(self, request: Request, reason: str, error: str | None = None) -> RequestOutput:
        """End `request` without a token (abort, error), freeing its row; its last output."""
        self.scheduler.finish(request, reason)
        return RequestOutput(request.id, None, reason, error)

    def _sampler(self, batch: list[Request]) -> Sampler:
        """How to pick each row's token. A request still prefilling its prompt, or a padding row
        (static batching: finished), draws a token that is dropped, which costs less than picking
        rows out first, from the global generator: its own seeded one draws only for its tokens,
        however many steps its prefill took."""
        generators = [r.generator if r.state is State.RUNNING and not r.prefilling else None for r in batch]
        return Sampler([r.params for r in batch], generators, self.backend.config.vocab_size, self.backend.device)

    def _record(self, tokens: torch.Tensor, batch: list[Request]) -> list[RequestOutput]:
        """Read the picked ids `(steps, B)` back (the one copy to the host of a step, or of a
        multi-step decode) and record them, step after step, for the requests that decode: a
        request's tokens after its end (EOS, a stop token id, its length) are dropped."""
        outputs = []
        for row_tokens in tokens.tolist():
            for request, token in zip(batch, row_tokens):
                if request.state is not State.RUNNING or request.prefilling:
                    continue
                reason = request.finish_after(token)
                if reason is not None:
                    self.scheduler.finish(request, reason)
                outputs.append(RequestOutput(request.id, token, reason))
        self._tokens += len(outputs)
        return outputs
