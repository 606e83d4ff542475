"""Writing output files so that they appear complete or not at all, and leave no debris.

Every file and directory tformer writes goes through one temporary path that tformer owns, beside
the target: `.NAME.tformer-HOST-PID-RANDOM.tmp` (plus the target's suffix, which some writers use
to pick a format). It is renamed over the target only once complete, so a crash, a bad input or a
`kill -9` leaves the target whole or absent. A killed writer cannot delete its own temporary path,
so the next write to the same target removes those of writers that are dead (same host, PID gone);
a live writer's are never touched. New files and directories get the user's umask, as any file
does.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tformer.errors import TformerError

_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]  # PIDs mean something on one host only


def _temp_name(target: Path, kind: str) -> Path:
    """A fresh temporary path beside `target`: `kind` is "tmp" (being written) or "old" (replaced)."""
    return target.with_name(f".{target.name}.tformer-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.{kind}{target.suffix}")


def _make_parent(path: Path) -> None:
    """Create `path`'s folder; a file standing where a folder should be is named, not "File exists"."""
    blocker = next((p for p in path.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{blocker} is a file, not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)


def remove_stale_temps(target: str | os.PathLike) -> list[Path]:
    """Delete the temporary paths that dead writers left beside `target`; returns what was removed."""
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.tformer-{_HOST}-(\d+)-[0-9a-f]+\.(tmp|old)")
    removed = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        found = pattern.match(entry.name)
        if found and not _alive(int(found.group(1))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, killed but not yet reaped, counts as dead)."""
    if pid == os.getpid():
        return True  # another thread of this process may be writing
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    fields = proc_stat_fields(pid)
    return fields is None or fields[0] not in ("Z", "X")


def proc_stat_fields(pid: int) -> list[str] | None:
    """The fields of Linux's /proc/PID/stat after the "(name)", which may hold spaces: `[0]` is the
    state, field N of proc(5) is `[N - 3]`; None where there is no such file (another OS, a process gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside `path` to write to; renamed over `path` if the block succeeds,
    deleted if it fails, so a crash or a bad input never leaves a half-written file behind.

    The file exists (empty, with the umask's permissions) when the block starts; writers should
    write into it rather than replace it. It is flushed to disk before the rename.
    """
    path = Path(path)
    try:
        _make_parent(path)
        remove_stale_temps(path)
        tmp = _temp_name(path, "tmp")
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except OSError as exc:
        raise TformerError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        yield str(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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
        _make_parent(path)
        remove_stale_temps(path)
        tmp = _temp_name(path, "tmp")
        tmp.mkdir(0o777)
    except OSError as exc:
        raise TformerError(f"cannot write to {path.parent}: {exc.strerror or exc}") from None
    try:
        yield tmp
        for file in tmp.iterdir():
            _fsync(file)
        if path.exists():
            old = _temp_name(path, "old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_writable(path: str | os.PathLike) -> None:
    """Fail now, not after minutes of work, if `path` cannot be written: its folder is created and
    a temporary file is made and removed there (permission bits alone do not tell, e.g. for root)."""
    path = Path(path)
    if path.is_dir():
        raise TformerError(f"cannot write {path}: it is a directory")
    try:
        _make_parent(path)
        probe = _temp_name(path, "tmp")
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        probe.unlink()
    except OSError as exc:
        raise TformerError(f"cannot write {path}: {exc.strerror or exc}") from None


def _fsync(path: Path) -> None:
    """Flush a file's data to disk, so that a rename never publishes a file whose data is lost
    in a power cut."""
    if path.is_file():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 1 MiB chunks (a model need not fit in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def store_root() -> Path:
    """Where tformer stores what it builds on first use (exports of a checkpoint, compiled
    kernels), to reuse it in later processes: $TFORMER_CACHE, else ~/.cache/tformer. ("Store",
    not "cache", in the code: a cache there is always a model's KV cache.)"""
    return Path(os.environ.get("TFORMER_CACHE") or Path.home() / ".cache" / "tformer")


def keep_compiled_kernels_in_store() -> None:
    """Point torch.compile's and AOTInductor's on-disk store into tformer's, unless the user set
    $TORCHINDUCTOR_CACHE_DIR. The commands call this for their own process; the library never
    changes the environment of a program that imports it."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(store_root() / "inductor"))
