"""The HTTP app: OpenAI's completions and chat completions on tformer's engine, with SSE streaming.

Every request's prompts become engine requests through the engine's front (`EngineFront`, the
engine's one loop on a thread of its own, for every connection; or `EngineProcess`), so requests
from all clients share the running batch. Text is built token by token with `Completion` (whole
characters, cut at stop strings, EOS dropped), exactly as `Runtime.generate` builds it, so a
greedy completion over HTTP is the in-process one. A client that goes away mid-stream closes its
generator, which aborts its requests: the rows are free at the next engine step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tformer.engine.front import Coalescer, EngineFront
from tformer.engine.output import Completion
from tformer.engine.request import RequestOutput, check_prompt
from tformer.errors import TformerError
from tformer.runtime import Runtime
from tformer.serve.metrics import Metrics
from tformer.serve.protocol import APIError, Job, check_chat, check_completion
from tformer.serve.worker import EngineProcess, Served

PLAYGROUND = Path(__file__).with_name("playground.html")
LIMIT, FIX = "this server's max_len", "shorten the prompt or lower max_tokens"  # the words of a prompt too long


@dataclass
class Event:
    """A piece of one choice's completion: its text and token ids, and its finish reason at the end."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class Choice:
    """One prompt's completion in progress (`Completion`: whole characters, cut at stop strings,
    EOS dropped, as `Runtime.generate` builds it), and what its metrics need. The text is decoded
    here, on the event loop, token by token: each token is a few bytes of work, bounded, unlike
    a prompt's tokenizing, which `Server.prompts` sends to a worker thread."""

    index: int
    completion: Completion  # without a tokenizer, the client gets token ids only
    began: float
    first: float | None = None  # when its first token came
    count: int = 0
    outcome: str = "abort"  # until it ends otherwise

    def take(self, outputs: list[RequestOutput]) -> Event | None:
        """The event of this choice's newest outputs; None once it has ended."""
        if self.completion.finished:
            return None
        piece = self.completion.take(outputs)
        if piece.finish_reason == "error":
            self.outcome = "error"
            raise APIError(500, f"generation failed: {piece.error}", kind="server_error")
        if piece.token_ids:
            self.count += len(piece.token_ids)
            self.first = self.first or time.perf_counter()
        if piece.finish_reason is not None:
            self.outcome = piece.finish_reason
        return Event(self.index, piece.text, piece.token_ids, piece.finish_reason)


@dataclass
class Totals:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    texts: dict[int, str] = field(default_factory=dict)
    token_ids: dict[int, list[int]] = field(default_factory=dict)
    finish: dict[int, str | None] = field(default_factory=dict)

    def add(self, event: Event) -> None:
        self.texts[event.index] = self.texts.get(event.index, "") + event.text
        self.token_ids.setdefault(event.index, []).extend(event.token_ids)
        self.completion_tokens += len(event.token_ids)
        self.finish[event.index] = event.finish_reason

    def usage(self) -> dict:
        total = self.prompt_tokens + self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": total}


class Server:
    """The state behind the routes: what is served, the engine's front (`EngineFront` here, or
    `EngineProcess`), metrics, readiness."""

    def __init__(self, front: EngineFront | EngineProcess, served: Served, model_name: str, max_waiting: int,
                 replica: str | None = None):  # fmt: skip
        self.front = front
        self.served = served
        self.metrics = Metrics(front.stats, served.max_batch_size)
        self.model_name = model_name
        self.max_waiting = max_waiting
        self.draining = False
        # Which server answered, in an `x-tformer-replica` header of each completion (Ray Serve's replicas)
        self.headers = {"x-tformer-replica": replica} if replica else {}

    def trouble(self) -> str | None:
        """Why this server cannot take requests ("draining", "engine down"), or None: `/health`."""
        if self.draining:
            return "draining"
        return None if self.front.alive else "engine down"

    async def drain(self, grace: float, hurry: Callable[[], bool] = lambda: False) -> int:
        """A server's shutdown: take no more requests (503; `/health` says draining), give those
        in flight `grace` seconds to finish (less if `hurry()` turns true), then abort the rest in
        the engine, so that each ends with its final event (finish_reason "abort") rather than a
        cut connection. Returns how many were aborted."""
        self.draining = True
        end = time.monotonic() + grace
        while self.front.listeners and not hurry() and (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 0.1))
        aborted = len(self.front.listeners)
        self.front.abort_all()
        return aborted

    async def prompts(self, job: Job) -> tuple[list[list[int]], list[str]]:
        """Each prompt's ids (checked against the engine's limits) and its text for `echo`.
        Text is tokenized (and ids decoded for `echo`) on a worker thread, never on the event loop
        that serves every other connection; a text with more bytes than its share of the context
        could hold (`longest_token_bytes` a token) is refused before any tokenizing."""
        if self.draining:
            raise APIError(503, "the server is shutting down; retry on another", code="shutting_down",
                           kind="server_error")  # fmt: skip
        tokenizer, served = self.served.tokenizer, self.served
        if job.texts is not None and tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send 'prompt' as token ids", "prompt")
        if job.params.stop and tokenizer is None:
            raise APIError(400, "'stop' strings need a tokenizer, and this model has none", "stop")
        if job.texts is not None:
            for i, text in enumerate(job.texts):
                self._check_text_length(i, text, job.params.max_new_tokens)
            ids = await asyncio.to_thread(lambda: [tokenizer.encode(t) for t in job.texts])
        else:
            ids = job.ids
        for i, prompt in enumerate(ids):
            try:
                check_prompt(prompt, job.params.max_new_tokens, served.config.vocab_size, served.max_len, f"prompt {i}",
                             LIMIT, FIX)  # fmt: skip
            except TformerError as exc:
                raise APIError(400, str(exc), "prompt", "context_length_exceeded" if "exceeds" in str(exc) else None)
        if job.texts is not None or not job.echo or tokenizer is None:
            texts = job.texts or [""] * len(ids)
        else:
            texts = await asyncio.to_thread(lambda: [tokenizer.decode(p) for p in ids])
        # The requests this server has in flight (the fronts' listeners): known at once, where the engine
        # process's stats come a step later; the engine's own counts are for /metrics.
        if len(self.front.listeners) + len(ids) > self.max_waiting + served.max_batch_size:
            raise APIError(503, f"the server is at capacity ({self.max_waiting} requests waiting); retry shortly",
                           code="overloaded", kind="server_error")  # fmt: skip
        return ids, texts

    def _check_text_length(self, i: int, text: str, max_new_tokens: int) -> None:
        """Refuse a text that must take more tokens than the context leaves it: more UTF-8 bytes
        than `longest_token_bytes` times that many. Its length in characters is a lower bound of
        its bytes: a huge text is refused without even encoding it."""
        per_token, max_len = self.served.tokenizer.longest_token_bytes, self.served.max_len
        most = max(max_len - max_new_tokens, 0) * per_token
        if len(text) > most or len(text.encode()) > most:
            raise APIError(400, f"prompt {i} is over {most} bytes of text, more than the {most // per_token} tokens "
                                f"that max_tokens={max_new_tokens} leaves of {LIMIT} of {max_len} tokens can hold (a "
                                f"token is at most {per_token} bytes): {FIX}", "prompt", "context_length_exceeded")

    async def events(self, job: Job, ids: list[list[int]]) -> AsyncIterator[list[Event]]:
        """Every choice's events as the engine makes them: a list per engine step, one event for
        each choice that moved. Closing this generator (a client gone) aborts the engine requests
        still running; each choice's metrics are recorded then."""
        tokenizer = self.served.tokenizer
        eos = None if job.ignore_eos else self.served.eos_id
        began = time.perf_counter()
        choices = [Choice(i, Completion(tokenizer, job.params.stop), began) for i in range(len(ids))]
        stream = self.front.submit(ids, job.params, eos_id=eos)
        request_ids = list(stream.index)  # in prompt order
        self.metrics.prompt_tokens.inc(sum(map(len, ids)))
        try:
            async for batch in stream:
                moved: dict[int, list[RequestOutput]] = {}
                for out in batch:
                    moved.setdefault(stream.index[out.request_id], []).append(out)
                events = [event for i, outputs in moved.items() if (event := choices[i].take(outputs)) is not None]
                for event in events:
                    if event.finish_reason is not None:
                        stream.abort(request_ids[event.index])  # a stop string ended it before the engine did
                yield events
        finally:
            await stream.aclose()
            for choice in choices:
                self._record(choice)

    def _record(self, choice: Choice) -> None:
        m, now = self.metrics, time.perf_counter()
        m.requests.labels(choice.outcome).inc()
        if choice.first is not None:
            m.ttft.observe(choice.first - choice.began)
            m.e2e.observe(now - choice.began)
            if choice.count > 1:
                m.tpot.observe((now - choice.first) / (choice.count - 1))


def default_body_limit(served: Served) -> int:
    """`--max-body-bytes`' default: 1 MiB (nginx's default), or what one prompt of the whole
    context can take if that is more: 6 bytes (JSON's longest escape of a byte, `\\u00XX`) per
    byte of the longest token, and at least 8 (a token id and its separator), per token of max_len."""
    per_token = max(8, 6 * served.tokenizer.longest_token_bytes) if served.tokenizer is not None else 8
    return max(2**20, served.max_len * per_token)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is refused with 413 before it is read:
    at its first read by its Content-Length, a chunked one at the read that passes the limit. The
    refusal is an `APIError` raised from `receive`, which the app answers with its error object;
    being part of the app, it holds under Ray Serve's proxy as under uvicorn."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = next((value for name, value in scope["headers"] if name == b"content-length"), b"")
        seen = int(declared) if declared.isdigit() else 0
        too_large = APIError(413, f"the request body is over this server's limit of {self.limit} bytes "
                                  "(--max-body-bytes): send a shorter prompt", code="request_too_large")  # fmt: skip

        async def limited() -> dict:
            nonlocal seen
            if seen > self.limit:
                raise too_large
            message = await receive()
            if not declared and message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise too_large
            return message

        await self.app(scope, limited, send)


def create_app(source: Runtime | EngineProcess, model_name: str = "tformer", max_waiting: int = 64,
               api_key: str | None = None, stream_interval: int = 1, replica: str | None = None,
               max_body_bytes: int | None = None) -> FastAPI:  # fmt: skip
    """The app for `source`: a `Runtime` (its engine, sized already by `Runtime(..., max_batch_size,
    max_len)`, steps on its thread, `Runtime.front`) or an `EngineProcess` (`tformer serve`).
    `api_key`: every `/v1/*` call must send `Authorization: Bearer <api_key>`. `stream_interval`:
    tokens per streamed chunk for a `Runtime` (its own calls get them so grouped too; an
    `EngineProcess` has its own, in its spec).
    `replica`: this server's name among several, sent as `x-tformer-replica` with each completion.
    `max_body_bytes`: the largest request body taken (413 beyond; default: `default_body_limit`)."""
    if isinstance(source, Runtime):
        front, served = source.front, Served.of(source)
        front.coalesce = Coalescer(stream_interval)
        front.start()  # an event loop cannot take the engine's turns: its loop runs on a thread
    else:
        front, served = source, source.served
    server = Server(front, served, model_name, max_waiting, replica)
    app = FastAPI(title="tformer", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(BodyLimit, limit=max_body_bytes or default_body_limit(served))

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        if exc.status < 500 or exc.status == 503:  # refused before any generation
            server.metrics.requests.labels("rejected").inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    async def authorized(request: Request) -> None:  # async: FastAPI would run a plain def on a thread pool
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])

    @v1.get("/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "tformer",
                "max_model_len": server.served.max_len, "vocab_size": server.served.config.vocab_size}  # fmt: skip
        return {"object": "list", "data": [card]}

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        job = check_completion(await _json(request), model_name)
        return await _answer(server, job, "text_completion", chat=False)

    @v1.post("/chat/completions")
    async def chat(request: Request) -> Response:
        job = check_chat(await _json(request), model_name)
        return await _answer(server, job, "chat.completion", chat=True)

    app.include_router(v1)

    @app.get("/health")
    async def health() -> JSONResponse:
        trouble = server.trouble()
        return JSONResponse({"status": trouble or "ok"}, status_code=200 if trouble is None else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def playground() -> HTMLResponse:
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

    return app


async def _json(request: Request) -> object:
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc})") from None


async def _answer(server: Server, job: Job, kind: str, chat: bool) -> Response:
    ids, texts = await server.prompts(job)
    totals = Totals(prompt_tokens=sum(map(len, ids)))
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": server.model_name}  # fmt: skip
    events = server.events(job, ids)
    if not job.stream:
        try:
            async for step in events:
                for event in step:
                    totals.add(event)
        finally:
            await events.aclose()
        choices = [_choice(i, totals.texts.get(i, ""), totals.token_ids.get(i, []), totals.finish.get(i), chat,
                           texts[i] if job.echo else "") for i in range(len(ids))]  # fmt: skip
        body = {**head, "object": kind, "choices": choices, "usage": totals.usage()}
        return JSONResponse(body, headers=server.headers)
    try:
        first = await anext(events)  # before the 200 goes out: an error here is still an error status
    except StopAsyncIteration:
        first = None
    except BaseException:
        await events.aclose()
        raise
    chunk_kind = "chat.completion.chunk" if chat else "text_completion"
    return EventStream(_sse(events, first, totals, head | {"object": chunk_kind}, job, chat, texts), server.headers)


class EventStream(Response):
    """A server-sent event stream: each piece of `body` is sent as it comes, in one ASGI message.
    Leaner than Starlette's StreamingResponse, which costs tens of microseconds a piece more on a
    busy server; a client that disconnects cancels the stream (its generator closes, which aborts
    the engine requests)."""

    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[bytes], headers: dict[str, str] | None = None):
        self.status_code, self.background, self.pieces = 200, None, body
        self.init_headers({"cache-control": "no-cache", **(headers or {})})  # no content-length: sent in pieces

    async def __call__(self, scope, receive, send) -> None:
        streaming = asyncio.create_task(self._stream(send))
        watching = asyncio.create_task(_disconnected(receive))
        try:
            await asyncio.wait((streaming, watching), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streaming, watching):
                task.cancel()
            await asyncio.gather(streaming, watching, return_exceptions=True)
        error = None if streaming.cancelled() else streaming.exception()
        if error is not None and not isinstance(error, OSError):  # OSError: the client is gone (ASGI 2.4 servers)
            raise error

    async def _stream(self, send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for piece in self.pieces:
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self.pieces.aclose()


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _sse(events, first, totals: Totals, head: dict, job: Job, chat: bool, texts: list[str]) -> AsyncIterator[bytes]:
    """OpenAI's stream: one chunk per event (chat opens each choice with its role), the usage
    chunk when asked for, then `[DONE]`. The chunks of one engine step go out in one write. An
    error after the first chunk is sent as an error event."""
    # The fields every chunk repeats, encoded once: a chunk then costs one small json.dumps.
    fixed = json.dumps(head)[1:-1] + (', "usage": null' if job.include_usage else "")

    def chunk(choice: dict) -> str:
        return f'data: {{{fixed}, "choices": [{json.dumps(choice)}]}}\n\n'

    if chat:
        opening = [chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}) for i in range(len(texts))]  # fmt: skip
    else:
        opening = [chunk(_choice(i, text, [], None, chat=False)) for i, text in enumerate(texts)] if job.echo else []
    try:
        step = first or []
        while True:
            for event in step:
                totals.completion_tokens += len(event.token_ids)  # the stream needs only the count
            if pieces := opening + [chunk(_choice(e.index, e.text, e.token_ids, e.finish_reason, chat, delta=True))
                                    for e in step]:  # fmt: skip
                yield "".join(pieces).encode()
            opening = []
            try:
                step = await anext(events)
            except StopAsyncIteration:
                break
    except APIError as exc:
        yield f"data: {json.dumps(exc.body())}\n\n".encode()
        return
    finally:
        await events.aclose()
    usage = f"data: {json.dumps({**head, 'choices': [], 'usage': totals.usage()})}\n\n" if job.include_usage else ""
    yield f"{usage}data: [DONE]\n\n".encode()


def _choice(index: int, text: str, token_ids: list[int], finish: str | None, chat: bool, echo: str = "",
            delta: bool = False) -> dict:  # fmt: skip
    """A choice (or a streamed chunk's choice), with tformer's `token_ids` extension: the ids behind
    the text, so that clients of a model without a tokenizer see what was generated."""
    if chat:
        body = {"delta": {"content": text} if text or not finish else {}} if delta else {
            "message": {"role": "assistant", "content": text}}  # fmt: skip
    else:
        body = {"text": echo + text}
    return {"index": index, **body, "token_ids": token_ids, "logprobs": None, "finish_reason": finish}
