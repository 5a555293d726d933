"""AdaptiveLoraCallback inside real ``Trainer.train()`` runs (tiny random models, CPU)."""

from __future__ import annotations

import contextlib
import json
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from peft_adaptive import AdaptiveLoraCallback, AdaptiveLoraConfig
from peft_adaptive.callback import CALLBACK_STATE_NAME, _refuse_sharded_backends
from peft_adaptive.resize import cost_per_rank

from .process_group import torchrun
from .tiny_models import TokenDataset, adaptive_model, tiny_bert, tiny_llama

REPO = Path(__file__).resolve().parents[1]
WARMUP = 3


def training_args(out: Path, **overrides) -> TrainingArguments:
    args = {
        "output_dir": str(out),
        "max_steps": 8,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "learning_rate": 1e-2,
        "max_grad_norm": 1.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
    }
    args.update(overrides)
    return TrainingArguments(**args)


class GradientProbe(TrainerCallback):
    """Counts optimizer steps and records which parameters the optimizer holds after each step."""

    def __init__(self):
        self.optimizer_steps = 0
        self.optimizer_matches_model = []

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.optimizer_steps += 1

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        shapes_ok = all(
            v.shape == p.shape
            for group in optimizer.param_groups
            for p in group["params"]
            for v in optimizer.state.get(p, {}).values()
            if torch.is_tensor(v) and v.dim() > 0
        )
        self.optimizer_matches_model.append(held == trainable and shapes_ok)


def train(model, out: Path, callbacks, dataset=None, resume=None, **overrides) -> Trainer:
    trainer = Trainer(
        model=model,
        args=training_args(out, **overrides),
        train_dataset=dataset or TokenDataset(64),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def assert_budget_spent(tuner, adapter="default"):
    config = tuner.peft_config[adapter]
    used, budget = tuner.adapter_param_count(adapter), tuner.param_budget(adapter)
    assert used <= budget
    for layer in tuner.adapted_modules(adapter).values():
        if layer.r[adapter] < config.max_r:
            assert cost_per_rank(layer, adapter) > budget - used


def test_reallocates_once_after_the_signal_steps_with_accumulation_and_clipping(tmp_path):
    model = adaptive_model(max_r=12, signal_steps=WARMUP)
    probe = GradientProbe()
    adaptive = AdaptiveLoraCallback()
    trainer = train(model, tmp_path, [adaptive, probe])

    assert adaptive.reallocation_step == WARMUP
    # signals read once per optimizer step (not per micro-batch of the accumulation window)
    assert adaptive.report.signal_steps == WARMUP
    assert probe.optimizer_steps == 8
    ranks = model.base_model.ranks()
    assert len(set(ranks.values())) > 1 and all(1 <= r <= 12 for r in ranks.values())
    assert_budget_spent(model.base_model)
    assert model.base_model.param_budget() == 4 * sum(
        cost_per_rank(m, "default") for m in model.base_model.adapted_modules().values()
    )
    # the optimizer holds exactly the model's trainable parameters, with matching state, at every step
    assert probe.optimizer_matches_model == [True] * 8
    # the allocation is in the Trainer's log history at the step it happened
    entries = [h for h in trainer.state.log_history if "adaptive_lora/budget" in h]
    assert len(entries) == 1 and entries[0]["step"] == WARMUP
    assert entries[0]["adaptive_lora/params_used"] == model.base_model.adapter_param_count()
    assert {k.removeprefix("adaptive_lora/rank/"): v for k, v in entries[0].items() if "/rank/" in k} == ranks
    assert entries[0]["adaptive_lora/predicted_gain"] == adaptive.report.predicted_gain > 1.0
    # the config records it, so a saved adapter says when and how the ranks were chosen
    assert model.peft_config["default"].reallocation_step == WARMUP
    assert model.peft_config["default"].allocation["ranks_after"] == list(ranks.values())


def test_loss_keeps_falling_after_reallocation(tmp_path):
    model = adaptive_model(max_r=12, signal_steps=4)
    data = TokenDataset(8, seed=1)  # small enough to memorise
    trainer = train(model, tmp_path, [AdaptiveLoraCallback()], dataset=data, max_steps=30, learning_rate=3e-2)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    after = losses[4:]
    assert sum(after[-5:]) / 5 < sum(after[:5]) / 5 - 0.1, losses


@pytest.mark.parametrize(
    "overrides",
    [
        {"bf16": True},
        {"gradient_checkpointing": True},
        {"gradient_accumulation_steps": 4, "max_grad_norm": 0.01},
        {"max_grad_norm": 0.0, "gradient_accumulation_steps": 1},
    ],
    ids=["bf16", "gradient-checkpointing", "ga4-tight-clipping", "no-clipping"],
)
def test_training_options(tmp_path, overrides):
    model = adaptive_model(max_r=12, signal_steps=WARMUP)
    probe = GradientProbe()
    adaptive = AdaptiveLoraCallback()
    train(model, tmp_path, [adaptive, probe], **overrides)
    assert adaptive.reallocation_step == WARMUP
    assert adaptive.report.signal_steps == WARMUP
    assert all(g > 0 for g in adaptive.report.grad_signal)
    assert probe.optimizer_matches_model == [True] * 8
    assert_budget_spent(model.base_model)


def test_torch_compile_recompiles_once_per_reallocation(tmp_path):
    """The reallocation changes the adapter's shapes, so the compiled graphs that hold it recompile, once: at most
    one new graph per graph compiled before it, and none in the steps after (the count depends on how many graphs
    the model compiles to, which changes between transformers releases)."""
    from torch._dynamo.utils import counters

    class GraphCount(TrainerCallback):
        def __init__(self):
            self.counts: dict[int, int] = {}  # graphs compiled before each step, by global_step

        def on_step_begin(self, args, state, control, **kwargs):
            self.counts[state.global_step] = counters["stats"]["unique_graphs"]

    torch._dynamo.reset()
    counters.clear()
    model = adaptive_model(max_r=12, signal_steps=WARMUP)
    probe, graphs, adaptive = GradientProbe(), GraphCount(), AdaptiveLoraCallback()
    trainer = train(model, tmp_path, [adaptive, probe, graphs], torch_compile=True, torch_compile_backend="aot_eager")
    assert type(trainer.model_wrapped).__name__ == "OptimizedModule"
    assert adaptive.reallocation_step == WARMUP
    assert probe.optimizer_matches_model == [True] * 8
    before, after = graphs.counts[WARMUP], graphs.counts[WARMUP + 1]
    assert before >= 1
    assert before < after <= 2 * before  # the first step on the new shapes recompiled, at most once per graph
    assert counters["stats"]["unique_graphs"] == after  # and nothing recompiled after it


def test_encoder_classifier_with_modules_to_save(tmp_path):
    config = AdaptiveLoraConfig(r=4, max_r=8, target_modules=["query", "value"], task_type="SEQ_CLS", signal_steps=2)
    model = get_peft_model(tiny_bert(), config)
    adaptive = AdaptiveLoraCallback()
    probe = GradientProbe()
    train(model, tmp_path, [adaptive, probe], dataset=TokenDataset(64, classification=True), max_steps=5)
    assert adaptive.reallocation_step == 2
    assert probe.optimizer_matches_model == [True] * 5
    head = [n for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
    assert head, "the classifier head (modules_to_save) must stay trainable"


def test_only_the_trained_adapter_changes(tmp_path):
    model = adaptive_model(max_r=12, signal_steps=WARMUP)
    model.add_adapter("other", AdaptiveLoraConfig(r=2, target_modules=["q_proj", "v_proj"], signal_steps=WARMUP))
    model.set_adapter("default")
    other_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".other." in n}
    train(model, tmp_path, [AdaptiveLoraCallback()])
    other_after = {n: p.detach() for n, p in model.named_parameters() if ".other." in n}
    assert other_before.keys() == other_after.keys()
    assert all(torch.equal(other_before[n], other_after[n]) for n in other_before)
    assert set(model.base_model.ranks("other").values()) == {2}
    assert len(set(model.base_model.ranks("default").values())) > 1


@pytest.mark.parametrize("resume_step", [2, 4], ids=["during-signal-steps", "after-reallocation"])
def test_resume_is_bit_identical(tmp_path, resume_step):
    reference = adaptive_model(max_r=12, signal_steps=WARMUP)
    train(reference, tmp_path / "a", [AdaptiveLoraCallback()], save_strategy="steps", save_steps=2)
    checkpoint = tmp_path / "a" / f"checkpoint-{resume_step}"
    state = torch.load(checkpoint / CALLBACK_STATE_NAME, weights_only=True)
    assert state["reallocation_step"] == (None if resume_step < WARMUP else WARMUP)
    saved = json.loads((checkpoint / "adaptive_lora.json").read_text())
    assert saved["reallocation_step"] == state["reallocation_step"]

    resumed = adaptive_model(max_r=12, signal_steps=WARMUP)
    adaptive = AdaptiveLoraCallback()
    train(resumed, tmp_path / "b", [adaptive], resume=str(checkpoint), save_strategy="steps", save_steps=2)
    assert resumed.base_model.ranks() == reference.base_model.ranks()
    expected, got = adapter_state(reference), adapter_state(resumed)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[n], got[n]) for n in expected)
    # reallocation never runs twice: after a resume past the signal steps the callback does nothing
    assert (adaptive.report is None) == (resume_step >= WARMUP)


def test_signal_steps_longer_than_the_run_is_an_error_unless_asked_for(tmp_path):
    with pytest.raises(ValueError, match="signal_steps=9 is longer than the run"):
        train(adaptive_model(max_r=12, signal_steps=9), tmp_path / "a", [AdaptiveLoraCallback()])
    model = adaptive_model(max_r=12, signal_steps=9)
    with pytest.warns(UserWarning, match="training as plain LoRA"):
        train(model, tmp_path / "b", [AdaptiveLoraCallback(allow_plain_lora=True)])
    assert set(model.base_model.ranks().values()) == {4}


def test_a_run_as_long_as_the_signal_steps_reallocates_at_its_last_step(tmp_path):
    """A probe run (docs/usage.md, "Ranks from step 0"): it stops at the reallocation and saves the ranks."""
    model = adaptive_model(max_r=12, signal_steps=8)
    callback = AdaptiveLoraCallback()
    trainer = train(model, tmp_path, [callback])
    assert trainer.state.global_step == 8 and callback.reallocation_step == 8
    assert model.peft_config["default"].reallocation_step == 8 and len(set(model.base_model.ranks().values())) > 1


def test_callback_on_a_plain_lora_model_is_refused(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"))
    with pytest.raises(TypeError, match="AdaptiveLoraConfig"):
        train(model, tmp_path, [AdaptiveLoraCallback()])


def test_callback_added_twice_is_refused(tmp_path):
    with pytest.raises(ValueError, match="added 2 times"):
        train(adaptive_model(max_r=12, signal_steps=WARMUP), tmp_path, [AdaptiveLoraCallback(), AdaptiveLoraCallback()])
    trainer = Trainer(
        model=adaptive_model(max_r=12, signal_steps=WARMUP),
        args=training_args(tmp_path),
        train_dataset=TokenDataset(64),
    )
    trainer.add_callback(AdaptiveLoraCallback(trainer=trainer))
    trainer.add_callback(AdaptiveLoraCallback(trainer=trainer))
    with pytest.raises(ValueError, match="added 2 times"):
        trainer.train()


class AllocationLogs(TrainerCallback):
    """The allocation entries that went through ``Trainer.log`` (what TensorBoard/W&B receive)."""

    def __init__(self):
        self.steps = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "adaptive_lora/budget" in (logs or {}):
            self.steps.append(state.global_step)


def test_explicit_trainer_added_after_construction(tmp_path):
    """``trainer.add_callback(AdaptiveLoraCallback(trainer=trainer))``, the form TRL's callbacks use."""
    model = adaptive_model(max_r=12, signal_steps=WARMUP)
    probe, logs = GradientProbe(), AllocationLogs()
    trainer = Trainer(
        model=model, args=training_args(tmp_path), train_dataset=TokenDataset(64), callbacks=[probe, logs]
    )
    adaptive = AdaptiveLoraCallback(trainer=trainer)
    trainer.add_callback(adaptive)
    trainer.train()
    assert adaptive.reallocation_step == WARMUP and adaptive.report.signal_steps == WARMUP
    assert probe.optimizer_matches_model == [True] * 8
    assert logs.steps == [WARMUP]
    assert [h["step"] for h in trainer.state.log_history if "adaptive_lora/budget" in h] == [WARMUP]


@pytest.mark.parametrize("explicit", [True, False], ids=["explicit", "zero-argument"])
def test_which_trainer_is_used_when_the_stack_walk_finds_none(tmp_path, monkeypatch, explicit):
    """Events fired from outside the Trainer's methods: only the explicit trainer still reaches ``Trainer.log``."""
    import peft_adaptive.callback

    monkeypatch.setattr(peft_adaptive.callback, "_calling_instance", lambda cls: None)
    logs = AllocationLogs()
    trainer = Trainer(
        model=adaptive_model(max_r=12, signal_steps=WARMUP),
        args=training_args(tmp_path),
        train_dataset=TokenDataset(64),
        callbacks=[logs],
    )
    adaptive = AdaptiveLoraCallback(trainer=trainer) if explicit else AdaptiveLoraCallback()
    trainer.add_callback(adaptive)
    trainer.train()
    assert adaptive.reallocation_step == WARMUP
    assert logs.steps == ([WARMUP] if explicit else [])  # the zero-argument form falls back to log_history only
    assert [h["step"] for h in trainer.state.log_history if "adaptive_lora/budget" in h] == [WARMUP]


def test_explicit_trainer_must_be_the_one_that_trains(tmp_path):
    other = Trainer(model=adaptive_model(), args=training_args(tmp_path / "other"), train_dataset=TokenDataset(8))
    with pytest.raises(ValueError, match="different Trainer than the one that is training"):
        train(adaptive_model(max_r=12, signal_steps=WARMUP), tmp_path, [AdaptiveLoraCallback(trainer=other)])
    with pytest.raises(TypeError, match="must be a transformers.Trainer"):
        AdaptiveLoraCallback(trainer=object())


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_sharded_backends_are_refused_with_the_alternative(backend):
    args = types.SimpleNamespace(
        fsdp="full_shard" if backend == "fsdp" else "", deepspeed="ds.json" if backend == "deepspeed" else None
    )
    with pytest.raises(RuntimeError, match="two-phase run") as refused:
        _refuse_sharded_backends(None, args)
    assert "peft_adaptive.fsdp.shard_base_model(model)" in str(refused.value)
    assert "DDP (torchrun/accelerate without FSDP/DeepSpeed) with this callback" in str(refused.value)


def test_ddp_processes_stay_identical_after_reallocation(tmp_path):
    """torchrun, 2 CPU processes (gloo), stock Trainer; negative control without the DDP re-initialisation.

    The fixed run also registers a communication hook and a forward pre-hook on the Trainer's DDP wrapper (both
    must survive the re-initialisation), then runs the README's accelerate loop with the one call under DDP.
    """
    results = {}
    for name, extra in (("fixed", ["--hooks"]), ("control", ["--no-rewrap"])):
        out = tmp_path / f"{name}.json"
        proc = torchrun(str(REPO / "tests/scripts/ddp_train.py"), str(out), *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = json.loads(out.read_text())

    fixed = results["fixed"]
    assert fixed["world_size"] == 2 and fixed["wrapped"] == "DistributedDataParallel"
    assert fixed["reallocation_step"] == 3
    assert fixed["ranks_per_process"][0] == fixed["ranks_per_process"][1]
    assert len(set(fixed["ranks_per_process"][0].values())) > 1
    assert fixed["max_diff_per_step"] == {str(s): 0.0 for s in range(1, 8)}
    # the hooks registered on the wrapper ran at every step, after the reallocation too
    assert fixed["hooked_wrapper"] == "DistributedDataParallel"
    calls = fixed["hook_calls_per_step"]
    assert all(calls[str(s)]["comm"] > 0 and calls[str(s)]["forward"] == 2 for s in range(1, 8)), calls
    # a plain accelerate loop (gradient accumulation 2) with update_and_allocate(..., wrapper=model)
    loop = fixed["accelerate"]
    assert loop["wrapped"] == "DistributedDataParallel" and loop["steps"] == 7 and loop["reallocation_step"] == 3
    assert loop["ranks_per_process"][0] == loop["ranks_per_process"][1]
    assert loop["max_diff_per_step"] == {str(s): 0.0 for s in range(1, 8)}
    # without re-initialising DDP the new parameters are silently not synchronised
    control = results["control"]
    assert all(control["max_diff_per_step"][str(s)] == 0.0 for s in range(1, 4))
    assert control["max_diff_per_step"]["7"] > 1e-4


@contextlib.contextmanager
def plugin_warnings():
    """Record the warnings that come from the plugin, into the list this yields.

    A warning is the plugin's when the Python frame that issued it (the innermost one outside the warnings
    machinery, seen while the warning is shown) runs ``peft_adaptive`` code, whatever ``stacklevel`` made it
    point at; or when the location it reports is a ``peft_adaptive`` file (e.g. a library deprecation warning
    about the plugin's call). Filtering on the reported file alone misses the plugin's own warnings: they use
    ``stacklevel`` to point at the user's or ``Trainer``'s line.
    """
    found: list[warnings.WarningMessage] = []

    def show(message, category, filename, lineno, file=None, line=None):
        frame = sys._getframe(1)
        while frame is not None and frame.f_globals.get("__name__") in ("warnings", "_py_warnings"):
            frame = frame.f_back
        issuer = frame.f_globals.get("__name__", "") if frame is not None else ""
        if issuer.split(".")[0] == "peft_adaptive" or "peft_adaptive" in str(filename):
            found.append(warnings.WarningMessage(message, category, filename, lineno, file, line))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield found


def test_warnings_are_clean_for_a_normal_run(tmp_path):
    with plugin_warnings() as ours:
        train(adaptive_model(max_r=12, signal_steps=WARMUP), tmp_path, [AdaptiveLoraCallback()])
    assert [f"{w.category.__name__}: {w.message}" for w in ours] == []


def test_plugin_warnings_sees_warnings_that_point_elsewhere(tmp_path):
    """The recorder above catches the plugin's own stacklevel warnings, which name transformers' files."""
    with plugin_warnings() as ours:
        train(adaptive_model(max_r=12, signal_steps=9), tmp_path, [AdaptiveLoraCallback(allow_plain_lora=True)])
        warnings.warn("not the plugin's", UserWarning, stacklevel=1)
    assert len(ours) == 1 and ours[0].category is UserWarning
    assert "training as plain LoRA" in str(ours[0].message)
    assert "peft_adaptive" not in ours[0].filename  # why filtering on the reported file found nothing
