"""The asynchronous front of the engine, for servers: `async for batch in front.submit(prompts)`.

One background thread steps the engine while any request is unfinished and sleeps otherwise.
Coroutines on any event loop (and threads) submit requests, one per prompt; the outputs of one
submission reach its coroutine through one asyncio queue, handed over thread-safely, once per
engine step for every request of that event loop. A coroutine that stops listening (a client that
disconnects) closes its stream, which aborts its requests: their rows are free at the next step.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence

from tformer.engine.engine import Engine, EngineStats
from tformer.engine.request import RequestOutput
from tformer.engine.sampling import SamplingParams
from tformer.errors import TformerError, one_line


class Listeners:
    """Which event loop and queue wait for each request's outputs; hands a step's outputs to each
    event loop in one call: one wake-up and one lock hand-off per step, not one per request."""

    def __init__(self):
        self._waiting: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.lock = threading.Lock()  # held while registering, so no output can come first

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, request_id: int, queue: asyncio.Queue) -> None:
        """Call with `lock` held."""
        self._waiting[request_id] = (asyncio.get_running_loop(), queue)

    def remove(self, request_ids: list[int]) -> None:
        with self.lock:
            for request_id in request_ids:
                self._waiting.pop(request_id, None)

    def ids(self) -> list[int]:
        with self.lock:
            return list(self._waiting)

    def hand_out(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        with self.lock:
            for out in outputs:
                if (listener := self._waiting.get(out.request_id)) is not None:
                    by_loop.setdefault(listener[0], []).append((listener[1], out))
        try:  # the loop itself, when it reads the engine's pipe (EngineProcess); else the engine's thread
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for loop, batch in by_loop.items():
            if loop is running:
                _put_all(batch)
                continue
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # that event loop has closed: nobody is listening any more
                pass


def _put_all(batch: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, output in batch:
        queue.put_nowait(output)


class Coalescer:
    """Holds back each request's tokens until it has `interval` of them to send together (its first
    token and its last output go at once): `interval` 1 passes every step's outputs through. A
    server streaming to many clients at once spends most of its CPU per chunk, not per token
    (vLLM's `--stream-interval` does the same)."""

    def __init__(self, interval: int = 1):
        self.interval = interval
        self._held: dict[int, list[RequestOutput]] = {}  # request id -> outputs not sent yet, once it has sent one

    def __call__(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        if self.interval == 1:
            return outputs
        ready = []
        for out in outputs:
            held = self._held.get(out.request_id)
            if held is None:  # its first output goes at once: time to first token is not held back
                ready.append(out)
                if not out.finished:
                    self._held[out.request_id] = []
                continue
            held.append(out)
            if out.finished or len(held) >= self.interval:
                ready += held
                held.clear()
                if out.finished:
                    del self._held[out.request_id]
        return ready


class Stream:
    """The outputs of one submission's requests (one per prompt, registered on one queue), as they
    come: `async for batch in stream` gives lists of every output waiting by then, so a consumer
    that fell behind (a server streaming to many clients) catches up in one go, and a request of
    many prompts costs one wake-up per step, not one per prompt. `index[request_id]` is the
    request's prompt index. `aclose()` (a consumer that leaves first) aborts what is unfinished;
    `abort(request_id)` ends one request early (a stop string)."""

    def __init__(self, ids: list[int], queue: asyncio.Queue, listeners: Listeners, abort: Callable[[int], None]):
        self.index = {request_id: i for i, request_id in enumerate(ids)}
        self._unfinished = set(ids)
        self._queue, self._listeners, self._abort = queue, listeners, abort

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> list[RequestOutput]:
        if not self._unfinished:
            raise StopAsyncIteration
        queue = self._queue
        batch = [await queue.get()]
        while not queue.empty():
            batch.append(queue.get_nowait())
        if finished := [out.request_id for out in batch if out.finished]:
            self._unfinished.difference_update(finished)
            self._listeners.remove(finished)
        return batch

    def abort(self, request_id: int) -> None:
        if request_id in self._unfinished:
            self._unfinished.discard(request_id)
            self._listeners.remove([request_id])
            self._abort(request_id)

    async def aclose(self) -> None:
        self._listeners.remove(list(self.index))
        for request_id in self._unfinished:
            self._abort(request_id)
        self._unfinished.clear()


class AsyncEngine:
    def __init__(self, engine: Engine, stream_interval: int = 1):
        """`stream_interval`: tokens of a request handed out together (see `Coalescer`)."""
        self.engine = engine
        self.listeners = Listeners()
        self._coalesce = Coalescer(stream_interval)
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="tformer-engine", daemon=True)
        self._thread.start()

    def submit(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams = SamplingParams(),
        eos_id: int | None = None,
        stop: Sequence[Sequence[int]] = (),
    ) -> Stream:
        """Queue one request per prompt; their outputs (`RequestOutput`) as the engine produces
        them, the last of each with its finish reason (see `Stream`). Input errors raise here,
        before any request is queued. Call from a running event loop."""
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        ids: list[int] = []
        with self.listeners.lock:
            try:
                for prompt in prompts:
                    ids.append(self.engine.add_request(prompt, params, eos_id, stop))
            except TformerError:
                for request_id in ids:
                    self.engine.abort(request_id)
                raise
            for request_id in ids:
                self.listeners.add(request_id, queue)
        self._wake.set()
        return Stream(ids, queue, self.listeners, self._abort)

    @property
    def alive(self) -> bool:
        """Whether the thread that steps the engine runs."""
        return self._thread.is_alive()

    def stats(self) -> EngineStats:
        """The engine's own counts (see `Engine.stats`)."""
        return self.engine.stats()

    def abort_all(self) -> None:
        """Abort every request in flight; each stream gets its final output ("abort") at the next
        step (a server at the end of its grace period)."""
        for request_id in self.listeners.ids():
            self.engine.abort(request_id)
        self._wake.set()

    def shutdown(self) -> None:
        """Stop the background thread (requests still running are left as they are)."""
        self._stopping = True
        self._wake.set()
        self._thread.join()

    def _abort(self, request_id: int) -> None:
        self.engine.abort(request_id)
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopping:
            if self.engine.has_unfinished():
                try:
                    self.listeners.hand_out(self._coalesce(self.engine.step()))
                except Exception as exc:  # noqa: BLE001 - a bug in a step: fail its requests, keep serving
                    self.engine.fail_all(one_line(exc))
            else:
                self._wake.wait()
                self._wake.clear()
