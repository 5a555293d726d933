"""``score="consistent_spectrum"``: the gradient spectrum, weighted by how consistently the signal steps agree.

``gradient_spectrum`` reads the singular values of each module's summed gradient ``S = sum_t G_t``. Summed noise
has size too: ``E|S|^2 = T^2 |E G|^2 + T tr Cov``, so a module whose large step gradients point every which way
(on a causal LM, typically the first layers) scores high without a direction worth a rank. With the per-step
squared norms ``Q = sum_t |G_t|^2`` kept beside the sum, the module's *consistency*

    c = |S|^2 / (T Q)        in [1/T, 1] for T steps (Cauchy-Schwarz)

is 1 when every step points the same way and about ``1/T`` for pure noise; in expectation it is the share of one
step's gradient energy that is the expected gradient, plus ``1/T`` times the rest. Each module's ``sigma_ij^2`` is
multiplied by ``c ** consistency_power`` (default 4) and the budget split by one global threshold per parameter, as
in ``gradient_spectrum``.
(The unbiased signal share ``(T c - 1) / (T - 1)``, the gradient-noise-scale identity of McCandlish et al. 2018,
is the sharper estimate but swings around zero when every module is noise-dominated; ``c`` keeps the ``1/T``
floor and with it the spectrum's order.) Both sums come from the sketches ``gradient_spectrum`` already keeps
(the row-space sketch, or the ``dL/dB`` sketch for layers without one): one more number per module; under
``torch.distributed`` each signal step's sketch is summed across the processes (one all-reduce per step) so that
``G_t`` is the whole batch's gradient, as in a single process.
"""

from __future__ import annotations

from .base import Needs, Score, ScoredAllocation, require
from .gradient_spectrum import gradient_spectra
from .spectral import allocate_spectra


class ConsistentSpectrumScore(Score):
    """``sigma^2 * c ** config.consistency_power``. The default power 4 orders modules as ``|S| * c^2`` (power 2 as
    ``|S| * c``); power 1 as ``|S| * sqrt(c)``, the loss decrease a sign-like optimizer such as Adam makes along a module's mean gradient
    (its step along a direction scales with the gradient's mean over its RMS). Power 2 was chosen over 1, and then
    4 over 2, by pre-registered benchmark rules (benchmarks/RESULTS.md): the higher power separates the modules whose
    gradients agree step after step from those whose large gradients are mostly noise more sharply."""

    name = "consistent_spectrum"
    values_ranks = True
    gradient_only = True

    def needs(self, config, layers, adapter) -> Needs:
        return Needs(grad_sum=True, sketch=True, step_energy=True)

    def allocate(self, collector, costs, budget, config) -> ScoredAllocation:
        spectra = gradient_spectra(collector)
        weights = module_consistencies(collector)
        power = config.consistency_power
        weighted = [[v * c ** (power / 2) for v in spectrum] for spectrum, c in zip(spectra, weights)]
        return allocate_spectra(weighted, costs, budget, config)


def consistency(summed_energy: float, step_energy: float, samples: int) -> float:
    """``|S|^2 / (T Q)``: ``summed_energy = |sum_t G_t|^2``, ``step_energy = Q = sum_t |G_t|^2``, ``samples = T``.

    1 when there is nothing to compare (no step, or no per-step energies recorded, as in a checkpoint from an
    older version); clipped to [0, 1] against rounding and sketch error.
    """
    if samples < 1 or step_energy <= 0:
        return 1.0
    return min(max(summed_energy / (samples * step_energy), 0.0), 1.0)


def module_consistencies(collector) -> list[float]:
    """Per module, :func:`consistency` from the row-space sketch where the layer has one, else from ``dL/dB``."""
    b_totals = require(collector.b_grad_sum, "grad_sum")
    b_steps = int(collector.finite_steps())
    values = [
        consistency(float(total.double().pow(2).sum()), squares, b_steps)
        for total, squares in zip(b_totals, require(collector.b_grad_square_sum, "step_energy"))
    ]
    if collector.sketch is None:
        return values
    totals, energies = collector.sketch.totals(), collector.sketch.step_energies()
    steps = collector.sketch.steps
    return [
        consistency(float(totals[name].double().pow(2).sum()), energies[name], steps) if name in totals else value
        for name, value in zip(collector.names, values)
    ]
