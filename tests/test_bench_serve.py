"""`tformer-bench serve`: the arrival schedule, the SSE reader, the metrics from known timestamps,
failures counted rather than raised, and the whole load generator against tformer's own server."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys

import aiohttp
import pytest
from click.testing import CliRunner

from tformer.bench.cli import main as bench
from tformer.bench.cpu import CpuMeter, descendants, process_seconds
from tformer.bench.latency import RequestTiming, serving_metrics
from tformer.bench.serve import (HTTP, OFFLINE, ServeSettings, benchmark_model, benchmark_url, feed, free_port,
                                 local_server, parse_rates, ratios, run_requests, send)  # fmt: skip
from tformer.bench.throughput import Workload, drive_workload
from tformer.checkpoint import save_checkpoint
from tformer.engine import Engine
from tformer.errors import TformerError
from tformer.runtime import Runtime

METRICS = ("completed", "failed", "errors", "duration_s", "request_throughput", "output_throughput",
           "total_token_throughput", "ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")  # fmt: skip


def test_arrivals_are_seeded_poisson_and_the_same_requests_at_every_rate():
    draw = lambda rate, seed=0: Workload.draw(4000, (1, 4), (1, 4), 50, rate, seed)  # noqa: E731
    assert draw(5.0) == draw(5.0) and draw(5.0) != draw(5.0, seed=1)
    assert [r[1:] for r in draw(5.0).requests] == [r[1:] for r in draw(None).requests] == [r[1:] for r in draw(50.0).requests]
    assert {r[0] for r in draw(None).requests} == {0.0}
    arrivals = [r[0] for r in draw(5.0).requests]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert min(gaps) >= 0 and statistics.mean(gaps) == pytest.approx(1 / 5, rel=0.06)
    assert statistics.stdev(gaps) == pytest.approx(1 / 5, rel=0.1)  # exponential gaps: stdev = mean


def test_request_rates():
    assert parse_rates("inf") == (None,)
    assert parse_rates("1, 2.5,INF") == (1.0, 2.5, None)
    for bad in ("0", "-1", "x", "1,,2", "nan"):
        with pytest.raises(TformerError, match="--request-rate"):
            parse_rates(bad)


def chunk(text: str | None = None, usage: int | None = None) -> str:
    body = {"choices": [] if text is None else [{"index": 0, "text": text, "finish_reason": None}]}
    if usage is not None:
        body["usage"] = {"prompt_tokens": 3, "completion_tokens": usage, "total_tokens": 3 + usage}
    return "data: " + json.dumps(body)


def test_sse_stream_is_timed_chunk_by_chunk_and_the_usage_count_wins():
    timing = RequestTiming(3, sent=1.0)
    lines = [chunk("a"), "", ": keep-alive", "event: completion", chunk(""), chunk("bc"), chunk("d"), chunk(usage=5), "data: [DONE]"]
    ends = [feed(timing, line, 1.5 + i) for i, line in enumerate(lines)]
    assert ends == [False] * 8 + [True]
    assert timing.token_times == [1.5, 6.5, 7.5]  # the empty-text chunk carries nothing
    assert (timing.output_tokens, timing.tokens, timing.end, timing.ok) == (5, 5, 9.5, True)
    plain = RequestTiming(3)
    for line in (chunk("a"), chunk("b"), "data: [DONE]"):
        feed(plain, line, 0.0)
    assert (plain.output_tokens, plain.tokens) == (None, 2)  # no usage: the chunks are counted


@pytest.mark.parametrize("lines, error", [
    (['data: {"error": {"message": "out of memory", "code": 500}}'], "error event: out of memory"),
    (["data: {not json"], "not an OpenAI completion chunk"),
    (["data: [1, 2]"], "not an OpenAI completion chunk"),
    (["data: [DONE]"], "without any text"),
])  # fmt: skip
def test_a_bad_stream_ends_the_request_with_its_error(lines, error):
    timing = RequestTiming(1)
    assert [feed(timing, line, 0.0) for line in lines][-1]
    assert error in timing.error


def test_metrics_from_known_timestamps():
    a = RequestTiming(10, sent=0.0, token_times=[0.1, 0.3, 0.4], end=0.5, output_tokens=5)  # usage said 5
    b = RequestTiming(20, sent=1.0, token_times=[1.2], end=1.2)  # one token: no TPOT, no ITL
    failed = [RequestTiming(7, error="HTTP 500: boom"), RequestTiming(7, error="HTTP 500: boom"), RequestTiming(7, error="ReadTimeout")]
    m = serving_metrics([a, b, *failed], duration=2.0)
    assert (m["completed"], m["failed"], m["errors"]) == (2, 3, ["HTTP 500: boom", "ReadTimeout"])
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (30, 6)
    assert (m["request_throughput"], m["output_throughput"], m["total_token_throughput"]) == (1.0, 3.0, 18.0)
    assert m["ttft_ms"]["mean"] == pytest.approx(150) and m["ttft_ms"]["p50"] == pytest.approx(150)
    assert m["ttft_ms"]["p99"] == pytest.approx(100 + 100 * 0.99)  # linear between the two order statistics
    assert m["tpot_ms"] == pytest.approx({"mean": 100, "p50": 100, "p99": 100})  # (500 - 100) / (5 - 1)
    assert m["itl_ms"]["mean"] == pytest.approx(150) and m["itl_ms"]["p50"] == pytest.approx(150)  # gaps 200, 100
    assert m["e2el_ms"]["mean"] == pytest.approx(350)
    nothing = serving_metrics([RequestTiming(1, error="x")], duration=1.0)
    assert nothing["completed"] == 0 and nothing["ttft_ms"] is None and nothing["output_throughput"] == 0


def served_send(body: str, status: int = 200) -> RequestTiming:
    """`send` against a real HTTP server (aiohttp's) that answers every POST with `body`."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=status, text=body)

    async def go() -> RequestTiming:
        app = web.Application()
        app.router.add_post("/v1/completions", answer)
        async with TestServer(app) as server, aiohttp.ClientSession() as session:
            return await send(session, str(server.make_url("")).rstrip("/"), {"prompt": [1]}, RequestTiming(1))

    return asyncio.run(go())


def test_http_failures_are_recorded_never_raised():
    assert served_send("boom", status=500).error == "HTTP 500: boom"
    cut = served_send(chunk("a") + "\n\n")
    assert cut.error == "the stream ended before data: [DONE]"
    good = served_send("\n\n".join([chunk("a"), chunk("b"), chunk(usage=2), "data: [DONE]"]))
    assert good.ok and good.tokens == 2 and good.sent <= good.token_times[0] <= good.end
    unterminated = served_send("\n\n".join([chunk("a"), "data: [DONE]"]).rstrip("\n"))  # no newline after [DONE]
    assert unterminated.ok and unterminated.tokens == 1


def test_a_run_against_nothing_counts_every_request_as_failed():
    workload = Workload.draw(3, (2, 4), (2, 3), 50, None, 0)
    timings, _ = asyncio.run(run_requests(f"http://127.0.0.1:{free_port()}", "m", workload, max_concurrency=2))
    m = serving_metrics(timings, 1.0)
    assert (m["completed"], m["failed"]) == (0, 3) and m["errors"][0].startswith("ClientConnectorError")


def test_offline_max_concurrency_holds_requests_as_a_client_would(trained):
    model, _ = trained
    engine = Engine(Runtime.from_model(model, device="cpu").backend, 4, 64)
    workload = Workload.draw(4, (3, 6), (2, 4), 300, None, 0)
    timings, _ = drive_workload(engine, workload, max_concurrency=1)
    assert all(t.ok and t.tokens == n for t, (_, _, n) in zip(timings, workload.requests))
    assert all(later.sent >= earlier.end for earlier, later in zip(timings, timings[1:]))  # one at a time


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/stat"), reason="reads Linux's /proc")
def test_cpu_of_a_child_process_is_what_it_measures_itself():
    """A child burns CPU, prints its own `time.process_time()` and waits: /proc, read from here,
    finds it below this process and gives the same seconds (to /proc's tick)."""
    burn = "import time, sys\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n" \
           "print(time.process_time(), flush=True)\nsys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        own = float(child.stdout.readline())
        assert child.pid in descendants(os.getpid())
        assert process_seconds(child.pid) == pytest.approx(own, abs=0.01)  # to /proc's tick, or better
        meter = CpuMeter(server_pid=child.pid)
        before = meter.read()
        assert set(before) == {"client", "server", "engine"} and before["engine"] == 0  # it has no children
        per_token = CpuMeter.per_token(before, {**before, "server": before["server"] + 0.5}, 1000)
        assert per_token == {"client": 0, "server": pytest.approx(500), "engine": 0}  # 0.5 s over 1000 tokens
    finally:
        child.stdin.close()
        child.wait()
    assert process_seconds(child.pid) is None and CpuMeter.per_token(before, before, 0) is None


def test_a_server_that_exits_is_reported_with_what_it_printed(tmp_path):
    with pytest.raises(TformerError, match=r"tformer serve exited with code \d+ before it was ready: .*Error"):
        with local_server(str(tmp_path / "missing.safetensors")):
            pass


@pytest.mark.parametrize("args, message", [
    (["serve"], "exactly one"),
    (["serve", "m.pt", "--url", "http://x"], "exactly one"),
    (["serve", "--url", "http://x", "--offline"], "--offline needs MODEL"),
    (["serve", "--url", "http://x", "--request-rate", "0"], "--request-rate"),
    (["serve", "--url", "http://x", "--prompt-len", "9:3"], "--prompt-len"),
])  # fmt: skip
def test_cli_bad_input(args, message):
    result = CliRunner().invoke(bench, args)
    assert result.exit_code == 2 and message in result.output


def test_load_generator_against_tformer_serve(trained, tmp_path):
    from tformer.serve.server import serve_in_thread  # the HTTP server (tformer serve)

    model, tokenizer = trained
    runtime = Runtime.from_model(model, tokenizer, device="cpu")
    settings = ServeSettings((None, 20.0), 6, (4, 12), (3, 8), seed=1, max_concurrency=4)
    with serve_in_thread(runtime, model_name="tiny", max_batch_size=4) as url:
        records, info = benchmark_url(url, settings)
        result = CliRunner().invoke(bench, ["serve", "--url", url, "--num-prompts", "6", "--request-rate", "inf",
                                            "--prompt-len", "4:12", "--output-len", "5", "--json", str(tmp_path / "s.json")])  # fmt: skip
    assert info["model"] == "tiny" and [r.rate for r in records] == [None, 20.0]
    assert all(set(r.cpu_us_per_token) == {"client"} and r.cpu_us_per_token["client"] > 0 for r in records)
    requested = sum(n for _, _, n in settings.workload(None, info["vocab_size"]).requests)
    for r in records:
        assert (r.completed, r.failed, r.errors) == (6, 0, [])
        assert r.total_output_tokens == requested  # ignore_eos: every request makes max_tokens
        assert r.ttft_ms["mean"] <= r.e2el_ms["mean"] and r.ttft_ms["p99"] <= r.e2el_ms["p99"]
        assert r.tpot_ms["mean"] > 0 and r.itl_ms["p50"] > 0 and r.output_throughput > 0
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "s.json").read_text())
    (record,) = saved["records"]
    assert all(record[k] is not None for k in METRICS)
    assert (record["completed"], record["failed"], record["total_output_tokens"]) == (6, 0, 30)
    assert record["ttft_ms"]["p50"] <= record["e2el_ms"]["p50"] and record["output_tokens_from"] in ("usage", "chunks")
    assert saved["meta"]["served_model"] == "tiny" and saved["meta"]["versions"]["torch"]


def test_rounds_alternate_http_and_the_offline_engine_and_give_their_ratios(trained, tmp_path):
    """`--offline --repeats 2` against a `tformer serve` it starts: per round an offline row and an
    HTTP row of the same workload, both complete; the ratios of each round's pair, summarised."""
    model, tokenizer = trained
    save_checkpoint(tmp_path / "tiny.safetensors", model, tokenizer)
    settings = ServeSettings((None,), 4, (4, 8), (3, 5), seed=2, max_concurrency=2)
    records, info = benchmark_model(str(tmp_path / "tiny.safetensors"), settings, max_batch_size=2, offline=True,
                                    repeats=2, threads=1)  # fmt: skip
    assert [(r.run, r.round) for r in records] == [(OFFLINE, 0), (HTTP, 0), (OFFLINE, 1), (HTTP, 1)]
    assert all((r.completed, r.failed) == (4, 0) for r in records)
    assert len({r.total_output_tokens for r in records}) == 1  # the same workload each time
    (ratio,) = ratios(records)
    pairs = [records[i + 1].output_throughput / records[i].output_throughput for i in (0, 2)]
    assert ratio["rounds"] == 2 and ratio["output_throughput"]["min"] == pytest.approx(min(pairs))
    assert ratio["itl_p50"]["median"] > 0
    for r in records:  # where each run's CPU went: under HTTP the engine is the server's child process
        assert set(r.cpu_us_per_token) == ({"client", "server", "engine"} if r.run == HTTP else {"engine"})
        assert min(r.cpu_us_per_token.values()) > 0, r.cpu_us_per_token  # each process served the run
