"""AOTInductor: a `.pt2` package of the step (the tensors of a `Batch`), run without tracing or compiling.

The package (see `tformer.export.pt2`) takes the engine's cache of rows as inputs and updates it
in place, so this backend is the eager one minus Python: `KVCache` buffers, one call per step.
Its cache inputs are whole, contiguous buffers; it reads the slots each step fills, `0..span-1`,
told by the length of its `span` input (a slice of a tensor allocated once), not every slot.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tformer.backends.base import Traits
from tformer.backends.batch import Batch
from tformer.backends.exported import ExportBackend
from tformer.errors import TformerError, one_line
from tformer.export.integrity import FIX, check_embedded
from tformer.model import KVCache


class AotBackend(ExportBackend):
    name = "aot"
    traits = Traits(devices=("cpu",), compiles=True, export_format="pt2")  # packages are compiled for the CPU
    implementation = "AOTInductor package (C++)"

    def _open(self, directory: Path) -> None:
        path = directory / "model.pt2"
        try:
            self.runner = torch._inductor.aoti_load_package(str(path))
        except Exception as exc:  # a verified package that this torch cannot load: one line, not its traceback
            raise TformerError(f"{path}: torch {torch.__version__} cannot load it ({one_line(exc)}); {FIX}") from None
        check_embedded(self.meta, self.runner.get_metadata(), path)  # the compiled program is the one described

    def allocate_cache(self, rows: int, slots: int) -> KVCache:
        if getattr(self, "_spans", torch.empty(0)).numel() < slots:  # its slices tell the package a span
            self._spans = torch.zeros(slots, dtype=torch.long, device=self.device)
        return KVCache.allocate(self.config, rows, slots, self.device, self.dtype)

    def step(self, batch: Batch, cache: KVCache) -> torch.Tensor:
        # A Batch's tensors are contiguous, as the compiled code assumes (and so is a slice of `_spans`).
        return self.runner(batch.input_ids, batch.start, batch.lengths, batch.rows, self._spans[: batch.span],
                           tuple(cache.k), tuple(cache.v))  # fmt: skip
