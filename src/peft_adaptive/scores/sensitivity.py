"""``score="sensitivity"``: AdaLoRA's importance, smoothed ``|theta * grad|`` times its uncertainty.

The collector keeps, per adapter entry, the EMA ``I_bar`` of ``|theta * grad|`` and the EMA of ``|I - I_bar|``
(AdaLoRA's ``beta1``, ``beta2``); a module's score is the mean over its entries of their product. Ranks
proportional to ``score ** score_exponent``.
"""

from __future__ import annotations

import torch

from ..allocation import allocate_ranks, normalise
from .base import Needs, Score, ScoredAllocation, require


class SensitivityScore(Score):
    name = "sensitivity"

    def needs(self, config, layers, adapter) -> Needs:
        return Needs(sensitivity=True)

    def allocate(self, collector, costs, budget, config) -> ScoredAllocation:
        values = module_sensitivity(collector)
        allocation = allocate_ranks(values, costs, budget, config.min_r, config.max_r, config.score_exponent)
        return ScoredAllocation(normalise(values), allocation)


@torch.no_grad()
def module_sensitivity(collector) -> list[float]:
    """Per module: the mean over its adapter entries (both factors) of smoothed importance x uncertainty."""
    state = require(collector.sensitivity_state, "sensitivity")
    per_factor = [float((importance * uncertainty).sum()) for importance, uncertainty in state]
    return [(a + b) / n for a, b, n in zip(per_factor[0::2], per_factor[1::2], collector.adapter_numel())]
