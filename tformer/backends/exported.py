"""What every backend that runs an export directory shares: one constructor, from the directory,
which is verified before the native runtime sees it.

An export directory is untrusted input (see `tformer.export.integrity`). The config and dtype
come from its verified `tformer.json`; the backend factory checks the device first.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tformer.backends.base import BackendBase
from tformer.config import ModelConfig
from tformer.errors import TformerError
from tformer.export.formats import EXPORT_DTYPES, format_named
from tformer.export.integrity import verified_meta


class ExportBackend(BackendBase):
    def __init__(self, directory: str | os.PathLike, device: torch.device):
        """Open the export in `directory` on `device` (made by `tformer-export`, or by the backend
        factory in tformer's store)."""
        directory = Path(directory)
        self.meta = verified_meta(directory)  # raises TformerError naming what is wrong
        fmt = format_named(self.meta["format"])
        if fmt.key != self.traits.export_format:
            raise TformerError(f"{directory} is a {fmt.name} export, which backend '{fmt.backend}' runs, not '{self.name}'")
        self.config = ModelConfig.from_dict(self.meta["config"])
        self.dtype = EXPORT_DTYPES[self.meta["dtype"]]
        self.device = device
        self._open(directory)

    def _open(self, directory: Path) -> None:
        """Load the verified export in `directory` onto `self.device`."""
        raise NotImplementedError
