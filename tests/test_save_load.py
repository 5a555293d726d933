"""Saving after a reallocation and loading in fresh processes, with and without the plugin."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from peft import get_peft_model
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file

from peft_adaptive import AdaptiveLoraConfig, AdaptiveLoraModel
from peft_adaptive.config import ADAPTIVE_CONFIG_NAME

from .fresh_process import loader_result, start_loader
from .tiny_models import TokenDataset, tiny_llama

TARGETS = ["embed_tokens", "q_proj", "v_proj", "o_proj", "down_proj"]
ADAPTIVE_FIELDS = dict(
    min_r=1,
    max_r=10,
    signal_steps=3,
    score="norms",
    grad_weight=0.7,
    delta_weight=0.3,
    score_exponent=1.5,
    param_budget=3000,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Train, reallocate, train on; save as LoRA and as ADAPTIVE_LORA; load both in two fresh processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the loader processes use one thread too: identical kernels, exact logits
    try:
        root = tmp_path_factory.mktemp("saved")
        torch.manual_seed(0)
        base = tiny_llama(seed=0)
        base.save_pretrained(root / "base")
        config = AdaptiveLoraConfig(
            r=4, lora_alpha=31, use_rslora=True, target_modules=TARGETS, lora_dropout=0.0, **ADAPTIVE_FIELDS
        )
        model = get_peft_model(base, config)
        tuner = model.base_model
        ids = TokenDataset(n=8, length=12, seed=2).ids
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        tuner.start_signal_collection()
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            tuner.record_gradients()
            optimizer.step()
            optimizer.zero_grad()
        tuner.reallocate(optimizer, step=3)
        for _ in range(2):  # every factor, grown columns included, is non-zero and non-trivial
            step()
        model.eval()
        with torch.no_grad():
            logits = model(ids).logits
        torch.save(ids, root / "ids.pt")
        model.save_pretrained(root / "lora")
        config.save_as_lora = False
        model.save_pretrained(root / "adaptive")
        config.save_as_lora = True

        # both saves, loaded in two fresh processes at once: with the plugin and with vanilla PEFT
        adapters = {name: root / name for name in ("lora", "adaptive")}
        procs = {
            mode: start_loader(root / "base", root / "ids.pt", root / f"logits_{mode}", list(adapters.values()), plugin)
            for mode, plugin in (("plugin", True), ("vanilla", False))
        }
        results = {}
        for mode, proc in procs.items():
            result = loader_result(proc)
            results[mode] = {name: result[str(path)] for name, path in adapters.items()}
            results[mode]["plugin_imported"] = result["plugin_imported"]
        yield {
            "root": root,
            "model": model,
            "tuner": tuner,
            "config": config,
            "logits": logits,
            "ranks": tuner.ranks(),
            "results": results,
        }
    finally:
        torch.set_num_threads(threads)


def loaded_logits(saved, mode: str, name: str) -> torch.Tensor:
    return torch.load(saved["results"][mode][name]["logits"])


def test_reallocation_made_uneven_ranks(saved):
    assert len(set(saved["ranks"].values())) > 1
    assert "embed_tokens" in " ".join(saved["ranks"])


def test_lora_export_config(saved):
    data = json.loads((saved["root"] / "lora" / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA"
    for field in ADAPTIVE_FIELDS:
        assert field not in data
    assert "allocation" not in data and "reallocation_step" not in data
    ranks = saved["ranks"]
    names = list(ranks)
    # exactly one anchored, escaped entry per adapted module, in both patterns
    expected_keys = {f"^{re.escape(n)}$" for n in names}
    assert set(data["rank_pattern"]) == expected_keys
    assert set(data["alpha_pattern"]) == expected_keys
    for n in names:
        key = f"^{re.escape(n)}$"
        assert data["rank_pattern"][key] == ranks[n]
        # PEFT's own lookup picks this module's key (whatever the on-disk order) ...
        assert get_pattern_key(list(data["rank_pattern"]), n) == key
        assert get_pattern_key(list(data["alpha_pattern"]), n) == key
        # ... and the key matches no other module
        for other in names:
            if other != n:
                assert re.match(rf"(.*\.)?({key})$", other) is None
    # alpha / sqrt(r) (rsLoRA), as PEFT computes it on load, is the scaling each layer uses, bit for bit
    # (alpha=31, r=4 makes scaling * sqrt(r') / sqrt(r') inexact for r' in 2, 6, 8, 10)
    layers = saved["tuner"].adapted_modules()
    for n in names:
        alpha = data["alpha_pattern"][f"^{re.escape(n)}$"]
        assert alpha / math.sqrt(ranks[n]) == layers[n].scaling["default"]


def test_lora_export_sidecar(saved):
    sidecar = json.loads((saved["root"] / "lora" / ADAPTIVE_CONFIG_NAME).read_text())
    for field, value in ADAPTIVE_FIELDS.items():
        assert sidecar[field] == value
    assert sidecar["reallocation_step"] == 3
    assert sidecar["allocation"]["ranks_after"] == [saved["ranks"][n] for n in sidecar["allocation"]["names"]]


def test_safetensors_shapes_match_ranks(saved):
    for directory in ("lora", "adaptive"):
        tensors = load_file(saved["root"] / directory / "adapter_model.safetensors")
        layers = saved["tuner"].adapted_modules()
        expected_keys = set()
        for n, r in saved["ranks"].items():
            prefix = f"base_model.model.{n}"
            A, B = layers[n].lora_A, layers[n].lora_B
            if "embed_tokens" in n:
                a, b = tensors[f"{prefix}.lora_embedding_A"], tensors[f"{prefix}.lora_embedding_B"]
                expected_keys |= {f"{prefix}.lora_embedding_A", f"{prefix}.lora_embedding_B"}
                assert torch.equal(a, layers[n].lora_embedding_A["default"].detach())
            else:
                a, b = tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]
                expected_keys |= {f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"}
                assert a.shape == A["default"].weight.shape and b.shape == B["default"].weight.shape
            assert a.shape[0] == r and b.shape[1] == r
        # PEFT also saves the base embedding when an embedding is targeted (save_embedding_layers="auto")
        assert set(tensors) - expected_keys == {"base_model.model.model.embed_tokens.base_layer.weight"}


def test_vanilla_peft_loads_the_lora_export_exactly(saved):
    result = saved["results"]["vanilla"]
    assert result["plugin_imported"] is False
    lora = result["lora"]
    assert "error" not in lora, lora
    assert (lora["tuner"], lora["config"], lora["peft_type"]) == ("LoraModel", "LoraConfig", "LORA")
    assert lora["ranks"] == saved["ranks"]
    diff = (loaded_logits(saved, "vanilla", "lora") - saved["logits"]).abs().max().item()
    assert diff == 0.0


def test_plugin_process_loads_the_lora_export_exactly(saved):
    lora = saved["results"]["plugin"]["lora"]
    assert saved["results"]["plugin"]["plugin_imported"] is True
    assert "error" not in lora, lora
    assert lora["peft_type"] == "LORA" and lora["ranks"] == saved["ranks"]
    diff = (loaded_logits(saved, "plugin", "lora") - saved["logits"]).abs().max().item()
    assert diff == 0.0


def test_adaptive_format_round_trip(saved):
    data = json.loads((saved["root"] / "adaptive" / "adapter_config.json").read_text())
    assert data["peft_type"] == "ADAPTIVE_LORA"
    assert data["save_as_lora"] is False
    for field, value in ADAPTIVE_FIELDS.items():
        assert data[field] == value
    assert not (saved["root"] / "adaptive" / ADAPTIVE_CONFIG_NAME).exists()
    # with the plugin: an AdaptiveLoraModel with the same ranks and the same logits, bit for bit
    adaptive = saved["results"]["plugin"]["adaptive"]
    assert "error" not in adaptive, adaptive
    assert (adaptive["tuner"], adaptive["config"], adaptive["peft_type"]) == (
        "AdaptiveLoraModel",
        "AdaptiveLoraConfig",
        "ADAPTIVE_LORA",
    )
    assert adaptive["ranks"] == saved["ranks"]
    diff = (loaded_logits(saved, "plugin", "adaptive") - saved["logits"]).abs().max().item()
    assert diff == 0.0
    # without it: PEFT does not know the type
    error = saved["results"]["vanilla"]["adaptive"]["error"]
    assert "ADAPTIVE_LORA" in error, error


@pytest.mark.parametrize("directory", ["lora", "adaptive"])
def test_config_from_pretrained_restores_adaptive_fields(saved, directory):
    config = AdaptiveLoraConfig.from_pretrained(str(saved["root"] / directory))
    live = saved["config"]
    assert type(config) is AdaptiveLoraConfig
    assert config.peft_type == "ADAPTIVE_LORA"
    for field, value in ADAPTIVE_FIELDS.items():
        assert getattr(config, field) == value, field
    assert config.reallocation_step == 3
    assert config.allocation == live.allocation
    assert config.rank_pattern == live.rank_pattern
    assert config.alpha_pattern == live.alpha_pattern
    assert (config.r, config.lora_alpha, config.use_rslora) == (4, 31, True)
    assert set(config.target_modules) == set(TARGETS)
    assert config.save_as_lora is (directory == "lora")


def test_in_process_reload_with_the_plugin(saved):
    # the same checks without a subprocess: the reloaded tuner is adaptive again and can be reallocated
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = AutoModelForCausalLM.from_pretrained(saved["root"] / "base")
        model = PeftModel.from_pretrained(base, saved["root"] / "adaptive", is_trainable=True)
        assert type(model.base_model) is AdaptiveLoraModel
        assert model.base_model.ranks() == saved["ranks"]
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(torch.load(saved["root"] / "ids.pt")).logits, saved["logits"])
    finally:
        torch.set_num_threads(threads)


def test_an_adapter_saved_with_the_previous_default_power_still_loads(tmp_path):
    """Until 2026-12-05 the default consistency_power was 2.0 and every save wrote it, with any score: such an
    adapter (here score='gradient_spectrum') must load although 2.0 is no longer the default."""
    config = AdaptiveLoraConfig(r=4, target_modules=["q_proj"], score="gradient_spectrum")
    get_peft_model(tiny_llama(), config).save_pretrained(tmp_path)
    sidecar = tmp_path / ADAPTIVE_CONFIG_NAME
    saved = json.loads(sidecar.read_text())
    assert saved["consistency_power"] == 4.0  # what this release writes
    sidecar.write_text(json.dumps({**saved, "consistency_power": 2.0}))  # what the previous one wrote
    loaded = AdaptiveLoraConfig.from_pretrained(str(tmp_path))
    assert (loaded.score, loaded.consistency_power) == ("gradient_spectrum", 2.0)
    with pytest.raises(ValueError, match="consistency_power=3.0 with score='gradient_spectrum'"):
        AdaptiveLoraConfig(target_modules=["q_proj"], score="gradient_spectrum", consistency_power=3.0)
