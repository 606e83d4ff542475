"""The front of an engine: requests from any thread (`requests`, what `Runtime` uses) or any event
loop (`submit`, what a server in one process uses), as messages to its core (`EngineCore`).

Callers send messages and never touch the engine, so submitting and aborting never wait for a
step. Each caller's outputs reach it through a queue of its own, handed over once per engine step
for every request of that event loop (`Listeners`): an asyncio queue for a coroutine, a plain
queue for a thread. A caller that stops listening (a client that disconnects, a stream closed
early) aborts its requests: their rows are free at the next step.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence

from tformer.engine.core import STOP, Abort, Add, Call, Emit, EngineCore, QueueInbox
from tformer.engine.engine import Engine, EngineStats
from tformer.engine.request import RequestOutput
from tformer.engine.sampling import SamplingParams


class Listeners:
    """Which event loop (None: a thread) and queue wait for each request's outputs; hands a
    step's outputs to each event loop in one call: one wake-up and one lock hand-off per step,
    not one per request."""

    def __init__(self):
        self._waiting: dict[Hashable, tuple[asyncio.AbstractEventLoop | None, asyncio.Queue | queue.SimpleQueue]] = {}
        self.lock = threading.Lock()  # held while registering, so no output can come first

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, request_id: Hashable, out, loop: asyncio.AbstractEventLoop | None) -> None:
        """Call with `lock` held."""
        self._waiting[request_id] = (loop, out)

    def remove(self, request_ids: Sequence[Hashable]) -> None:
        with self.lock:
            for request_id in request_ids:
                self._waiting.pop(request_id, None)

    def ids(self) -> list[Hashable]:
        with self.lock:
            return list(self._waiting)

    def hand_out(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop | None, list[tuple[object, RequestOutput]]] = {}
        with self.lock:
            for out in outputs:
                if (listener := self._waiting.get(out.request_id)) is not None:
                    by_loop.setdefault(listener[0], []).append((listener[1], out))
        try:  # the loop itself, when it reads the engine's pipe (EngineProcess); else the engine's thread
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for loop, batch in by_loop.items():
            if loop is None or loop is running:
                _put_all(batch)
                continue
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # that event loop has closed: nobody is listening any more
                pass


def _put_all(batch: list[tuple[object, RequestOutput]]) -> None:
    for out, output in batch:
        out.put_nowait(output)


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


class EngineFront:
    """What callers of one engine talk to: requests from any thread (`requests`, what `Runtime`
    uses) or any event loop (`submit`, what a server uses), all through the core's inbox.

    Without a thread of its own (the default), the callers' threads step the engine: a caller
    that waits for an output and finds none takes a turn of the core's loop (`EngineCore.turn`),
    unless another caller is taking one. So a `Runtime` steps in the thread that called it, as a
    bare loop does: on a 2-core CPU an engine stepped on a second thread ran 0.6-0.75x as fast at
    batch 8 once the main thread had used torch's threads (docs/benchmarks). `start()` runs the
    loop on a thread of its own instead, for a server in this process (an event loop cannot take
    turns); `shutdown()` ends it.
    """

    def __init__(self, engine: Engine, stream_interval: int = 1):
        """`stream_interval`: tokens of a request handed out together (see `Coalescer`)."""
        self.engine = engine
        self.listeners = Listeners()
        self.coalesce = Coalescer(stream_interval)
        self.core = EngineCore(engine)
        self._inbox = QueueInbox()
        self._turns = threading.Lock()  # one turn of the loop at a time, whoever takes it
        self._ids = itertools.count()
        self._stats = engine.stats()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Run the core's loop on a thread of its own (a server's), until `shutdown`."""
        if not self.alive:
            self._thread = threading.Thread(target=self.core.run, args=(self._inbox, self._emit, self._turns),
                                            name="tformer-engine", daemon=True)  # fmt: skip
            self._thread.start()

    def run(self, inbox, emit: Emit) -> None:
        """Run the core's loop in this thread, on `inbox`, until it says STOP (an engine process's
        main thread, on its pipe); `emit` gets each step's outputs, coalesced, and stats."""
        self.core.run(inbox, lambda outputs, stats: emit(self.coalesce(outputs), stats), self._turns)

    @property
    def alive(self) -> bool:
        """Whether the loop runs on a thread of its own (a server's health: its engine runs)."""
        return self._thread is not None and self._thread.is_alive()

    def shutdown(self) -> None:
        """Stop the loop's own thread after its current step (requests still running are left as
        they are); callers step the engine themselves again."""
        if self.alive:
            self._inbox.put(STOP)
            self._thread.join()

    def submit(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams = SamplingParams(), eos_id: int | None = None
    ) -> Stream:
        """Queue one request per prompt; their outputs (`RequestOutput`) as the engine produces
        them, the last of each with its finish reason (see `Stream`). Input errors raise here,
        before any request is queued. Call from a running event loop, with the loop on its own
        thread (`start`)."""
        out: asyncio.Queue[RequestOutput] = asyncio.Queue()
        ids = self.send(prompts, params, eos_id, out, asyncio.get_running_loop())
        return Stream(ids, out, self.listeners, self.abort)

    def requests(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, eos_id: int | None = None
    ) -> tuple[list[Hashable], Iterator[RequestOutput]]:
        """`submit` for a thread: the requests' ids, in prompt order, and an iterator of their
        outputs as they come (closing it early aborts what is unfinished)."""
        out: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
        ids = self.send(prompts, params, eos_id, out)
        return ids, self._outputs(ids, out)

    def send(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, eos_id: int | None, out,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> list[int]:  # fmt: skip
        """Check the prompts, then queue one request per prompt; their ids. Each output goes to
        `out.put_nowait(output)`: through `loop` when one is given, else called in the thread that
        stepped, as soon as its step is done (a benchmark stamps tokens there)."""
        checked = [self.engine.check(prompt, params, f"prompt {i}") for i, prompt in enumerate(prompts)]
        ids = [next(self._ids) for _ in prompts]
        with self.listeners.lock:
            for request_id in ids:
                self.listeners.add(request_id, out, loop)
        for request_id, prompt in zip(ids, checked):
            self._inbox.put(Add(request_id, prompt, params, eos_id))
        return ids

    def wait(self, until: Callable[[], bool]) -> None:
        """Step the engine (a turn at a time, when no one else is) until `until()` holds; with the
        loop on its own thread, just wait for it."""
        while not until():
            if not self.alive and self._turns.acquire(blocking=False):
                try:
                    self.core.turn(self._inbox.take(wait=False), self._emit)
                finally:
                    self._turns.release()
            else:
                time.sleep(0.0005)

    def call(self, fn: Callable[[], None]) -> None:
        """Run `fn` between two steps, in the thread that steps (CUDA graphs belong to the thread
        that records them), and wait for it."""
        call = Call(fn)
        self._inbox.put(call)
        self.wait(call.done.is_set)
        call.wait()

    def stats(self) -> EngineStats:
        """The engine's own counts as of its latest step (see `Engine.stats`)."""
        return self._stats

    def put(self, message: Add | Abort) -> None:
        """A message for the core, checked by its sender."""
        self._inbox.put(message)

    def abort(self, request_id: Hashable) -> None:
        self._inbox.put(Abort(request_id))

    def abort_all(self) -> None:
        """Abort every request in flight; each stream gets its final output ("abort") at the next
        step (a server at the end of its grace period)."""
        self._inbox.put(Abort(None))

    def _outputs(self, ids: list[int], out: queue.SimpleQueue) -> Iterator[RequestOutput]:
        unfinished = set(ids)
        try:
            while unfinished:
                self.wait(lambda: not out.empty())
                output = out.get()
                if output.finished:
                    unfinished.discard(output.request_id)
                yield output
        finally:
            self.listeners.remove(ids)
            for request_id in unfinished:  # closed early (a stop string, a consumer that went away)
                self.abort(request_id)

    def _emit(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        self._stats = stats
        self.listeners.hand_out(self.coalesce(outputs))
