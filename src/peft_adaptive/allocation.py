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
from collections.abc import Sequence
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
        min_r, max_r: rank bounds, ``1 <= min_r <= max_r``.
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
    if not (_is_whole(min_r) and _is_whole(max_r) and 1 <= min_r <= max_r):
        raise ValueError(f"need integers 1 <= min_r <= max_r, got min_r={min_r}, max_r={max_r}")
    if not _is_whole(budget):
        raise ValueError(f"budget must be an integer, got budget={budget}")
    if exponent < 0 or not math.isfinite(exponent):
        raise ValueError(f"exponent must be a finite number >= 0, got {exponent}")
    for i, (s, c) in enumerate(zip(scores, cost_per_rank)):
        if not (math.isfinite(s) and s >= 0):
            raise ValueError(f"scores must be finite and >= 0, got scores[{i}]={s}")
        if not _is_whole(c) or c <= 0:
            raise ValueError(f"cost_per_rank must be positive integers, got cost_per_rank[{i}]={c}")
    floor_cost = min_r * sum(cost_per_rank)
    if floor_cost > budget:
        raise ValueError(
            f"budget={budget} cannot give every module min_r={min_r}: that alone costs {floor_cost} parameters"
        )

    weights = _weights(scores, exponent)
    ranks = [min_r] * n
    remaining = budget - floor_cost
    # Max-heap of (-quotient, index). Modules that no longer fit are dropped for good: the
    # remaining budget only shrinks, so they can never fit again.
    heap = [(-w / (min_r + 1), i) for i, w in enumerate(weights) if min_r < max_r]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        if cost_per_rank[i] > remaining:
            continue
        ranks[i] += 1
        remaining -= cost_per_rank[i]
        if ranks[i] < max_r:
            heapq.heappush(heap, (-weights[i] / (ranks[i] + 1), i))
    return Allocation(ranks=ranks, budget=budget, used=budget - remaining)


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
