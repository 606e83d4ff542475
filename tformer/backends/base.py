"""The backend interface (contract v3): a backend is only a decode step over cache rows.

Everything else (requests, scheduling, sampling, stopping, streaming) lives once, in
`tformer.engine`. A backend allocates a cache of rows once and runs steps over it; a new backend
is one short file that implements these two methods.

Each request being served owns one cache row. Its token at position `p` sits in slot `p` of that
row: no left padding, no position shared between rows. A step feeds some rows new tokens (a
prefill: a prompt or a chunk of one; a decode: one token each) and returns, per row, the logits
of its last new token.

v3 (after v2's tensors-only step): a step comes as one `Batch`, its numbers on the host and on
the device, built once by the engine. A backend takes its decisions from the host side and
never reads a device tensor back during a step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from tformer.backends.batch import Batch
from tformer.config import ModelConfig
from tformer.model import KVCache


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

    def allocate_cache(self, rows: int, slots: int) -> Any:
        """A cache of `rows` rows of `slots` slots each, allocated once (by the engine, when it
        starts). Its type is the backend's own business; the engine only passes it back to `step`.
        """
        ...

    def step(self, batch: Batch, cache: Any) -> torch.Tensor:
        """Run the new tokens of `batch`'s B rows (see `Batch` for every shape and meaning), write
        their keys and values into their cache rows, and return the logits of each row's last new
        token, `(B, V)` in the backend's dtype, on its device.

        Column t of row b is the token at position `start[b] + t`; it goes to slot `start[b] + t`
        of cache row `rows[b]` and attends to slots `0..start[b] + t` of that row. The engine keeps
        room for padding columns (`start[b] + T <= slots`): a backend may write their keys and
        values (into slots no real token has reached yet) or skip them; their outputs are never
        read. Slots at or beyond a row's length hold garbage from earlier requests and must never
        be attended to. Decisions on the host (spans, blocks, graphs) come from `batch`'s host
        lists: no `.tolist()`, `.item()` or `int()` of a device tensor during a step.
        """
        ...

    def move_row(self, cache: Any, src: int, dst: int, length: int) -> bool:
        """Copy slots `0..length-1` of cache row `src` to row `dst`, or return False if this cache
        cannot. Optional: the engine moves a request to a lower free row when one frees up and no
        request waits for it, so that a step's rows stay one block (which backends read as a view
        rather than gathering a copy of each row); without it rows stay where they are."""
        ...

    def warmup(self, cache: Any) -> None:
        """Compile now, for steps over `cache`, everything a step may need, so that no step
        compiles later (the engine's `warmup`, which `Runtime.warmup` calls). A no-op for backends
        that compile nothing while running."""
        ...


class BackendBase:
    """The defaults of `Backend`'s descriptive parts, for backends to inherit."""

    traits: ClassVar[Traits] = Traits()
    untimed: str | None = None
    notes: tuple[str, ...] = ()

    @classmethod
    def unavailable(cls, device: torch.device) -> str | None:
        return None

    def move_row(self, cache: Any, src: int, dst: int, length: int) -> bool:
        if not isinstance(cache, KVCache):
            return False
        cache.move_row(src, dst, length)
        return True

    def warmup(self, cache: Any) -> None:
        return None
