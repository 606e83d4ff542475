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
    """Logits of a prefill of `prefill` tokens, then of one decode step per remaining token, on the CPU."""
    B, T = ids.shape
    dtype = next(model.parameters()).dtype
    cache = KVCache.allocate(TINY, B, T, device, dtype)
    ids = ids.to(device)
    with torch.no_grad():
        steps = [model(ids[:, :prefill], torch.arange(prefill, device=device), None, cache)]
        for t in range(prefill, T):
            steps.append(model(ids[:, t : t + 1], torch.tensor([t], device=device), None, cache))
    return [s.float().cpu() for s in steps]


@pytest.mark.parametrize("device", DEVICES)
def test_every_cached_decode_step_matches_full_recompute(reference_model, device):
    model = tformer_copy(reference_model).to(device)
    ids = torch.randint(0, TINY.vocab_size, (2, 40))
    expected = reference_logits(reference_model, ids)
    prefill, *steps = cached_steps(model, ids, 9, device)
    assert (prefill - expected[:, :9]).abs().max() <= TOL
    for t, step in enumerate(steps, start=9):
        assert (step[:, 0] - expected[:, t]).abs().max() <= TOL, f"decode step at position {t}"


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_prefill_and_every_decode_step_match_the_fp32_tutorial_model(reference_model, device):
    model = tformer_copy(reference_model).to(device=device, dtype=torch.bfloat16)
    ids = torch.randint(0, TINY.vocab_size, (2, 40))
    expected = reference_logits(reference_model, ids)
    ours = torch.cat(cached_steps(model, ids, 9, device), dim=1)
    error = float((ours - expected).abs().max() / expected.abs().max())
    assert error <= BF16_TOL
    assert error > 0, "bf16 rounding should show: was the model really in bf16?"


@pytest.mark.parametrize("device", DEVICES)
def test_left_padded_batch_matches_each_row_alone(reference_model, device):
    """Rows of different lengths, left-padded: each row's logits equal running it unpadded."""
    model = tformer_copy(reference_model).to(device)
    rows = [torch.randint(0, TINY.vocab_size, (n,)) for n in (11, 4, 1)]
    P = 11
    ids = torch.zeros(3, P, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, P - len(r) :] = r
    start = torch.tensor([P - len(r) for r in rows], device=device)
    cache = KVCache.allocate(TINY, 3, P + 5, device, torch.float32)
    nxt = torch.randint(0, TINY.vocab_size, (3, 5))
    with torch.no_grad():
        batched = [model(ids.to(device), torch.arange(P, device=device), start, cache)[:, -1].cpu()]
        for t in range(5):
            step = model(nxt[:, t : t + 1].to(device), torch.tensor([P + t], device=device), start, cache)
            batched.append(step[:, 0].cpu())
        for b, r in enumerate(rows):
            alone = reference_logits(reference_model, torch.cat([r, nxt[b]])[None])[0]
            for t, got in enumerate(batched):
                assert (got[b] - alone[len(r) - 1 + t]).abs().max() <= TOL, f"row {b} step {t}"


@pytest.mark.parametrize("device", DEVICES)
def test_fully_masked_padding_rows_stay_finite(reference_model, device):
    """Padding queries attend to nothing; with a finite mask value they must not become NaN."""
    model = tformer_copy(reference_model).to(device)
    ids = torch.randint(0, TINY.vocab_size, (2, 6)).to(device)
    start = torch.tensor([0, 5], device=device)  # row 1: slots 0..4 are padding
    cache = KVCache.allocate(TINY, 2, 8, device, torch.float32)
    positions = torch.arange(6, device=device)
    with torch.no_grad():
        logits = model(ids, positions, start, cache)
    assert torch.isfinite(logits).all()
    for dtype in (torch.float16, torch.bfloat16):
        half = tformer_copy(make_reference_model()).to(device=device, dtype=dtype)
        cache = KVCache.allocate(TINY, 2, 8, device, dtype)
        with torch.no_grad():
            assert torch.isfinite(half(ids, positions, start, cache)).all(), dtype


def test_cache_slots_beyond_the_current_position_are_ignored(reference_model):
    """Garbage in not-yet-written slots must not leak into the result (they are masked)."""
    model = tformer_copy(reference_model)
    ids = torch.randint(0, TINY.vocab_size, (1, 7))
    clean = KVCache.allocate(TINY, 1, 12, "cpu", torch.float32)
    dirty = KVCache.allocate(TINY, 1, 12, "cpu", torch.float32)
    for t in dirty.k + dirty.v:
        t.normal_(0, 100.0)
    with torch.no_grad():
        a = model(ids, torch.arange(7), None, clean)
        b = model(ids, torch.arange(7), None, dirty)
    assert torch.equal(a, b)
