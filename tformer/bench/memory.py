"""Peak memory of the timed runs: the CUDA allocator on GPU, the process's peak RSS on CPU."""

from __future__ import annotations

import resource
import sys

import torch


class PeakMemory:
    """Reset before the timed runs, read after them.

    On Linux the kernel's peak-RSS mark (VmHWM) can be reset by writing 5 to
    /proc/self/clear_refs, so each row gets its own peak; where that is impossible the figure is
    the process's peak since it started (`source` says which).
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

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            with open("/proc/self/status") as f:
                kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
            return kib / 1024
        except (OSError, StopIteration):
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
            return peak / (2**20 if sys.platform == "darwin" else 1024)
