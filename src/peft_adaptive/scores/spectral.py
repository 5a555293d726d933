"""``score="spectral"``: the singular values of each module's learned update ``s B A`` after the signal steps.

Ranks from one global threshold on ``sigma_ij ** (2 * score_exponent)`` per parameter
(:func:`~peft_adaptive.allocation.allocate_by_spectrum`). The update is measured from the factors at the start
of the collection, so adapters that do not start at ``B = 0`` (PiSSA, OLoRA, ...) are read correctly.
"""

from __future__ import annotations

import torch

from ..allocation import allocate_by_spectrum, normalise
from ..resize import lora_factors
from .base import Needs, Score, ScoredAllocation


class SpectralScore(Score):
    name = "spectral"
    values_ranks = True

    def needs(self, config, layers, adapter) -> Needs:
        # an adapter that starts at B = 0 needs no snapshot: its update is s B A itself
        return Needs(delta=any(bool(lora_factors(m, adapter)[1].abs().max() > 0) for m in layers.values()))

    def allocate(self, collector, costs, budget, config) -> ScoredAllocation:
        snapshot = collector.snapshot or [None] * len(collector.layers)
        spectra = [update_spectrum(layer, collector.adapter, start) for layer, start in zip(collector.layers, snapshot)]
        return allocate_spectra(spectra, costs, budget, config)


def allocate_spectra(spectra: list[list[float]], costs, budget: int, config) -> ScoredAllocation:
    """The spectrum scores' rule: a direction with singular value ``sigma`` is worth ``sigma ** (2 * exponent)``
    per parameter (``sigma^2``: the first-order loss decrease under gradient descent; exponent 0.5 values it at
    ``sigma``, closer to what a sign-like optimizer such as Adam gains along it)."""
    energies = [[v ** (2 * config.score_exponent) for v in s] for s in spectra]
    allocation = allocate_by_spectrum(energies, costs, budget, config.min_r, config.max_r)
    return ScoredAllocation(normalise([sum(e) for e in energies]), allocation, values=energies)


@torch.no_grad()
def update_spectrum(layer, adapter: str, start: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[float]:
    """The singular values of the layer's learned update ``s B A`` (minus ``s0 B0 A0`` when ``start`` holds the
    factors ``(A0, s0 B0)`` it started from), through two QR factorisations: no ``fan_out x fan_in`` matrix."""
    A, B = lora_factors(layer, adapter)
    sB = B.detach().double() * layer.scaling[adapter]
    A = A.detach().double()
    if start is not None:
        A0, sB0 = start
        sB = torch.cat([sB, -sB0.to(sB.device).double()], dim=1)
        A = torch.cat([A, A0.to(A.device).double()], dim=0)
    _, r_b = torch.linalg.qr(sB)
    _, r_a = torch.linalg.qr(A.T)
    return torch.linalg.svdvals(r_b @ r_a.T).tolist()
