"""The peers: PEFT's own ways to per-module ranks (AdaLoRA, EVA) and full fine-tuning, wired into the hand loop of
``runner.py`` at the same final budget as uniform LoRA at rank ``r`` (rank-dependent adapter parameters).

* ``adalora``: ``AdaLoraConfig(init_r=ceil(1.5 r), target_r=r)`` on the suite's target modules, ``lora_alpha`` the
  suite's, no dropout; the rest PEFT's defaults (``beta1 = beta2 = 0.85``, ``orth_reg_weight = 0.5``). Schedule
  (``adalora_schedule``): ``total_step`` = the suite's steps, ``tinit`` = its signal steps (``warmup``, 10% of the
  steps on every suite), ``tfinal`` = 20% of the steps, ``deltaT`` = 10: the proportions of the example in
  ``AdaLoraConfig``'s docstring (tinit 10, tfinal 20 of total_step 100) and the ``deltaT`` of PEFT's AdaLoRA
  examples. ``update_and_allocate(step - 1)`` (the 0-based index of the step just taken, as ``Trainer``'s
  ``state.global_step`` is in ``on_optimizer_step``) runs every step after ``optimizer.step()`` and before
  ``zero_grad()``. AdaLoRA masks instead of resizing: its final budget is the unmasked singular values
  (``target_r`` x modules), each costing ``fan_in + fan_out + 1`` parameters (the ``+1``: its ``E`` entry).
  Orthogonal regulariser: ``AdaLoraModel.forward`` adds ``orth_reg_weight * adalora_orth_reg(model)`` to the model
  output's ``loss``, but every method here is a ``PeftModel`` without a ``task_type`` (the same for all, so no
  method gets a trained head through ``modules_to_save``), whose ``forward`` calls the adapted model directly, past
  ``AdaLoraModel.forward``; and the hidden-state and distillation tasks compute their loss themselves. So the
  runner adds the same term to the task's loss on every suite (``adalora_orth_reg``; a test checks it equals what
  ``AdaLoraModel.forward`` adds). Held-out and validation losses are computed without it.
* ``eva`` / ``eva-rho1``: the suite's ``LoraConfig`` with ``init_lora_weights="eva"`` and
  ``EvaConfig(rho=2 | 1)`` (other fields PEFT's defaults), ``get_peft_model(..., low_cpu_mem_usage=True)``, then
  ``initialize_lora_eva_weights`` on exactly the batches the signal steps see (``task.batches(seed, warmup)``, as
  the model's keyword inputs: ``Task.model_inputs``). EVA budgets ranks (their sum stays ``r`` x modules; a module
  may get rank 0 and lose its adapter). EVA's ``adjust_scaling_factors`` multiplies alpha by new_r / r, which keeps
  plain LoRA's scaling ``alpha / r``; under the suites' rsLoRA (``alpha / sqrt(r)``) a module's scaling changes by
  ``sqrt(new_r / r)``: PEFT's behaviour, kept.
* ``full``: every weight trained, at ``FULL_LR`` (5e-5, glue.py's) times the ``+lr`` factor; MiniLM suites only.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from . import common

if TYPE_CHECKING:
    from .methods import Method
    from .suites import Suite
    from .tasks import Task

ADALORA_DELTA_T = 10
ADALORA_FINAL_SHARE = 0.2  # tfinal as a share of the steps


def unfit_reason(method: Method, suite: Suite, model_name: str) -> str | None:
    """Why ``method`` cannot run on ``suite`` (which trains ``model_name``), or ``None`` where it can."""
    if method.kind == "full" and model_name != "minilm":
        return "full fine-tuning runs on the MiniLM suites only (this CPU)"
    if method.kind == "adalora" and suite.settings.get("embeddings"):
        return "PEFT's AdaLoRA cannot adapt an nn.Embedding, and this suite's budget holds one"
    return None


def refuse_unfit(method: Method, suite: Suite, model_name: str) -> None:
    """SystemExit where a method cannot run on a suite (:func:`unfit_reason`)."""
    if reason := unfit_reason(method, suite, model_name):
        raise SystemExit(f"{method.name}: {reason}; not on {suite.name} ({model_name})")


def build(method: Method, task: Task, model):
    """Wrap ``model`` for a peer method (``adalora``, ``eva``: before EVA's initialisation; ``full``: unchanged)."""
    refuse_unfit(method, task.suite, task.model_name)
    if method.kind == "full":
        return model.requires_grad_(True)
    if method.kind == "adalora":
        return build_adalora(model, task)
    if method.kind == "eva":
        return build_eva(model, task, method.eva_rho)
    raise ValueError(f"not a peer method: {method.name}")


# --- AdaLoRA ----------------------------------------------------------------------------------------------


def adalora_schedule(suite: Suite) -> dict[str, int]:
    """AdaLoRA's ranks and schedule for ``suite`` (see the module docstring)."""
    return {
        "init_r": math.ceil(1.5 * suite.r),
        "target_r": suite.r,
        "tinit": suite.warmup,
        "tfinal": max(1, round(ADALORA_FINAL_SHARE * suite.steps)),
        "deltaT": ADALORA_DELTA_T,
        "total_step": suite.steps,
    }


def build_adalora(model, task: Task):
    from peft import AdaLoraConfig, get_peft_model

    config = AdaLoraConfig(
        target_modules=task.targets(),
        lora_alpha=task.suite.lora_alpha,
        lora_dropout=0.0,
        **adalora_schedule(task.suite),
    )
    return get_peft_model(model, config)


def adalora_orth_reg(model) -> Any:
    """AdaLoRA's orthogonal regulariser as ``AdaLoraModel.forward`` computes it (before its weight): the mean over
    the trainable adapter's ``lora_A`` and ``lora_B`` of ``||P P^T - I||_F`` (A) and ``||P^T P - I||_F`` (B)."""
    import torch

    tuner = model.base_model
    adapter = tuner.trainable_adapter_name
    total, count = 0, 0
    for name, param in tuner.model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and adapter in name:
            covariance = param @ param.T if "lora_A" in name else param.T @ param
            identity = torch.eye(*covariance.size(), out=torch.empty_like(covariance))
            total = total + torch.norm(covariance - identity, p="fro")
            count += 1
    return total / count if count else total


def adalora_orth_reg_weight(model) -> float:
    tuner = model.base_model
    return tuner.peft_config[tuner.trainable_adapter_name].orth_reg_weight


def adalora_final_step(suite: Suite) -> int:
    """The 0-based step at which AdaLoRA fixes its final budget (``total_step - tfinal``)."""
    schedule = adalora_schedule(suite)
    return schedule["total_step"] - schedule["tfinal"]


def adalora_record(model, suite: Suite) -> dict[str, Any]:
    """AdaLoRA's settings and what it ended with: the physical (``init_r``) adapter size beside the final budget."""
    config = model.base_model.peft_config["default"]
    return {
        **adalora_schedule(suite),
        "beta1": config.beta1,
        "beta2": config.beta2,
        "orth_reg_weight": config.orth_reg_weight,
        "orth_reg_added_by": "harness",  # to the task's loss, every step (see the module docstring)
        "final_budget_step": adalora_final_step(suite),
        "budget_reached": bool(config.rank_pattern),
        "allocated_params": common.allocated_adapter_params(model),
    }


# --- EVA --------------------------------------------------------------------------------------------------


def build_eva(model, task: Task, rho: float):
    from peft import EvaConfig, LoraConfig, get_peft_model

    suite = task.suite
    config = LoraConfig(
        r=suite.r,
        lora_alpha=suite.lora_alpha,
        target_modules=task.targets(),
        lora_dropout=0.0,
        use_rslora=suite.use_rslora,
        init_lora_weights="eva",
        eva_config=EvaConfig(rho=rho),
    )
    return get_peft_model(model, config, low_cpu_mem_usage=True)


def init_eva(model, task: Task, seed: int) -> dict[str, Any]:
    """EVA's SVD initialisation on the signal steps' batches; returns its time, forward passes and removed modules.

    EVA cycles the batches until the leading components of every layer's inputs converge, so it may see each more
    than once (``eva_forward_passes`` against ``eva_batches``)."""
    from peft import initialize_lora_eva_weights

    batches = [task.model_inputs(batch) for batch in task.batches(seed, task.suite.warmup)]
    passes = 0

    def forward(peft_model, inputs: dict):
        nonlocal passes
        passes += 1
        return peft_model(**inputs)

    adapted = set(common.lora_layers(model))
    started = time.perf_counter()
    initialize_lora_eva_weights(model, batches, forward_fn=forward, show_progress_bar=False)
    seconds = time.perf_counter() - started
    return {
        "rho": model.peft_config["default"].eva_config.rho,
        "eva_init_seconds": round(seconds, 3),
        "eva_forward_passes": passes,
        "eva_batches": len(batches),
        "removed": sorted(adapted - set(common.lora_layers(model))),  # rank 0: EVA unwrapped the module
    }
