"""The kept loss: what each module's learned directions hold, in units of the training loss, and the ``keepgate``
allocation built on it (benchmark-only; ``loss_value_probe.py`` found it, RESULTS.md 2026-12-08).

At the reallocation, on the training batches that follow the signal steps (the run would train on them next; no
held-out sentence), each module's **keep values** are the loss increases when one singular direction of its adapter's
update ``s B A`` is removed, and its **kept loss** the sum of the positive ones. Every gradient or update *size*
ranked the planted family's changed modules near chance on SmolLM2 (their units are set by the module's kind); the
kept loss ranks them first by orders of magnitude.

``keepgate``: each module's ranks valued by the shape of its gradient spectrum (as the shipped default reads it)
times its kept loss, split by the package's ``allocate_by_spectrum``; but uniform LoRA's ranks where the kept loss
is spread over the modules (``concentration`` at least ``SPREAD_GATE``): where every module holds about as much,
moving rank only cuts what was learned.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from peft_adaptive.allocation import allocate_by_spectrum
from peft_adaptive.resize import cost_per_rank, lora_factors
from peft_adaptive.scores.gradient_spectrum import gradient_spectra

MEASURE_BATCHES = 4  # the training batches after the signal steps the keep values are read on
#: uniform ranks where the kept loss's participation ratio over the modules reaches this (set on the family's
#: choose members and family-07 at seed 0: 0.04-0.12 on the first, 0.29 on family-07)
SPREAD_GATE = 0.2


def adapter_svd(layer, adapter: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, S, Vh`` of the adapter's contribution ``s B A`` (rank ``r``, thin)."""
    A, B = lora_factors(layer, adapter)
    delta = (B.detach().double() * layer.scaling[adapter]) @ A.detach().double()
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    r = A.shape[0]
    return U[:, :r], S[:r], Vh[:r]


@contextmanager
def added(layer, u: torch.Tensor, v: torch.Tensor, scale: float):
    """The layer's output plus ``scale * (x · v) u``: its weight moved by ``scale * u vᵀ``, for the ``with`` block."""

    def hook(_module, args, output):
        x = args[0]
        return output + scale * (x @ v.to(x.dtype)).unsqueeze(-1) * u.to(x.dtype)

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def measuring_batches(task, seed: int, step: int) -> tuple[list, list]:
    """The ``MEASURE_BATCHES`` training batches after ``step`` and, for a task with a fixed teacher, its targets
    (computed once; ``None`` where the task's loss needs none)."""
    batches = task.batches(seed, MEASURE_BATCHES, offset=step)
    teacher = getattr(task, "teacher", None)
    with torch.no_grad():
        targets = [teacher(**b).last_hidden_state if teacher is not None else None for b in batches]
    return batches, targets


def batch_loss(model, task, batches: list, targets: list) -> Callable[[], float]:
    """The model's mean training loss over ``batches``, without gradients, as a function of nothing."""

    def loss() -> float:
        with torch.no_grad():
            values = [task.loss(model, b) if t is None else task.loss(model, b, t) for b, t in zip(batches, targets)]
        return sum(float(v) for v in values) / len(values)

    return loss


def keep_values(layers: Sequence, adapter: str, loss: Callable[[], float]) -> list[list[float]]:
    """Per layer, the loss increase when each singular direction of its adapter's update is removed, largest
    direction first (the in-place resize cuts the trailing ones)."""
    base = loss()
    out = []
    for layer in layers:
        U, S, Vh = adapter_svd(layer, adapter)
        values = []
        for j in range(len(S)):
            with added(layer, U[:, j], Vh[j], -float(S[j])):
                values.append(loss() - base)
        out.append(values)
    return out


def kept_loss(keep: Sequence[float]) -> float:
    """What a module's learned directions hold: the sum of its positive keep values."""
    return sum(max(x, 0.0) for x in keep)


def concentration(kept: Sequence[float]) -> float:
    """How few modules hold what the adapters learned: the participation ratio of the modules' kept loss over the
    number of modules (``1/n``: one module holds all; 1: every module holds the same; 1 where none holds any)."""
    total, square = sum(kept), sum(k * k for k in kept)
    return total * total / (square * len(kept)) if square > 0 else 1.0


def is_spread(kept: Sequence[float]) -> bool:
    """Whether the kept loss is spread evenly enough over the modules that ``keepgate`` keeps uniform ranks."""
    return concentration(kept) >= SPREAD_GATE


def keep_mix_values(spectra: Sequence[Sequence[float]], kept: Sequence[float]) -> list[list[float]]:
    """Per module, rank ``j`` worth ``sigma_j^2 / sum sigma^2 * kept loss`` (the gradient spectrum's shape, the kept
    loss's size), with a vanishing ramp so ties keep each module's own order."""
    out = []
    for spectrum, size in zip(spectra, kept):
        energy = sum(s * s for s in spectrum) or 1.0
        values = [s * s / energy * size for s in spectrum]
        out.append([x + 1e-30 * (len(values) - j) for j, x in enumerate(values)])
    return out


def keep_gate_ranks(
    spectra: Sequence[Sequence[float]],
    kept: Sequence[float],
    costs: Sequence[int],
    budget: int,
    r: int,
    min_r: int,
    max_r: int,
) -> list[int]:
    """``keepgate``'s ranks: uniform ``r`` where the kept loss ``is_spread``, else the budget split by
    ``keep_mix_values`` within ``min_r..max_r``."""
    if is_spread(kept):
        return [r] * len(kept)
    return list(allocate_by_spectrum(keep_mix_values(spectra, kept), costs, budget, min_r, max_r).ranks)


def keep_gate_allocation(model, task, seed: int, step: int, tuner, adapter: str = "default") -> tuple[dict, dict]:
    """At a run's reallocation: the ``keepgate`` ranks of every adapted module (for ``reallocate(ranks=...)``), and
    what they were read from (each module's kept loss, the spread, whether the gate held, the seconds it took)."""
    started = time.perf_counter()
    collector = tuner._signal_collectors[adapter]  # the shipped default's signals, as its score reads them
    config = tuner.peft_config[adapter]
    modules = tuner.adapted_modules(adapter)
    was_training = model.training
    model.eval()
    try:
        keep = keep_values(collector.layers, adapter, batch_loss(model, task, *measuring_batches(task, seed, step)))
    finally:
        model.train(was_training)
    kept = [kept_loss(k) for k in keep]
    ranks = keep_gate_ranks(
        gradient_spectra(collector),
        kept,
        [cost_per_rank(modules[n], adapter) for n in collector.names],
        tuner.param_budget(adapter),
        config.r,
        config.min_r,
        config.max_r,
    )
    record: dict[str, Any] = {
        "modules": dict(zip(collector.names, kept)),
        "spread": concentration(kept),
        "gated": is_spread(kept),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return dict(zip(collector.names, ranks)), record
