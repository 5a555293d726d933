"""``AdaptiveLoraConfig.signal_steps``, formerly ``warmup_steps`` (accepted for one release with a FutureWarning)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model

from peft_adaptive import AdaptiveLoraConfig
from peft_adaptive.config import ADAPTIVE_CONFIG_NAME, DEFAULT_SIGNAL_STEPS

from .tiny_models import TokenDataset, tiny_llama

TARGETS = ["q_proj", "v_proj"]


def test_the_default_and_the_new_name():
    assert AdaptiveLoraConfig(target_modules=TARGETS).signal_steps == DEFAULT_SIGNAL_STEPS == 200
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = AdaptiveLoraConfig(target_modules=TARGETS, signal_steps=7)
    assert config.signal_steps == 7
    assert "warmup_steps" not in config.to_dict() and "warmup_steps" not in config.adaptive_fields()


def test_the_old_name_warns_and_names_the_new_field():
    with pytest.warns(FutureWarning, match=r"warmup_steps=\.\.\.\) is deprecated.*use signal_steps=") as caught:
        config = AdaptiveLoraConfig(target_modules=TARGETS, warmup_steps=7)
    assert config.signal_steps == 7
    assert caught[0].filename == __file__  # points at the caller's line
    with pytest.warns(FutureWarning, match="signal_steps"):
        assert config.warmup_steps == 7  # reading the old attribute
    with pytest.warns(FutureWarning, match="signal_steps"):
        config.warmup_steps = 9
    assert config.signal_steps == 9


def test_both_names_must_agree():
    with pytest.raises(ValueError, match="got signal_steps=8 and warmup_steps=7.*pass only signal_steps"):
        AdaptiveLoraConfig(target_modules=TARGETS, signal_steps=8, warmup_steps=7)
    with pytest.warns(FutureWarning):
        assert AdaptiveLoraConfig(target_modules=TARGETS, signal_steps=8, warmup_steps=8).signal_steps == 8


def test_invalid_values_name_the_new_field():
    with pytest.raises(ValueError, match="AdaptiveLoraConfig.signal_steps must be an integer >= 1, got 0"):
        AdaptiveLoraConfig(target_modules=TARGETS, signal_steps=0)
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="signal_steps must be an integer >= 1"):
        AdaptiveLoraConfig(target_modules=TARGETS, warmup_steps=0)


def test_copies_of_a_config_do_not_warn():
    """``dataclasses.replace`` (PEFT's add_weighted_adapter) copies init-only arguments: the alias must stay quiet."""
    config = AdaptiveLoraConfig(target_modules=TARGETS, signal_steps=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        copy = dataclasses.replace(config, r=2)
    assert copy.signal_steps == 5 and copy.r == 2


@pytest.fixture(scope="module")
def old_saves(tmp_path_factory):
    """A reallocated adapter saved in both formats, then rewritten the way the previous release wrote them."""
    root = tmp_path_factory.mktemp("old")
    model = get_peft_model(tiny_llama(), AdaptiveLoraConfig(r=4, target_modules=TARGETS, signal_steps=2))
    tuner = model.base_model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = TokenDataset(4, seed=1).ids
    tuner.start_signal_collection()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        tuner.record_gradients()
        optimizer.step()
        optimizer.zero_grad()
    tuner.reallocate(optimizer, step=2)
    model.save_pretrained(root / "lora")
    model.peft_config["default"].save_as_lora = False
    model.save_pretrained(root / "adaptive")
    for name, file in (("lora", ADAPTIVE_CONFIG_NAME), ("adaptive", "adapter_config.json")):
        shutil.copytree(root / name, root / f"{name}-old")
        path = root / f"{name}-old" / file
        data = json.loads(path.read_text())
        data["warmup_steps"] = data.pop("signal_steps")
        path.write_text(json.dumps(data))
    return {"root": root, "ranks": tuner.ranks()}


def test_new_saves_write_the_new_name(old_saves):
    sidecar = json.loads((old_saves["root"] / "lora" / ADAPTIVE_CONFIG_NAME).read_text())
    adaptive = json.loads((old_saves["root"] / "adaptive" / "adapter_config.json").read_text())
    for data in (sidecar, adaptive):
        assert data["signal_steps"] == 2 and "warmup_steps" not in data


@pytest.mark.parametrize("name", ["lora-old", "adaptive-old"])
def test_saves_with_the_old_name_still_load_without_a_warning(old_saves, name):
    path = old_saves["root"] / name
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*warmup_steps.*", category=FutureWarning)
        config = AdaptiveLoraConfig.from_pretrained(str(path))
        generic = PeftConfig.from_pretrained(str(path))
        model = PeftModel.from_pretrained(tiny_llama(), str(path))
    assert config.signal_steps == 2 and config.reallocation_step == 2
    if name == "adaptive-old":  # saved as ADAPTIVE_LORA: PEFT's own loader builds the adaptive config
        assert isinstance(generic, AdaptiveLoraConfig) and generic.signal_steps == 2
        assert model.peft_config["default"].signal_steps == 2
    assert {n: layer.r["default"] for n, layer in _lora_layers(model)} == old_saves["ranks"]


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer)]


@pytest.mark.parametrize("name", ["lora-old", "adaptive-old"])
def test_inspect_reads_the_old_name_as_the_new_one(old_saves, name):
    from peft_adaptive import inspect_adapter

    adaptive = inspect_adapter(old_saves["root"] / name).adaptive
    assert adaptive["signal_steps"] == 2 and "warmup_steps" not in adaptive
