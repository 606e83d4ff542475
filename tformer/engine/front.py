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


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._wake = threading.Event()
        self._stopping = False
        # request id -> (its event loop, its queue). Outputs of one engine step are handed to each
        # event loop in one call: one wake-up and one GIL hand-off per step, not per request.
        self._listeners: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._listeners_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="tformer-engine", daemon=True)
        self._thread.start()

    async def generate(
        self,
        prompt: Sequence[int],
        params: SamplingParams = SamplingParams(),
        eos_id: int | None = None,
        stop: Sequence[Sequence[int]] = (),
    ) -> AsyncIterator[RequestOutput]:
        """The request's outputs as the engine produces them, the last with its finish reason.
        Input errors raise before the first output."""
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        with self._listeners_lock:  # registered before the engine thread can hand out its outputs
            request_id = self.engine.add_request(prompt, params, eos_id, stop)
            self._listeners[request_id] = (asyncio.get_running_loop(), queue)
        self._wake.set()
        finished = False
        try:
            while not finished:
                output = await queue.get()
                finished = output.finished
                yield output
        finally:
            with self._listeners_lock:
                self._listeners.pop(request_id, None)
            if not finished:  # the consumer went away: free the row
                self.engine.abort(request_id)
                self._wake.set()

    def shutdown(self) -> None:
        """Stop the background thread (requests still running are left as they are)."""
        self._stopping = True
        self._wake.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stopping:
            if self.engine.has_unfinished():
                try:
                    self._hand_out(self.engine.step())
                except Exception as exc:  # noqa: BLE001 - a bug in a step: fail its requests, keep serving
                    self.engine.fail_all(one_line(exc))
            else:
                self._wake.wait()
                self._wake.clear()

    def _hand_out(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        with self._listeners_lock:
            for out in outputs:
                if (listener := self._listeners.get(out.request_id)) is not None:
                    by_loop.setdefault(listener[0], []).append((listener[1], out))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # that event loop has closed: nobody is listening any more
                pass


def _put_all(batch: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, output in batch:
        queue.put_nowait(output)
