"""Seeded corruption of files, and running trials in a worker process so that a crash is seen.

A native library that segfaults or aborts takes the test process with it; so trials run in one
worker subprocess that prints one JSON line per trial, announcing each trial before it runs. If
the worker dies, the last announced trial is the one that crashed it.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path


KINDS = ("flip", "truncate", "zero")


def mutate(raw: bytes, rng: random.Random, kind: str | None = None) -> tuple[bytes, str]:
    """A damaged copy of `raw` and how it was damaged: bit flips (1 to 16), a truncation, or a
    zeroed run of bytes (what a torn write leaves); `kind` one of KINDS, default drawn (flips twice
    as often)."""
    kind = kind or rng.choice(["flip", "flip", "truncate", "zero"])
    data = bytearray(raw)
    if kind == "truncate":
        cut = rng.randrange(len(data))
        return bytes(data[:cut]), f"truncated to {cut} of {len(data)} bytes"
    if kind == "zero":
        start = rng.randrange(len(data))
        length = rng.randint(1, 4096)
        data[start : start + length] = bytes(len(data[start : start + length]))
        return bytes(data), f"zeroed {length} bytes at {start}"
    spots = sorted(rng.randrange(len(data)) for _ in range(rng.randint(1, 16)))
    for spot in spots:
        data[spot] ^= 1 << rng.randrange(8)
    return bytes(data), f"flipped bits at {spots}"


def run_trials(code: str, args: list[str], timeout: float = 600) -> list[dict]:
    """Run worker `code` (Python source reading `sys.argv[1:]`) and return its JSON lines.

    The worker prints {"trial": i, "running": ...} before each trial and {"trial": i, ...outcome}
    after it. Fails the calling test with the crashed trial if the worker dies.
    """
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).parent)  # fmt: skip
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        last = lines[-1] if lines else "before the first trial"
        raise AssertionError(f"worker died with code {proc.returncode} at {last}\n{proc.stderr[-3000:]}")
    return [line for line in lines if "running" not in line]
