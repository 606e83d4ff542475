"""What one backend call runs (backend contract v3): a step's batch, built on the host once and
copied to the device once.

The engine knows every number of a step before it runs it: which cache rows, where each row
starts, how many tokens it feeds. `Batch` holds them twice: as host lists, for the decisions a
backend makes in Python (how many slots to attend, whether the rows are one block of the cache,
which compiled graph runs), and as device tensors, for the model. A backend reads the host side
only: reading a device tensor back (`.tolist()`, `.item()`, `int()`) would wait for the device
in every step, where a GPU could otherwise run a step while the host prepares the next (vLLM's
attention metadata does the same).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, eq=False)
class Batch:
    """One step over B cache rows, T new columns each (T = 1: a decode).

    Device tensors, int64 on the backend's device, contiguous:
    input_ids: `(B, T)`; row b's new tokens in columns `0..n_b-1`, `n_b = lengths[b] - start[b]`
        (1 <= n_b <= T); columns `n_b..T-1` are padding (id 0).
    start: `(B,)` position of row b's first new token, which is also its cache row's length
        before the step (slots `0..start[b]-1` hold its earlier tokens).
    lengths: `(B,)` row b's length after the step.
    rows: `(B,)` distinct cache rows: batch row b reads and writes cache row `rows[b]` only.
    Host side, the same numbers as Python lists (`host_start`, `host_lengths`, `host_rows`), and
    what backends derive from them, computed once: `span` (the longest row after the step: slots
    `0..span-1` cover every row), `past` (the longest row before it), `uniform` (every row has
    the same length: a decode then needs no mask), `aligned` (the start every row shares, if
    they do: their new columns go to the same slots, which a backend writes as a slice), `block`
    (the rows as a slice when they are consecutive, which a backend reads as a view of the cache
    rather than gathering a copy).
    """

    input_ids: torch.Tensor
    start: torch.Tensor
    lengths: torch.Tensor
    rows: torch.Tensor
    host_start: list[int]
    host_lengths: list[int]
    host_rows: list[int]
    span: int = field(init=False)
    past: int = field(init=False)
    uniform: bool = field(init=False)
    aligned: int | None = field(init=False)
    block: slice | None = field(init=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "span", max(self.host_lengths))
        set_(self, "past", max(self.host_start))
        set_(self, "uniform", min(self.host_lengths) == self.span)
        set_(self, "aligned", self.past if self.past == min(self.host_start) else None)
        first, rows = self.host_rows[0], self.host_rows
        set_(self, "block", slice(first, first + len(rows)) if rows == list(range(first, first + len(rows))) else None)

    @property
    def size(self) -> int:
        return len(self.host_rows)

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]

    @property
    def decode(self) -> bool:
        """One new token per row (a decode, or a prefill of one-token chunks: the same shapes)."""
        return self.width == 1

    @classmethod
    def build(
        cls, ids: list[int], width: int, start: list[int], lengths: list[int], rows: list[int], device: torch.device
    ) -> Batch:
        """From host lists: `ids` the `B * width` token ids, row by row (padded); the rest `B`
        each. One host tensor, one copy to the device (pinned and asynchronous on CUDA)."""
        B = len(rows)
        packed = torch.tensor(start + lengths + rows + ids, dtype=torch.long)
        if device.type != "cpu":
            packed = packed.pin_memory().to(device, non_blocking=True)
        start_, lengths_, rows_, ids_ = packed.split((B, B, B, B * width))  # one op for the four views
        return cls(ids_.view(B, width), start_, lengths_, rows_, start, lengths, rows)

    def following(self, input_ids: torch.Tensor) -> Batch:
        """The decode step after this one, over the same rows (a multi-step decode): `input_ids`
        `(B, 1)` on the device (the ids this step's logits gave), every row one longer. Its start
        is this step's lengths (the same tensor) and its lengths one op on the device: nothing is
        copied from the host."""
        return Batch(input_ids, self.lengths, self.lengths + 1, self.rows, self.host_lengths,
                     [n + 1 for n in self.host_lengths], self.host_rows)  # fmt: skip

    @classmethod
    def of(cls, input_ids: torch.Tensor, start: Sequence[int], lengths: Sequence[int], rows: Sequence[int]) -> Batch:
        """From a `(B, T)` tensor of ids and host sequences (tests, an export's validation: callers
        outside the engine's steps)."""
        B, T = input_ids.shape
        return cls.build(input_ids.reshape(-1).tolist(), T, [int(s) for s in start], [int(n) for n in lengths],
                         [int(r) for r in rows], input_ids.device)  # fmt: skip
