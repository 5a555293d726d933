"""Score strategies: from warmup signals to integer ranks, one function per strategy.

``AdaptiveLoraConfig.score`` picks one:

* ``"norms"`` (the original write-up's score): ``grad_weight * G_i + delta_weight * W_i``, the per-entry RMS
  gradient and weight change of each module, each normalised to sum to one; ranks proportional to
  ``score ** score_exponent`` (D'Hondt, :func:`~peft_adaptive.allocation.allocate_ranks`).
* ``"sensitivity"``: AdaLoRA's smoothed ``|theta * grad|`` x uncertainty, averaged over the adapter's entries;
  ranks proportional to ``score ** score_exponent``.
* ``"sketch_energy"``: the per-entry RMS of the module's *mean* full-weight gradient, estimated from the
  accumulated ``dL/dB = s G A^T`` (a random sketch of it); ranks proportional to ``score ** score_exponent``.
  Summing before taking the norm keeps what the steps agree on and averages out the noise, unlike ``norms``.
* ``"spectral"``: the singular values ``sigma_ij`` of each module's learned update ``s B A`` after the warmup;
  ranks from one global threshold on ``sigma_ij^(2 * score_exponent)`` per parameter
  (:func:`~peft_adaptive.allocation.allocate_by_spectrum`).
* ``"gradient_spectrum"`` (the default): the singular values of each module's mean full-weight gradient, from the
  row-space sketch (:mod:`peft_adaptive.sketch`; from the ``dL/dB`` sketch for layers that cannot be
  sketched); ranks from one global threshold on ``sigma_ij^2`` per parameter. To first order, a rank
  spent on direction ``j`` of module ``i`` buys a loss decrease proportional to ``sigma_ij^2``, so this
  spends the budget where the gradient says a parameter buys the most.

Each strategy returns per-module scores (for the report) and the allocation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .allocation import Allocation, allocate_by_spectrum, allocate_ranks
from .config import SCORES
from .resize import lora_factors
from .signals import ModuleSignals, SignalCollector, combine_scores, normalise
from .sketch import sketch_spectrum

#: Scores that only need gradients, so they also work in a calibration phase without optimizer steps.
GRADIENT_ONLY_SCORES = ("norms", "sketch_energy", "gradient_spectrum")


@dataclass(frozen=True)
class Trackers:
    """Which optional signals a score needs the collector to keep."""

    sensitivity: bool = False
    grad_sum: bool = False
    sketch: bool = False


def trackers_for(score: str, growth: str) -> Trackers:
    """The trackers a score and growth rule need (gradient growth always needs the row-space sketch)."""
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; allowed: {', '.join(SCORES)}")
    return Trackers(
        sensitivity=score == "sensitivity",
        grad_sum=score in ("sketch_energy", "gradient_spectrum"),
        sketch=score == "gradient_spectrum" or growth == "gradient",
    )


@dataclass
class ScoredAllocation:
    scores: list[float]  # per module, normalised to sum to one (for the report and the logs)
    allocation: Allocation


def score_and_allocate(
    score: str,
    collector: SignalCollector,
    signals: ModuleSignals,
    costs: Sequence[int],
    budget: int,
    min_r: int,
    max_r: int,
    exponent: float = 1.0,
    grad_weight: float = 1.0,
    delta_weight: float = 0.0,
) -> ScoredAllocation:
    """Run the chosen strategy on the collected signals."""
    if score == "norms":
        values = combine_scores(signals, grad_weight, delta_weight)
    elif score == "sensitivity":
        values = _require(collector.sensitivity(), "sensitivity")
    elif score == "sketch_energy":
        spectra = _require(collector.grad_sum_spectra(), "grad_sum")
        values = [_per_entry_rms(s, layer_shape) for s, layer_shape in zip(spectra, _shapes(collector))]
    elif score in ("spectral", "gradient_spectrum"):
        spectra = collector.update_spectra() if score == "spectral" else gradient_spectra(collector)
        # a direction is worth sigma^2 (first-order loss decrease under gradient descent); score_exponent 0.5
        # values it at sigma, closer to what a sign-like optimizer (Adam) gains along it
        energies = [[v ** (2 * exponent) for v in s] for s in spectra]
        allocation = allocate_by_spectrum(energies, costs, budget, min_r, max_r)
        return ScoredAllocation(normalise([sum(e) for e in energies]), allocation)
    else:
        raise ValueError(f"unknown score {score!r}; allowed: {', '.join(SCORES)}")
    allocation = allocate_ranks(values, costs, budget, min_r, max_r, exponent)
    return ScoredAllocation(normalise(values), allocation)


def gradient_spectra(collector: SignalCollector) -> list[list[float]]:
    """Per module, the mean full-weight gradient's leading singular values: from the row-space sketch where the
    layer has one, else from the ``dL/dB`` sketch."""
    fallback = _require(collector.grad_sum_spectra(), "grad_sum")
    if collector.sketch is None:
        return fallback
    totals = collector.sketch.totals()
    steps = collector.sketch.steps
    return [
        sketch_spectrum(totals[name], steps).tolist() if name in totals else spectrum
        for name, spectrum in zip(collector.names, fallback)
    ]


def _shapes(collector: SignalCollector) -> list[tuple[int, int]]:
    shapes = []
    for layer in collector.layers:
        A, B = lora_factors(layer, collector.adapter)
        shapes.append((B.shape[0], A.shape[1]))
    return shapes


def _per_entry_rms(spectrum: Sequence[float], shape: tuple[int, int]) -> float:
    return math.sqrt(sum(v * v for v in spectrum) / (shape[0] * shape[1]))


def _require(value, tracker: str):
    if value is None:
        raise RuntimeError(f"the signal collector did not track {tracker!r}, which this score needs")
    return value
