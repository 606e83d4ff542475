"""Running the app: `run` for `tformer serve` (signals, a grace period, final events) and
`serve_in_thread` for tests and benchmarks (a real uvicorn server on a free port, in a thread)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator

import uvicorn

from tformer.runtime import Runtime
from tformer.serve.app import create_app
from tformer.serve.worker import EngineProcess

BACKSTOP_S = 3.0  # after the grace period: uvicorn cancels what its aborts have not ended by then


class _Server(uvicorn.Server):
    """uvicorn's server, stopping as a model server must. At the first SIGTERM or SIGINT it stops
    accepting and marks the app draining (`/health` 503, new requests 503); requests in flight
    have `grace` seconds to finish; then (or at once, at a second signal) every engine request
    still in flight is aborted, so that each stream ends with a final chunk (finish_reason
    "abort") and `[DONE]` and each non-streamed request gets its JSON (finish_reason "abort"),
    where uvicorn alone would cut them. uvicorn's own `timeout_graceful_shutdown` stays a
    backstop a few seconds later. The signal is not re-raised after (uvicorn does, so that the
    process dies of it): `stopped_by` tells the CLI which one came, for its exit status."""

    def __init__(self, config: uvicorn.Config, grace: float, say: Callable[[str], None] = lambda line: None):
        config.timeout_graceful_shutdown = grace + BACKSTOP_S
        super().__init__(config)
        self.grace, self.say = grace, say
        self.stopped_by: int | None = None  # the first signal
        self._hurry = False  # a second signal: abort now

    def handle_exit(self, sig, frame) -> None:
        if self.stopped_by is None:
            self.stopped_by = sig
        else:
            self._hurry = True
        self.config.app.state.server.draining = True
        self.should_exit = True

    async def shutdown(self, sockets=None) -> None:
        if self.stopped_by is not None:
            self.say(f"tformer serve: {signal.Signals(self.stopped_by).name}: not accepting; requests in flight "
                     f"have {self.grace:g} s (--grace) to finish")  # fmt: skip
        deadline = asyncio.create_task(self._end_of_grace())
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()

    async def _end_of_grace(self) -> None:
        if aborted := await self.config.app.state.server.drain(self.grace, lambda: self._hurry):
            self.say(f"tformer serve: aborted {aborted} request(s) still in flight")


def run(source: Runtime | EngineProcess, host: str, port: int, grace: float = 30.0,
        say: Callable[[str], None] = lambda line: None, **app_options) -> int | None:  # fmt: skip
    """Serve until SIGTERM or SIGINT; then stop accepting, let in-flight requests finish for up to
    `grace` seconds, abort the rest (their streams end with a final event, see `_Server`), stop
    the engine and return the signal that stopped it. `say(line)`: what it tells its operator."""
    app = create_app(source, **app_options)
    server = _Server(uvicorn.Config(app, host=host, port=port, log_level="warning"), grace, say)
    try:
        server.run()
    finally:
        app.state.server.front.shutdown()
    return server.stopped_by


@contextlib.contextmanager
def serve_in_thread(
    runtime: Runtime, max_batch_size: int | None = None, max_len: int | None = None, **app_options
) -> Iterator[str]:
    """A real server for `runtime` on a free port of 127.0.0.1, in a background thread; yields its
    base URL (`http://127.0.0.1:PORT`) once it accepts connections, and stops it on exit.
    `max_batch_size`, `max_len`: size its engine (else the runtime's own sizing);
    `app_options`: those of `create_app` (model_name, max_waiting, api_key, stream_interval)."""
    if max_batch_size is not None or max_len is not None:
        runtime = Runtime(runtime.backend, runtime.tokenizer, max_batch_size, max_len)
    app = create_app(runtime, **app_options)
    server = _Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"), grace=0)
    thread = threading.Thread(target=server.run, name="tformer-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        app.state.server.front.shutdown()
