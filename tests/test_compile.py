"""The compile backend: same tokens as eager, and no recompilation after warm-up (CPU inductor;
on a GPU, CUDA graphs too)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo

from tformer.runtime import Runtime

from conftest import DEVICES


@pytest.fixture(scope="module", params=DEVICES)
def compiled(request, trained, tmp_path_factory):
    """Compiled once per device for batch 2 (a decode graph and a dynamic-length prefill graph;
    on CUDA the decode step runs as a CUDA graph)."""
    import os

    os.environ.setdefault("TFORMER_CACHE", str(tmp_path_factory.mktemp("cache")))
    runtime = Runtime.from_model(copy.deepcopy(trained[0]), backend="compile", device=request.param)
    assert runtime.warmup(batch_sizes=(2,), max_prompt_len=200, max_new_tokens=40) > 0
    return runtime


def test_compile_greedy_equals_eager_batched_and_padded(trained, compiled):
    model, tokenizer = trained
    prompts = [tokenizer.encode("import sys\nfrom os import path\n"), tokenizer.encode("def ")]
    eager = Runtime.from_model(copy.deepcopy(model), device=compiled.backend.device)
    want = eager.generate_ids(prompts, max_new_tokens=40, temperature=0)
    assert compiled.generate_ids(prompts, max_new_tokens=40, temperature=0) == want
    assert all(len(set(row)) >= 5 for row in want)


def test_no_recompiles_across_prompt_lengths(compiled, monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    for length in (1, 2, 3, 17, 64, 129, 199, 200):
        out = compiled.generate_ids([[5] * length, [6] * max(1, length // 2)], max_new_tokens=3, temperature=0)
        assert [len(row) for row in out] == [3, 3]
    if compiled.backend._ahead:  # decode compiled ahead of time: exactly one step, for batch 2 and the warm-up's cache
        assert list(compiled.backend._decoders) == [(2, 256)]
    assert compiled.backend.notes == ()  # on CUDA: the decode step ran as a CUDA graph, never skipped one
