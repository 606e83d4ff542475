"""Generation through the engine: KV cache vs full recompute, batching, sampling, stopping."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tformer.config import ModelConfig
from tformer.errors import TformerError
from tformer.engine import Engine, Output
from tformer.engine.sampling import Sampler, SamplingParams
from tformer.model import TransformerLM
from tformer.runtime import Runtime
from tformer.reference import generate_full_recompute

from conftest import DEVICES, stock_copy, token_ids


@pytest.mark.parametrize("device", DEVICES)
def test_cached_greedy_equals_full_recompute(trained, device):
    """Eager on `device` against the tutorial's own loop on the CPU."""
    model, tokenizer = trained
    runtime = Runtime.from_model(copy.deepcopy(model), device=device)  # a copy: the shared model stays on the CPU
    ref = stock_copy(model)
    for text in ("def ", "import os\nclass "):
        prompt = tokenizer.encode(text)
        ours = token_ids(runtime, [prompt], max_new_tokens=64, temperature=0)[0]
        assert ours == generate_full_recompute(ref, [prompt], 64)[0]
        assert len(set(ours)) >= 5, "degenerate output would make this comparison meaningless"


@pytest.mark.parametrize("device", DEVICES)
def test_batched_equals_one_by_one(trained, device):
    model, tokenizer = trained
    runtime = Runtime.from_model(copy.deepcopy(model), device=device)
    prompts = [tokenizer.encode(t) for t in ("x", "    def __init__(self, ", "import sys\nfrom os import path\n")]
    assert len({len(p) for p in prompts}) == 3
    batched = token_ids(runtime, prompts, max_new_tokens=40, temperature=0)
    assert batched == [token_ids(runtime, [p], max_new_tokens=40, temperature=0)[0] for p in prompts]


@pytest.mark.parametrize("device", DEVICES)
def test_naive_backend_greedy_equals_eager(trained, device):
    """The tutorial's loop as a backend (no padding mask: prompts of one length) against eager."""
    model, tokenizer = trained
    prompts = [tokenizer.encode(t)[:6] for t in ("import sys\nfrom os import path\n", "    def __init__(self, ")]
    assert [len(p) for p in prompts] == [6, 6] and prompts[0] != prompts[1]
    naive = Runtime.from_model(copy.deepcopy(model), backend="naive", device=device)
    eager = Runtime.from_model(copy.deepcopy(model), device=device)
    ours = token_ids(naive, prompts, max_new_tokens=30, temperature=0)
    assert ours == token_ids(eager, prompts, max_new_tokens=30, temperature=0)
    assert all(len(set(row)) >= 5 for row in ours)


def test_seed_makes_sampling_reproducible(trained):
    runtime = Runtime.from_model(trained[0], device="cpu")
    a = token_ids(runtime, [[5, 6, 7]], max_new_tokens=30, temperature=1.0, seed=1)
    assert a == token_ids(runtime, [[5, 6, 7]], max_new_tokens=30, temperature=1.0, seed=1)
    assert a != token_ids(runtime, [[5, 6, 7]], max_new_tokens=30, temperature=1.0, seed=2)


@pytest.mark.parametrize("sampling", [dict(top_k=1), dict(top_p=1e-6), dict(temperature=1e-4, top_k=None)])
def test_degenerate_sampling_equals_greedy(trained, sampling):
    runtime = Runtime.from_model(trained[0], device="cpu")
    greedy = token_ids(runtime, [[5, 6, 7]], max_new_tokens=20, temperature=0)
    assert token_ids(runtime, [[5, 6, 7]], max_new_tokens=20, seed=0, **{"temperature": 1.0, **sampling}) == greedy


def test_top_k_and_top_p_keep_only_the_allowed_tokens():
    """2000 rows of one distribution in one batched pass, each with its own seeded generator, then
    all on the global one: top-k and top-p keep exactly the allowed tokens, and the free draw's
    shares match the probabilities."""
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]])
    logits = probs.log().expand(2000, 5)
    torch.manual_seed(0)
    for seeded in (True, False):

        def draw(**sampling):
            params = [SamplingParams(temperature=1.0, **sampling)] * len(logits)
            generators = [torch.Generator().manual_seed(i) if seeded else None for i in range(len(logits))]
            return Sampler(params, generators, logits.shape[-1], logits.device)(logits)

        assert set(draw(top_k=2).tolist()) == {0, 1}
        assert set(draw(top_k=None, top_p=0.85).tolist()) == {0, 1, 2}  # 0.5 + 0.3 < 0.85: the third token is needed
        free = draw(top_k=None)
        assert set(free.tolist()) == {0, 1, 2, 3, 4}
        shares = torch.bincount(free, minlength=5).double() / len(free)
        assert (shares - probs[0].double()).abs().max() < 0.04, (seeded, shares)


def test_a_seeded_row_draws_the_same_tokens_in_any_batch_and_greedy_rows_take_the_argmax():
    logits = torch.randn(4, 50)
    seeded = SamplingParams(temperature=1.0, top_k=None)
    others = [SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=1.3, top_p=0.9), SamplingParams(temperature=0)]
    alone_g, mixed_g = torch.Generator().manual_seed(77), torch.Generator().manual_seed(77)
    drawn = set()
    for _ in range(20):
        alone = Sampler([seeded], [alone_g], 50, logits.device)(logits[2:3]).tolist()
        mixed = Sampler([others[0], others[1], seeded, others[2]], [None, torch.Generator().manual_seed(3), mixed_g, None],
                        50, logits.device)(logits).tolist()  # fmt: skip
        assert mixed[2] == alone[0] and mixed[3] == int(logits[3].argmax())
        drawn.add(alone[0])
    assert len(drawn) > 3  # its generator moves on


class ScriptedBackend:
    """Emits a fixed script of tokens per cache row (its k-th call for a row gives script[k]);
    records how many calls ran."""

    name = "scripted"

    def __init__(self, scripts: list[list[int]], vocab_size: int = 10):
        self.config = ModelConfig(vocab_size=vocab_size, d_model=4, nhead=1, d_ff=4, n_layers=1, max_len=64)
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.scripts = scripts
        self.steps = 0

    def allocate_cache(self, rows, slots):
        return [0] * rows  # calls seen per row

    def step(self, batch, cache):
        logits = torch.zeros(batch.size, self.config.vocab_size)
        for b, row in enumerate(batch.host_rows):
            script = self.scripts[row]
            logits[b, script[min(cache[row], len(script) - 1)]] = 1.0
            cache[row] += 1
        self.steps += 1
        return logits


def test_rows_end_at_eos_and_the_loop_stops_when_all_have():
    backend = ScriptedBackend([[3, 9, 4, 4, 4], [5, 6, 7, 9, 4]])
    runtime = Runtime(backend, tokenizer=None, decode_steps=1)
    runtime.eos_id = 9
    assert token_ids(runtime, [[1], [1, 2]], max_new_tokens=50, temperature=0) == [[3], [5, 6, 7]]
    assert backend.steps == 4  # a prefill + 3 decode calls; not 50


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_stop_token_ids_end_rows_with_reason_stop_and_are_not_part_of_the_completion(decode_steps):
    """In the engine, a stop token id ends its row where it is generated (reason "stop"; EOS:
    "eos"), also within a multi-step decode; through `Runtime`, like EOS it is left out of the
    completion, whose reason is "stop" either way, and a row with neither runs to its length."""
    scripts = [[3, 9, 4, 4, 4], [5, 6, 8, 4, 4], [2, 7, 2, 2, 2]]
    stop = SamplingParams(max_new_tokens=4, temperature=0, stop_token_ids=[8, 7])
    engine = Engine(ScriptedBackend(scripts), max_batch_size=3, max_len=16, decode_steps=decode_steps)
    ids = [engine.add_request([1], stop, eos_id=9), engine.add_request([1, 2], stop, eos_id=9),
           engine.add_request([3], SamplingParams(max_new_tokens=4, temperature=0), eos_id=9)]  # fmt: skip
    outputs = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id].append((out.token, out.finish_reason))
    assert list(outputs.values()) == [[(3, None), (9, "eos")], [(5, None), (6, None), (8, "stop")],
                                      [(2, None), (7, None), (2, None), (2, "length")]]  # fmt: skip

    def runtime(scripts: list[list[int]]) -> Runtime:  # a fresh backend: its rows count their calls across runs
        runtime = Runtime(ScriptedBackend(scripts), tokenizer=None, decode_steps=decode_steps)
        runtime.eos_id = 9
        return runtime

    assert runtime(scripts).generate([[1], [1, 2], [3]], stop) == [
        Output("", [3], "stop"), Output("", [5, 6], "stop"), Output("", [2], "stop")]  # 7 ends row 2 too
    pieces = [(p.token_ids, p.finish_reason) for p in runtime(scripts[1:]).stream([1, 2], stop)]
    assert pieces == [([5], None), ([6], None), ([], "stop")]


@pytest.mark.parametrize(
    "prompts, message",
    [
        ([], "no prompts given"),
        ([[1, 2], []], "prompt 1 is empty"),
        ([[1, 61]], r"prompt 0: token id 61 is outside the vocabulary \[0, 61\)"),
        ([[-1]], "token id -1 is outside"),
        ([[1.5]], "prompt 0: token id 1.5 at index 0 is not an integer"),
        ([[1] * 40], "prompt 0 has 40 tokens; with max_new_tokens=30 that exceeds the model's context of 64"),
    ],
)
def test_bad_prompts(prompts, message):
    short_context = ModelConfig(vocab_size=61, d_model=32, nhead=4, d_ff=64, n_layers=2, max_len=64)
    runtime = Runtime.from_model(TransformerLM(short_context), device="cpu")
    with pytest.raises(TformerError, match=message):
        token_ids(runtime, prompts, max_new_tokens=30)


def test_prompt_filling_the_context_exactly_is_fine(trained):
    runtime = Runtime.from_model(trained[0], device="cpu")
    out = token_ids(runtime, [[7] * 500], max_new_tokens=12, temperature=0)  # 500 + 12 == max_len 512
    assert len(out[0]) == 12


@pytest.mark.parametrize(
    "sampling, message",
    [
        (dict(temperature=-1), "temperature must be a finite number >= 0"),
        (dict(temperature=math.nan), "temperature must be a finite number >= 0"),
        (dict(top_k=0), r"top_k \(None = all\) must be a positive integer"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (dict(seed="x"), "seed must be an integer"),
        (dict(temprature=0.5), "unknown sampling option"),
    ],
)
def test_bad_sampling_values(trained, sampling, message):
    runtime = Runtime.from_model(trained[0], device="cpu")
    with pytest.raises(TformerError, match=message):
        token_ids(runtime, [[1, 2]], **sampling)
