"""The public API: tformer.load, text generation, streaming, stop strings, tokenizer handling."""

from __future__ import annotations

import pytest
import torch

import tformer
from tformer.checkpoint import save_checkpoint
from tformer.errors import TformerError
from tformer.tokenizer import Tokenizer

from conftest import token_ids


@pytest.fixture
def saved(tmp_path, trained):
    model, tokenizer = trained
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, tokenizer)
    return path


def test_tokenizer_is_lossless_for_any_unicode(trained):
    tokenizer = trained[1]
    text = "héllo wörld 🌍 中文\tdef f(x):\r\n    return x ** 2  # ☃\x00"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    stream = tokenizer.text_stream()
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)  # no broken character shown mid-stream


def test_tokenizer_json_round_trip(tmp_path, trained):
    tokenizer = trained[1]
    tokenizer.save(tmp_path / "tokenizer.json")
    again = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert again.encode("import os") == tokenizer.encode("import os") and again.eos_id == tokenizer.eos_id
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TformerError, match="bad.json: not a valid tokenizer.json"):
        Tokenizer.from_file(tmp_path / "bad.json")


def test_generate_stream_and_ids_agree(saved):
    """Text and id prompts, `generate` and `stream`: one completion, as text, ids and reason."""
    runtime = tformer.load(saved, device="cpu")
    outs = runtime.generate(["def ", "import "], max_new_tokens=30, temperature=0)
    assert len(outs) == 2 and all(out.text for out in outs)
    assert all(out.finish_reason in ("stop", "length") for out in outs)
    short = runtime.generate("def ", max_new_tokens=3, temperature=0)[0]
    assert (short.token_ids, short.finish_reason) == (outs[0].token_ids[:3], "length")
    assert runtime.tokenizer.decode(outs[0].token_ids) == outs[0].text
    pieces = list(runtime.stream("def ", max_new_tokens=30, temperature=0))
    assert "".join(p.text for p in pieces) == outs[0].text
    assert [t for p in pieces for t in p.token_ids] == outs[0].token_ids
    assert [p.finish_reason for p in pieces] == [None] * (len(pieces) - 1) + [outs[0].finish_reason]
    prompt = runtime.tokenizer.encode("def ")
    assert runtime.generate([prompt], max_new_tokens=30, temperature=0) == outs[:1]  # ids in, text out too
    assert [t for p in runtime.stream(prompt, max_new_tokens=30, temperature=0) for t in p.token_ids] == outs[0].token_ids
    assert runtime.generate("def ", max_new_tokens=30, temperature=0) == outs[:1]
    params = tformer.SamplingParams(max_new_tokens=30, temperature=0)
    assert runtime.generate("def ", params) == outs[:1]
    assert list(runtime.stream("def ", params)) == pieces


def test_stop_strings_cut_generate_and_stream_alike(saved):
    runtime = tformer.load(saved, device="cpu")
    full = runtime.generate("def ", max_new_tokens=40, temperature=0)[0].text
    stop = full[10:13]
    cut = full[: full.index(stop)]
    out = runtime.generate("def ", stop=[stop], max_new_tokens=40, temperature=0)[0]
    assert (out.text, out.finish_reason) == (cut, "stop")
    assert "".join(p.text for p in runtime.stream("def ", stop=[stop], max_new_tokens=40, temperature=0)) == cut
    with pytest.raises(TformerError, match="stop strings must be non-empty"):
        runtime.generate("def ", stop=[""])


def test_stop_token_ids_end_generate_and_stream_and_are_not_in_the_completion(saved):
    """A stop token id ends the request where it is first generated, finish reason "stop", and,
    like EOS, is not part of the completion's ids or text."""
    runtime = tformer.load(saved, device="cpu")
    full = runtime.generate("def ", max_new_tokens=40, temperature=0)[0]
    at = next(i for i, t in enumerate(full.token_ids) if i >= 3 and t not in full.token_ids[:i])
    stop_id = full.token_ids[at]
    out = runtime.generate("def ", stop_token_ids=[stop_id], max_new_tokens=40, temperature=0)[0]
    assert (out.token_ids, out.finish_reason) == (full.token_ids[:at], "stop")
    assert out.text == runtime.tokenizer.decode(full.token_ids[:at])
    pieces = list(runtime.stream("def ", stop_token_ids=stop_id, max_new_tokens=40, temperature=0))
    assert [t for p in pieces for t in p.token_ids] == out.token_ids and pieces[-1].finish_reason == "stop"
    assert "".join(p.text for p in pieces) == out.text


def test_tutorial_checkpoint_without_tokenizer(tmp_path, reference_model, trained):
    path = tmp_path / "model.pt"
    torch.save(reference_model.state_dict(), path)
    runtime = tformer.load(path, nhead=4, device="cpu")
    out = runtime.generate([[1, 2, 3]], max_new_tokens=5, temperature=0)[0]
    assert (out.text, len(out.token_ids), out.finish_reason) == ("", 5, "length")  # ids work without a tokenizer
    with pytest.raises(TformerError, match="no tokenizer: pass tokenizer='tokenizer.json'"):
        runtime.generate("hello")
    trained[1].save(tmp_path / "tokenizer.json")
    with pytest.raises(TformerError, match="tokenizer has 320 ids but the model only 61"):
        tformer.load(path, nhead=4, tokenizer=tmp_path / "tokenizer.json", device="cpu")


def test_external_tokenizer_replaces_the_missing_one(tmp_path, trained):
    model, tokenizer = trained
    torch.save(model.state_dict(), tmp_path / "model.pt")
    tokenizer.save(tmp_path / "tokenizer.json")
    runtime = tformer.load(tmp_path / "model.pt", nhead=4, tokenizer=tmp_path / "tokenizer.json", device="cpu")
    assert runtime.generate("def ", max_new_tokens=5, temperature=0)[0].text


def test_half_precision_runs(saved):
    runtime = tformer.load(saved, device="cpu", dtype="bf16")
    assert runtime.backend.model.decoder.weight.dtype == torch.bfloat16
    assert len(token_ids(runtime, [[5, 6], [7]], max_new_tokens=8)[1]) == 8


def test_the_engine_is_sized_once_by_load_and_calls_of_any_size_run_on_it(saved):
    """Calls of growing batch and length run on the engine `load` sized (8 rows and the model's
    context by default): never a new engine or cache, which a compiling backend would compile
    again for (see test_compile). Beyond its bounds a call is refused, naming the fix."""
    runtime = tformer.load(saved, device="cpu")
    engine, cache = runtime.engine, runtime.engine.runner.cache
    assert (engine.max_batch_size, engine.max_len) == (8, runtime.config.max_len)
    for batch, new in ((1, 2), (1, 40), (8, 4), (11, 30)):  # 11 prompts: 3 wait for a free row
        assert [len(r) for r in token_ids(runtime, [[5, 6, 7]] * batch, max_new_tokens=new, temperature=0)] == [new] * batch
        assert runtime.engine is engine and engine.runner.cache is cache
    small = tformer.load(saved, device="cpu", max_batch_size=2, max_len=16)
    assert (small.engine.max_batch_size, small.engine.max_len) == (2, 16)
    with pytest.raises(TformerError, match=r"exceeds this engine's max_len of 16 tokens: .* load with a larger max_len"):
        token_ids(small, [[5, 6, 7]], max_new_tokens=14)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(backend="tensorrt"), "unknown backend 'tensorrt'; choose one of: eager"),
        (dict(dtype="int8"), "unsupported dtype 'int8'"),
        (dict(device="tpu"), "unknown device 'tpu'"),
    ],
)
def test_bad_load_options(saved, kwargs, message):
    with pytest.raises(TformerError, match=message):
        tformer.load(saved, **{"device": "cpu", **kwargs})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_requested_without_cuda(saved):
    with pytest.raises(TformerError, match="CUDA is not available on this machine; use device='cpu'"):
        tformer.load(saved, device="cuda")
