"""Shared fixtures: the tutorial's own model as the reference, and one tiny trained model."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before anything imports triton: its kernels then run on the CPU, interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tformer.config import ModelConfig
from tformer.model import TransformerLM
from tformer.reference import TransformerModel
from tformer.train import TrainConfig, default_corpus, read_corpus, train

TINY = ModelConfig(vocab_size=61, d_model=32, nhead=4, d_ff=64, n_layers=2)


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
