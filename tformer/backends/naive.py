"""The tutorial's own generation, as a backend: no cache, each row's whole sequence re-run every step.

This is the baseline every other backend is measured against (`tformer-bench`'s `naive` row). It
runs the tutorial's `TransformerModel` itself, seq-first with its square causal mask, one row at
a time (it has no padding mask); its "cache" is each cache row's token history.
"""

from __future__ import annotations

import torch

from tformer.backends.base import BackendBase
from tformer.backends.batch import Batch
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

    def allocate_cache(self, rows: int, slots: int) -> list[torch.Tensor]:
        """Per cache row, its tokens so far `(length,)`."""
        return [torch.zeros(0, dtype=torch.long, device=self.device) for _ in range(rows)]

    def move_row(self, cache: list[torch.Tensor], src: int, dst: int, length: int) -> bool:
        cache[dst] = cache[src][:length]
        return True

    def step(self, batch: Batch, cache: list[torch.Tensor]) -> torch.Tensor:
        logits = []
        for b, (row, first, length) in enumerate(zip(batch.host_rows, batch.host_start, batch.host_lengths)):
            cache[row] = torch.cat([cache[row][:first], batch.input_ids[b, : length - first]])  # the row's tokens
            seq = cache[row][:, None]  # (T, 1) seq-first
            mask = self.model.generate_square_subsequent_mask(seq.shape[0]).to(self.device)
            logits.append(self.model(seq, mask)[-1, 0])  # (V,): the last token's
        return torch.stack(logits)  # (B, V)
