"""Values users pass to the Python API: numpy and torch numbers and arrays are taken where Python
ones are, and every wrong value is refused with one line naming the argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tformer
from tformer.engine import SamplingParams
from tformer.errors import TformerError
from tformer.runtime import Runtime

from conftest import TINY, tformer_copy, token_ids

PROMPTS = [[1, 2, 3], [4, 5]]


@pytest.fixture(scope="module")
def runtime():
    from conftest import make_reference_model

    return Runtime.from_model(tformer_copy(make_reference_model()), device="cpu")


@pytest.fixture(scope="module")
def expected(runtime):
    return token_ids(runtime, PROMPTS, max_new_tokens=6, temperature=0)


@pytest.mark.parametrize(
    "prompts",
    [
        [[np.int64(1), np.int32(2), 3], [np.uint8(4), torch.tensor(5)]],  # numpy and torch scalars as ids
        [np.array([1, 2, 3]), torch.tensor([4, 5])],  # one 1-D array or tensor per prompt
        [(1, 2, 3), range(4, 6)],  # any sequences
    ],
    ids=["scalars", "1-D arrays", "sequences"],
)
def test_numpy_and_torch_ids_give_the_same_tokens(runtime, expected, prompts):
    assert token_ids(runtime, prompts, max_new_tokens=6, temperature=0) == expected


@pytest.mark.parametrize("make", [np.array, torch.tensor], ids=["numpy", "torch"])
def test_2d_arrays_are_batches(runtime, make):
    batch = make([[1, 2, 3], [4, 5, 6]])
    assert token_ids(runtime, batch, max_new_tokens=6, temperature=0) == token_ids(
        runtime, [[1, 2, 3], [4, 5, 6]], max_new_tokens=6, temperature=0
    )
    streamed = [t for piece in runtime.stream(make([1, 2, 3]), max_new_tokens=6, temperature=0) for t in piece.token_ids]
    assert streamed == token_ids(runtime, [[1, 2, 3]], max_new_tokens=6, temperature=0)[0]


def test_numpy_and_torch_sampling_values(runtime, expected):
    sampled = token_ids(runtime, PROMPTS, max_new_tokens=6, temperature=0.7, top_k=5, top_p=0.9, seed=3)
    again = token_ids(
        runtime, PROMPTS, max_new_tokens=np.int64(6), temperature=np.float32(0.7), top_k=torch.tensor(5),
        top_p=np.float64(0.9), seed=np.uint64(3),
    )  # fmt: skip
    assert again == sampled
    assert token_ids(runtime, PROMPTS, max_new_tokens=torch.tensor(6), temperature=torch.tensor(0.0)) == expected


def test_numpy_nhead_at_load(tmp_path, reference_model, expected):
    torch.save(reference_model.state_dict(), tmp_path / "model.pt")
    loaded = tformer.load(tmp_path / "model.pt", nhead=np.int64(TINY.nhead), device="cpu")
    assert token_ids(loaded, PROMPTS, max_new_tokens=6, temperature=0) == expected


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda rt: token_ids(rt, [1, 2, 3]), r"a list of prompts; for one prompt pass \[ids\]"),
        (lambda rt: token_ids(rt, np.array([1, 2, 3])), r"2-D array .* for one prompt pass \[ids\] or ids\[None\]"),
        (lambda rt: token_ids(rt, None), "prompts must be a string, a list of strings or a list of prompts .*got None"),
        (lambda rt: token_ids(rt, [[1.5, 2]]), "prompt 0: token id 1.5 at index 0 is not an integer"),
        (lambda rt: token_ids(rt, np.array([[0.5, 1.0]])), "prompt 0 must be a 1-D array of integer token ids"),
        (lambda rt: token_ids(rt, [[1, 99]]), r"token id 99 is outside the vocabulary \[0, 61\)"),
        (lambda rt: rt.stream(5), "prompt must be one string or one list of token ids, got int 5"),
        (lambda rt: rt.stream([[1, 2]]), r"prompt: token id \[1, 2\] at index 0 is not an integer"),
        (lambda rt: rt.stream("hello"), "this model has no tokenizer: .* or give prompts as token ids"),
        (lambda rt: token_ids(rt, [[1]], max_new_tokens=True), "max_new_tokens must be an integer, got bool True"),
        (lambda rt: token_ids(rt, [[1]], max_new_tokens=2.0), "max_new_tokens must be an integer, got float"),
        (lambda rt: token_ids(rt, [[1]], seed=2**70), r"seed must be an integer in \[0, 2\*\*64\)"),
        (lambda rt: token_ids(rt, [[1]], seed=-1), r"seed must be an integer in \[0, 2\*\*64\)"),
        (lambda rt: token_ids(rt, [[1]], temperature="hot"), "temperature must be a finite number >= 0"),
        (lambda rt: token_ids(rt, [[1]], temperature=np.float32("inf")), "temperature must be a finite number >= 0"),
        (lambda rt: token_ids(rt, [[1]], top_k=np.int64(0)), "top_k .* must be a positive integer"),
        (lambda rt: token_ids(rt, [[1]], top_p=torch.tensor(1.5)), r"top_p must be in \(0, 1\]"),
        (lambda rt: token_ids(rt, [[1]], stop_token_ids=[1.0]), "stop_token_ids: token id 1.0 at index 0 is not an"),
        (lambda rt: token_ids(rt, [[1]], stop_token_ids=np.int64(-3)), "stop_token_ids must be token ids >= 0, got -3"),
        (lambda rt: token_ids(rt, [[1]], stop_token_ids="7"), "stop_token_ids must be a list of token ids, got str"),
        (lambda rt: token_ids(rt, [[1]], stop_token_ids=[5, 61, 99]), r"stop_token_ids \[61, 99\] are outside the vocab"),
        (lambda rt: token_ids(rt, [[1]], stop=["\n"]), "stop strings need a tokenizer, and this model has none"),
        (lambda rt: token_ids(rt, [[1]], stop_ids=[3]), "unknown sampling option.* stop_ids; known: .*stop_token_ids"),
        (lambda rt: rt.generate([[1]], SamplingParams(), temperature=0), r"give params or keyword options \(temperature\)"),
        (lambda rt: rt.stream([1], {"temperature": 0}), "params must be a tformer.SamplingParams, got dict"),
    ],
)
def test_bad_id_and_sampling_values(runtime, call, message):
    with pytest.raises(TformerError, match=message) as info:
        call(runtime)
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def text_runtime(trained):
    model, tokenizer = trained
    return Runtime.from_model(model, tokenizer, device="cpu")


def test_stop_none_means_no_stop_strings(text_runtime):
    plain = text_runtime.generate("def ", max_new_tokens=12, temperature=0)
    assert text_runtime.generate("def ", stop=None, stop_token_ids=None, max_new_tokens=12, temperature=0) == plain
    assert "".join(p.text for p in text_runtime.stream("def ", stop=None, max_new_tokens=12, temperature=0)) == plain[0].text


def test_numpy_and_torch_stop_token_ids():
    """One id or many, as numpy or torch values: the same request as plain ints."""
    assert SamplingParams(stop_token_ids=np.int64(7)) == SamplingParams(stop_token_ids=[7])
    assert SamplingParams(stop_token_ids=torch.tensor([7, 9])).stop_token_ids == (7, 9)
    assert SamplingParams(stop_token_ids=[np.uint8(7), torch.tensor(9)]).stop_token_ids == (7, 9)
    assert SamplingParams(stop="\n\n").stop == ("\n\n",)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda rt: rt.generate(None), "prompts must be a string, a list of strings or a list of prompts .*got None"),
        (lambda rt: rt.generate(["a", 2]), "prompt 1 must be a string, got int"),
        (lambda rt: rt.generate("a\ud800b"), r"prompt holds a lone surrogate U\+D800 at index 1"),
        (lambda rt: rt.stream(["a"]), "prompt must be one string or one list of token ids, got list"),
        (lambda rt: rt.generate("a", stop=5), "stop must be a string or a list of strings, got int"),
        (lambda rt: rt.generate("a", stop=["\udfff"]), r"stop\[0\] holds a lone surrogate U\+DFFF"),
        (lambda rt: rt.generate("a", stop=["x", ""]), r"stop strings must be non-empty; stop\[1\] is '': leave it out"),
    ],
)
def test_bad_text_values(text_runtime, call, message):
    with pytest.raises(TformerError, match=message) as info:
        call(text_runtime)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(path=123), r"path must be a file or directory path \(str or pathlib.Path\), got int 123"),
        (dict(path=None), "path must be a file or directory path .*got None"),
        (dict(tokenizer=123), "tokenizer must be a tokenizer.json path or a tformer.Tokenizer, got int"),
        (dict(nhead=4.0), "nhead must be an integer, got float"),
        (dict(nhead=0), "nhead must be a positive integer, got 0"),
        (dict(backend=3), "backend must be a name such as 'eager'"),
        (dict(device="mps"), "device 'mps' is not supported: tformer runs on 'cpu' or 'cuda'"),
        (dict(device="meta"), "device 'meta' is not supported"),
        (dict(device=0.5), "device must be 'cpu', 'cuda' or 'cuda:N', got float"),
    ],
)
def test_bad_load_values(tmp_path, reference_model, kwargs, message):
    torch.save(reference_model.state_dict(), tmp_path / "model.pt")
    with pytest.raises(TformerError, match=message) as info:
        tformer.load(**{"path": tmp_path / "model.pt", "nhead": 4, **kwargs})
    assert "\n" not in str(info.value)
