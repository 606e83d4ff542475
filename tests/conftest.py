"""Shared fixtures: the tutorial's own model as the reference, one tiny trained model, and the
`device` cases of tests that run on a CUDA GPU too."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # before anything imports triton: its kernels then run on the CPU, interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tformer.config import ModelConfig
from tformer.model import TransformerLM
from tformer.reference import TransformerModel
from tformer.train import TrainConfig, default_corpus, read_corpus, train

TINY = ModelConfig(vocab_size=61, d_model=32, nhead=4, d_ff=64, n_layers=2)


def cuda_case(unavailable: str | None = None):
    """The "cuda" case of a `device` parametrization. Marked `cuda`, which is how the GPU pass
    (`tformer-bench gpu-pass`) selects these tests (`pytest -m cuda`); skipped, with the reason,
    where there is no GPU or where `unavailable` says what else it lacks here."""
    reason = "no CUDA GPU here" if not CUDA else unavailable
    return pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(reason is not None, reason=str(reason))])


DEVICES = ["cpu", cuda_case()]  # @pytest.mark.parametrize("device", DEVICES): the CPU always, CUDA where there is one


def at_once(call: Callable[[int], Any], n: int) -> list[Any]:
    """`call(i)` for i in 0..n-1, each on its own thread, all released together by a barrier; the
    results in order. An exception in a thread is raised here, in the test's own thread."""
    together = threading.Barrier(n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        together.wait()
        try:
            results[i] = call(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def make_reference_model(config: ModelConfig = TINY, seed: int = 0) -> TransformerModel:
    """The tutorial's TransformerModel with random weights everywhere (biases and norms too), so
    that parity tests exercise every parameter rather than the tutorial's zero-initialised ones."""
    torch.manual_seed(seed)
    ref = TransformerModel(config.vocab_size, config.d_model, config.nhead, config.d_ff, config.n_layers, 0.0)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2 if p.ndim == 2 else 0.05)
    return ref.eval()


def tformer_copy(ref: TransformerModel, config: ModelConfig = TINY) -> TransformerLM:
    model = TransformerLM(config)
    model.load_state_dict(ref.state_dict(), strict=True)
    return model.eval()


@pytest.fixture
def reference_model() -> TransformerModel:
    return make_reference_model()


@pytest.fixture(scope="session")
def trained():
    """(model, tokenizer) trained for a few seconds on a slice of the standard library: its greedy
    output varies with context, unlike random weights, which collapse onto one token."""
    texts = read_corpus(default_corpus()[:12])
    config = ModelConfig(vocab_size=320, d_model=48, nhead=4, d_ff=96, n_layers=2, max_len=512, dropout=0.0)
    steps = TrainConfig(steps=120, batch_size=16, seq_len=48, lr=3e-3, eval_every=60, eval_batches=2)
    model, tokenizer, _ = train(texts, config, steps, progress=False)
    return model, tokenizer
