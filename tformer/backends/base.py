"""The backend interface: a backend is only a decode step.

Everything else (tokenizing, left padding, sampling, stopping, streaming) lives once, in
`tformer.generate`. A backend allocates a cache and runs one step over it; a new backend is one
short file that implements these two methods.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import torch

from tformer.config import ModelConfig
from tformer.errors import TformerError
from tformer.export.integrity import verified_meta


class Backend(Protocol):
    name: str
    attention: str  # which attention implementation runs, for benchmark records
    config: ModelConfig
    device: torch.device
    dtype: torch.dtype  # of the weights and the cache

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


class FromExport:
    """For backends that run an export directory: `from_directory` opens one made by
    `tformer-export`; the constructor (from a model) exports to tformer's cache first. Either way
    the directory is verified (`tformer.export.integrity.verified_meta`) before the native
    runtime sees it, and the device is checked before anything is verified or exported."""

    export_format: str  # the tformer.json "format" this backend runs
    meta: dict  # the directory's tformer.json, verified

    @classmethod
    def from_directory(cls, directory: str | os.PathLike, device: torch.device):
        backend = cls.__new__(cls)
        backend._check_device(device)
        backend._open(Path(directory), verified_meta(directory), device)
        return backend

    @staticmethod
    def default_device() -> torch.device:
        """Where an export runs when the user names no device: the best this backend can use here."""
        raise NotImplementedError

    def _check_device(self, device: torch.device) -> None:
        """Raise TformerError if this backend cannot run on `device` (never fall back quietly)."""
        raise NotImplementedError

    def _open(self, directory: Path, meta: dict, device: torch.device) -> None:
        """Load the verified export in `directory` (`meta`: its tformer.json) onto `device`."""
        raise NotImplementedError

    def _adopt(self, directory: Path, meta: dict) -> None:
        """Check that the export is this backend's format; take `config` and `dtype` from it."""
        if meta["format"] != self.export_format:
            raise TformerError(f"{directory} is a {meta['format']} export, not {self.export_format}")
        self.meta = meta
        self.config = ModelConfig.from_dict(meta["config"])
        self.dtype = getattr(torch, meta["dtype"])
