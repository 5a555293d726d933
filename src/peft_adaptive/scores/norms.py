"""``score="norms"`` (the original write-up's score): per-entry RMS gradient and weight change.

``s_i = grad_weight * G_i + delta_weight * W_i``, each signal normalised to sum to one; ranks proportional to
``s_i ** score_exponent`` (:func:`~peft_adaptive.allocation.allocate_ranks`).
"""

from __future__ import annotations

from ..allocation import allocate_ranks, normalise
from ..signals import ModuleSignals
from .base import Needs, Score, ScoredAllocation


class NormsScore(Score):
    name = "norms"
    gradient_only = True

    def needs(self, config, layers, adapter) -> Needs:
        return Needs(delta=config.delta_weight > 0)

    def allocate(self, collector, costs, budget, config) -> ScoredAllocation:
        values = combine_scores(collector.signals(), config.grad_weight, config.delta_weight)
        allocation = allocate_ranks(values, costs, budget, config.min_r, config.max_r, config.score_exponent)
        return ScoredAllocation(normalise(values), allocation)


def combine_scores(signals: ModuleSignals, grad_weight: float, delta_weight: float) -> list[float]:
    """``s_i = grad_weight * G_i + delta_weight * W_i`` with each signal normalised to sum to one.

    Normalising by the sum (not min-max) keeps the ratios between modules, so a module with twice the
    activity gets twice the share, and the least active module is not pushed to zero. The two weights
    then trade off the signals independently of their physical units.
    """
    if signals.delta_rms is None:
        if delta_weight != 0:
            raise ValueError(
                f"delta_weight={delta_weight} needs the weight-delta signal, which was not tracked: "
                "start the collection with track_delta=True"
            )
        return [grad_weight * g for g in normalise(signals.grad_rms)]
    return [
        grad_weight * g + delta_weight * d for g, d in zip(normalise(signals.grad_rms), normalise(signals.delta_rms))
    ]
