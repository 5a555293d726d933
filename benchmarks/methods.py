"""The methods the GLUE benchmark compares (LoRA, adaptive LoRA, AdaLoRA, EVA, full fine-tuning): their variants
(ablations) and how each wraps a model. Builders take the worker's :class:`glue_worker.RunSpec`.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from bench import common

if TYPE_CHECKING:
    from glue_worker import RunSpec


@dataclass(frozen=True)
class Method:
    """One training configuration. ``kind`` picks the code path; the other fields are its knobs."""

    name: str
    kind: str  # lora | adaptive | adalora | eva | full
    signal_steps: int | None = None
    grad_weight: float | None = None
    delta_weight: float | None = None
    lr: float | None = None  # overrides the shared adapter learning rate (only AdaLoRA offers this)
    score: str | None = None  # AdaptiveLoraConfig.score (None: the package default)


METHOD_KINDS = ("lora", "adaptive", "adalora", "eva", "full")


def base_methods(kinds: list[str], args: argparse.Namespace) -> list[Method]:
    methods = []
    for kind in kinds:
        if kind == "adaptive":
            methods.append(Method("adaptive", kind, args.signal_steps, args.grad_weight, args.delta_weight))
        elif kind == "adalora" and args.adalora_lr is not None and args.adalora_lr != args.lr:
            # AdaLoRA starts its singular values at zero and A, B at std 0.02, so at the shared lr of a short
            # run it may not move at all; this row is labelled so nobody mistakes it for the shared setting.
            methods.append(Method(f"adalora (lr {args.adalora_lr:g})", kind, lr=args.adalora_lr))
        else:
            methods.append(Method(kind, kind))
    return methods


def ablation_methods(ablations: list[str], args: argparse.Namespace, max_steps: int) -> list[Method]:
    """Adaptive variants for the write-up's ablations (signal weights; warmup length)."""
    default = Method("adaptive", "adaptive", args.signal_steps, args.grad_weight, args.delta_weight)
    variants = []
    if "weights" in ablations:
        for g, d, label in ((1.0, 0.0, "grad only"), (0.0, 1.0, "delta only"), (0.5, 0.5, "0.5/0.5")):
            variants.append(replace(default, name=f"adaptive ({label})", grad_weight=g, delta_weight=d, score="norms"))
    if "warmup" in ablations:
        for w in args.ablation_warmups:
            if w >= max_steps:
                print(f"ablation: skipping warmup {w}: not below the {max_steps} training steps")
                continue
            variants.append(replace(default, name=f"adaptive (warmup {w})", signal_steps=w))
    return variants


def dedupe_methods(methods: list[Method]) -> list[Method]:
    """Drop variants whose configuration equals an earlier method's (e.g. 'grad only' = the default)."""
    seen, kept = set(), []
    for m in methods:
        key = (m.kind, m.signal_steps, m.grad_weight, m.delta_weight, m.lr, m.score)
        if key in seen:
            print(f"note: {m.name!r} is the same configuration as an earlier method; not run twice")
            continue
        seen.add(key)
        kept.append(m)
    return kept


def plan_methods(args: argparse.Namespace, max_steps: int) -> list[Method]:
    methods = base_methods(args.methods, args) + ablation_methods(args.ablation, args, max_steps)
    return dedupe_methods(methods)


# --- wrapping a model (runs inside the worker subprocess) ----------------------------------------------


def target_names(model, spec: RunSpec) -> list[str]:
    return common.block_linear_names(model, spec.targets)


def lora_config(spec: RunSpec, targets: list[str], **overrides):
    from peft import LoraConfig

    return LoraConfig(
        task_type="SEQ_CLS",
        r=spec.r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=targets,
        **overrides,
    )


def adaptive_config(spec: RunSpec, method: Method, targets: list[str]):
    import peft_adaptive

    return peft_adaptive.AdaptiveLoraConfig(
        task_type="SEQ_CLS",
        r=spec.r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=targets,
        signal_steps=method.signal_steps,
        # the signal weights belong to score="norms" (the write-up's score, kept for its ablation)
        **(
            dict(score="norms", grad_weight=method.grad_weight, delta_weight=method.delta_weight)
            if method.score == "norms"
            else {}
        ),
    )


def adalora_config(spec: RunSpec, targets: list[str]):
    from peft import AdaLoraConfig

    return AdaLoraConfig(
        task_type="SEQ_CLS",
        init_r=spec.adalora_init_r,
        target_r=spec.r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=targets,
        tinit=spec.adalora_tinit,
        tfinal=spec.adalora_tfinal,
        deltaT=spec.adalora_deltat,
        total_step=spec.max_steps,
    )


def eva_dataloader(train_ds, collator, spec: RunSpec):
    """Batches for EVA's SVD (plain dicts: EVA's input preparation rejects ``BatchEncoding``)."""
    import torch

    def collate(features: list[dict]) -> dict:
        collate.batches += 1
        return dict(collator(features))

    collate.batches = 0

    generator = torch.Generator().manual_seed(spec.seed)
    return torch.utils.data.DataLoader(
        train_ds, batch_size=spec.batch_size, shuffle=True, generator=generator, collate_fn=collate
    )


def build_method(spec: RunSpec, method: Method, model, train_ds, collator) -> tuple[Any, list, dict]:
    """Wrap ``model`` for ``method``; returns the model to train, extra callbacks and init facts."""
    from peft import get_peft_model

    info: dict[str, Any] = {}
    if method.kind == "full":
        return model, [], info
    targets = target_names(model, spec)
    if method.kind == "lora":
        return get_peft_model(model, lora_config(spec, targets)), [], info
    if method.kind == "adaptive":
        from peft_adaptive.callback import AdaptiveLoraCallback

        peft_model = get_peft_model(model, adaptive_config(spec, method, targets))
        return peft_model, [AdaptiveLoraCallback()], info
    if method.kind == "adalora":
        return get_peft_model(model, adalora_config(spec, targets)), [common.AdaLoraAllocateCallback()], info
    if method.kind == "eva":
        from peft import EvaConfig, initialize_lora_eva_weights

        # sequence classification has no token labels to mask; padding is masked by the attention mask
        eva = EvaConfig(rho=spec.eva_rho, use_label_mask=False)
        peft_model = get_peft_model(
            model, lora_config(spec, targets, init_lora_weights="eva", eva_config=eva), low_cpu_mem_usage=True
        )
        forwards = []

        def forward(model, inputs: dict):  # EVA's default forward, counted
            forwards.append(1)
            return model(**inputs)

        start = time.perf_counter()
        loader = eva_dataloader(train_ds, collator, spec)
        initialize_lora_eva_weights(peft_model, loader, forward_fn=forward, show_progress_bar=False)
        info["eva_init_s"] = time.perf_counter() - start
        info["eva_forward_passes"] = len(forwards)  # EVA cycles the loader until its SVDs converge
        info["eva_distinct_batches"] = loader.collate_fn.batches
        return peft_model, [], info
    raise ValueError(f"unknown method kind {method.kind!r}")


def adapter_facts(model, method: Method) -> dict[str, Any]:
    """Trainable-parameter facts; adapter counts are the rank-dependent ``sum(rank * (fan_in + fan_out))``."""
    facts = {"trainable_params": common.trainable_param_count(model)}
    if method.kind == "full":
        return facts
    facts.update(
        adapter_params=common.adapter_param_count(model),
        adapter_params_allocated=common.allocated_adapter_params(model),
        ranks=common.adapter_ranks(model),
    )
    return facts


def method_lr(spec: RunSpec, method: Method) -> float:
    if method.lr is not None:
        return method.lr
    return spec.full_lr if method.kind == "full" else spec.lr
