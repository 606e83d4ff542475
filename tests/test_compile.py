"""The compile backend: same tokens as eager; after `warmup`, requests coming and going never
compile anything again (CPU inductor; on a GPU, CUDA graphs too); a fresh runtime called from
several threads at once compiles once and serves them all."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from tformer.backends.compile import buckets
from tformer.engine import Engine
from tformer.runtime import Runtime

from conftest import COMPILED_NEW as NEW, COMPILED_PROMPT as PROMPT, COMPILED_ROWS as ROWS, DEVICES, token_ids
from test_engine import run_staggered


@pytest.fixture(scope="module", params=DEVICES)
def compiled_runtime(request, compiled):
    """The session's compiled runtime on each device: every decode bucket and the prefill graph
    compiled (on CUDA the decode buckets run as CUDA graphs)."""
    return compiled(request.param)


def test_buckets():
    assert [buckets(n) for n in (1, 2, 3, 8, 12)] == [[1], [1, 2], [1, 2, 3], [1, 2, 4, 8], [1, 2, 4, 8, 12]]


def test_compile_greedy_equals_eager_batched_and_padded(trained, compiled_runtime):
    model, tokenizer = trained
    compiled = compiled_runtime.runtime
    prompts = [tokenizer.encode("import sys\nfrom os import path\n"), tokenizer.encode("def ")]
    eager = Runtime.from_model(copy.deepcopy(model), device=compiled.backend.device)
    want = token_ids(eager, prompts, max_new_tokens=40, temperature=0)
    assert token_ids(compiled, prompts, max_new_tokens=40, temperature=0) == want
    assert all(len(set(row)) >= 5 for row in want)


def test_no_compilation_over_100_requests_coming_and_going(trained, compiled_runtime):
    """100 requests (prompts 1..100 tokens, outputs 1..60), one added per engine step: batches of
    every size 1..4 at every span, prefills of 1..4 rows of 1..100 tokens beside them. Nothing is
    compiled (no recompile, no new graph), and every request gets eager's tokens."""
    model, compiled = trained[0], compiled_runtime.runtime
    rng = random.Random(13)
    prompts = [[rng.randrange(model.config.vocab_size) for _ in range(rng.randint(1, PROMPT))] for _ in range(100)]
    outputs = [rng.randint(1, NEW) for _ in range(100)]
    eager = Runtime.from_model(copy.deepcopy(model), device=compiled.backend.device).backend
    want = run_staggered(Engine(eager, ROWS, PROMPT + NEW), prompts, outputs)
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):  # (monkeypatch's undo would delete the option)
        assert run_staggered(compiled.engine, prompts, outputs) == want
    assert counters["stats"]["unique_graphs"] == graphs  # not even a graph of a new shape
    assert compiled.backend.notes == ()  # on CUDA: the decode steps ran as CUDA graphs, never skipped one


def test_six_threads_at_once_on_a_fresh_runtime(trained, compiled_runtime):
    """Each thread's `generate` on a runtime that had compiled nothing yet (how the session's
    compiled runtime began): the engine serializes the steps (and so the compiling); every thread
    got eager's tokens for its prompt."""
    prompts, got = compiled_runtime.first_calls
    eager = Runtime.from_model(copy.deepcopy(trained[0]), device=compiled_runtime.runtime.backend.device)
    assert got == [token_ids(eager, [p], max_new_tokens=20, temperature=0)[0] for p in prompts]


def test_runtime_calls_of_growing_batch_and_length_never_recompile(compiled_runtime):
    """The compile backend stalled for 5-22 s whenever a call needed more rows or slots than any
    before (batch 1 and 8 new tokens, then 128, then batch 8...): the runtime regrew its engine
    between calls, and the graphs are keyed by the cache. The engine is sized once: after
    `warmup`, calls of growing batch (up to more prompts than rows, which wait) and length run
    on the same cache and compile nothing."""
    runtime = compiled_runtime.runtime
    cache = runtime.engine.runner.cache
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch, new, prompt in ((1, 2, 1), (1, NEW, 1), (ROWS, 2, PROMPT), (ROWS, NEW, 3), (ROWS + 2, NEW, PROMPT)):
            got = token_ids(runtime, [[(b + t) % 7 for t in range(prompt)] for b in range(batch)], max_new_tokens=new,
                                       temperature=0)  # fmt: skip
            assert [len(row) for row in got] == [new] * batch
    assert runtime.engine.runner.cache is cache and counters["stats"]["unique_graphs"] == graphs
