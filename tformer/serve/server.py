"""Running the app: `run` for `tformer serve` (signals, a grace period, one line on exit) and
`serve_in_thread` for tests and benchmarks (a real uvicorn server on a free port, in a thread)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import uvicorn

from tformer.runtime import Runtime
from tformer.serve.app import create_app
from tformer.serve.worker import EngineProcess


class _Server(uvicorn.Server):
    """uvicorn's server, which marks the app as draining (`/health` 503) as soon as it is told to
    stop, and does not re-raise the signal after its graceful shutdown (uvicorn does, so that the
    process dies of it): `tformer serve` ends with exit status 0 and one line."""

    def handle_exit(self, sig, frame) -> None:
        self.config.app.state.server.draining = True
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def run(source: Runtime | EngineProcess, host: str, port: int, grace: float = 30.0, **app_options) -> None:
    """Serve until SIGTERM or Ctrl-C; then stop accepting, let in-flight requests finish for up to
    `grace` seconds (the rest are cancelled, which aborts their engine requests), stop the engine
    and return."""
    app = create_app(source, **app_options)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=grace)
    try:
        _Server(config).run()
    finally:
        app.state.server.front.shutdown()


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
    server = _Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=5))
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
