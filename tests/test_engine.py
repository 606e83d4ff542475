"""The continuous-batching engine, on every backend, against the tutorial model run alone.

The reference for each request is the tutorial's `TransformerModel` re-running the whole
sequence for every token (its own loop), for that request's prompt alone: whatever else shares
the batch, whenever it joins or leaves, a request's greedy tokens must be exactly those.

Two workloads: the full one (32 requests, prompts up to 100 tokens, outputs up to 80, joining a
batch of 8 one per step) runs on eager, the reference backend, and on onnx; every other backend
runs a small one that still has rows joining, waiting, leaving, moving down (compaction) and
padded prefills (`test_small_workload_covers_what_batching_does` checks that it does), on top of
its own parity tests (test_compile, test_aot, test_kernels). The Triton interpreter is the reason:
the full workload took it 277 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import random
from dataclasses import replace

import pytest
import torch

import tformer
from conftest import at_once, reference_of, token_ids
from tformer.engine import Engine, SamplingParams
from tformer.engine.engine import EngineStats
from tformer.engine.front import Coalescer, EngineFront
from tformer.engine.request import RequestOutput
from tformer.errors import TformerError
from tformer.reference import generate_full_recompute
from tformer.runtime import Runtime

FULL = dict(requests=32, prompts=(1, 100), outputs=(1, 80), rows=8, max_len=192, threads=6, thread_tokens=8)
SMALL = dict(requests=7, prompts=(1, 12), outputs=(1, 6), rows=3, max_len=32, threads=3, thread_tokens=4)


def make_workload(model, requests: int, prompts: tuple[int, int], outputs: tuple[int, int], **_) -> tuple:
    """`requests` seeded requests, the first at the shortest prompt and longest output, the second
    the other way round, then random lengths in the ranges; and the tutorial model's greedy tokens
    for each prompt alone: (prompts, outputs, expected)."""
    reference = reference_of(model)
    rng = random.Random(7)
    lengths = [prompts[0], prompts[1]] + [rng.randint(*prompts) for _ in range(requests - 2)]
    news = [outputs[1], outputs[0]] + [rng.randint(*outputs) for _ in range(requests - 2)]
    ids = [[rng.randrange(model.config.vocab_size) for _ in range(n)] for n in lengths]
    expected = [generate_full_recompute(reference, [p], n)[0] for p, n in zip(ids, news)]
    return ids, news, expected


@pytest.fixture(scope="module")
def workload(trained):
    return make_workload(trained[0], **FULL)


@pytest.fixture(scope="module")
def small_workload(trained):
    return make_workload(trained[0], **SMALL)


def run_staggered(engine: Engine, prompts: list[list[int]], outputs: list[int], per_step: int = 1) -> dict[int, list[int]]:
    """Add `per_step` requests at each engine step (so requests join a running batch, and wait
    once all rows are busy); step until every request is done. Tokens per request, in order."""
    tokens: dict[int, list[int]] = {}
    order: list[int] = []
    step = 0
    while len(order) < len(prompts) or engine.has_unfinished():
        for i in range(len(order), min(len(order) + per_step, len(prompts))):
            order.append(engine.add_request(prompts[i], SamplingParams(max_new_tokens=outputs[i], temperature=0)))
        for out in engine.step():
            tokens.setdefault(out.request_id, []).append(out.token)
        step += 1
        assert step < 10_000
    return {i: tokens[rid] for i, rid in enumerate(order)}


def runtime_of(backend: str, trained, exports: dict, compiled) -> Runtime:
    """The backend over the trained model, built once per session where that is costly: the
    exports' backends from the session's export directories, compile from its compiled runtime."""
    model, _ = trained
    if backend in exports:
        return tformer.load(exports[backend](), device="cpu")
    if backend == "compile":
        return compiled("cpu").runtime
    return Runtime.from_model(copy.deepcopy(model), backend=backend, device="cpu")


READS_BACK = ("tolist", "item", "__int__", "__index__", "__float__", "__bool__")


class ReadBack(BaseException):
    """Not an Exception: the engine fails a request whose step raises one, and this must end the test."""


@contextlib.contextmanager
def steps_never_read_back(backend):
    """Within `backend.step`, any Python-level read of a tensor's values (`.tolist()`, `.item()`,
    `int()`, `bool()`...) fails the test: backend contract v3 takes host numbers from the
    `Batch`, never from the device (on a GPU each read would wait for the device)."""
    step = backend.step

    def refuse(*_args, **_kwargs):
        raise ReadBack(f"{backend.name} read a tensor's values back during a step")

    def guarded(batch, cache):
        saved = {name: getattr(torch.Tensor, name) for name in READS_BACK}
        try:
            for name in READS_BACK:
                setattr(torch.Tensor, name, refuse)
            return step(batch, cache)
        finally:
            for name, method in saved.items():
                setattr(torch.Tensor, name, method)

    backend.step = guarded  # an instance attribute over the class's method, removed after
    try:
        yield
    finally:
        del backend.step


def check_backend(runtime: Runtime, engine: Engine, workload, size: dict, per_step: int) -> None:
    prompts, outputs, expected = workload
    name = runtime.backend.name
    # The tutorial's nn.TransformerEncoder (naive, the baseline) checks its mask's values itself.
    guard = steps_never_read_back(runtime.backend) if name != "naive" else contextlib.nullcontext()
    with guard:
        got = run_staggered(engine, prompts, outputs, per_step)
    wrong = [i for i in range(len(prompts)) if got[i] != expected[i]]
    assert not wrong, f"{name}: requests {wrong} differ from the tutorial model run alone (first: {wrong[0]})"
    # Runtime's methods from several threads at once on the same backend: their requests share the
    # batch. Greedy, so the first tokens of each are those of the full request.
    n, k = size["threads"], size["thread_tokens"]
    threaded = at_once(lambda i: token_ids(runtime, [prompts[i]], max_new_tokens=min(k, outputs[i]), temperature=0)[0], n)
    assert threaded == [expected[i][:k] for i in range(n)], f"{name}: threads at once differ from the requests alone"


@pytest.fixture(scope="module")
def exports(request) -> dict:
    """The export backends' directories, built (once per session) only when a test asks."""
    return {"onnx": lambda: request.getfixturevalue("onnx_export"), "aot": lambda: request.getfixturevalue("pt2_export")}


EXPORTS = pytest.mark.exports  # see conftest.uses_exports


@pytest.mark.parametrize("backend", ["eager", pytest.param("onnx", marks=EXPORTS)])
def test_staggered_requests_equal_the_tutorial_model_alone(trained, workload, exports, compiled, backend):
    runtime = runtime_of(backend, trained, exports, compiled)
    check_backend(runtime, Engine(runtime.backend, FULL["rows"], FULL["max_len"]), workload, FULL, per_step=1)


@pytest.mark.parametrize("backend", ["naive", "compile", pytest.param("aot", marks=EXPORTS), "triton"])
def test_small_staggered_workload_equals_the_tutorial_model_alone(trained, small_workload, exports, compiled, backend):
    """Two requests join per step into 3 rows (4 for compile: the rows it was compiled for)."""
    runtime = runtime_of(backend, trained, exports, compiled)
    engine = runtime.engine if backend == "compile" else Engine(runtime.backend, SMALL["rows"], SMALL["max_len"])
    check_backend(runtime, engine, small_workload, SMALL, per_step=2)


def test_workload_is_varied(workload):
    prompts, outputs, expected = workload
    assert min(map(len, prompts)) == 1 and max(map(len, prompts)) == 100 and max(outputs) == 80
    assert len({t for row in expected for t in row}) >= 10  # greedy varies with context


def test_small_workload_covers_what_batching_does(trained, small_workload):
    """On the small workload's 3 rows, the engine's calls include requests joining a running batch
    and waiting for a row, prefills of rows of different lengths (padded) beside decodes, rows
    leaving mid-batch, a row moved down into a freed one, and decodes of several steps in a row
    (none waiting) beside single ones (some waiting)."""
    prompts, outputs, _ = small_workload
    engine = Engine(Runtime.from_model(copy.deepcopy(trained[0]), device="cpu").backend, SMALL["rows"], SMALL["max_len"])
    runner, scheduler = engine.runner, engine.scheduler
    prefills, decodes, moves, waiting, steps = [], [], [], [], []
    prefill, decode, move, schedule = runner.prefill, runner.decode, runner.move, scheduler.schedule
    runner.prefill = lambda work: prefills.append([n for _, n in work]) or prefill(work)
    runner.decode = lambda requests, pick, n: decodes.append({r.id for r in requests}) or steps.append(n) or decode(
        requests, pick, n)
    runner.move = lambda request, row: (moved := move(request, row)) and moves.append(row) or moved
    scheduler.schedule = lambda: (schedule(), waiting.append(len(scheduler.waiting)))[0]  # after admission
    run_staggered(engine, prompts, outputs, per_step=2)
    assert any(len(set(lengths)) > 1 for lengths in prefills), "no padded prefill of rows of different lengths"
    assert max(waiting) >= 1, "no request ever waited for a row"
    assert any(a - b for a, b in zip(decodes, decodes[1:])), "no request left a running batch"
    assert any(b - a and a & b for a, b in zip(decodes, decodes[1:])), "no request joined a running batch"
    assert moves, "no row was moved down into a freed one"
    assert max(steps) > 1 and min(steps) == 1, "no multi-step decode, or only such"


def test_multi_step_decode_gives_the_outputs_of_single_steps_in_their_order(trained):
    """Greedy and seeded requests, ending by length, EOS and stop token ids mid-pass, more of them
    than rows: every output, its token, finish reason and place in the stream, is the same with 5
    decode steps per pass as with one, in fewer passes. (Request 2 ends by EOS while others wait
    for its row: only single steps run then, or the next would start later.)"""
    model, _ = trained
    backend = Runtime.from_model(copy.deepcopy(model), device="cpu").backend
    rng = random.Random(5)
    prompts = [[rng.randrange(model.config.vocab_size) for _ in range(rng.randint(1, 20))] for _ in range(9)]
    greedy, seeded = SamplingParams(max_new_tokens=23, temperature=0), SamplingParams(max_new_tokens=17, seed=9)

    def run(decode_steps: int, eos_ids={}, stop_ids={}) -> tuple[list[tuple], int]:
        engine = Engine(backend, max_batch_size=4, max_len=64, decode_steps=decode_steps)
        for i, prompt in enumerate(prompts):
            params = replace(greedy if i % 2 else seeded, stop_token_ids=stop_ids.get(i, ()))
            engine.add_request(prompt, params, eos_ids.get(i), request_id=i)  # 7 and 8 run when none waits
        outputs, passes = [], 0
        while engine.has_unfinished():
            outputs += [(o.request_id, o.token, o.finish_reason) for o in engine.step()]
            passes += 1
        return outputs, passes

    plain, _ = run(1)
    tokens = {i: [t for r, t, _ in plain if r == i] for i in range(len(prompts))}
    # Each ends its request mid-way: an EOS id or a stop token id first seen at its 5th token or later.
    ends = {i: next(t for j, t in enumerate(tokens[i]) if j >= 4 and t not in tokens[i][:j]) for i in (2, 7, 8)}
    eos, stop = {i: ends[i] for i in (2, 8)}, {7: ends[7]}
    single, single_passes = run(1, eos, stop)
    multi, multi_passes = run(5, eos, stop)
    ends = {i: (len([r for r, _, _ in single if r == i]), reason) for i, _, reason in single if reason}
    assert ends[2][1] == ends[8][1] == "eos" and ends[7][1] == "stop" and min(ends[i][0] for i in (2, 7, 8)) >= 5
    assert multi == single and multi_passes < single_passes


def test_seeded_request_is_the_same_alone_and_in_a_busy_batch(trained):
    model, _ = trained
    backend = Runtime.from_model(copy.deepcopy(model), device="cpu").backend
    prompt = [5, 17, 42, 8, 99]
    params = SamplingParams(max_new_tokens=30, temperature=1.0, top_k=None, seed=1234)

    alone = Engine(backend, max_batch_size=4, max_len=64)
    rid = alone.add_request(prompt, params)
    solo = [o.token for _ in iter(alone.has_unfinished, False) for o in alone.step() if o.request_id == rid]

    busy = Engine(backend, max_batch_size=4, max_len=64)
    noise = [busy.add_request([i + 1] * (i + 2), SamplingParams(max_new_tokens=40, temperature=0.9)) for i in range(3)]
    busy.step()
    busy.step()  # the others are decoding when ours arrives
    rid = busy.add_request(prompt, params)
    crowded = [o.token for _ in iter(busy.has_unfinished, False) for o in busy.step() if o.request_id == rid]
    assert len(noise) == 3 and len(solo) == 30 and crowded == solo


def test_a_seeded_long_prompt_is_the_same_however_its_prefill_is_cut(trained):
    """A prompt longer than a chunk is prefilled over several steps, how many depends on what
    else takes the step's token budget (4 chunks); its seeded draws must not: a row still
    prefilling draws nothing from its generator. Alone, 300 tokens go in as 256 + 44; behind
    requests that leave 20 of the budget, as 20 + 256 + 24."""
    model, _ = trained
    backend = Runtime.from_model(copy.deepcopy(model), device="cpu").backend
    rng = random.Random(3)
    prompt = [rng.randrange(model.config.vocab_size) for _ in range(300)]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=None, seed=77)
    greedy = SamplingParams(max_new_tokens=2, temperature=0)
    got = []
    for others in ([], [300, 300, 300, 236]):
        engine = Engine(backend, max_batch_size=5, max_len=320)
        for n in others:
            engine.add_request([1] * n, greedy)
        rid = engine.add_request(prompt, params)
        got.append([o.token for _ in iter(engine.has_unfinished, False) for o in engine.step() if o.request_id == rid])
    assert len(got[0]) == 12 and got[1] == got[0]


def test_abort_frees_the_row_for_a_waiting_request(trained):
    model, _ = trained
    backend = Runtime.from_model(copy.deepcopy(model), device="cpu").backend
    engine = Engine(backend, max_batch_size=2, max_len=64)
    long = SamplingParams(max_new_tokens=50, temperature=0)
    a, b, c = (engine.add_request([1, 2, 3], long) for _ in range(3))
    first = engine.step()
    assert {o.request_id for o in first} == {a, b}  # c waits: both rows are busy
    assert engine.stats() == EngineStats(running=2, waiting=1, rows_in_use=2, aborts=0, tokens=2)
    assert engine.abort(a)
    assert engine.stats() == EngineStats(running=1, waiting=1, rows_in_use=1, aborts=1, tokens=2)  # its row is free at once
    second = engine.step()
    assert (a, None, "abort") in [(o.request_id, o.token, o.finish_reason) for o in second]
    assert {o.request_id for o in second if o.token is not None} == {b, c}  # c started in the very next step
    assert engine.stats().tokens == 4
    assert not engine.abort(a)  # already finished
    waiting = engine.add_request([4], long)
    assert engine.abort(waiting)  # a waiting request can be aborted too
    assert (waiting, None, "abort") in [(o.request_id, o.token, o.finish_reason) for o in engine.step()]
    assert engine.stats().aborts == 2  # the abort of a finished request did not count


def test_finish_reasons(trained):
    model, _ = trained
    backend = Runtime.from_model(copy.deepcopy(model), device="cpu").backend
    engine = Engine(backend, max_batch_size=4, max_len=64)
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    probe = engine.add_request([3, 1, 4], greedy)
    tokens = [o.token for _ in iter(engine.has_unfinished, False) for o in engine.step()]
    assert len(tokens) == 12
    by_eos = engine.add_request([3, 1, 4], greedy, eos_id=tokens[4])
    at = next(j for j, t in enumerate(tokens) if j >= 2 and t not in tokens[:j])  # a stop token id's first time
    by_stop = engine.add_request([3, 1, 4], replace(greedy, stop_token_ids=[tokens[at]]))
    by_length = engine.add_request([3, 1, 4], SamplingParams(max_new_tokens=3, temperature=0))
    last = {}
    while engine.has_unfinished():
        for o in engine.step():
            last[o.request_id] = o
    assert probe not in last
    assert (last[by_eos].finish_reason, last[by_eos].token) == ("eos", tokens[4])
    assert (last[by_stop].finish_reason, last[by_stop].token) == ("stop", tokens[at])
    assert last[by_length].finish_reason == "length"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda e: e.add_request([1] * 60, SamplingParams(max_new_tokens=10)),
         "the prompt has 60 tokens; with max_new_tokens=10 that exceeds this engine's max_len of 64 tokens: .* "
         "a larger max_len \\(up to the model's context, 512\\)"),
        (lambda e: e.add_request([], SamplingParams()), "the prompt is empty"),
        (lambda e: e.add_request([400], SamplingParams()), r"token id 400 is outside the vocabulary \[0, 320\)"),
        (lambda e: e.add_request([1], SamplingParams(max_new_tokens=4, stop_token_ids=[3, 320, 400])),
         r"stop_token_ids \[320, 400\] are outside the vocabulary \[0, 320\); use ids of this model's tokenizer"),
    ],
)
def test_requests_that_can_never_run_are_refused_at_once(trained, call, message):
    model, _ = trained
    backend = Runtime.from_model(copy.deepcopy(model), device="cpu").backend
    engine = Engine(backend, max_batch_size=2, max_len=64)
    with pytest.raises(TformerError, match=message):
        call(engine)
    assert not engine.has_unfinished()


def test_engine_options_and_cache_size(trained):
    model, _ = trained
    backend = Runtime.from_model(copy.deepcopy(model), device="cpu").backend
    engine = Engine(backend, max_batch_size=3, max_len=100)
    c = model.config
    slots = 100 + engine.chunk
    assert engine.cache_bytes == 2 * c.n_layers * 3 * c.nhead * slots * c.head_dim * 4
    assert "max_batch_size=3, max_len=100, cache" in repr(engine)
    with pytest.raises(TformerError, match="max_len must be an integer in"):
        Engine(backend, max_batch_size=2, max_len=c.max_len + 1)
    with pytest.raises(TformerError, match="max_batch_size must be a positive integer"):
        Engine(backend, max_batch_size=0)


def test_static_batching_admits_only_into_an_empty_batch(trained):
    """The throughput benchmark's baseline: a new batch starts only when the last one is done."""
    model, _ = trained
    backend = Runtime.from_model(copy.deepcopy(model), device="cpu").backend
    engine = Engine(backend, max_batch_size=2, max_len=64, static=True)
    short, long = SamplingParams(max_new_tokens=2, temperature=0), SamplingParams(max_new_tokens=6, temperature=0)
    a, b, c = engine.add_request([1, 2], short), engine.add_request([3], long), engine.add_request([4], short)
    steps = []
    while engine.has_unfinished():
        steps.append({o.request_id for o in engine.step()})
    first_c = next(i for i, ids in enumerate(steps) if c in ids)
    last_b = max(i for i, ids in enumerate(steps) if b in ids)
    assert a in steps[0] and b in steps[0] and first_c == last_b + 1  # c waited for b, though a's row was free


def test_async_front_serves_coroutines_and_threads_at_once(trained, workload):
    """Coroutines on two event loops (one per thread) submit at once through one `EngineFront`,
    one prompt a submission on one loop, all five in one submission on the other; every request
    streams exactly the tokens it gets alone, the last output with its reason."""
    model, _ = trained
    prompts, outputs, expected = workload
    front = EngineFront(Engine(Runtime.from_model(copy.deepcopy(model), device="cpu").backend, max_batch_size=4, max_len=192))
    front.start()

    async def tokens_of(stream) -> dict[int, tuple[list[int], str | None]]:
        got = {i: ([], None) for i in stream.index.values()}
        async for batch in stream:
            for out in batch:
                tokens, _ = got[stream.index[out.request_id]]
                tokens.append(out.token)
                got[stream.index[out.request_id]] = (tokens, out.finish_reason)
        return got

    async def one_by_one() -> list:
        streams = [front.submit([prompts[i]], SamplingParams(max_new_tokens=outputs[i], temperature=0)) for i in range(5)]
        return [(await tokens_of(s))[0] for s in streams]

    shortest = min(outputs[5:10])

    async def all_at_once() -> list:
        got = await tokens_of(front.submit(prompts[5:10], SamplingParams(max_new_tokens=shortest, temperature=0)))
        return [got[i] for i in range(5)]

    try:
        alone, together = at_once(lambda t: asyncio.run(all_at_once() if t else one_by_one()), 2)
    finally:
        front.shutdown()
    assert alone == [(expected[i], "length") for i in range(5)]
    assert together == [(expected[i][:shortest], "length") for i in range(5, 10)]


def test_async_consumer_that_stops_listening_aborts_its_request(trained):
    """A client that goes away (its generator closed after two tokens) aborts its request: the
    engine runs nothing more for it and its row serves the waiting request."""
    model, _ = trained
    engine = Engine(Runtime.from_model(copy.deepcopy(model), device="cpu").backend, max_batch_size=1, max_len=64)
    front = EngineFront(engine)
    front.start()
    long = SamplingParams(max_new_tokens=60, temperature=0)

    async def scenario() -> tuple[int, int]:
        seen, stream = 0, front.submit([[1, 2, 3]], long)
        async for batch in stream:
            seen += len(batch)
            if seen >= 2:
                break
        await stream.aclose()  # the consumer leaves: its request is aborted
        short = [out.token async for batch in front.submit([[4, 5]], SamplingParams(max_new_tokens=3, temperature=0))
                 for out in batch]  # fmt: skip
        return min(seen, 2), len(short)

    try:
        assert asyncio.run(asyncio.wait_for(scenario(), 60)) == (2, 3)  # the one row went to the second request
        assert not engine.has_unfinished()
    finally:
        front.shutdown()


def test_coalescer_sends_the_first_token_at_once_then_groups_and_flushes_at_the_end():
    """`--stream-interval 3`: a request's first token goes at once, then its tokens three at a
    time; an ending (finished or aborted) sends whatever is held with it; interval 1 holds nothing."""
    out = RequestOutput
    steps = [[out(1, 10), out(2, 20)], [out(1, 11), out(2, 21)], [out(1, 12), out(2, None, "abort")],
             [out(1, 13)], [out(1, 14)], [out(1, 15, "length")]]  # fmt: skip
    coalesce = Coalescer(3)
    sent = [coalesce(step) for step in steps]
    assert sent == [[out(1, 10), out(2, 20)], [], [out(2, 21), out(2, None, "abort")],
                    [out(1, 11), out(1, 12), out(1, 13)], [], [out(1, 14), out(1, 15, "length")]]  # fmt: skip
    assert [Coalescer(1)(step) for step in steps] == steps


def test_adapted_threads_run_small_steps_on_one_thread_and_give_the_same_tokens(trained):
    """`Engine.adapt_threads` (tformer serve's engine process): a step below `PARALLEL_MACS` runs on
    one torch thread, a larger one on the threads torch had; the tokens do not change."""
    from tformer.engine.runner import PARALLEL_MACS

    model, _ = trained
    backend = Runtime.from_model(copy.deepcopy(model), device="cpu").backend
    c = backend.config
    per_token = c.n_layers * (4 * c.d_model**2 + 2 * c.d_model * c.d_ff) + c.d_model * c.vocab_size
    prompts = [[(7 * i + j) % c.vocab_size for j in range(100)] for i in range(4)]  # their prefill is one large step
    assert 400 * per_token >= PARALLEL_MACS and 4 * per_token < PARALLEL_MACS  # a decode of 4 rows is small
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        plain = Engine(backend, max_batch_size=4, max_len=128)
        adapted = Engine(backend, max_batch_size=4, max_len=128)
        adapted.adapt_threads()
        got = {}
        for name, engine in (("plain", plain), ("adapted", adapted)):
            ids = [engine.add_request(p, SamplingParams(max_new_tokens=5, temperature=0)) for p in prompts]
            tokens, threads = {i: [] for i in ids}, []
            while engine.has_unfinished():
                for o in engine.step():
                    tokens[o.request_id].append(o.token)
                threads.append(torch.get_num_threads())
            got[name] = list(tokens.values()), threads
        assert got["adapted"][0] == got["plain"][0] and all(len(t) == 5 for t in got["plain"][0])
        assert got["adapted"][1][0] == 2 and set(got["adapted"][1][1:]) == {1}  # the prefill, then 4-row decodes
        assert set(got["plain"][1]) == {2}
    finally:
        torch.set_num_threads(before)


def test_a_batch_holds_its_numbers_on_the_host_and_in_one_device_buffer():
    from tformer.backends.batch import Batch

    cpu = torch.device("cpu")
    batch = Batch.build([5, 6, 0, 7, 8, 9], 3, [4, 0], [6, 3], [2, 3], cpu)  # row 0: 2 tokens, padded
    assert batch.input_ids.tolist() == [[5, 6, 0], [7, 8, 9]]
    assert (batch.start.tolist(), batch.lengths.tolist(), batch.rows.tolist()) == ([4, 0], [6, 3], [2, 3])
    assert (batch.size, batch.width, batch.decode, batch.span, batch.past, batch.uniform) == (2, 3, False, 6, 4, False)
    assert batch.block == slice(2, 4)  # consecutive rows: read as a view
    storage = {t.untyped_storage().data_ptr() for t in (batch.input_ids, batch.start, batch.lengths, batch.rows)}
    assert len(storage) == 1 and all(t.is_contiguous() for t in (batch.input_ids, batch.start, batch.rows))
    decode = Batch.build([1, 2], 1, [3, 3], [4, 4], [2, 0], cpu)
    assert decode.decode and decode.uniform and decode.block is None  # rows 2, 0: not one block
