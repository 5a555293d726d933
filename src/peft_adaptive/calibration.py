"""Calibration: allocate ranks and initialise ``A`` from a few batches' gradients, before training starts.

GoRA (arXiv 2502.12171) and LoRA-GA (arXiv 2407.05000) get their gains from the full-weight gradient of a
few batches taken before training: GoRA allocates ranks from it, LoRA-GA initialises the factors from its
singular vectors. :func:`calibrate_adaptive_lora` does both without ever forming a full-weight gradient: it runs
forward and backward passes (no optimizer step) while the gradient sketch of :mod:`peft_adaptive.sketch`
accumulates, allocates the budget with the configured ``score`` (one that needs only gradients), and, with
``growth="gradient"``, gives every module's ``A`` the leading input directions of its summed gradient while
``B`` stays zero. The model's output is unchanged, and the first optimizer step moves each ``B`` along
``G A^T``, the largest first step a rank-``r_i`` adapter can take. Call it like PEFT's
``initialize_lora_eva_weights``: after ``get_peft_model`` and before the optimizer is created.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .model import AdaptiveLoraModel, AllocationReport
from .scores import SCORES, get_score


def calibrate_adaptive_lora(
    model: torch.nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    adapter_name: str | None = None,
    allocate: bool = True,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
    seed: int = 0,
    ranks: dict[str, int] | None = None,
) -> AllocationReport:
    """Allocate ranks and initialise ``A`` from the gradients of ``num_batches`` batches; no optimizer step.

    Args:
        model: a ``PeftModel`` made with ``get_peft_model(base, AdaptiveLoraConfig(...))``, not yet trained
            (``B == 0``, PEFT's default initialisation).
        batches: an iterable of batches, e.g. the training ``DataLoader`` (``trainer.get_train_dataloader()``).
        num_batches: how many batches to use (default: all of ``batches``).
        adapter_name: the adapter to calibrate (default: the active one).
        allocate: allocate the budget with the configured ``score``; False keeps the uniform ranks and only
            initialises (LoRA-GA's uniform-rank setting).
        loss_fn: ``loss_fn(model, batch) -> loss``; default ``model(**batch).loss`` (tensors are moved to the
            model's device).
        seed: seeds the sketch and any random rows.
        ranks: use these ranks (every adapted module, by name, within the budget) instead of the score's
            allocation; ``A`` is still initialised from the gradient. For your own allocation rules.

    Returns the :class:`~peft_adaptive.model.AllocationReport` (``step`` 0). The config records
    ``reallocation_step = 0``, so ``AdaptiveLoraCallback`` does not reallocate again during training.
    """
    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, AdaptiveLoraModel):
        raise TypeError(
            "calibrate_adaptive_lora needs a model made by peft.get_peft_model(model, AdaptiveLoraConfig(...)); "
            f"got {type(model).__name__}"
        )
    adapter_name = tuner._resolve_adapter(adapter_name)
    config = tuner.peft_config[adapter_name]
    if allocate and ranks is None and not get_score(config.score).gradient_only:
        gradient_only = [name for name, score in SCORES.items() if score.gradient_only]
        raise ValueError(
            f"AdaptiveLoraConfig.score={config.score!r} needs training steps; calibration can only use "
            f"{', '.join(repr(s) for s in gradient_only)} (or allocate=False)"
        )
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    loss_fn = loss_fn or _default_loss
    tuner.start_signal_collection(adapter_name, seed=seed)
    used = 0
    try:
        for batch in itertools.islice(batches, num_batches):
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            tuner.record_gradients(adapter_name)
            used += 1
    except BaseException:
        tuner._close_collector(adapter_name)
        raise
    finally:
        model.zero_grad(set_to_none=True)
    if used == 0:
        tuner._close_collector(adapter_name)
        raise ValueError("calibrate_adaptive_lora got no batches")
    if ranks is None and not allocate:
        ranks = tuner.ranks(adapter_name)
    return tuner._allocate(adapter_name, None, step=0, seed=seed, ranks=ranks, initialise=config.growth == "gradient")


def _default_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    device = next(p for p in model.parameters() if p.requires_grad).device
    if not isinstance(batch, dict):
        raise TypeError(f"batches must be dicts of model inputs (or pass loss_fn); got {type(batch).__name__}")
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    output = model(**inputs)
    loss = output["loss"] if isinstance(output, dict) else getattr(output, "loss", None)
    if loss is None:
        raise ValueError("the model returned no loss for a calibration batch: include labels, or pass loss_fn")
    return loss
