"""Paired comparisons over seeds: differences, 95% t intervals, the verdict word, and rank correlation.

Records are ``{seed: run}`` with ``run["metrics"][metric]``; same seed = same data order and initialisation.
"""

from __future__ import annotations

import math
import statistics

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def paired(a: dict[int, dict], b: dict[int, dict], metric: str) -> tuple[float, float, float, int, int] | None:
    """Paired differences a - b over common seeds: mean, std, half-width of the 95% t interval, n, seeds a - b > 0."""
    diffs = list(paired_differences(a, b, metric).values())
    if len(diffs) < 2:
        return None
    std = statistics.stdev(diffs)
    half = T_975.get(len(diffs) - 1, 2.0) * std / math.sqrt(len(diffs))
    return statistics.fmean(diffs), std, half, len(diffs), sum(d > 0 for d in diffs)


def paired_differences(a: dict[int, dict], b: dict[int, dict], metric: str) -> dict[int, float]:
    """``{seed: a - b}`` on each seed both have, in seed order."""
    return {s: a[s]["metrics"][metric] - b[s]["metrics"][metric] for s in sorted(set(a) & set(b))}


def per_seed_differences(a: dict[int, dict], b: dict[int, dict], metric: str) -> str:
    """``s0 +0.0091, s1 +0.0123``: the paired difference a - b on each common seed."""
    return ", ".join(f"s{s} {d:+.4f}" for s, d in paired_differences(a, b, metric).items()) or "–"


def verdict(diff: tuple[float, float, float, int, int] | None, higher_is_better: bool) -> str:
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
