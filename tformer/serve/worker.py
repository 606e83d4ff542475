"""The engine in a process of its own, for `tformer serve`.

In one process the engine thread and the event loop that streams tokens share one interpreter
lock: each streamed chunk's ~100 us of Python (JSON, HTTP framing) is time the engine's own Python
waits for, so every step gets slower as clients multiply (docs/benchmarks/2026-11-25-serve-cpu-2core.md).
Here the engine runs in a child process with its own interpreter: the same `EngineCore` loop as
in-process, in the child's main thread. The HTTP process sends it the core's own messages
(`Add` under the parent's request ids, `Abort`) over a pipe, and the core answers with one
message per engine step holding every output of that step and the engine's stats
(`Engine.stats`: what `/metrics` reports). `EngineProcess` offers `EngineFront`'s `submit`, so
the app does not care which it has. The child
ignores SIGINT and SIGTERM (a terminal or a service manager signals the whole group; the parent
decides when the engine stops) and ends on the pipe's EOF, so a parent killed leaves no engine.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tformer.config import ModelConfig
from tformer.engine import RequestOutput, SamplingParams
from tformer.engine.core import STOP, Abort, Add
from tformer.engine.engine import EngineStats
from tformer.engine.front import Coalescer, Listeners, Stream
from tformer.errors import TformerError, one_line
from tformer.runtime import Runtime, load
from tformer.tokenizer import Tokenizer


# What stops a server: its engine process ignores them and is stopped by its parent, which may
# still need it to finish or abort the requests in flight (a terminal's Ctrl-C and a service
# manager's stop signal the whole process group, the engine process too).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# The engine process's program: the parent's sys.path first, then `_child` over the pipe on `fd`.
CHILD = ("import sys; from multiprocessing.connection import Connection; conn = Connection({fd}); "
         "sys.path[:] = conn.recv(); from tformer.serve.worker import _child; _child(conn)")


@dataclass(frozen=True)
class WorkerSpec:
    """What the child loads and how it sizes its engine (the options of `tformer serve`)."""

    model: str
    backend: str | None = None
    device: str | None = None
    dtype: str | None = None
    nhead: int | None = None
    tokenizer: str | None = None
    max_batch_size: int = 16
    max_len: int | None = None  # default: the model's context
    threads: int | None = None  # torch's CPU threads; None: torch's own choice (one per core)
    stream_interval: int = 1  # tokens of a request sent to the HTTP side together (see `Coalescer`)
    decode_steps: int | None = None  # decode steps per engine turn while none waits; None: the engine's default


@dataclass(frozen=True)
class Served:
    """What the HTTP side knows of the served model and engine."""

    config: ModelConfig
    tokenizer: Tokenizer | None
    eos_id: int | None
    max_len: int
    max_batch_size: int
    cache_bytes: int | None
    backend: str
    device: str
    warmup_s: float = 0.0

    @classmethod
    def of(cls, runtime: Runtime, warmup_s: float = 0.0) -> Served:
        engine = runtime.engine
        return cls(runtime.config, runtime.tokenizer, runtime.eos_id, engine.max_len, engine.max_batch_size,
                   engine.cache_bytes, runtime.backend.name, str(runtime.backend.device), warmup_s)  # fmt: skip


def build(spec: WorkerSpec) -> tuple[Runtime, Served]:
    """Load the model, size its engine and warm it up (compiling backends compile here)."""
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    runtime = load(spec.model, backend=spec.backend, device=spec.device, dtype=spec.dtype, nhead=spec.nhead,
                   tokenizer=spec.tokenizer, max_batch_size=spec.max_batch_size, max_len=spec.max_len,
                   decode_steps=spec.decode_steps)  # fmt: skip
    prompt = min(128, runtime.engine.max_len // 2)
    seconds = runtime.warmup((1, spec.max_batch_size), prompt, min(128, runtime.engine.max_len - prompt))
    runtime.engine.adapt_threads()  # this process is the engine's
    return runtime, Served.of(runtime, seconds)


class EngineProcess:
    """An engine in a child process, driven like `EngineFront` (`submit`), from one event loop."""

    def __init__(self, spec: WorkerSpec, timeout: float = 600.0):
        self._conn, child = multiprocessing.Pipe()
        # A fresh interpreter (no forked torch threads), started as a plain subprocess: multiprocessing's
        # spawn would also start its resource tracker, a process left for init to reap after we exit.
        self._process = _start_ignoring_stop_signals([sys.executable, "-c", CHILD.format(fd=child.fileno())],
                                                     child.fileno())  # fmt: skip
        child.close()
        try:
            self._conn.send(sys.path)  # where it imports tformer from, as multiprocessing's spawn does
            self._conn.send(spec)
            if not self._conn.poll(timeout):
                raise TformerError(f"the engine process did not start within {timeout:.0f} s")
            kind, payload = self._conn.recv()
        except (EOFError, BrokenPipeError):
            self._kill()
            raise TformerError(f"the engine process exited (code {self._process.returncode}) while starting") from None
        except BaseException:  # Ctrl-C while it loads: it ignores that, so it goes now
            self._kill()
            raise
        if kind == "failed":
            self._kill()
            raise TformerError(payload)
        config, tokenizer, rest = payload
        self.served = Served(ModelConfig.from_dict(config), Tokenizer.from_json(tokenizer) if tokenizer else None, **rest)
        self._ids = itertools.count()
        self.listeners = Listeners()
        self._send_lock = threading.Lock()  # a pipe end is not safe to write from two threads at once
        self._loop: asyncio.AbstractEventLoop | None = None  # the one event loop that reads the pipe
        self._stats = EngineStats(0, 0, 0, 0, 0)  # the engine's, from its latest message

    def submit(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams = SamplingParams(), eos_id: int | None = None
    ) -> Stream:
        """One request per prompt, their outputs as the child's engine produces them (as
        `EngineFront.submit`; the HTTP side has checked the prompts against the engine's limits).
        Call from one event loop: the first call makes it the one that reads the child's answers."""
        loop = self._attach()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        ids = [next(self._ids) for _ in prompts]
        with self.listeners.lock:
            for request_id in ids:
                self.listeners.add(request_id, queue, loop)
            self._send([Add(i, list(prompt), params, eos_id) for i, prompt in zip(ids, prompts)])
        return Stream(ids, queue, self.listeners, lambda request_id: self._send([Abort(request_id)]))

    def stats(self) -> EngineStats:
        """The child's engine's own counts, as of its latest step (sent with each step's outputs)."""
        return self._stats

    def abort_all(self) -> None:
        """Abort every request in flight; each stream gets its final output ("abort") with the
        engine's next step (a server at the end of its grace period)."""
        self._send([Abort(None)])

    @property
    def alive(self) -> bool:
        """Whether the engine process still runs (a health check's question)."""
        return self._process.poll() is None

    def shutdown(self) -> None:
        """Stop the engine process: it ends after its current step (killed if it has not within 5 s)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._conn.fileno())
        self._send([STOP])
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._kill()

    def _kill(self) -> None:
        """Kill the engine process (it ignores SIGTERM: see `STOP_SIGNALS`) and reap it."""
        self._process.kill()
        self._process.wait()

    def _send(self, messages: list) -> None:
        """Messages for the child's core (one pipe message for the requests of one submission)."""
        try:
            with self._send_lock:
                self._conn.send(messages)
        except OSError:  # the child is gone; the reader fails its requests
            pass

    def _attach(self) -> asyncio.AbstractEventLoop:
        """Read the pipe in the running event loop, as soon as a message is there: one wake-up per
        engine step, where a reader thread cost two (its own, then the loop's) and an
        interpreter-lock hand-off."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            loop.add_reader(self._conn.fileno(), self._read)
        elif loop is not self._loop:
            raise RuntimeError("an EngineProcess serves the requests of one event loop")
        return loop

    def _read(self) -> None:
        """Hand every step's outputs waiting in the pipe to their streams."""
        try:
            while self._conn.poll(0):
                outputs, self._stats = self._conn.recv()
                self.listeners.hand_out(outputs)
        except (EOFError, OSError):  # the child is gone: nothing more will come
            self._loop.remove_reader(self._conn.fileno())
            self.listeners.hand_out([RequestOutput(i, None, "error", "the engine process exited")
                                     for i in self.listeners.ids()])  # fmt: skip


def _start_ignoring_stop_signals(command: list[str], fd: int) -> subprocess.Popen:
    """Start `command` (passing it `fd`) with SIGINT and SIGTERM ignored from its first
    instruction (an ignored signal stays ignored across exec, and Python then leaves SIGINT
    alone): while it imports and loads, a Ctrl-C would otherwise end it with a traceback. Only the
    main thread may change signal handlers; elsewhere (a Ray replica) the child ignores them from
    `_child` on."""
    start = lambda: subprocess.Popen(command, pass_fds=(fd,), stdin=subprocess.DEVNULL)  # noqa: E731
    if threading.current_thread() is not threading.main_thread():
        return start()
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        return start()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _child(conn) -> None:
    """The child: build the engine, say so, then serve the pipe: requests in, one message per step
    out, until the parent says stop or is gone (the pipe's end: a parent killed leaves no engine
    behind)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    try:
        _serve_pipe(conn, conn.recv())
    except (EOFError, OSError):  # the parent is gone
        pass


def _serve_pipe(conn, spec: WorkerSpec) -> None:
    try:
        runtime, served = build(spec)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        conn.send(("failed", one_line(exc) if not isinstance(exc, TformerError) else str(exc)))
        return
    rest = {k: v for k, v in vars(served).items() if k not in ("config", "tokenizer")}
    conn.send(("ready", (vars(served.config).copy(), served.tokenizer.to_json() if served.tokenizer else None, rest)))
    front = runtime.front  # whose loop warmed up the backend, in this thread
    front.coalesce = Coalescer(spec.stream_interval)
    front.run(PipeInbox(conn), lambda outputs, stats: conn.send((outputs, stats)))


class PipeInbox:
    """The parent's messages, a list per pipe message, as `EngineCore.run` takes them."""

    def __init__(self, conn):
        self.conn = conn

    def take(self, wait: bool) -> list:
        messages = []
        while self.conn.poll(None if wait and not messages else 0):
            messages += self.conn.recv()
        return messages
