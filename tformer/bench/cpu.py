"""CPU time of the processes in a serving benchmark: this one (the load generator, or the offline
engine) and, for a server that `tformer-bench serve` started itself, that server's process and its
descendants (`tformer serve` runs its engine in a child process).

Why: on a machine where the server, its engine and the load generator share a few cores, the
HTTP layer's cost in throughput is the CPU it takes from the engine. CPU microseconds per output
token, per process, show where that goes, and how much a client on another machine would give
back. Other processes' CPU time is read from Linux's /proc; elsewhere only this process is measured.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from tformer.files import proc_stat_fields

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100  # /proc's CPU times are in these


def process_seconds(pid: int) -> float | None:
    """User + system CPU seconds of `pid` (all its threads) so far; None where /proc cannot say.
    /proc/PID/stat counts in clock ticks (10 ms), which reads 0 for a process that served a short
    run; the scheduler's nanoseconds of each live thread (/proc/PID/task/*/schedstat) resolve it.
    The larger of the two: the ticks also count threads that have exited."""
    fields = proc_stat_fields(pid)
    try:
        ticks = (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime: fields 14 and 15 of proc(5)
    except (TypeError, IndexError, ValueError):
        return None
    nanoseconds = 0
    for task in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            nanoseconds += int(task.read_text().split()[0])  # time on a CPU
        except (OSError, ValueError, IndexError):
            continue
    return max(ticks, nanoseconds / 1e9)


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (children, theirs...), from /proc's children lists; [] where there are none."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                children = [int(c) for c in task.read_text().split()]
            except (OSError, ValueError):
                continue
            found += children
            todo += children
    return found


@dataclass(frozen=True)
class CpuMeter:
    """Reads the CPU seconds of this process ("client") and of a local server ("server": its own
    process; "engine": its descendants, summed). `per_token(before, after, tokens)` turns two
    readings into microseconds per output token."""

    server_pid: int | None = None
    this: str = "client"  # what this process is in the run: "client" (HTTP) or "engine" (offline)

    def read(self) -> dict[str, float]:
        seconds = {self.this: time.process_time()}
        if self.server_pid is not None and (server := process_seconds(self.server_pid)) is not None:
            seconds["server"] = server
            seconds["engine"] = sum(s for p in descendants(self.server_pid) if (s := process_seconds(p)) is not None)
        return seconds

    @staticmethod
    def per_token(before: dict[str, float], after: dict[str, float], tokens: int) -> dict[str, float] | None:
        if tokens <= 0:
            return None
        return {k: (after[k] - before[k]) / tokens * 1e6 for k in after if k in before}
