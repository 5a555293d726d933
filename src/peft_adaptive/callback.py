"""``AdaptiveLoraCallback``: adaptive ranks for an existing ``transformers.Trainer`` script, in one line.

The callback is a thin wrapper over :meth:`AdaptiveLoraModel.update_and_allocate
<peft_adaptive.model.AdaptiveLoraModel.update_and_allocate>`, the one call a hand-written loop makes per
optimizer step. Timeline inside ``Trainer``'s loop (transformers 5.x):

* ``on_train_begin``: checks the setup, snapshots the adapter (for the weight delta, only when
  ``delta_weight > 0``) and starts the signals before the first step; on resume it restores them from the
  checkpoint, or notes that the reallocation already happened.
* ``on_pre_optimizer_step``: reads the loss scale the step's backward ran with (fp16), before the optimizer
  step updates it.
* ``on_optimizer_step`` (after ``optimizer.step()``, before ``zero_grad()``): ``update_and_allocate`` records
  the step's gradients, complete for the step: accumulated over all micro-batches, all-reduced under DDP,
  unscaled under fp16 and clipped; a step whose gradients are not finite (skipped by the fp16 scaler) adds
  nothing. At step ``signal_steps`` it reallocates the ranks in place, updates the optimizer and
  re-initialises the DDP wrapper (or, for a model transformers sharded with FSDP2 at load time, registers the
  Trainer's gradient averaging on the new factors): between two optimizer steps, never inside a
  gradient-accumulation window.
* ``on_step_end``: logs the allocation through ``Trainer.log`` at the step it happened.
* ``on_save``: stores the callback's state beside each checkpoint, so a resume never reallocates twice
  and a resume during the signal steps keeps the signals gathered so far.

The callback needs the ``Trainer`` for two things the callback arguments cannot do: logging the allocation
through ``Trainer.log`` (so TensorBoard/W&B see it) and re-initialising the DDP wrapper over the resized
parameters. Pass it explicitly (``AdaptiveLoraCallback(trainer=trainer)``, then ``trainer.add_callback(...)``);
otherwise the callback finds it by walking up the call stack to the ``Trainer`` method that fired the event
(see :func:`_calling_instance`).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import CallbackHandler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .checkpoints import atomic_write, is_complete_checkpoint, last_complete_checkpoint
from .distributed import check_ddp
from .fsdp import check_trainer_resync, resync_trainer_replicas
from .model import AdaptiveLoraModel, AllocationReport

logger = logging.getLogger(__name__)

#: File written into each checkpoint folder with the callback's state.
CALLBACK_STATE_NAME = "adaptive_lora_state.pt"


class AdaptiveLoraCallback(TrainerCallback):
    """Collect the signals and reallocate LoRA ranks once, in place, during ``Trainer.train()``.

    Args:
        adapter_name: the adapter to reallocate (default: the model's active adapter).
        allow_plain_lora: when the run is shorter than ``signal_steps``, train it as plain LoRA
            (with a warning) instead of raising.
        trainer: the ``Trainer`` this callback is added to, for callbacks created after the trainer
            (``trainer.add_callback(AdaptiveLoraCallback(trainer=trainer))``, as TRL's callbacks do). Without
            it the callback finds the ``Trainer`` that fires its events by walking up the call stack.
    """

    def __init__(self, adapter_name: str | None = None, allow_plain_lora: bool = False, trainer: Trainer | None = None):
        if trainer is not None and not isinstance(trainer, Trainer):
            raise TypeError(
                f"AdaptiveLoraCallback(trainer=...) must be a transformers.Trainer, got {type(trainer).__name__}"
            )
        self.adapter_name = adapter_name
        self.allow_plain_lora = allow_plain_lora
        self.reallocation_step: int | None = None
        self.report: AllocationReport | None = None
        self._tuner: AdaptiveLoraModel | None = None
        self._explicit_trainer = trainer
        self._trainer: Trainer | None = trainer
        self._collecting = False
        self._loss_scale = 1.0
        self._unlogged: AllocationReport | None = None

    # --- events --------------------------------------------------------------------------------------

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        _refuse_duplicates(self)
        if kwargs.get("model") is not None:
            self._tuner = _adaptive_tuner(kwargs["model"])

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._trainer = self._find_trainer()
        _refuse_duplicates(self)
        self._tuner = _adaptive_tuner(kwargs["model"])
        self.adapter_name = self._tuner._resolve_adapter(self.adapter_name)
        self._tuner._leave_signal_start_to_caller()  # the callback starts the signals itself (or restores them)
        _refuse_sharded_backends(self._trainer, args)
        signal_steps = self.config.signal_steps
        resumed = self._restore(args, state)
        if self.config.reallocation_step is not None and self.reallocation_step is None:
            # calibrated before training (calibrate_adaptive_lora) or loaded after a reallocation: nothing to do
            self.reallocation_step = self.config.reallocation_step
        if self.reallocation_step is not None or state.global_step >= signal_steps:
            self._collecting = False
            return
        if state.max_steps < signal_steps:  # equal: the reallocation is the run's last step (a probe run)
            message = (
                f"AdaptiveLoraConfig.signal_steps={signal_steps} is longer than the run "
                f"(max_steps={state.max_steps}): the ranks would never be reallocated"
            )
            if not self.allow_plain_lora:
                raise ValueError(
                    message + ". Lower signal_steps, or pass AdaptiveLoraCallback(allow_plain_lora=True) "
                    "to train as plain LoRA."
                )
            warnings.warn(message + "; training as plain LoRA (allow_plain_lora=True).", stacklevel=2)
            return
        self._check_distributed()
        if not resumed:
            self._tuner.start_signal_collection(self.adapter_name, seed=args.seed)
        self._collecting = True

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._collecting:
            # the scale this step's backward ran with; optimizer.step() may change it (GradScaler.update)
            self._loss_scale = _loss_scale(self._trainer)

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if not self._collecting:
            return
        step = state.global_step + 1  # Trainer counts the step after on_optimizer_step
        report = self._tuner.update_and_allocate(
            step,
            kwargs.get("optimizer"),
            self.adapter_name,
            loss_scale=self._loss_scale,
            seed=args.seed,
            wrapper=self._trainer.model_wrapped if self._trainer is not None else None,
        )
        if report is not None or self.config.reallocation_step is not None:
            self._collecting = False
        if report is not None:
            resync_trainer_replicas(self._trainer)  # transformers' own FSDP2 (sharded at load): hook the new factors
            self.report = report
            self.reallocation_step = step
            self._unlogged = report

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._unlogged is not None:
            report, self._unlogged = self._unlogged, None
            self._log(report, state)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if not state.is_world_process_zero or self._tuner is None:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            return
        payload: dict[str, Any] = {"reallocation_step": self.reallocation_step}
        collector = self._tuner._signal_collectors.get(self.adapter_name) if self._collecting else None
        if collector is not None:
            payload["signals"] = collector.state_dict()
        # atomically, and last: the file marks the checkpoint complete (see peft_adaptive.checkpoints)
        atomic_write(os.path.join(folder, CALLBACK_STATE_NAME), lambda f: torch.save(payload, f))

    # --- helpers ------------------------------------------------------------------------------------

    @property
    def config(self):
        return self._tuner.peft_config[self.adapter_name]

    def _find_trainer(self) -> Trainer | None:
        """The explicit ``trainer``, else the ``Trainer`` up the call stack; refuses a mismatch of the two."""
        found = _calling_instance(Trainer)
        if self._explicit_trainer is None:
            return found
        if found is not None and found is not self._explicit_trainer:
            raise ValueError(
                "AdaptiveLoraCallback(trainer=...) was given a different Trainer than the one that is training; "
                "pass the trainer the callback is added to"
            )
        return self._explicit_trainer

    def _check_distributed(self) -> None:
        """Under DDP the wrapper must be found now and be one that can be re-initialised at the reallocation."""
        if self._trainer is None:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                if torch.distributed.get_world_size() > 1:
                    raise RuntimeError(
                        "AdaptiveLoraCallback cannot find the Trainer, which it needs to re-initialise the DDP "
                        "wrapper after the reallocation: pass it explicitly, "
                        "trainer.add_callback(AdaptiveLoraCallback(trainer=trainer))"
                    )
            return
        check_ddp(self._trainer.model_wrapped)
        check_trainer_resync(self._trainer)

    def _restore(self, args: TrainingArguments, state: TrainerState) -> bool:
        """Restore signals/flags from the checkpoint being resumed; True if signals were restored."""
        resumed = _resumed_checkpoint()
        if resumed is not None and not is_complete_checkpoint(resumed):
            # trainer_state.json missing makes Trainer start at step 0 with the checkpoint's weights: never silently
            last = last_complete_checkpoint(os.path.dirname(os.path.abspath(resumed)))
            raise RuntimeError(
                f"{resumed} is not a complete checkpoint: it lacks {CALLBACK_STATE_NAME} or trainer_state.json, which "
                "are written last (the process was probably killed while saving it, or it was saved without "
                "AdaptiveLoraCallback). Resume from peft_adaptive.last_complete_checkpoint(output_dir) instead"
                + (f" (here: {last})" if last else " (none is complete here: start again)")
                + "; resume_from_checkpoint=True takes the newest folder, finished or not."
            )
        if state.global_step == 0:
            return False
        checkpoint = resumed or os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        path = os.path.join(checkpoint, CALLBACK_STATE_NAME)
        if not os.path.isfile(path):
            if state.global_step < self.config.signal_steps:
                warnings.warn(
                    f"resuming during the signal steps without {CALLBACK_STATE_NAME} in {checkpoint}: the signals "
                    "restart from this step",
                    stacklevel=3,
                )
            return False
        payload = torch.load(path, map_location="cpu", weights_only=True)
        self.reallocation_step = payload.get("reallocation_step")
        if self.reallocation_step is None and "signals" in payload:
            collector = self._tuner.start_signal_collection(self.adapter_name, seed=args.seed)
            collector.load_state_dict(payload["signals"])
            return True
        return False

    def _log(self, report: AllocationReport, state: TrainerState) -> None:
        logs: dict[str, float] = {
            "adaptive_lora/budget": report.budget,
            "adaptive_lora/params_used": report.used,
            "adaptive_lora/signal_steps": report.signal_steps,
        }
        if report.predicted_gain is not None:
            logs["adaptive_lora/predicted_gain"] = report.predicted_gain
        for name, rank, score in zip(report.names, report.ranks_after, report.scores):
            logs[f"adaptive_lora/rank/{name}"] = rank
            logs[f"adaptive_lora/score/{name}"] = score
        # the per-module table itself is logged by AdaptiveLoraModel.reallocate
        if self._trainer is not None:
            self._trainer.log(logs)
        else:
            state.log_history.append({**logs, "step": state.global_step})


def _adaptive_tuner(model: torch.nn.Module) -> AdaptiveLoraModel:
    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, AdaptiveLoraModel):
        raise TypeError(
            "AdaptiveLoraCallback needs a model made by peft.get_peft_model(model, AdaptiveLoraConfig(...)); "
            f"got {type(model).__name__} whose base_model is {type(tuner).__name__}"
        )
    return tuner


def _loss_scale(trainer: Trainer | None) -> float:
    """The GradScaler's current scale (the layer-output gradients the sketch sees are still scaled), else 1."""
    scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())


def _calling_instance(cls: type) -> Any:
    """The nearest ``self`` of type ``cls`` up the call stack (the Trainer that fired this event), or None."""
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, cls):
            return candidate
        frame = frame.f_back
    return None


def _resumed_checkpoint() -> str | None:
    """The ``resume_from_checkpoint`` folder of the running ``Trainer.train`` call, if any."""
    frame = sys._getframe(1)
    while frame is not None:
        value = frame.f_locals.get("resume_from_checkpoint")
        if isinstance(frame.f_locals.get("self"), Trainer) and isinstance(value, str):
            return value
        frame = frame.f_back
    return None


def _refuse_duplicates(callback: AdaptiveLoraCallback) -> None:
    trainer = callback._trainer
    handler = trainer.callback_handler if trainer is not None else _calling_instance(CallbackHandler)
    if handler is None:
        return
    count = sum(isinstance(cb, AdaptiveLoraCallback) for cb in handler.callbacks)
    if count > 1:
        raise ValueError(
            f"AdaptiveLoraCallback was added {count} times to this Trainer; add it once (each copy would "
            "reallocate the ranks again)"
        )


def _refuse_sharded_backends(trainer: Trainer | None, args: TrainingArguments) -> None:
    fsdp = bool(getattr(args, "fsdp", None)) or bool(trainer is not None and getattr(trainer, "is_fsdp_enabled", False))
    deepspeed = bool(getattr(args, "deepspeed", None)) or bool(
        trainer is not None and getattr(trainer, "is_deepspeed_enabled", False)
    )
    if not (fsdp or deepspeed):
        return
    if deepspeed:
        why = (
            "DeepSpeed: ZeRO partitions the parameters and owns the optimizer and its flat buffers, so adapters "
            "cannot be resized in place (this package has no tested DeepSpeed path)"
        )
    else:
        why = (
            "FSDP through Trainer/accelerate: accelerate shards the adapter with the base model, so it cannot be "
            "resized in place"
        )
    raise RuntimeError(
        f"AdaptiveLoraCallback does not support {why}. Working alternatives: (1) FSDP2 in a hand-written loop: "
        "peft_adaptive.fsdp.shard_base_model(model) shards the base model per decoder layer and keeps the adapter "
        "replicated, and model.base_model.update_and_allocate(step, optimizer) reallocates in place "
        "(docs/distributed.md); (2) DDP (torchrun/accelerate without FSDP/DeepSpeed) with this callback; (3) a "
        "two-phase run. Phase 1: train the signal steps with DDP or one device, with AdaptiveLoraCallback and "
        "max_steps=signal_steps+1, then save_pretrained (the adapter records the new per-module ranks). Phase 2: "
        "load it with PeftModel.from_pretrained(base, path, is_trainable=True) and continue with a fresh Trainer, "
        "without the callback."
    )
