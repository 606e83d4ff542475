"""Writing output files so that they appear complete or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tformer.errors import TformerError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside `path` to write to; renamed over `path` if the block succeeds,
    deleted if it fails, so a crash or a bad input never leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it a normal file's mode
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@contextmanager
def atomic_directory(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """A temporary directory beside `path` to fill; it replaces `path` only if the block succeeds.

    An existing `path` is an error unless `force`; with `force` it is replaced only once the new
    directory is complete. On failure nothing is left behind.
    """
    path = Path(path)
    if path.exists() and not force:
        raise TformerError(f"{path} already exists; pass --force (force=True) to overwrite it")
    if path.exists() and not path.is_dir():
        raise TformerError(f"{path} exists and is not a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_umask())
    except OSError as exc:
        raise TformerError(f"cannot write to {path.parent}: {exc.strerror or exc}") from None
    try:
        yield tmp
        if path.exists():
            old = tmp.with_name(tmp.name + ".old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cache_root() -> Path:
    """Where tformer keeps what it builds on first use (ONNX exports, compiled kernels):
    $TFORMER_CACHE, else ~/.cache/tformer."""
    return Path(os.environ.get("TFORMER_CACHE") or Path.home() / ".cache" / "tformer")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
