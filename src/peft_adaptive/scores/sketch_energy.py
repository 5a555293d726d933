"""``score="sketch_energy"``: the per-entry RMS of each module's *mean* full-weight gradient.

Estimated from the accumulated ``dL/dB = s G A^T``, a random sketch of the summed full-weight gradient ``G``
while ``A`` is near its random initialisation. Summing before taking the norm keeps what the steps agree on and
averages out the noise, unlike ``norms``. Ranks proportional to ``score ** score_exponent``.
"""

from __future__ import annotations

import math

import torch

from ..allocation import allocate_ranks, normalise
from ..resize import lora_factors
from .base import Needs, Score, ScoredAllocation, require


class SketchEnergyScore(Score):
    name = "sketch_energy"
    gradient_only = True

    def needs(self, config, layers, adapter) -> Needs:
        return Needs(grad_sum=True)

    def allocate(self, collector, costs, budget, config) -> ScoredAllocation:
        values = []
        for layer, spectrum in zip(collector.layers, b_gradient_spectra(collector)):
            A, B = lora_factors(layer, collector.adapter)
            values.append(math.sqrt(sum(v * v for v in spectrum) / (B.shape[0] * A.shape[1])))
        allocation = allocate_ranks(values, costs, budget, config.min_r, config.max_r, config.score_exponent)
        return ScoredAllocation(normalise(values), allocation)


@torch.no_grad()
def b_gradient_spectra(collector) -> list[list[float]]:
    """Per module: the singular values of its *mean* full-weight gradient seen through ``A``.

    ``sum dL/dB = s (sum G) A^T``; with ``Omega = A^T / (rms(A) sqrt(r))``, ``E[Omega Omega^T] = I``, so the
    singular values of ``sum dL/dB / (steps s rms(A) sqrt(r))`` estimate the ``r`` leading ones of the mean
    gradient. Valid while ``A`` is close to its random initialisation, i.e. during a short warmup.
    """
    totals = require(collector.b_grad_sum, "grad_sum")
    steps = max(collector.finite_steps(), 1.0)
    spectra = []
    for layer, total in zip(collector.layers, totals):
        A, _ = lora_factors(layer, collector.adapter)
        r = A.shape[0]
        rms_a = float(A.detach().float().pow(2).mean().sqrt()) or 1.0
        matrix = total.reshape(total.shape[0], -1).double() / (
            steps * layer.scaling[collector.adapter] * rms_a * math.sqrt(r)
        )
        spectra.append(torch.linalg.svdvals(matrix).tolist())
    return spectra
