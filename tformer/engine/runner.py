"""The model runner: turns a step's requests into one `Batch` and one backend call.

It owns the backend's cache, allocated once: `max_batch_size` rows of `max_len + chunk` slots (the
`chunk` spare slots take the keys and values of a prefill's padding columns, which may run past a
request's own end: see the backend contract in `tformer.backends.base`). A step's numbers are
gathered from its requests on the host, in one pass, and copied to the device once (`Batch.build`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tformer.backends.base import Backend
from tformer.backends.batch import Batch
from tformer.engine.request import Request

# A CPU step of fewer multiply-adds than this gains nothing from torch's threads (the built-in model,
# 2-core CPU: 4 rows, 13 M, 1.50 ms on 2 threads against 1.48 on one; 8 rows, 26 M, 1.72 against 2.25).
PARALLEL_MACS = 16_000_000


class ModelRunner:
    def __init__(self, backend: Backend, max_batch_size: int, max_len: int, chunk: int):
        self.backend = backend
        self.device = backend.device
        self.cache = backend.allocate_cache(max_batch_size, max_len + chunk)
        c = backend.config
        self._macs = c.n_layers * (4 * c.d_model**2 + 2 * c.d_model * c.d_ff) + c.d_model * c.vocab_size  # a token's
        self.threads: int | None = None  # set: torch's threads for large steps, one for small (Engine.adapt_threads)
        self._threads_now = 0

    def prefill(self, work: list[tuple[Request, int]]) -> torch.Tensor:
        """Feed each request its next `n` prompt tokens; logits `(B, V)` of each one's last."""
        width = max(n for _, n in work)
        ids: list[int] = []
        for request, n in work:  # right-padded with id 0
            ids += request.prompt[request.prefilled : request.prefilled + n] + [0] * (width - n)
        start = [r.prefilled for r, _ in work]
        lengths = [s + n for s, (_, n) in zip(start, work)]
        return self._step(Batch.build(ids, width, start, lengths, [r.row for r, _ in work], self.device))

    def decode(self, requests: list[Request], pick: Callable[[torch.Tensor], torch.Tensor], steps: int = 1) -> torch.Tensor:
        """Feed each request its newest token, `pick` the next from the logits, and feed that, for
        `steps` steps; the picked ids `(steps, B)`, on the device. Only the first step's batch is
        built on the host: each following one feeds the ids just picked (`Batch.following`), so
        a multi-step decode goes back to neither Python bookkeeping nor the host in between."""
        start = [r.cached for r in requests]
        batch = Batch.build([r.output[-1] for r in requests], 1, start, [s + 1 for s in start],
                            [r.row for r in requests], self.device)  # fmt: skip
        picked = [pick(self._step(batch))]
        for _ in range(steps - 1):
            batch = batch.following(picked[-1][:, None])
            picked.append(pick(self._step(batch)))
        return torch.stack(picked)

    def move(self, request: Request, row: int) -> bool:
        """Copy `request`'s cache row to `row` (False where the backend cannot)."""
        move_row = getattr(self.backend, "move_row", None)  # optional in the Backend protocol
        return bool(move_row is not None and move_row(self.cache, request.row, row, request.cached))

    def _step(self, batch: Batch) -> torch.Tensor:
        if self.threads is not None:  # changed only when a step crosses PARALLEL_MACS, not every step
            threads = self.threads if batch.input_ids.numel() * self._macs >= PARALLEL_MACS else 1
            if threads != self._threads_now:
                torch.set_num_threads(threads)
                self._threads_now = threads
        return self.backend.step(batch, self.cache)
