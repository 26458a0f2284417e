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


def tost_power(n: int, sd: float, true_difference: float, margin: float, alpha: float = 0.05) -> float:
    """The probability that TOST at ``alpha`` per side (the (1 - 2 alpha) paired t-interval inside ±``margin``)
    passes with ``n`` pairs of normal differences with standard deviation ``sd`` and mean ``true_difference``.

    Exact: the mean and the sample sd are independent, so the chance that |mean| < margin - t * s / sqrt(n) is
    integrated over the chi-square law of s (Owen's power of TOST, by quadrature).
    """
    from scipy.integrate import quad
    from scipy.stats import chi2, norm, t

    if n < 2 or sd <= 0:
        return 0.0
    df, crit, root_n = n - 1, float(t.ppf(1 - alpha, n - 1)), math.sqrt(n)
    widest = (margin * root_n / crit) ** 2 * df / sd**2  # the chi-square value beyond which no mean can pass

    def passes(q: float) -> float:
        room = margin - crit * sd * math.sqrt(q / df) / root_n  # how far the mean may lie from 0, given s
        return (norm.cdf((room - true_difference) * root_n / sd)
                - norm.cdf((-room - true_difference) * root_n / sd)) * chi2.pdf(q, df)

    # Over the chi-square's mass only: at large n it is a narrow peak that quadrature over [0, widest] misses.
    low, high = float(chi2.ppf(1e-12, df)), min(widest, float(chi2.ppf(1 - 1e-12, df)))
    return 0.0 if high <= low else float(min(1.0, max(0.0, quad(passes, low, high, limit=200)[0])))


def pairs_for_power(sd: float, true_difference: float, margin: float, power: float = 0.8, alpha: float = 0.05,
                    most: int = 100_000) -> int | None:
    """The fewest pairs for which TOST passes with probability ``power``; None when no n up to ``most`` does
    (a true difference at or beyond the margin never passes)."""
    if abs(true_difference) >= margin:
        return None
    low, high = 2, 4
    while tost_power(high, sd, true_difference, margin, alpha) < power:  # power grows with n
        if high >= most:
            return None
        low, high = high + 1, min(2 * high, most)
    while low < high:
        mid = (low + high) // 2
        low, high = (mid + 1, high) if tost_power(mid, sd, true_difference, margin, alpha) < power else (low, mid)
    return low
