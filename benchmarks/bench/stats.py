"""Paired comparisons over seeds: differences, 95% t intervals, the verdict word, ratios of means with Fieller's
interval, and rank correlation.

Records are ``{seed: run}`` with ``run["metrics"][metric]``; same seed = same data order and initialisation.
"""

from __future__ import annotations

import math
import statistics

#: Student's t, 97.5% quantile, by degrees of freedom
T_975 = {
    **{1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228},
    **{11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093},
    **{20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048},
    **{29: 2.045, 30: 2.042},
}


Diff = tuple[float, float, float, int, int]  # mean, std, half-width of the 95% t interval, n, how many > 0


def paired(a: dict[int, dict], b: dict[int, dict], metric: str) -> Diff | None:
    """Paired differences a - b over common seeds: mean, std, half-width of the 95% t interval, n, seeds a - b > 0."""
    return summarise(list(paired_differences(a, b, metric).values()))


def summarise(values: list[float]) -> Diff | None:
    """Mean, std, half-width of the 95% t interval of the mean, n and how many are > 0 (``None`` below 2 values)."""
    if len(values) < 2:
        return None
    std = statistics.stdev(values)
    half = t_975(len(values) - 1) * std / math.sqrt(len(values))
    return statistics.fmean(values), std, half, len(values), sum(v > 0 for v in values)


def t_975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (the table's; 2.0 beyond 30)."""
    return T_975.get(df, 2.0)


def is_better(diff: Diff | None, higher_is_better: bool) -> bool:
    """The difference is better outside its 95% interval (the pre-registered pass rule of a calibration)."""
    if diff is None:
        return False
    mean, _, half, _, _ = diff
    return abs(mean) > half and (mean > 0) == higher_is_better


def fieller(numerator: list[float], denominator: list[float]) -> tuple[float, float | None, float | None] | None:
    """``mean(numerator) / mean(denominator)`` of paired samples and its 95% Fieller interval ``(ratio, low, high)``;
    ``low``/``high`` are ``None`` when the interval is unbounded (the denominator's mean is not clearly away from 0).

    The bounds are the ``theta`` with ``(mx - theta my)^2 <= t^2 Var(mx - theta my)``, ``Var`` from the sample
    (co)variances over ``n``: the roots of ``a theta^2 - 2 b theta + c`` with ``a = my^2 - t^2 syy / n``,
    ``b = mx my - t^2 sxy / n``, ``c = mx^2 - t^2 sxx / n``; bounded when ``a > 0``."""
    n = len(numerator)
    if n < 2 or len(denominator) != n:
        return None
    mx, my = statistics.fmean(numerator), statistics.fmean(denominator)
    if my == 0:
        return None
    sxx, syy = statistics.variance(numerator), statistics.variance(denominator)
    sxy = statistics.covariance(numerator, denominator)
    t2n = t_975(n - 1) ** 2 / n
    a, b, c = my * my - t2n * syy, mx * my - t2n * sxy, mx * mx - t2n * sxx
    if a <= 0:
        return mx / my, None, None
    root = math.sqrt(max(b * b - a * c, 0.0))
    return mx / my, (b - root) / a, (b + root) / a


def paired_differences(a: dict[int, dict], b: dict[int, dict], metric: str) -> dict[int, float]:
    """``{seed: a - b}`` on each seed both have, in seed order."""
    return {s: a[s]["metrics"][metric] - b[s]["metrics"][metric] for s in sorted(set(a) & set(b))}


def per_seed_differences(a: dict[int, dict], b: dict[int, dict], metric: str) -> str:
    """``s0 +0.0091, s1 +0.0123``: the paired difference a - b on each common seed."""
    return ", ".join(f"s{s} {d:+.4f}" for s, d in paired_differences(a, b, metric).items()) or "–"


def verdict(diff: Diff | None, higher_is_better: bool) -> str:
    """``+d ± half (n, k/n up)``: the mean paired difference with its 95% interval; **better**/**worse** when the
    interval excludes 0, "inside" otherwise (the interval is wider than the paired spread: ``std * t / sqrt(n)``)."""
    if diff is None:
        return "n/a (need 2+ paired seeds)"
    mean, _, half, n, up = diff
    wins = up if higher_is_better else n - up
    text = f"{mean:+.4f} ± {half:.4f} ({wins}/{n} seeds better)"
    if abs(mean) <= half:
        return text + ": inside"
    better = (mean > 0) == higher_is_better
    return text + f": **{'better' if better else 'worse'}**"


def spearman(a: dict[str, int], b: dict[str, int]) -> float:
    """Spearman correlation of two modules-to-ranks maps, over ``a``'s modules (missing from ``b``: rank 0)."""
    from scipy.stats import spearmanr  # lazy: only the report needs it ([bench] and [test] extras)

    names = sorted(a)
    return float(spearmanr([a[n] for n in names], [b.get(n, 0) for n in names])[0])
