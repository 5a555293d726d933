"""``score="gradient_spectrum"`` (the default): the singular values of each module's mean full-weight gradient.

Read from the row-space sketch (:mod:`peft_adaptive.sketch`), or from the ``dL/dB`` sketch for layers that cannot
be sketched (embeddings, convolutions). Ranks from one global threshold on ``sigma_ij^2`` per parameter: to first
order, a rank spent on direction ``j`` of module ``i`` buys a loss decrease proportional to ``sigma_ij^2``, so this
spends the budget where the gradient says a parameter buys the most.
"""

from __future__ import annotations

from ..sketch import sketch_spectrum
from .base import Needs, Score, ScoredAllocation
from .sketch_energy import b_gradient_spectra
from .spectral import allocate_spectra


class GradientSpectrumScore(Score):
    name = "gradient_spectrum"
    values_ranks = True
    gradient_only = True

    def needs(self, config, layers, adapter) -> Needs:
        return Needs(grad_sum=True, sketch=True)

    def allocate(self, collector, costs, budget, config) -> ScoredAllocation:
        return allocate_spectra(gradient_spectra(collector), costs, budget, config)


def gradient_spectra(collector) -> list[list[float]]:
    """Per module, the mean full-weight gradient's leading singular values: from the row-space sketch where the
    layer has one, else from the ``dL/dB`` sketch."""
    fallback = b_gradient_spectra(collector)
    if collector.sketch is None:
        return fallback
    totals = collector.sketch.totals()
    steps = collector.sketch.steps
    return [
        sketch_spectrum(totals[name], steps).tolist() if name in totals else spectrum
        for name, spectrum in zip(collector.names, fallback)
    ]
