"""Run under ``torchrun --nproc_per_node 2``: stock Trainer + AdaptiveLoraCallback on CPU (gloo).

After every optimizer step it measures the largest difference of the trainable parameters between the
processes and, on process 0, writes the measurements as JSON to ``argv[1]``. With ``--no-rewrap`` the
DDP re-initialisation after the resize is disabled (the negative control). With ``--hooks`` a
communication hook and a forward pre-hook are registered on the Trainer's DDP wrapper and counted per
step, and after the Trainer run a plain accelerate loop (gradient accumulation, the one call
``update_and_allocate(..., wrapper=model)``) is measured the same way.
"""

import json
import sys
import warnings

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
warnings.simplefilter("ignore")

from tests.tiny_models import TokenDataset, adaptive_model  # noqa: E402

import peft_adaptive.distributed  # noqa: E402
from peft_adaptive import AdaptiveLoraCallback  # noqa: E402


def max_cross_process_diff(model: torch.nn.Module) -> float:
    flat = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    sizes = [None] * dist.get_world_size()
    dist.all_gather_object(sizes, flat.numel())
    if len(set(sizes)) > 1:
        return float("inf")
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return max(float((g - gathered[0]).abs().max()) for g in gathered)


def all_ranks(tuner) -> list[dict]:
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, tuner.ranks())
    return ranks


class CrossProcessCheck(TrainerCallback):
    def __init__(self):
        self.max_diff_per_step = {}
        self.ranks_per_process = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.max_diff_per_step[state.global_step] = max_cross_process_diff(model)
        self.ranks_per_process = all_ranks(model.base_model)


class CountingHooks(TrainerCallback):
    """A communication hook (all-reduce, counted) and a forward pre-hook on the DDP wrapper, counted per step."""

    def __init__(self):
        self.trainer = None
        self.calls = {"comm": 0, "forward": 0}
        self.per_step = {}
        self.wrapper_type = None

    def on_train_begin(self, args, state, control, **kwargs):
        wrapper = self.trainer.model_wrapped
        self.wrapper_type = type(wrapper).__name__

        def comm_hook(calls, bucket):
            calls["comm"] += 1
            return default_hooks.allreduce_hook(None, bucket)

        wrapper.register_comm_hook(self.calls, comm_hook)
        wrapper.register_forward_pre_hook(
            lambda module, inputs: self.calls.__setitem__("forward", self.calls["forward"] + 1)
        )

    def on_step_end(self, args, state, control, **kwargs):
        self.per_step[state.global_step] = dict(self.calls)
        self.calls.update(comm=0, forward=0)


def accelerate_loop(signal_steps: int = 3, steps: int = 7) -> dict:
    """The README's accelerate loop under DDP, with the cross-process difference after every optimizer step."""
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=2)
    # consistent_spectrum (the default, named for the intent): each signal step's sketch is summed across the
    # processes before its squared norm is taken (one all-reduce per step)
    model = adaptive_model(max_r=12, signal_steps=signal_steps, score="consistent_spectrum")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = TokenDataset(2 * 2 * steps * 4, seed=4)  # 2 processes x 2 micro-batches x steps, batch 4
    loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=default_data_collator)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    tuner = accelerator.unwrap_model(model).base_model
    step, diffs, reallocated_at = 0, {}, None
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            if accelerator.sync_gradients:
                step += 1
                if tuner.update_and_allocate(step, optimizer, wrapper=model) is not None:
                    reallocated_at = step
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            diffs[step] = max_cross_process_diff(tuner)
    return {
        "wrapped": type(model).__name__,
        "steps": step,
        "reallocation_step": reallocated_at,
        "max_diff_per_step": diffs,
        "ranks_per_process": all_ranks(tuner),
    }


def main() -> None:
    out = sys.argv[1]
    if "--no-rewrap" in sys.argv:
        peft_adaptive.distributed.rewrap_ddp = lambda model: False
    model = adaptive_model(max_r=12)
    args = TrainingArguments(
        output_dir=out + ".run",
        max_steps=7,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        max_grad_norm=1.0,
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo",
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    check = CrossProcessCheck()
    adaptive = AdaptiveLoraCallback()
    hooks = CountingHooks() if "--hooks" in sys.argv else None
    callbacks = [adaptive, check] + ([hooks] if hooks else [])
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(64), callbacks=callbacks)
    if hooks:
        hooks.trainer = trainer
    trainer.train()
    result = {
        "world_size": dist.get_world_size(),
        "reallocation_step": adaptive.reallocation_step,
        "max_diff_per_step": check.max_diff_per_step,
        "ranks_per_process": check.ranks_per_process,
        "wrapped": type(trainer.model_wrapped).__name__,
    }
    if hooks:
        result["hooked_wrapper"] = hooks.wrapper_type
        result["hook_calls_per_step"] = hooks.per_step
        result["accelerate"] = accelerate_loop()
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
