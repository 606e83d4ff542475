"""The engine core: one loop, whoever drives it.

`EngineCore.run` is tformer's only engine loop. It takes messages from an inbox (add a request,
abort one or all, stop), steps the engine while any request is unfinished and waits for messages
otherwise, and hands each step's outputs, with the engine's stats, to `emit`. Where it runs, only
the inbox and `emit` differ:

- in its callers' own threads, a turn at a time, or on a thread of its own for a server run in one
  process (`EngineFront`, what `Runtime` holds): a queue in, the callers' queues out;
- in the main thread of a child process (`tformer serve`, a Ray replica: `tformer.serve.worker`):
  the pipe both ways;
- in the benchmark (`tformer-bench throughput`): requests released at their arrival times.

Requests carry their caller's own ids, which the engine keeps (vLLM's `EngineCore` takes
`EngineCoreRequest`s the same way). Messages are checked by whoever sends them (`Engine.check`,
in the caller's thread, where an error can be raised to it); the core adds them as they come.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from tformer.engine.engine import Engine, EngineStats
from tformer.engine.request import RequestOutput
from tformer.engine.sampling import SamplingParams
from tformer.errors import TformerError, one_line


@dataclass(frozen=True)
class Add:
    """Add a request, checked by the sender (`Engine.check`)."""

    request_id: Hashable
    prompt: Sequence[int]
    params: SamplingParams
    eos_id: int | None = None


@dataclass(frozen=True)
class Abort:
    """End a request now (its last output, reason "abort", comes with the next step); `None`: every one."""

    request_id: Hashable | None


class Call:
    """Run `fn` on the core's thread between two steps; the sender waits for it (`wait`)."""

    def __init__(self, fn: Callable[[], None]):
        self.fn = fn
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            self.fn()
        except BaseException as exc:  # noqa: BLE001 - raised again in the sender's thread
            self.error = exc
        finally:
            self.done.set()

    def wait(self) -> None:
        self.done.wait()
        if self.error is not None:
            raise self.error


STOP = "stop"  # ends the loop after the step in progress

Emit = Callable[[list[RequestOutput], EngineStats], None]


class Inbox(Protocol):
    def take(self, wait: bool) -> list:
        """Every message waiting; with `wait`, block until there is at least one."""
        ...


class QueueInbox:
    """An inbox any thread may put into."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    def put(self, message) -> None:
        self._queue.put(message)

    def take(self, wait: bool) -> list:
        messages = [self._queue.get()] if wait else []
        while True:
            try:
                messages.append(self._queue.get_nowait())
            except queue.Empty:
                return messages


class EngineCore:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._refused: list[RequestOutput] = []  # adds the engine refused: their outputs go with the next step
        self._reported: EngineStats | None = None

    def run(self, inbox: Inbox, emit: Emit, lock: threading.Lock | None = None) -> None:
        """Until a STOP message: take the messages waiting (waiting for one when the engine is
        idle), and take a turn (`turn`), under `lock` when one is given (callers that take turns
        themselves hold it too: `EngineFront`)."""
        # OpenMP thread counts are per thread: this one takes the process's (torch.set_num_threads
        # elsewhere, before the loop starts), once.
        torch.set_num_threads(torch.get_num_threads())
        while True:
            messages = inbox.take(wait=not self.engine.has_unfinished())
            with contextlib.nullcontext() if lock is None else lock:
                if not self.turn(messages, emit):
                    return

    def turn(self, messages: list, emit: Emit) -> bool:
        """One turn of the loop: apply `messages`, step the engine if any request is unfinished,
        and emit the step's outputs and stats (a turn that changed nothing emits nothing). False
        at a STOP message."""
        engine = self.engine
        for message in messages:
            if message == STOP:
                return False
            self.apply(message)
        try:
            outputs = engine.step() if engine.has_unfinished() else []
        except Exception as exc:  # noqa: BLE001 - a bug in a step: fail its requests, keep serving
            engine.fail_all(one_line(exc))
            return True
        if self._refused:
            outputs, self._refused = self._refused + outputs, []
        stats = engine.stats()
        if outputs or stats != self._reported:
            emit(outputs, stats)
            self._reported = stats
        return True

    def apply(self, message: Add | Abort | Call) -> None:
        if isinstance(message, Add):
            try:
                self.engine.add_checked(message.request_id, message.prompt, message.params, message.eos_id)
            except TformerError as exc:  # its sender checked it; a clash of ids is still its error alone
                self._refused.append(RequestOutput(message.request_id, None, "error", str(exc)))
        elif isinstance(message, Call):
            message.run()
        elif message.request_id is None:
            self.engine.abort_all()
        else:
            self.engine.abort(message.request_id)
