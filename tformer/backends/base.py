"""The backend interface: a backend is only a decode step.

Everything else (tokenizing, left padding, sampling, stopping, streaming) lives once, in
`tformer.generate`. A backend allocates a cache and runs one step over it; a new backend is one
short file that implements these two methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from tformer.config import ModelConfig


@dataclass(frozen=True)
class Traits:
    """What generic code (the factory, the runtime, the benchmark) needs to know about a backend
    class, declared once by the backend instead of tested by name elsewhere."""

    devices: tuple[str, ...] = ("cpu", "cuda")  # the device types it can run on at all
    compiles: bool = False  # its setup compiles (benchmarks time setup with cold and warm caches)
    # It runs an export directory of this format (a key of tformer.export.formats.FORMATS): built
    # from a directory; given a model, the factory exports it to tformer's store first.
    export_format: str | None = None


class Backend(Protocol):
    name: str
    traits: ClassVar[Traits]
    implementation: str  # what runs the step ("onnxruntime 1.32 (CPUExecutionProvider)"), for records
    untimed: str | None  # why timing it here would mean nothing (the Triton interpreter), else None
    notes: tuple[str, ...]  # what happened while running that a benchmark should report
    config: ModelConfig
    device: torch.device
    dtype: torch.dtype  # of the weights and the cache

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        """Why it cannot run on `device` here (a missing package, provider or GPU), else None."""
        ...

    def allocate_cache(self, batch: int, max_len: int) -> Any:
        """A cache for `batch` rows of up to `max_len` slots (prompt + new tokens), allocated once.

        Its type is the backend's own business; the generation loop only passes it back to `step`.
        """
        ...

    def step(
        self, input_ids: torch.Tensor, input_pos: torch.Tensor, start: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        """Run `input_ids` through the model, write their K/V into `cache`, return logits.

        input_ids: `(B, T)` int64 on `device`; T is the prompt length at prefill, 1 when decoding.
        input_pos: `(T,)` int64 cache slots of the T columns (shared by all rows: the batch is
            left-padded so that its rows end together).
        start: `(B,)` int64 first valid slot of each row; slots before it are padding, never
            attended to. Row b's token in slot j has position `j - start[b]`.
        Returns logits `(B, T, V)`; the loop reads the last column. Rows are independent: padding
        rows must produce finite values (no NaN), whatever they are.
        """
        ...


class BackendBase:
    """The defaults of `Backend`'s descriptive parts, for backends to inherit."""

    traits: ClassVar[Traits] = Traits()
    untimed: str | None = None
    notes: tuple[str, ...] = ()

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        return None
