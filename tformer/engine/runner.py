"""The model runner: turns a step's requests into one backend call and the logits back into rows.

It owns the backend's cache, allocated once: `max_batch_size` rows of `max_len + chunk` slots (the
`chunk` spare slots take the keys and values of a prefill's padding columns, which may run past a
request's own end: see the backend contract in `tformer.backends.base`).
"""

from __future__ import annotations

import torch

from tformer.backends.base import Backend
from tformer.engine.request import Request


# A CPU step of fewer multiply-adds than this gains nothing from torch's threads (the built-in model,
# 2-core CPU: 4 rows, 13 M, 1.50 ms on 2 threads against 1.48 on one; 8 rows, 26 M, 1.72 against 2.25).
PARALLEL_MACS = 16_000_000


class ModelRunner:
    def __init__(self, backend: Backend, max_batch_size: int, max_len: int, chunk: int):
        self.backend = backend
        self.cache = backend.allocate_cache(max_batch_size, max_len + chunk)
        c = backend.config
        self._macs = c.n_layers * (4 * c.d_model**2 + 2 * c.d_model * c.d_ff) + c.d_model * c.vocab_size  # a token's
        self.threads: int | None = None  # set: torch's threads for large steps, one for small (Engine.adapt_threads)

    def prefill(self, work: list[tuple[Request, int]]) -> torch.Tensor:
        """Feed each request its next `n` prompt tokens; logits `(B, V)` of each one's last."""
        width = max(n for _, n in work)
        ids = torch.zeros(len(work), width, dtype=torch.long)  # right-padded with id 0
        for b, (request, n) in enumerate(work):
            ids[b, :n] = torch.tensor(request.prompt[request.prefilled : request.prefilled + n])
        start = [r.prefilled for r, _ in work]
        columns = torch.tensor([start, [s + n for s, (_, n) in zip(start, work)], [r.row for r, _ in work]])
        return self._step(ids, columns)

    def decode(self, requests: list[Request]) -> torch.Tensor:
        """Feed each request its newest token; logits `(B, V)` of the next."""
        start = [r.cached for r in requests]
        packed = torch.tensor([[r.output[-1] for r in requests], start, [s + 1 for s in start], [r.row for r in requests]])
        return self._step(packed[0][:, None], packed[1:])  # one host tensor: a small one costs microseconds

    def move(self, request: Request, row: int) -> bool:
        """Copy `request`'s cache row to `row` (False where the backend cannot)."""
        move_row = getattr(self.backend, "move_row", None)  # optional in the Backend protocol
        return bool(move_row is not None and move_row(self.cache, request.row, row, request.cached))

    def _step(self, ids: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """ids `(B, T)`; columns `(3, B)`: start, lengths and cache rows."""
        device = self.backend.device
        if self.threads is not None:
            torch.set_num_threads(self.threads if ids.numel() * self._macs >= PARALLEL_MACS else 1)
        if device.type != "cpu":
            ids, columns = ids.to(device), columns.to(device)  # one copy to the device for the three columns
        return self.backend.step(ids, *columns.unbind(0), self.cache)
