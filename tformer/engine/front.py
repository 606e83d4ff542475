"""The asynchronous front of the engine, for servers: `async for output in front.generate(...)`.

One background thread steps the engine while any request is unfinished and sleeps otherwise.
Coroutines on any event loop (and threads) submit requests; each request's outputs reach its
coroutine through an asyncio queue, handed over thread-safely. A coroutine that stops listening
(a client that disconnects) aborts its request, whose row is then free at the next step.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence

from tformer.engine.engine import Engine
from tformer.engine.request import RequestOutput
from tformer.engine.sampling import SamplingParams
from tformer.errors import one_line


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

    def remove(self, request_id: int) -> None:
        with self.lock:
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
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # that event loop has closed: nobody is listening any more
                pass


def _put_all(batch: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, output in batch:
        queue.put_nowait(output)


async def outputs_of(
    request_id: int, queue: asyncio.Queue, listeners: Listeners, abort, batched: bool = False
) -> AsyncIterator:
    """A registered request's outputs until its last; `abort(request_id)` if the consumer leaves
    first. `batched`: yield lists, each of every output waiting by then, so that a consumer that
    fell behind (a server streaming to many clients) catches up in one go rather than one by one."""
    finished = False
    try:
        while not finished:
            batch = [await queue.get()]
            while batched and not batch[-1].finished and not queue.empty():
                batch.append(queue.get_nowait())
            finished = batch[-1].finished
            if batched:
                yield batch
            else:
                yield batch[0]
    finally:
        listeners.remove(request_id)
        if not finished:  # the consumer went away: free the row
            abort(request_id)


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.listeners = Listeners()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="tformer-engine", daemon=True)
        self._thread.start()

    def generate(
        self,
        prompt: Sequence[int],
        params: SamplingParams = SamplingParams(),
        eos_id: int | None = None,
        stop: Sequence[Sequence[int]] = (),
        batched: bool = False,
    ) -> AsyncIterator:
        """The request's outputs (`RequestOutput`) as the engine produces them, the last with its
        finish reason; `batched`: lists of the outputs waiting (see `outputs_of`). Input errors
        raise here, before the first output. Call from a running event loop."""
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        with self.listeners.lock:
            request_id = self.engine.add_request(prompt, params, eos_id, stop)
            self.listeners.add(request_id, queue)
        self._wake.set()
        return outputs_of(request_id, queue, self.listeners, self._abort, batched)

    def stats(self) -> tuple[int, int, int]:
        """Requests running, requests waiting, cache rows in use."""
        scheduler = self.engine.scheduler
        return len(scheduler.running), len(scheduler.waiting), self.engine.max_batch_size - len(scheduler.free_rows)

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
                    self.listeners.hand_out(self.engine.step())
                except Exception as exc:  # noqa: BLE001 - a bug in a step: fail its requests, keep serving
                    self.engine.fail_all(one_line(exc))
            else:
                self._wake.wait()
                self._wake.clear()
