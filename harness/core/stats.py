"""Numbers with their noise: the spread and the confidence interval every measured figure carries.

A benchmark's step time is a sample of a noisy process (other work on the host, clocks, the allocator), so a
figure is its n, its median, its interquartile range (the minimum and maximum where n is too small for
quartiles) and a 95% confidence interval for its mean from Student's t distribution (t-based, not bootstrap: a
run has 2–50 timed steps, too few for a bootstrap's resampling to mean much). Rates derived from a step time
(tokens/s, TFLOP/s, MFU) are computed from the same per-step times, so they agree with ms/step by construction.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Optional, Sequence

MIN_QUARTILES = 4
"""Below this many values the spread is the minimum and maximum, not quartiles."""
MIN_INTERVAL = 3
"""Below this many values no interval is given (two points say little about the mean); `train.steps` that
leaves fewer timed steps is warned about."""
HIGH_CV = 0.1
"""A coefficient of variation (standard deviation / mean) above this flags the figure as noisy."""
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
"""Student's t 0.975 quantile for 1..30 degrees of freedom (any statistics table)."""


def t975(df: int) -> float:
    """Student's t 0.975 quantile; past the table, the Cornish-Fisher expansion around the normal 1.96."""
    if df < 1:
        raise ValueError("t quantile needs at least 1 degree of freedom")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def describe(values: Sequence[float]) -> Optional[dict[str, Any]]:
    """n, median, mean, spread (q1/q3 or min/max), 95% confidence interval of the mean and coefficient of
    variation of `values`; None for no values."""
    xs = sorted(float(v) for v in values if v is not None and math.isfinite(v))
    n = len(xs)
    if not n:
        return None
    mean = statistics.fmean(xs)
    out: dict[str, Any] = {"n": n, "median": statistics.median(xs), "mean": mean, "min": xs[0], "max": xs[-1]}
    if n >= MIN_QUARTILES:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
        out.update(q1=q1, q3=q3, spread="iqr")
    else:
        out["spread"] = "min-max"
    if n >= MIN_INTERVAL:
        sd = statistics.stdev(xs)
        half = t975(n - 1) * sd / math.sqrt(n)
        out.update(sd=sd, ci95=[mean - half, mean + half], ci_method="t", cv=sd / mean if mean else None)
    else:
        out.update(ci95=None, ci_reason=f"{n} value(s): an interval needs at least {MIN_INTERVAL}")
    return out


def plus_minus(stats: Optional[dict[str, Any]]) -> Optional[float]:
    """Half the interquartile range (or of the min-max range): the ± a table prints beside the median."""
    if not stats:
        return None
    if stats.get("spread") == "iqr":
        return (stats["q3"] - stats["q1"]) / 2
    return (stats["max"] - stats["min"]) / 2


def noisy(stats: Optional[dict[str, Any]]) -> bool:
    return bool(stats and stats.get("cv") is not None and stats["cv"] > HIGH_CV)


def inverted(stats: dict[str, Any], work: float) -> dict[str, Any]:
    """The figures of a rate work/t from those of t: the same n, the median over the median, the quartiles,
    extremes and interval swapped (a monotone map keeps medians and quantiles; the interval is the mean's, mapped)."""
    def over(x: Optional[float]) -> Optional[float]:
        return None if x is None or x <= 0 else work / x

    out: dict[str, Any] = {"n": stats["n"], "median": over(stats["median"]), "mean": None,
                           "min": over(stats["max"]), "max": over(stats["min"]), "spread": stats["spread"],
                           "derived": "the step's work over the step time's figures"}
    if stats["spread"] == "iqr":
        out.update(q1=over(stats["q3"]), q3=over(stats["q1"]))
    if stats.get("ci95"):
        low, high = stats["ci95"]
        out.update(ci95=[over(high), over(low)], ci_method=stats["ci_method"], cv=stats.get("cv"))
    else:
        out.update(ci95=None, ci_reason=stats.get("ci_reason"))
    return out
