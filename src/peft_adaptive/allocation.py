"""Turn per-module importance scores into integer LoRA ranks under a parameter budget.

Everything here is pure Python on lists of numbers so it can be tested exhaustively.

The rule is a highest-averages (D'Hondt) apportionment with costs: every module starts at ``min_r``;
then, one rank at a time, the module with the largest quotient ``score**exponent / (rank + 1)``
among those that are below ``max_r`` and whose next rank still fits in the remaining budget gets
one more rank. This gives ranks proportional to ``score**exponent`` (the classic property of
D'Hondt), never exceeds the budget, and stops only when no further whole rank would fit.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Allocation:
    """Result of :func:`allocate_ranks`."""

    ranks: list[int]
    budget: int
    used: int

    @property
    def unspent(self) -> int:
        return self.budget - self.used


def allocate_ranks(
    scores: Sequence[float],
    cost_per_rank: Sequence[int],
    budget: int,
    min_r: int,
    max_r: int,
    exponent: float = 1.0,
) -> Allocation:
    """Allocate integer ranks in ``[min_r, max_r]`` whose total cost fits ``budget`` exactly.

    Args:
        scores: non-negative importance of each module (any scale; only ratios matter).
        cost_per_rank: trainable parameters one rank costs in each module (``in + out`` for a Linear).
        budget: maximum total trainable parameters, ``sum(rank_i * cost_i)``.
        min_r, max_r: rank bounds, ``0 <= min_r <= max_r`` (rank 0 removes a module's adapter).
        exponent: ranks are proportional to ``score**exponent``; ``0`` gives a uniform split,
            larger values concentrate the budget on the highest scores.

    Guarantees (tested with hypothesis): ``min_r <= rank_i <= max_r``; ``used <= budget``; every module
    below ``max_r`` costs more than the unspent budget (no whole rank left that would fit);
    deterministic (ties go to the lower index); raising one module's score never lowers its rank
    when costs are equal.
    """
    n = len(scores)
    if len(cost_per_rank) != n:
        raise ValueError(f"scores and cost_per_rank must have the same length, got {n} and {len(cost_per_rank)}")
    _check_problem(cost_per_rank, budget, min_r, max_r)
    if exponent < 0 or not math.isfinite(exponent):
        raise ValueError(f"exponent must be a finite number >= 0, got {exponent}")
    for i, s in enumerate(scores):
        if not (math.isfinite(s) and s >= 0):
            raise ValueError(f"scores must be finite and >= 0, got scores[{i}]={s}")
    weights = _weights(scores, exponent)
    # D'Hondt: the next rank of module i, now at rank r, is worth the quotient w_i / (r + 1)
    return _greedy(lambda i, r: weights[i] / (r + 1), cost_per_rank, budget, min_r, max_r)


def allocate_by_spectrum(
    spectra: Sequence[Sequence[float]],
    cost_per_rank: Sequence[int],
    budget: int,
    min_r: int,
    max_r: int,
) -> Allocation:
    """Allocate ranks from per-module spectra with one global threshold on value per parameter.

    ``spectra[i][j]`` is what the ``(j+1)``-th rank of module ``i`` is worth (e.g. the energy ``sigma_j**2``
    of the ``j``-th singular direction of its gradient or of its learned update); each list must be
    non-increasing. A rank is worth ``spectra[i][j] / cost_per_rank[i]`` per parameter, and ranks are handed
    out from the most to the least valuable while they fit: since every module's values fall with ``j``,
    this is the same as one threshold on value per parameter across all modules. With equal costs it
    maximises the total value exactly; with unequal costs it is the greedy rule of the (fractional) knapsack,
    optimal up to the last module that no longer fits.

    A spectrum shorter than ``max_r`` (a warmup at rank ``r`` shows at most ``r`` singular values) is
    extended geometrically with the decay of its last two values (ratio capped at 1), so a module whose
    spectrum is still flat at its end can grow past the rank it was measured at.

    Every module keeps ``min_r``; the budget is never exceeded; deterministic (ties go to the lower index).
    """
    n = len(spectra)
    if len(cost_per_rank) != n:
        raise ValueError(f"spectra and cost_per_rank must have the same length, got {n} and {len(cost_per_rank)}")
    _check_problem(cost_per_rank, budget, min_r, max_r)
    values = [_extend_spectrum(s, max_r, i) for i, s in enumerate(spectra)]
    return _greedy(lambda i, r: values[i][r] / cost_per_rank[i], cost_per_rank, budget, min_r, max_r)


def _greedy(
    next_rank_value: Callable[[int, int], float],
    cost_per_rank: Sequence[int],
    budget: int,
    min_r: int,
    max_r: int,
) -> Allocation:
    """Start every module at ``min_r``, then hand out one rank at a time to the module whose next rank is worth
    the most (``next_rank_value(i, current_rank)``) while it fits; ties go to the lower index.

    Both rules above are this loop with a different value: it is optimal when each module's values fall with its
    rank, as D'Hondt quotients and non-increasing spectra do.
    """
    ranks = [min_r] * len(cost_per_rank)
    remaining = budget - min_r * sum(cost_per_rank)
    # Max-heap of (-value, index). Modules that no longer fit are dropped for good: the remaining budget only
    # shrinks, so they can never fit again.
    heap = [(-next_rank_value(i, min_r), i) for i in range(len(ranks)) if min_r < max_r]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        if cost_per_rank[i] > remaining:
            continue
        ranks[i] += 1
        remaining -= cost_per_rank[i]
        if ranks[i] < max_r:
            heapq.heappush(heap, (-next_rank_value(i, ranks[i]), i))
    return Allocation(ranks=ranks, budget=budget, used=budget - remaining)


def predicted_gain(
    spectra: Sequence[Sequence[float]], ranks_before: Sequence[int], ranks_after: Sequence[int]
) -> float:
    """How much more the new ranks are worth than the old ones, by the spectra that chose them.

    The value of an allocation is the sum of each module's first ``rank`` spectrum values (extended past the
    measured length as :func:`allocate_by_spectrum` extends them); the result is ``value(after) / value(before)``.
    About 1 means the score sees nothing to gain from moving rank between modules (its need is spread evenly);
    ``nan`` when the old ranks are worth nothing. A diagnostic: it is in the score's own units, not the loss's.
    """
    if not len(spectra) == len(ranks_before) == len(ranks_after):
        raise ValueError(
            f"spectra, ranks_before and ranks_after must have the same length, got {len(spectra)}, "
            f"{len(ranks_before)} and {len(ranks_after)}"
        )

    def value(ranks: Sequence[int]) -> float:
        return sum(sum(_extend_spectrum(s, r, i)) for i, (s, r) in enumerate(zip(spectra, ranks)))

    before = value(ranks_before)
    return value(ranks_after) / before if before > 0 else float("nan")


def _extend_spectrum(spectrum: Sequence[float], length: int, index: int) -> list[float]:
    values = [float(v) for v in spectrum]
    for j, v in enumerate(values):
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"spectra must be finite and >= 0, got spectra[{index}][{j}]={v}")
        if j and v > values[j - 1] * (1 + 1e-9):
            raise ValueError(f"spectra[{index}] must be non-increasing, got {values[j - 1]} then {v}")
    if not values:
        return [0.0] * length
    ratio = min(values[-1] / values[-2], 1.0) if len(values) > 1 and values[-2] > 0 else 0.0
    while len(values) < length:
        values.append(values[-1] * ratio)
    return values[:length]


def _check_problem(cost_per_rank: Sequence[int], budget: int, min_r: int, max_r: int) -> None:
    if not (_is_whole(min_r) and _is_whole(max_r) and 0 <= min_r <= max_r):
        raise ValueError(f"need integers 0 <= min_r <= max_r, got min_r={min_r}, max_r={max_r}")
    if not _is_whole(budget):
        raise ValueError(f"budget must be an integer, got budget={budget}")
    for i, c in enumerate(cost_per_rank):
        if not _is_whole(c) or c <= 0:
            raise ValueError(f"cost_per_rank must be positive integers, got cost_per_rank[{i}]={c}")
    floor_cost = min_r * sum(cost_per_rank)
    if floor_cost > budget:
        raise ValueError(
            f"budget={budget} cannot give every module min_r={min_r}: that alone costs {floor_cost} parameters"
        )


def _weights(scores: Sequence[float], exponent: float) -> list[float]:
    """``(score / max_score)**exponent``, with all-zero scores treated as a uniform split.

    Dividing by the largest score first keeps every base in ``[0, 1]``, so the power neither overflows
    nor underflows to all zeros for scores of extreme scale (only the ratios matter).
    """
    top = max(scores, default=0.0)
    if exponent == 0 or not top > 0:
        return [1.0] * len(scores)
    return [(float(s) / top) ** exponent for s in scores]


def _is_whole(value: object) -> bool:
    """A finite number with an integer value (``3`` or ``3.0``; not ``2.5``, NaN or infinity)."""
    try:
        return math.isfinite(value) and int(value) == value
    except TypeError:
        return False


def normalise(values: list[float]) -> list[float]:
    """Scale finite non-negative values to sum to one (non-finite ones count as 0; all-zero gives uniform)."""
    total = sum(v for v in values if math.isfinite(v))
    if total <= 0:
        return [1.0 / len(values)] * len(values) if values else []
    return [v / total if math.isfinite(v) else 0.0 for v in values]
