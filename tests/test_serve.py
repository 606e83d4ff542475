"""`tformer serve` over real HTTP: a uvicorn server on a free port, spoken to with the official
`openai` client (and raw HTTP for what that client hides). The reference for every text is the
same model in-process (`Runtime.generate`), which the engine tests tie to the tutorial's model."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from click.testing import CliRunner

from serve_support import (group_alive, long_model, metrics, raw_post, start_cli, stop, stream, up, wait_for,
                           wait_up)  # fmt: skip
from tformer.bench.serve import free_port
from tformer.checkpoint import save_checkpoint
from tformer.cli import cli
from tformer.runtime import Runtime
from tformer.serve.server import serve_in_thread

from conftest import token_ids

PROMPTS = ["def ", "import os\n", "class Foo", "return self."]
NAME = "tiny"


@pytest.fixture(scope="module")
def runtime(trained):
    model, tokenizer = trained
    return Runtime.from_model(copy.deepcopy(model), tokenizer, device="cpu")


@pytest.fixture(scope="module")
def served(runtime):
    """A server with 4 cache rows and room for 16 waiting requests: (base URL, runtime)."""
    sized = Runtime(runtime.backend, runtime.tokenizer, max_batch_size=4, max_len=256)
    with serve_in_thread(sized, model_name=NAME, max_waiting=16) as url:
        yield url, sized


def client(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


def test_greedy_completions_equal_the_model_in_process(served):
    url, rt = served
    want = [out.text for out in rt.generate(PROMPTS, max_new_tokens=24, temperature=0)]
    c = client(url)
    got = c.completions.create(model=NAME, prompt=PROMPTS, max_tokens=24, temperature=0)
    assert [ch.text for ch in sorted(got.choices, key=lambda ch: ch.index)] == want
    assert got.usage.prompt_tokens == sum(len(rt.tokenizer.encode(p)) for p in PROMPTS)
    assert got.usage.completion_tokens > 0 and all(ch.finish_reason in ("stop", "length") for ch in got.choices)
    streamed = c.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=24, temperature=0, stream=True,
                                    stream_options={"include_usage": True})  # fmt: skip
    chunks = list(streamed)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want[0]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    ids = rt.tokenizer.encode(PROMPTS[1])
    by_ids = c.completions.create(model=NAME, prompt=ids, max_tokens=24, temperature=0, echo=True)
    assert by_ids.choices[0].text == PROMPTS[1] + want[1]


def test_stop_strings_cut_the_text_as_in_python(served):
    """The `stop` field is `SamplingParams.stop`: the same cut text and finish reason as in-process."""
    url, rt = served
    full = rt.generate("def ", max_new_tokens=24, temperature=0)[0].text
    stop = full[8:10]
    want = rt.generate("def ", max_new_tokens=24, temperature=0, stop=stop)[0]
    assert want.text == full[: full.index(stop)] and want.finish_reason == "stop"
    got = client(url).completions.create(model=NAME, prompt="def ", max_tokens=24, temperature=0, stop=[stop])
    assert (got.choices[0].text, got.choices[0].finish_reason) == (want.text, "stop")


def test_chat_completion_is_the_templated_prompt(served):
    url, rt = served
    messages = [{"role": "system", "content": "Python."}, {"role": "user", "content": "def f"}]
    want = rt.generate("system: Python.\nuser: def f\nassistant:", max_new_tokens=16, temperature=0)[0].text
    c = client(url)
    got = c.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0)
    assert got.choices[0].message.content == want and got.choices[0].message.role == "assistant"
    parts = list(c.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0, stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == want


def test_sixteen_concurrent_streams_each_get_their_own_text(served):
    url, rt = served
    prompts = [f"{PROMPTS[i % 4]}{i}" for i in range(16)]  # 16 clients, 4 rows: most wait, then join
    want = [out.text for out in rt.generate(prompts, max_new_tokens=20, temperature=0)]

    async def one(c: openai.AsyncOpenAI, prompt: str) -> str:
        stream = await c.completions.create(model=NAME, prompt=prompt, max_tokens=20, temperature=0, stream=True)
        return "".join([chunk.choices[0].text async for chunk in stream])

    async def all_at_once() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0) as c:
            return await asyncio.gather(*(one(c, p) for p in prompts))

    assert asyncio.run(all_at_once()) == want


def test_stream_interval_groups_tokens_into_fewer_chunks_with_the_same_text(runtime):
    """A server with stream_interval 3 (`tformer serve --stream-interval 3`): tokens come at least
    three to a chunk after the first (more when the client lags: it gets every group waiting), and
    the text is the in-process text."""
    sized = Runtime(runtime.backend, runtime.tokenizer, max_batch_size=4, max_len=256)
    want = sized.generate(PROMPTS[0], max_new_tokens=20, temperature=0)[0].text
    body = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 20, "temperature": 0, "stream": True}
    with serve_in_thread(sized, model_name=NAME, stream_interval=3) as url:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
            events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    counts = [len(e["choices"][0]["token_ids"]) for e in events]
    assert sum(counts) >= 10 and len(counts) <= 1 + -(-(sum(counts) - 1) // 3)  # ceil: the first token, then groups of 3
    assert "".join(e["choices"][0]["text"] for e in events) == want


def test_a_client_that_disconnects_frees_its_row(served, monkeypatch):
    """The engine itself sees the disconnect: its abort counter rises by one and its row is free
    while the request still had seconds of tokens to go (each step slowed to 50 ms: 200 tokens
    take 10 s), which an engine that ignored aborts could only show after finishing it by length."""
    url, rt = served
    step = rt.backend.step
    monkeypatch.setattr(rt.backend, "step", lambda *a: time.sleep(0.05) or step(*a))
    before = metrics(url)
    body = {"model": NAME, "prompt": "def ", "max_tokens": 200, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # generating
        assert metrics(url)["tformer:cache_rows_in_use"] == 1
    # closed after one chunk of 200: the engine aborts it and its row is free
    assert wait_for(lambda: metrics(url)["tformer:engine_aborts_total"] == before["tformer:engine_aborts_total"] + 1, 5)
    after = metrics(url)
    assert after["tformer:cache_rows_in_use"] == 0 and after["tformer:num_requests_running"] == 0
    assert after["tformer:requests_total{outcome=abort}"] == before.get("tformer:requests_total{outcome=abort}", 0) + 1


def test_overflow_is_503_with_retry_after(runtime, monkeypatch):
    sized = Runtime(runtime.backend, runtime.tokenizer, max_batch_size=1, max_len=256)
    step = sized.backend.step
    monkeypatch.setattr(sized.backend, "step", lambda *a: time.sleep(0.02) or step(*a))  # 200 tokens: 4 s
    with serve_in_thread(sized, model_name=NAME, max_waiting=0) as url:
        body = {"model": NAME, "prompt": "def ", "max_tokens": 200, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as busy:
            lines = busy.iter_lines()  # kept: a dropped line iterator closes the response (a disconnect)
            next(line for line in lines if line.startswith("data: "))  # the one row is taken
            refused = httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, timeout=30)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "overloaded"


BAD = [
    (b"{not json", 400, None, "not valid JSON"),
    ({"model": NAME, "prompt": "x", "best_offf": 2}, 400, "best_offf", "unknown field"),
    ({"model": NAME, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "must be an integer"),
    ({"model": NAME, "prompt": "x", "temperature": 3}, 400, "temperature", "in [0, 2]"),
    ({"model": NAME, "prompt": "x", "n": 2}, 400, "n", "must be 1"),
    ({"model": NAME, "prompt": "x", "logprobs": 3}, 400, "logprobs", "not supported"),
    ({"model": NAME, "prompt": [[1, 2], "x"]}, 400, "prompt", "list of token ids"),
    ({"model": NAME, "prompt": "x", "max_tokens": 300}, 400, "prompt", "this server's max_len of 256"),
    ({"model": NAME, "prompt": [5, 100000]}, 400, "prompt", "outside the vocabulary"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model", "serves 'tiny'"),
    ({"model": NAME, "prompt": "x", "stop": ["\n", ""]}, 400, "stop", "non-empty string"),
    ({"model": NAME, "prompt": "x", "stop": "\udfff"}, 400, "stop", "lone surrogate"),
]


@pytest.mark.parametrize("body, status, param, message", BAD, ids=[b[3] for b in BAD])
def test_bad_requests_get_openai_error_objects(served, body, status, param, message):
    url, _ = served
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{url}/v1/completions", content=raw, headers={"content-type": "application/json"})
    error = r.json()["error"]
    assert r.status_code == status and error["param"] == param and message in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_the_official_client_raises_its_own_errors(served):
    url, _ = served
    with pytest.raises(openai.BadRequestError, match="max_len of 256"):
        client(url).completions.create(model=NAME, prompt="x", max_tokens=1000)


def test_text_prompts_need_a_tokenizer(runtime):
    bare = Runtime(runtime.backend, None, max_batch_size=2, max_len=128)
    with serve_in_thread(bare, model_name=NAME) as url:
        r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "def "})
        assert r.status_code == 400 and "no tokenizer" in r.json()["error"]["message"]
        ok = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": [1, 2, 3], "max_tokens": 4,
                                                        "temperature": 0, "ignore_eos": True}).json()  # fmt: skip
        assert ok["choices"][0]["token_ids"] == token_ids(bare, [[1, 2, 3]], max_new_tokens=4, temperature=0)[0]


def test_api_key_guards_v1_but_not_health(runtime):
    sized = Runtime(runtime.backend, runtime.tokenizer, max_batch_size=2, max_len=128)
    with serve_in_thread(sized, model_name=NAME, api_key="s3cret") as url:
        assert httpx.get(f"{url}/health").status_code == 200
        r = httpx.get(f"{url}/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").models.list()
        assert [m.id for m in client(url, api_key="s3cret").models.list()] == [NAME]


def test_an_engine_failure_fails_only_its_request(runtime, monkeypatch):
    sized = Runtime(runtime.backend, runtime.tokenizer, max_batch_size=2, max_len=128)
    step = sized.backend.step

    def failing(batch, cache):
        if bool((batch.input_ids == 7).any()):
            raise RuntimeError("simulated kernel failure")
        return step(batch, cache)

    monkeypatch.setattr(sized.backend, "step", failing)
    with serve_in_thread(sized, model_name=NAME) as url:
        r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": [7, 8], "max_tokens": 4})
        assert r.status_code == 500 and "simulated kernel failure" in r.json()["error"]["message"]
        ok = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": [8, 9], "max_tokens": 4, "temperature": 0})
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")
        assert metrics(url)["tformer:requests_total{outcome=error}"] == 1


def test_metrics_health_and_models(served):
    url, _ = served
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    card = httpx.get(f"{url}/v1/models").json()["data"][0]
    assert card["id"] == NAME and card["max_model_len"] == 256
    m = metrics(url)
    for name in ("tformer:requests_total{outcome=length}", "tformer:prompt_tokens_total", "tformer:generation_tokens_total",
                 "tformer:time_to_first_token_seconds_count", "tformer:time_per_output_token_seconds_count",
                 "tformer:e2e_request_latency_seconds_count", "tformer:num_requests_running",
                 "tformer:num_requests_waiting", "tformer:cache_rows_in_use", "tformer:cache_rows",
                 "tformer:engine_aborts_total"):  # fmt: skip
        assert name in m, name
    assert m["tformer:cache_rows"] == 4 and m["tformer:generation_tokens_total"] > 0


def test_a_body_over_the_limit_is_413_before_it_is_read(runtime):
    """--max-body-bytes: a body declared larger is refused at once, though the client sent one
    byte of it (the server never read it); a chunked one as soon as it passes the limit; one
    within the limit is served."""
    sized = Runtime(runtime.backend, runtime.tokenizer, max_batch_size=2, max_len=128)
    with serve_in_thread(sized, model_name=NAME, max_body_bytes=1000) as url:
        status, answer = raw_post(url, {"Content-Length": "10000000"}, b"{")
        assert status == 413 and answer["error"]["code"] == "request_too_large"
        assert "limit of 1000 bytes" in answer["error"]["message"]
        chunk = b'{"model": "tiny", "prompt": "' + b"x" * 600
        status, answer = raw_post(url, {"Transfer-Encoding": "chunked"}, b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2)
        assert status == 413 and answer["error"]["code"] == "request_too_large"
        ok = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "def ", "max_tokens": 1,
                                                        "user": "u" * 900})  # fmt: skip
        assert len(ok.request.content) in range(900, 1001)
        assert ok.status_code == 200, ok.text


def test_a_huge_text_prompt_is_refused_without_tokenizing_it(served, monkeypatch):
    """A 1 MB text prompt cannot fit in 256 tokens: it is refused (400, context_length_exceeded,
    with the limits) and the tokenizer never sees it."""
    url, rt = served
    seen = []
    encode = rt.tokenizer.encode
    monkeypatch.setattr(rt.tokenizer, "encode", lambda text: seen.append(len(text)) or encode(text))
    r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "a" * 10**6, "max_tokens": 16}, timeout=30)
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert "max_tokens=16" in error["message"] and "max_len of 256 tokens" in error["message"]
    assert seen == []
    ok = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "def ", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200 and seen == [4]  # a prompt that can fit is tokenized


def test_health_and_other_streams_go_on_while_a_prompt_is_tokenized(served, monkeypatch):
    """Tokenizing runs off the event loop: while one request's tokenization is held (an encode
    that waits on an event), /health answers and a stream of token ids runs to its end."""
    url, rt = served
    entered, release = threading.Event(), threading.Event()
    encode = rt.tokenizer.encode

    def held(text: str) -> list[int]:
        if text == "hold me":
            entered.set()
            release.wait(60)
        return encode(text)

    monkeypatch.setattr(rt.tokenizer, "encode", held)
    blocked = {}
    waiting = threading.Thread(target=lambda: blocked.update(r=httpx.post(
        f"{url}/v1/completions", json={"model": NAME, "prompt": "hold me", "max_tokens": 2}, timeout=60)))  # fmt: skip
    waiting.start()
    try:
        assert entered.wait(30)
        assert httpx.get(f"{url}/health", timeout=10).json() == {"status": "ok"}
        out = {}
        stream(url, {"model": NAME, "prompt": [1, 2, 3], "max_tokens": 4, "ignore_eos": True}, out, timeout=10)
        assert (out["end"], out["tokens"]) == ("done", 4), out
        assert "r" not in blocked  # still held
    finally:
        release.set()
        waiting.join(60)
    assert blocked["r"].status_code == 200


def rss() -> int:
    """This process's resident memory in bytes (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_big_requests_leave_no_memory_behind(served, runtime):
    """A body declared at 10 MB (413) and, to a server that takes bodies of 5 MB, a 4 MB text
    prompt (400, never tokenized: tokenizing it took over 200 MiB more), twice each: the servers'
    memory (they run in this process) ends within 50 MiB of where it was."""
    url, _ = served
    sized = Runtime(runtime.backend, runtime.tokenizer, max_batch_size=2, max_len=256)
    big = json.dumps({"model": NAME, "prompt": "a" * (4 * 10**6)}).encode()  # the client's, made once before
    with serve_in_thread(sized, model_name=NAME, max_body_bytes=5 * 10**6) as roomy:
        before = rss()
        for _ in range(2):
            assert raw_post(url, {"Content-Length": str(10 * 10**6)}, b'{"model": "tiny", "prompt": "')[0] == 413
            status, answer = raw_post(roomy, {"Content-Length": str(len(big))}, big)
            assert status == 400 and answer["error"]["code"] == "context_length_exceeded", answer
        after = rss()
    assert after - before < 50 * 2**20, f"{(after - before) / 2**20:.0f} MiB more"


@pytest.fixture(scope="module")
def long_checkpoint(trained, tmp_path_factory):
    """A checkpoint of the trained model with a 4096-token context (requests long enough to still
    be running when a test acts), and its in-process Runtime: (path, runtime)."""
    path = tmp_path_factory.mktemp("serve") / "tiny.safetensors"
    return path, long_model(trained, path)


def start_server(path, tmp_path, *options: str) -> tuple[str, subprocess.Popen, Path]:
    """`tformer serve` of `path` on a free port, in a process group of its own: (URL, process, its stderr's file)."""
    port, log = free_port(), tmp_path / "stderr"
    proc = start_cli([str(path), "--port", str(port), "--device", "cpu", *options], log, TFORMER_API_KEY="")
    url = f"http://127.0.0.1:{port}"
    wait_up(url, proc, log)
    return url, proc, log


def signal_with_streams_in_flight(url: str, proc: subprocess.Popen, sig: int, group: bool, longs: int,
                                  short: int = 0) -> tuple[list[dict], dict]:  # fmt: skip
    """`longs` streams of 4000 tokens (seconds of work) and one of `short` tokens, all streaming,
    when `sig` goes to the server's process (or its whole group, as Ctrl-C in a terminal does),
    which then stops accepting at once; each stream read to its end: (the long ones' outcomes, the
    short one's; see `stream`)."""
    body = {"model": "tiny", "prompt": "def ", "temperature": 0, "ignore_eos": True}
    outs, quick = [{} for _ in range(longs)], {}
    threads = [threading.Thread(target=stream, args=(url, {**body, "max_tokens": 4000}, o)) for o in outs]
    if short:
        threads.append(threading.Thread(target=stream, args=(url, {**body, "max_tokens": short}, quick)))
    for t in threads:
        t.start()
    assert wait_for(lambda: all("first" in o or "end" in o for o in [*outs, quick][: len(threads)]), 60), outs
    (os.killpg if group else os.kill)(proc.pid, sig)
    # It stops accepting at once: /health fails while the long streams still run (in the grace period).
    assert wait_for(lambda: not up(url)) and not any("end" in o for o in outs), outs
    for t in threads:
        t.join(timeout=60)
    return outs, quick


def test_cli_serves_until_sigterm_then_exits_0(long_checkpoint, tmp_path):
    """`tformer serve` in a process of its own: the in-process text; a disconnect reaches its
    engine process as an abort; SIGTERM to the process with streams in flight: it stops accepting,
    the stream that can finish within --grace gets every token (finish_reason length), the others
    end with a final chunk (finish_reason abort) and [DONE], a request not streamed gets its JSON
    (finish_reason abort), and it exits 0 with nothing left."""
    path, rt = long_checkpoint
    url, proc, log = start_server(path, tmp_path, "--max-batch-size", "8", "--grace", "3")
    try:
        r = client(url).completions.create(model="tiny", prompt="def ", max_tokens=5, temperature=0)
        assert r.choices[0].text == rt.generate("def ", max_new_tokens=5, temperature=0)[0].text
        # The engine's abort counter rises (a request it finished by length would not count) and the row is free.
        body = {"model": "tiny", "prompt": "def ", "max_tokens": 4000, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            assert metrics(url)["tformer:cache_rows_in_use"] == 1
        assert wait_for(lambda: metrics(url)["tformer:engine_aborts_total"] == 1)
        m = metrics(url)
        assert m["tformer:cache_rows_in_use"] == 0 and m["tformer:requests_total{outcome=abort}"] == 1

        whole = {}  # a request not streamed, in flight too: its JSON, finish_reason abort
        body = {"model": "tiny", "prompt": "def ", "max_tokens": 4000, "ignore_eos": True}
        plain = threading.Thread(target=lambda: whole.update(r=httpx.post(f"{url}/v1/completions", json=body, timeout=60)))
        plain.start()
        outs, quick = signal_with_streams_in_flight(url, proc, signal.SIGTERM, group=False, longs=4, short=100)
        assert proc.wait(timeout=3 + 5) == 0
        plain.join(10)
        choice = whole["r"].json()["choices"][0]
        assert whole["r"].status_code == 200 and choice["finish_reason"] == "abort" and choice["token_ids"], choice
        assert (quick["end"], quick["finish"], quick["tokens"]) == ("done", "length", 100), quick
        assert [(o["end"], o["finish"]) for o in outs] == [("done", "abort")] * 4, outs
        err = log.read_text()
        assert f"http://127.0.0.1:{url.rsplit(':', 1)[1]}" in err and "cache" in err and "grace 3 s" in err
        assert "SIGTERM" in err and err.strip().endswith("tformer serve: stopped") and "Traceback" not in err, err
        assert group_alive(proc.pid) == []
    finally:
        stop(proc)


def test_cli_ctrl_c_to_its_group_ends_every_stream_and_exits_130(long_checkpoint, tmp_path):
    """SIGINT to the whole process group (Ctrl-C in a terminal): the engine process ignores it and
    its parent stops it; after --grace every stream ends with a final chunk and [DONE]; exit 130."""
    path, _ = long_checkpoint
    url, proc, log = start_server(path, tmp_path, "--max-batch-size", "4", "--grace", "1")
    try:
        outs, _ = signal_with_streams_in_flight(url, proc, signal.SIGINT, group=True, longs=4)
        assert proc.wait(timeout=1 + 5) == 130
        assert [(o["end"], o["finish"]) for o in outs] == [("done", "abort")] * 4, outs
        err = log.read_text()
        assert "SIGINT" in err and err.strip().endswith("tformer serve: stopped") and "Traceback" not in err, err
        assert group_alive(proc.pid) == []
    finally:
        stop(proc)


def test_cli_refuses_a_port_in_use(trained, tmp_path):
    model, tokenizer = trained
    save_checkpoint(tmp_path / "tiny.safetensors", model, tokenizer)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = CliRunner().invoke(cli, ["serve", str(tmp_path / "tiny.safetensors"), "--port", str(port)])
    assert r.exit_code == 2 and r.stderr.startswith("Error: cannot listen on 127.0.0.1:") and "--port" in r.stderr


def test_ray_without_ray_installed_is_one_line(trained, tmp_path):
    """`tformer serve --ray` where Ray cannot be imported: one line naming the extra, exit 2."""
    model, tokenizer = trained
    save_checkpoint(tmp_path / "m.safetensors", model, tokenizer)
    (tmp_path / "noray" / "ray").mkdir(parents=True)
    (tmp_path / "noray" / "ray" / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\", name='ray')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "noray"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "tformer.cli", "serve", str(tmp_path / "m.safetensors"), "--ray"],
                       capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert r.returncode == 2 and r.stderr == "Error: tformer serve --ray needs Ray Serve: pip install 'tformer[ray]'\n"


def test_a_request_without_sampling_fields_samples_as_python_does_by_default():
    """One `SamplingParams` and its defaults for Python callers and HTTP alike (OpenAI's)."""
    from tformer.engine import SamplingParams
    from tformer.serve.protocol import check_chat, check_completion

    plain = SamplingParams()
    for job in (check_completion({"model": NAME, "prompt": "x"}, NAME),
                check_chat({"model": NAME, "messages": [{"role": "user", "content": "x"}]}, NAME)):  # fmt: skip
        p = job.params
        assert (p.temperature, p.top_k, p.top_p or 1.0, p.seed) == (plain.temperature, plain.top_k, plain.top_p or 1.0, plain.seed)
        assert (p.stop, p.stop_token_ids) == (plain.stop, plain.stop_token_ids) == ((), ())
    assert (plain.temperature, plain.top_k, plain.top_p) == (1.0, None, None)


def test_the_engine_process_sizes_its_one_engine_from_the_options(checkpoint):
    """`tformer serve --max-batch-size 2 --max-len 64 --decode-steps 3` reaches the engine the
    worker builds (loaded at that size once, not at the default size first)."""
    from tformer.serve.worker import WorkerSpec, build

    runtime, served = build(WorkerSpec(str(checkpoint), max_batch_size=2, max_len=64, decode_steps=3))
    engine = runtime.engine
    assert (engine.max_batch_size, engine.max_len, engine.decode_steps) == (2, 64, 3)
    assert (served.max_batch_size, served.max_len) == (2, 64)
