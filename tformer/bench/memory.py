"""Memory of a generation: the CUDA allocator on GPU, the process's resident set (RSS) on CPU."""

from __future__ import annotations

import resource
import sys

import torch


class PeakMemory:
    """Reset before a generation, read after it.

    On Linux the kernel's peak-RSS mark (VmHWM) can be reset by writing 5 to
    /proc/self/clear_refs, so each generation gets its own peak; where that is impossible the
    figure is the process's peak since it started (`source` says which).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.source = "CUDA allocator peak" if device.type == "cuda" else "process peak RSS"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.source = "process peak RSS since start"

    def current_mib(self) -> float | None:
        """What is held now (None where it cannot be read)."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        return _status_mib("VmRSS:")

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        peak = _status_mib("VmHWM:")
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
            return peak / (2**20 if sys.platform == "darwin" else 1024)
        return peak


def _status_mib(field: str) -> float | None:
    """A memory line of /proc/self/status (Linux), in MiB."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024
    except (OSError, StopIteration):
        return None
