"""Summary statistics for benchmark samples."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Spread:
    """Median of repeated measurements, with the extremes, so a reader sees how noisy they were."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Spread:
        if not samples:
            raise ValueError("no samples")
        return cls(float(np.median(samples)), float(min(samples)), float(max(samples)))


def percentiles(samples: Sequence[float], qs: Sequence[float] = (50, 90, 99)) -> dict[str, float]:
    """`{"p50": ..., "p90": ..., "p99": ...}` with linear interpolation between order statistics
    (numpy's default, as vLLM and llama.cpp report inter-token latency)."""
    if not samples:
        raise ValueError("no samples")
    values = np.percentile(np.asarray(samples, dtype=float), qs)
    return {f"p{q:g}": float(v) for q, v in zip(qs, values)}


def summary(samples: Sequence[float]) -> dict[str, float]:
    """`{"mean": ..., "p50": ..., "p99": ...}`: the latency summary vLLM's serving benchmark prints
    (p50 is the median), percentiles as in `percentiles`."""
    return {"mean": float(np.mean(np.asarray(samples, dtype=float))), **percentiles(samples, (50, 99))}
