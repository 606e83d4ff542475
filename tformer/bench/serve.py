"""The load generator behind `tformer-bench serve`: a seeded workload of streamed completions
against any OpenAI-compatible server (tformer's own `tformer serve`, vLLM, llama.cpp...), measured
as vLLM's `bench serve` measures it, so that the figures compare across servers.

It speaks only the OpenAI HTTP API: `POST /v1/completions` with the prompt as token ids (random,
seeded: no tokenizer needed on either side), `stream: true` and `stream_options.include_usage`,
reading the server-sent events as they come. Requests arrive as a Poisson process at a rate (or
all at once), at most `max_concurrency` in flight; a comma list of rates is a sweep over the same
requests. A request that fails (an HTTP error, a dropped connection, a timeout, an error event) is
counted and its message kept; it never stops the run. Given a MODEL instead of a URL, it starts
`tformer serve` on a free local port for the runs and, with `offline`, also runs the same workload
through tformer's engine in-process, so that the HTTP layer's cost shows side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from tformer.bench.cpu import CpuMeter
from tformer.bench.latency import RequestTiming, serving_metrics
from tformer.bench.stats import Spread
from tformer.bench.throughput import Workload, drive_workload
from tformer.backends.base import Backend
from tformer.engine import Engine
from tformer.engine.engine import DEFAULT_BATCH
from tformer.errors import TformerError, one_line
from tformer.runtime import load

if TYPE_CHECKING:
    import aiohttp

DEFAULT_VOCAB = 256  # random prompt ids stay below this when neither --vocab-size nor the server says more
TIMEOUT_S = 600.0  # to connect, and for each read between events: a stalled stream fails, a long one does not
SERVER_START_S = 600.0  # a compiling backend may warm up for minutes before /health answers 200
HTTP, OFFLINE = "http", "offline engine"
T = TypeVar("T")
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy from the environment, as aiohttp


@dataclass(frozen=True)
class ServeSettings:
    """One benchmark's workload and client settings; `rates`: requests/s per run, None = all at once."""

    rates: tuple[float | None, ...]
    num_prompts: int
    prompt_len: tuple[int, int]
    output_len: tuple[int, int]
    seed: int = 0
    max_concurrency: int | None = None
    model: str | None = None  # the served model's name; default: the first that /v1/models lists
    vocab_size: int | None = None  # default: the server's `vocab_size` in /v1/models, else DEFAULT_VOCAB
    ignore_eos: bool = True

    def workload(self, rate: float | None, vocab_size: int) -> Workload:
        return Workload.draw(self.num_prompts, self.prompt_len, self.output_len, vocab_size, rate, self.seed)


@dataclass
class ServeRecord:
    """One run: HTTP against the server, or the same workload through the engine in-process.
    Figures as `latency.serving_metrics` computes them (vLLM's names; latencies in ms)."""

    run: str  # HTTP or OFFLINE
    rate: float | None  # requests/s of the Poisson arrivals; None: all at once (inf)
    max_concurrency: int | None
    num_prompts: int
    output_tokens_from: str  # "usage" (the server's count), "chunks" (streamed text chunks), "engine"
    completed: int
    failed: int
    errors: list[str]  # the first distinct messages of failed requests
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft_ms: dict[str, float] | None
    tpot_ms: dict[str, float] | None
    itl_ms: dict[str, float] | None
    e2el_ms: dict[str, float] | None

    round: int = 0  # which round of the run (`--repeats`)
    # CPU microseconds per output token of each process in the run (`CpuMeter`): "client" (this
    # one), and for a server started here "server" and "engine" (its child); offline: "engine"
    cpu_us_per_token: dict[str, float] | None = None

    @classmethod
    def of(cls, run: str, rate: float | None, settings: ServeSettings, timings: Sequence[RequestTiming],
           duration: float, source: str, round_: int = 0, cpu: tuple[dict, dict] | None = None) -> ServeRecord:  # fmt: skip
        """`cpu`: `CpuMeter` readings before and after the run."""
        metrics = serving_metrics(timings, duration)
        per_token = CpuMeter.per_token(*cpu, metrics["total_output_tokens"]) if cpu else None
        return cls(run, rate, settings.max_concurrency, len(timings), source, **metrics, round=round_,
                   cpu_us_per_token=per_token)  # fmt: skip

    @property
    def flagged(self) -> bool:
        return self.failed > 0


def require_aiohttp() -> None:
    """aiohttp is imported where requests are sent, so that the other benchmarks run without it."""
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise TformerError("tformer-bench serve needs aiohttp: pip install 'tformer[serve]'") from None


def parse_rates(text: str) -> tuple[float | None, ...]:
    """"inf" or "2" or "1,2,inf" -> requests/s per run (None = all at once)."""
    rates = []
    for part in (p.strip() for p in text.split(",")):
        try:
            rate = None if part.lower() == "inf" else float(part)
        except ValueError:
            rate = 0.0
        if rate is not None and not 0 < rate < float("inf"):
            raise TformerError(f"--request-rate must be inf or positive numbers, comma-separated; got {text!r}")
        rates.append(rate)
    return tuple(rates)


def rate_label(rate: float | None) -> str:
    return "inf" if rate is None else f"{rate:g}"


def feed(timing: RequestTiming, line: str, now: float) -> bool:
    """One line of a completion's event stream into `timing`; True when the stream is over
    (`data: [DONE]`, or an error, which sets `timing.error`). A chunk whose first choice carries
    text (or, from tformer serve, token ids: a model without a tokenizer streams no text) is a
    piece of output; a `usage` object gives the token count. Blank lines, comments and
    other SSE fields are skipped."""
    if not line.startswith("data:"):
        return False
    data = line[5:].strip()
    if data == "[DONE]":
        timing.end = now
        if not timing.token_times:
            timing.error = "the stream ended without any text"
        return True
    try:
        chunk = json.loads(data)
        if "error" in chunk:
            error = chunk["error"]
            timing.error = "error event: " + str(error.get("message", error) if isinstance(error, dict) else error)
            return True
        choices = chunk.get("choices") or []
        if choices and (choices[0].get("text") or choices[0].get("token_ids")):  # token_ids: tformer's extension
            timing.token_times.append(now)
        usage = chunk.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            timing.output_tokens = int(usage["completion_tokens"])
    except (ValueError, AttributeError, TypeError):
        timing.error = f"not an OpenAI completion chunk: {data[:80]!r}"
        return True
    return False


async def send(session: aiohttp.ClientSession, url: str, payload: dict, timing: RequestTiming) -> RequestTiming:
    """POST one streamed completion and time its events into `timing`; any failure is recorded
    in `timing.error`, never raised. The body is read as it arrives and cut into lines here: each
    piece of output costs the client a few microseconds, so that a load generator on the server's
    own machine takes as little of its CPU as it can (httpx's line iterator cost about 150 us a
    chunk, as much as the server spent writing it)."""
    import aiohttp

    timing.sent = time.perf_counter()
    try:
        async with session.post(f"{url}/v1/completions", json=payload) as response:
            if response.status != 200:
                body = (await response.read()).decode(errors="replace").strip()
                timing.error = f"HTTP {response.status}: {body[:200] or response.reason}"
                return timing
            rest = b""
            async for data in response.content.iter_any():
                now = time.perf_counter()
                *lines, rest = (rest + data).split(b"\n")
                for line in lines:
                    if feed(timing, line.decode(errors="replace"), now):
                        return timing
            if rest and feed(timing, rest.decode(errors="replace"), time.perf_counter()):
                return timing
            timing.error = "the stream ended before data: [DONE]"
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        timing.error = f"{type(exc).__name__}: {one_line(exc) or 'timed out'}"
    return timing


def _headers() -> dict[str, str]:
    """The key in OPENAI_API_KEY, if set, as a bearer token (as vLLM's client sends it)."""
    key = os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _payload(model: str, prompt: list[int], max_tokens: int, ignore_eos: bool) -> dict:
    payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
               "stream_options": {"include_usage": True}}  # fmt: skip
    if ignore_eos:  # vLLM's extension (its bench sends it the same way); servers without it ignore it or refuse it
        payload["ignore_eos"] = True
    return payload


async def run_requests(
    url: str,
    model: str,
    workload: Workload,
    max_concurrency: int | None = None,
    ignore_eos: bool = True,
    progress: Callable[[int], None] = lambda _: None,
) -> tuple[list[RequestTiming], float]:
    """Send each request of `workload` at its arrival time (at most `max_concurrency` in flight);
    their timings, in workload order, and the run's seconds. `progress(done)` after each one."""
    import aiohttp

    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    done = 0
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=TIMEOUT_S, sock_read=TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=0)  # no cap on connections: the workload sets the concurrency
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, headers=_headers()) as session:
        began = time.perf_counter()

        async def one(arrival: float, prompt: list[int], max_tokens: int) -> RequestTiming:
            nonlocal done
            await asyncio.sleep(max(0.0, began + arrival - time.perf_counter()))
            async with limit:
                timing = await send(session, url, _payload(model, prompt, max_tokens, ignore_eos), RequestTiming(len(prompt)))
            done += 1
            progress(done)
            return timing

        timings = await asyncio.gather(*(one(*request) for request in workload.requests))
        return list(timings), time.perf_counter() - began


def _run(main: Coroutine[Any, Any, T]) -> T:
    """Run the load generator's coroutine on uvloop where it is installed (its event loop costs
    the client less CPU per streamed chunk, which it shares with a server on the same machine)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def served_model(url: str, name: str | None = None) -> dict:
    """The model object of `name` (default: the first) in `url`'s /v1/models: its `id`, and the
    `vocab_size` and `max_model_len` extensions where the server adds them."""
    try:
        with _DIRECT.open(urllib.request.Request(f"{url}/v1/models", headers=_headers()), timeout=TIMEOUT_S) as r:
            models = json.loads(r.read())["data"]
        if not all(isinstance(m["id"], str) for m in models):
            raise TypeError("a model without a string id")
    except (OSError, ValueError, KeyError, TypeError) as exc:  # URLError and HTTPError are OSErrors
        raise TformerError(f"cannot list the models at {url}/v1/models ({one_line(exc)}); is it an OpenAI-compatible server?") from None
    if not models:
        raise TformerError(f"{url}/v1/models lists no model")
    if name is None:
        return models[0]
    if name not in (m["id"] for m in models):
        known = ", ".join(m["id"] for m in models)
        raise TformerError(f"{url} serves no model named {name!r}; it serves: {known} (--model)")
    return next(m for m in models if m["id"] == name)


def connect(url: str, settings: ServeSettings, progress: Callable[[str], None] = lambda _: None) -> dict:
    """What the runs need of the server at `url`, checked with one request first: `url`, `model`
    (its name there), `vocab_size` (random prompt ids stay below it) and `vocab_from`."""
    url = url.rstrip("/")
    info = served_model(url, settings.model)
    vocab, vocab_from = next((v, f) for v, f in ((settings.vocab_size, "--vocab-size"), (info.get("vocab_size"), "server"),
                                                 (DEFAULT_VOCAB, "default")) if v)  # fmt: skip
    longest = settings.prompt_len[1] + settings.output_len[1]
    if isinstance(info.get("max_model_len"), int) and longest > info["max_model_len"]:
        raise TformerError(f"the longest request ({longest} tokens) exceeds the server's max_model_len of {info['max_model_len']}")
    progress("checking the server with one request")
    first = settings.workload(None, vocab).requests[:1]
    check = _run(run_requests(url, info["id"], Workload(first), ignore_eos=settings.ignore_eos))[0][0]
    if not check.ok:
        raise TformerError(f"the server failed a first test request: {check.error} (random prompt ids are below {vocab}: --vocab-size)")
    return {"url": url, "model": info["id"], "vocab_size": vocab, "vocab_from": vocab_from}


def run_http(server: dict, settings: ServeSettings, rate: float | None, round_: int = 0,
             progress: Callable[[str], None] = lambda _: None, meter: CpuMeter = CpuMeter()) -> ServeRecord:  # fmt: skip
    """One run of the workload at `rate` against the server that `connect` checked; `meter`
    reads the CPU time of the processes it knows before and after."""

    def note(done: int) -> None:
        progress(f"round {round_ + 1}, HTTP, rate {rate_label(rate)}: {done}/{settings.num_prompts} requests done")

    note(0)
    workload = settings.workload(rate, server["vocab_size"])
    before = meter.read()
    timings, duration = _run(run_requests(server["url"], server["model"], workload, settings.max_concurrency,
                                          settings.ignore_eos, note))  # fmt: skip
    cpu = (before, meter.read())
    counted = {"usage" if t.output_tokens is not None else "chunks" for t in timings if t.ok}
    return ServeRecord.of(HTTP, rate, settings, timings, duration, "+".join(sorted(counted)) or "-", round_, cpu)


def offline_engine(backend: Backend, settings: ServeSettings, vocab_size: int, max_batch_size: int) -> Engine:
    """An engine in this process sized as the server's (`max_batch_size` rows), warmed up with a
    batch of the workload as the server warms up: the runs without HTTP."""
    workloads = [settings.workload(rate, vocab_size) for rate in settings.rates]
    engine = Engine(backend, max_batch_size, max(w.longest for w in workloads))
    drive_workload(engine, Workload([(0.0, p, n) for _, p, n in workloads[0].requests[:max_batch_size]]))
    return engine


def run_offline(engine: Engine, settings: ServeSettings, rate: float | None, vocab_size: int, round_: int = 0,
                progress: Callable[[str], None] = lambda _: None) -> ServeRecord:  # fmt: skip
    """One run of the workload at `rate` through `engine` in this process."""
    progress(f"round {round_ + 1}, offline engine, rate {rate_label(rate)}")
    meter = CpuMeter(this="engine")
    before = meter.read()
    timings, duration = drive_workload(engine, settings.workload(rate, vocab_size), max_concurrency=settings.max_concurrency)
    return ServeRecord.of(OFFLINE, rate, settings, timings, duration, "engine", round_, (before, meter.read()))


def benchmark_url(
    url: str, settings: ServeSettings, progress: Callable[[str], None] = lambda _: None, repeats: int = 1
) -> tuple[list[ServeRecord], dict]:  # fmt: skip
    """`repeats` rounds of one HTTP run per rate against the server at `url`. Returns the records
    and what `connect` found of the server."""
    server = connect(url, settings, progress)
    return [run_http(server, settings, rate, r, progress) for r in range(repeats) for rate in settings.rates], server


def benchmark_model(
    model: str,
    settings: ServeSettings,
    nhead: int | None = None,
    backend: str | None = None,
    tokenizer: str | None = None,
    max_batch_size: int = DEFAULT_BATCH,
    offline: bool = False,
    progress: Callable[[str], None] = lambda _: None,
    repeats: int = 1,
    threads: int | None = None,
    stream_interval: int = 1,
) -> tuple[list[ServeRecord], dict]:
    """`repeats` rounds against `tformer serve MODEL` started for them (and stopped after); with
    `offline`, each round also runs the same workload through the engine in this process, the
    two never at once (the idle server takes no CPU), in alternating order, so that a noisy spell
    of the machine costs both kinds of run alike. `threads`: torch threads of the server's engine
    and of the offline one (default: torch's own); `stream_interval`: the server's. Records per
    round and rate: the offline row and the HTTP row."""
    options = [*(["--nhead", str(nhead)] if nhead else []), *(["--backend", backend] if backend else []),
               *(["--tokenizer", tokenizer] if tokenizer else []), *(["--model-name", settings.model] if settings.model else []),
               *(["--threads", str(threads)] if threads else []), "--stream-interval", str(stream_interval),
               "--max-batch-size", str(max_batch_size)]  # fmt: skip
    progress("starting tformer serve")
    with local_server(model, options) as (url, pid):
        server, meter = connect(url, settings, progress), CpuMeter(pid)
        engine = None
        if offline:
            progress("offline engine: loading and warming up")
            if threads:
                torch.set_num_threads(threads)
            runtime = load(model, backend, nhead=nhead, tokenizer=tokenizer, max_batch_size=1, max_len=2)  # its backend
            engine = offline_engine(runtime.backend, settings, server["vocab_size"], max_batch_size)
        records = []
        for r in range(repeats):
            for rate in settings.rates:
                runs = [lambda: run_http(server, settings, rate, r, progress, meter)]
                if engine is not None:
                    runs.append(lambda: run_offline(engine, settings, rate, server["vocab_size"], r, progress))
                pair = [run() for run in (runs[::-1] if r % 2 else runs)]  # which runs first alternates
                records += sorted(pair, key=lambda record: record.run != OFFLINE)
    return records, server


def ratios(records: Sequence[ServeRecord]) -> list[dict]:
    """Per request rate with both kinds of run: HTTP's output tokens/s and ITL p50 over the
    offline engine's, per round, as median, min and max over the rounds (`Spread`)."""
    out = []
    for rate in dict.fromkeys(r.rate for r in records):
        pairs = {}
        for r in records:
            if r.rate == rate:
                pairs.setdefault(r.round, {})[r.run] = r
        both = [p for p in pairs.values() if len(p) == 2 and p[OFFLINE].output_throughput > 0]
        if not both:
            continue
        tok = [p[HTTP].output_throughput / p[OFFLINE].output_throughput for p in both]
        itl = [p[HTTP].itl_ms["p50"] / p[OFFLINE].itl_ms["p50"] for p in both if p[HTTP].itl_ms and p[OFFLINE].itl_ms]
        out.append({"rate": rate, "rounds": len(both), "output_throughput": vars(Spread.of(tok)),
                    "itl_p50": vars(Spread.of(itl)) if itl else None})  # fmt: skip
    return out


def free_port() -> int:
    """A local TCP port free right now (the OS picks it; another process could take it before the server does)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_server(model: str, options: Sequence[str] = (), timeout: float = SERVER_START_S) -> Iterator[tuple[str, int]]:
    """`tformer serve MODEL OPTIONS` on a free local port, in a process of its own; yields its URL
    and process id once GET /health answers 200, and stops it (SIGTERM, then SIGKILL after 30 s)
    afterwards."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "tformer", "serve", model, "--host", "127.0.0.1", "--port", str(port), *options]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            _wait_ready(url, process, log, timeout)
            yield url, process.pid
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(url: str, process: subprocess.Popen, log, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise TformerError(f"tformer serve exited with code {process.returncode} before it was ready: {_tail(log)}")
        with contextlib.suppress(OSError), _DIRECT.open(f"{url}/health", timeout=5) as response:
            if response.status == 200:
                return
        time.sleep(0.25)
    raise TformerError(f"tformer serve was not ready after {timeout:.0f} s (GET {url}/health): {_tail(log)}")


def _tail(log, lines: int = 3) -> str:
    """The last lines the server printed, on one line."""
    log.seek(0)
    text = [line.strip() for line in log.read().decode(errors="replace").splitlines() if line.strip()]
    return " | ".join(text[-lines:]) or "(it printed nothing)"
