"""The study's statistics: a summary over seeds and the paired difference of two arms with its t-interval.
"""

from __future__ import annotations

import math

import numpy as np


def describe(values: list[float]) -> dict:
    """n, mean and sample standard deviation (None where undefined)."""
    n = len(values)
    return {"n": n, "mean": float(np.mean(values)) if n else None,
            "sd": float(np.std(values, ddof=1)) if n >= 2 else None}


def paired_ci(values: dict[int, float], reference: dict[int, float], confidence: float = 0.95) -> dict:
    """Mean paired difference ``values[s] - reference[s]`` over the seeds both have, with a t-interval.

    ``mean ± t_{(1 + confidence) / 2, n - 1} * sd / sqrt(n)``; with fewer than two pairs there is no interval.
    """
    seeds = sorted(set(values) & set(reference))
    d = np.array([values[s] - reference[s] for s in seeds], dtype=np.float64)
    n = len(d)
    result = {"seeds": seeds, "n": n, "mean": float(d.mean()) if n else None, "sd": None,
              "half_width": None, "low": None, "high": None, "confidence": confidence}
    if n >= 2:
        from scipy.stats import t

        sd = float(d.std(ddof=1))
        half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
        result.update(sd=sd, half_width=half, low=result["mean"] - half, high=result["mean"] + half)
    return result
