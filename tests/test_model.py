"""TransformerLM against the tutorial's own TransformerModel (stock nn.TransformerEncoder).

The reference always runs on the CPU in float32; ours runs on each of `DEVICES` (CUDA too where
there is a GPU).
"""

from __future__ import annotations

import pytest
import torch

from tformer.model import KVCache, TransformerLM

from conftest import DEVICES, TINY, make_reference_model, tformer_copy

TOL = 1e-4
# bf16 keeps 8 significant bits: every weight and activation is rounded by up to 2**-9 of itself,
# and through the embedding, two layers (attention, MLP, two layer norms each) and the decoder
# that adds up to about 1% of the largest logit (at most 1.7% over 20 random models, on the CPU).
# A wrong mask, position or cache slot is off by tens of percent. Relative to max |reference|.
BF16_TOL = 5e-2


def reference_logits(ref, ids: torch.Tensor) -> torch.Tensor:
    """Stock forward with the causal mask, seq-first; returned batch-first (B, T, V)."""
    with torch.no_grad():
        return ref(ids.T, ref.generate_square_subsequent_mask(ids.shape[1])).transpose(0, 1)


def test_weight_names_and_shapes_equal_the_tutorial_model(reference_model):
    ours = TransformerLM(TINY).state_dict()
    theirs = reference_model.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert TransformerLM(TINY).load_state_dict(theirs, strict=True).missing_keys == []


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_logits_match_stock_encoder(reference_model, device):
    model = tformer_copy(reference_model).to(device)
    ids = torch.randint(0, TINY.vocab_size, (3, 23))
    with torch.no_grad():
        ours = model(ids.to(device)).cpu()
    assert (ours - reference_logits(reference_model, ids)).abs().max() <= TOL


def cached_steps(model, ids: torch.Tensor, prefill: int, device: str) -> list[torch.Tensor]:
    """Last-token logits `(B, V)` of a prefill of `prefill` tokens, then of one decode step per
    remaining token (contract v2: each row in its own cache row), on the CPU."""
    B, T = ids.shape
    dtype = next(model.parameters()).dtype
    cache = KVCache.allocate(TINY, B, T, device, dtype)
    ids, rows = ids.to(device), torch.arange(B, device=device)

    def step(first: int, last: int) -> torch.Tensor:
        start = torch.full((B,), first, device=device)
        return model.step(ids[:, first:last], start, start + (last - first), rows, cache)

    with torch.no_grad():
        steps = [step(0, prefill)] + [step(t, t + 1) for t in range(prefill, T)]
    return [s.float().cpu() for s in steps]


@pytest.mark.parametrize("device", DEVICES)
def test_every_cached_decode_step_matches_full_recompute(reference_model, device):
    model = tformer_copy(reference_model).to(device)
    ids = torch.randint(0, TINY.vocab_size, (2, 40))
    expected = reference_logits(reference_model, ids)
    steps = cached_steps(model, ids, 9, device)
    for t, step in enumerate(steps, start=8):
        assert (step - expected[:, t]).abs().max() <= TOL, f"the step ending at position {t}"


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_prefill_and_every_decode_step_match_the_fp32_tutorial_model(reference_model, device):
    model = tformer_copy(reference_model).to(device=device, dtype=torch.bfloat16)
    ids = torch.randint(0, TINY.vocab_size, (2, 40))
    expected = reference_logits(reference_model, ids)[:, 8:]
    ours = torch.stack(cached_steps(model, ids, 9, device), dim=1)  # (B, 32, V)
    error = float((ours - expected).abs().max() / expected.abs().max())
    assert error <= BF16_TOL
    assert error > 0, "bf16 rounding should show: was the model really in bf16?"


@pytest.mark.parametrize("device", DEVICES)
def test_rows_of_different_lengths_in_one_step_match_each_row_alone(reference_model, device):
    """Three prompts (11, 4 and 1 tokens) prefilled in one right-padded step into cache rows out
    of order, the longest in two chunks, then 5 decode steps: each row's logits equal the
    tutorial model running that row alone."""
    model = tformer_copy(reference_model).to(device)
    prompts = [torch.randint(0, TINY.vocab_size, (n,)) for n in (11, 4, 1)]
    nxt = torch.randint(0, TINY.vocab_size, (3, 5))
    rows = torch.tensor([2, 0, 1], device=device)
    cache = KVCache.allocate(TINY, 3, 11 + 5 + 8, device, torch.float32)
    for t in cache.k + cache.v:
        t.normal_(0, 10.0)  # what earlier requests left in these rows must never be read

    def step(ids: list[torch.Tensor], start: list[int]) -> torch.Tensor:
        batch = torch.zeros(3, max(map(len, ids)), dtype=torch.long)  # right-padded
        for b, r in enumerate(ids):
            batch[b, : len(r)] = r
        first = torch.tensor(start, device=device)
        lengths = first + torch.tensor([len(r) for r in ids], device=device)
        return model.step(batch.to(device), first, lengths, rows, cache).cpu()

    with torch.no_grad():
        step([prompts[0][:6], prompts[1], prompts[2]], [0, 0, 0])  # row 0's first chunk
        batched = [step([prompts[0][6:], nxt[1, :1], nxt[2, :1]], [6, 4, 1])]  # its second, the others decode
        lengths = [11, 5, 2]
        for t in range(5):
            batched.append(step([nxt[0, t : t + 1], nxt[1, t + 1 : t + 2] if t < 4 else nxt[1, :1],
                                 nxt[2, t + 1 : t + 2] if t < 4 else nxt[2, :1]], lengths))  # fmt: skip
            lengths = [n + 1 for n in lengths]
    sequences = [torch.cat([prompts[0], nxt[0]]), torch.cat([prompts[1], nxt[1], nxt[1, :1]]),
                 torch.cat([prompts[2], nxt[2], nxt[2, :1]])]  # fmt: skip
    for b, (seq, first) in enumerate(zip(sequences, (11, 5, 2))):
        alone = reference_logits(reference_model, seq[None])[0]
        for t, got in enumerate(batched):
            assert (got[b] - alone[first - 1 + t]).abs().max() <= TOL, f"row {b} step {t}"


@pytest.mark.parametrize("device", DEVICES)
def test_padding_columns_stay_finite_in_every_dtype(reference_model, device):
    """Right-padding columns attend to whatever the step left in their slots; in fp16 and bf16
    too their values (never read) must not turn the real rows' logits into NaN."""
    ids = torch.randint(0, TINY.vocab_size, (2, 6)).to(device)
    start = torch.tensor([0, 0], device=device)
    lengths = torch.tensor([6, 1], device=device)  # row 1: one real token, five padding columns
    rows = torch.arange(2, device=device)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        model = tformer_copy(make_reference_model()).to(device=device, dtype=dtype)
        cache = KVCache.allocate(TINY, 2, 8, device, dtype)
        with torch.no_grad():
            assert torch.isfinite(model.step(ids, start, lengths, rows, cache)).all(), dtype


def test_cache_slots_beyond_the_current_position_are_ignored(reference_model):
    """Garbage in not-yet-written slots must not leak into the result (they are masked)."""
    model = tformer_copy(reference_model)
    ids = torch.randint(0, TINY.vocab_size, (1, 7))
    clean = KVCache.allocate(TINY, 1, 12, "cpu", torch.float32)
    dirty = KVCache.allocate(TINY, 1, 12, "cpu", torch.float32)
    for t in dirty.k + dirty.v:
        t.normal_(0, 100.0)
    args = (ids, torch.tensor([0]), torch.tensor([7]), torch.tensor([0]))
    with torch.no_grad():
        assert torch.equal(model.step(*args, clean), model.step(*args, dirty))
