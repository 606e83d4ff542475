"""TransformerLM against the tutorial's own TransformerModel (stock nn.TransformerEncoder)."""

from __future__ import annotations

import torch

from tformer.model import KVCache, TransformerLM

from conftest import TINY, make_reference_model, tformer_copy

TOL = 1e-4


def reference_logits(ref, ids: torch.Tensor) -> torch.Tensor:
    """Stock forward with the causal mask, seq-first; returned batch-first (B, T, V)."""
    with torch.no_grad():
        return ref(ids.T, ref.generate_square_subsequent_mask(ids.shape[1])).transpose(0, 1)


def test_weight_names_and_shapes_equal_the_tutorial_model(reference_model):
    ours = TransformerLM(TINY).state_dict()
    theirs = reference_model.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert TransformerLM(TINY).load_state_dict(theirs, strict=True).missing_keys == []


def test_prefill_logits_match_stock_encoder(reference_model):
    model = tformer_copy(reference_model)
    ids = torch.randint(0, TINY.vocab_size, (3, 23))
    with torch.no_grad():
        ours = model(ids)
    assert (ours - reference_logits(reference_model, ids)).abs().max() <= TOL


def test_every_cached_decode_step_matches_full_recompute(reference_model):
    model = tformer_copy(reference_model)
    ids = torch.randint(0, TINY.vocab_size, (2, 40))
    expected = reference_logits(reference_model, ids)
    cache = KVCache.allocate(TINY, 2, 40, "cpu", torch.float32)
    with torch.no_grad():
        prefill = model(ids[:, :9], torch.arange(9), None, cache)
        assert (prefill - expected[:, :9]).abs().max() <= TOL
        for t in range(9, 40):
            step = model(ids[:, t : t + 1], torch.tensor([t]), None, cache)
            assert (step[:, 0] - expected[:, t]).abs().max() <= TOL, f"decode step at position {t}"


def test_left_padded_batch_matches_each_row_alone(reference_model):
    """Rows of different lengths, left-padded: each row's logits equal running it unpadded."""
    model = tformer_copy(reference_model)
    rows = [torch.randint(0, TINY.vocab_size, (n,)) for n in (11, 4, 1)]
    P = 11
    ids = torch.zeros(3, P, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, P - len(r) :] = r
    start = torch.tensor([P - len(r) for r in rows])
    cache = KVCache.allocate(TINY, 3, P + 5, "cpu", torch.float32)
    nxt = torch.randint(0, TINY.vocab_size, (3, 5))
    with torch.no_grad():
        batched = [model(ids, torch.arange(P), start, cache)[:, -1]]
        for t in range(5):
            batched.append(model(nxt[:, t : t + 1], torch.tensor([P + t]), start, cache)[:, 0])
        for b, r in enumerate(rows):
            alone = reference_logits(reference_model, torch.cat([r, nxt[b]])[None])[0]
            for t, got in enumerate(batched):
                assert (got[b] - alone[len(r) - 1 + t]).abs().max() <= TOL, f"row {b} step {t}"


def test_fully_masked_padding_rows_stay_finite(reference_model):
    """Padding queries attend to nothing; with a finite mask value they must not become NaN."""
    model = tformer_copy(reference_model)
    ids = torch.randint(0, TINY.vocab_size, (2, 6))
    start = torch.tensor([0, 5])  # row 1: slots 0..4 are padding
    cache = KVCache.allocate(TINY, 2, 8, "cpu", torch.float32)
    with torch.no_grad():
        logits = model(ids, torch.arange(6), start, cache)
    assert torch.isfinite(logits).all()
    for dtype in (torch.float16, torch.bfloat16):
        half = tformer_copy(make_reference_model()).to(dtype)
        cache = KVCache.allocate(TINY, 2, 8, "cpu", dtype)
        with torch.no_grad():
            assert torch.isfinite(half(ids, torch.arange(6), start, cache)).all(), dtype


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
