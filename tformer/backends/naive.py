"""The tutorial's own generation, as a backend: no cache, the whole sequence re-run every step.

This is the baseline every other backend is measured against (`tformer-bench`'s `naive` row). It
runs the tutorial's `TransformerModel` itself, seq-first with its square causal mask; its "cache"
is just the token history. It has no key-padding mask, so it serves only batches whose prompts
have equal lengths.
"""

from __future__ import annotations

import torch

from tformer.backends.base import BackendBase
from tformer.errors import TformerError
from tformer.model import TransformerLM
from tformer.reference import TransformerModel


class NaiveBackend(BackendBase):
    name = "naive"
    implementation = "nn.TransformerEncoder, full recompute (no cache)"

    def __init__(self, model: TransformerLM, device: torch.device, dtype: torch.dtype):
        c = model.config
        reference = TransformerModel(c.vocab_size, c.d_model, c.nhead, c.d_ff, c.n_layers, c.dropout)
        reference.pos_encoder.pe = reference.pos_encoder.pe[: c.max_len]  # the tutorial fixes 5000 rows
        reference.load_state_dict(model.state_dict(), strict=True)
        self.model = reference.to(device=device, dtype=dtype).eval()
        self.config = c
        self.device = device
        self.dtype = dtype

    def allocate_cache(self, batch: int, max_len: int) -> list[torch.Tensor]:
        return []  # the token history, (T, B) seq-first, grown as the tutorial's loop does

    def step(
        self, input_ids: torch.Tensor, input_pos: torch.Tensor, start: torch.Tensor, cache: list[torch.Tensor]
    ) -> torch.Tensor:
        if bool(start.any()):
            raise TformerError("the naive backend (the tutorial's loop) cannot mask padding: give prompts of equal length")
        seq = input_ids.T if not cache else torch.cat([cache.pop(), input_ids.T], dim=0)  # (T, B)
        cache.append(seq)
        mask = self.model.generate_square_subsequent_mask(seq.shape[0]).to(self.device)
        logits = self.model(seq, mask)  # (T, B, V)
        return logits[-input_ids.shape[1]:].transpose(0, 1)  # (B, T_new, V)
