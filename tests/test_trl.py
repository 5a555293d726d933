"""TRL's trainers (``Trainer`` subclasses) with ``AdaptiveLoraCallback``: SFT and DPO, tiny models on the CPU."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_adaptive import AdaptiveLoraCallback, AdaptiveLoraConfig

from .test_callback import GradientProbe
from .tiny_models import tiny_llama
from .tiny_text import preference_dataset, text_dataset, tiny_tokenizer

trl = pytest.importorskip("trl")

SIGNAL_STEPS = 3
STEPS = 6
COMMON = dict(
    max_steps=STEPS,
    per_device_train_batch_size=4,
    learning_rate=1e-2,
    report_to=[],
    use_cpu=True,
    save_strategy="no",
    logging_steps=1,
    disable_tqdm=True,
    max_length=32,
    seed=0,
)


def adaptive_config() -> AdaptiveLoraConfig:
    return AdaptiveLoraConfig(
        r=4, max_r=12, target_modules="all-linear", signal_steps=SIGNAL_STEPS, task_type="CAUSAL_LM", lora_dropout=0.0
    )


def check_run(trainer, callback: AdaptiveLoraCallback, probe: GradientProbe) -> None:
    """Reallocated once at the step, logged there, and the optimizer held exactly the model's parameters."""
    tuner = trainer.model.base_model
    assert callback.reallocation_step == SIGNAL_STEPS and callback.report.signal_steps == SIGNAL_STEPS
    ranks = tuner.ranks()
    assert len(set(ranks.values())) > 1 and all(1 <= r <= 12 for r in ranks.values())
    assert tuner.adapter_param_count() <= tuner.param_budget()
    assert probe.optimizer_matches_model == [True] * STEPS
    entries = [h for h in trainer.state.log_history if "adaptive_lora/budget" in h]
    assert len(entries) == 1 and entries[0]["step"] == SIGNAL_STEPS


def check_saved(trainer, path) -> None:
    """The saved adapter loads (as plain LoRA, without the sidecar's help) with the new ranks and the trained weights.

    Weights, not outputs, are compared: after training under mixed precision, accelerate leaves the trained
    model's forward in autocast.
    """
    from peft.utils import get_peft_model_state_dict

    trainer.save_model(str(path))
    assert AdaptiveLoraConfig.from_pretrained(str(path)).reallocation_step == SIGNAL_STEPS  # from the sidecar
    loaded = PeftModel.from_pretrained(tiny_llama(), str(path))  # a plain LoRA adapter
    assert {n: m.r["default"] for n, m in _lora_layers(loaded)} == trainer.model.base_model.ranks()
    expected, got = get_peft_model_state_dict(trainer.model), get_peft_model_state_dict(loaded)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer) and "default" in m.r]


@pytest.mark.parametrize("form", ["callbacks-list", "add-callback"])
def test_sft_trainer_with_peft_config(tmp_path, form):
    """``SFTTrainer(peft_config=AdaptiveLoraConfig(...))``: TRL wraps the model; both ways to add the callback."""
    from trl import SFTConfig, SFTTrainer

    probe = GradientProbe()
    callback = AdaptiveLoraCallback() if form == "callbacks-list" else None
    trainer = SFTTrainer(
        model=tiny_llama(),
        args=SFTConfig(output_dir=str(tmp_path), **COMMON),
        train_dataset=text_dataset(),
        processing_class=tiny_tokenizer(),
        peft_config=adaptive_config(),
        callbacks=[probe] + ([callback] if callback else []),
    )
    if callback is None:
        callback = AdaptiveLoraCallback(trainer=trainer)
        trainer.add_callback(callback)
    assert trainer.args.gradient_checkpointing  # TRL's default: the callback works under it
    trainer.train()
    check_run(trainer, callback, probe)
    check_saved(trainer, tmp_path / "adapter")


def test_sft_trainer_with_an_already_wrapped_model(tmp_path):
    from trl import SFTConfig, SFTTrainer

    model = get_peft_model(tiny_llama(), adaptive_config())
    probe = GradientProbe()
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(output_dir=str(tmp_path), **COMMON),
        train_dataset=text_dataset(),
        processing_class=tiny_tokenizer(),
        callbacks=[probe],
    )
    callback = AdaptiveLoraCallback(trainer=trainer)
    trainer.add_callback(callback)
    trainer.train()
    assert trainer.model is model
    check_run(trainer, callback, probe)
    check_saved(trainer, tmp_path / "adapter")


@pytest.mark.parametrize("route", ["peft-config", "wrapped"])
def test_dpo_trainer(tmp_path, route):
    """DPO with ``peft_config`` (reference = adapter disabled) and with a wrapped model (reference = TRL's frozen
    copy ``ref`` of the adapter, which must keep its ranks and its own config)."""
    from trl import DPOConfig, DPOTrainer

    model = tiny_llama() if route == "peft-config" else get_peft_model(tiny_llama(), adaptive_config())
    probe = GradientProbe()
    trainer = DPOTrainer(
        model=model,
        args=DPOConfig(output_dir=str(tmp_path), **COMMON),
        train_dataset=preference_dataset(),
        processing_class=tiny_tokenizer(),
        peft_config=adaptive_config() if route == "peft-config" else None,
        callbacks=[probe],
    )
    callback = AdaptiveLoraCallback(trainer=trainer)
    trainer.add_callback(callback)
    trainer.train()
    check_run(trainer, callback, probe)
    check_saved(trainer, tmp_path / "adapter")
    if route == "wrapped":
        tuner = trainer.model.base_model
        assert set(tuner.ranks("ref").values()) == {4}
        assert tuner.peft_config["ref"] is not tuner.peft_config["default"]
        assert tuner.peft_config["ref"].reallocation_step is None
        loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter"))
        loaded.load_adapter(str(tmp_path / "adapter" / "ref"), "ref")  # its saved config describes its own ranks
        assert {m.r["ref"] for _, m in _lora_layers(loaded)} == {4}
