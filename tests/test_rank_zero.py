"""Rank 0: a module given no rank is removed from the adapter, and the saved adapter still loads exactly."""

from __future__ import annotations

import json

import torch
from peft import get_peft_model
from torch import nn

from peft_adaptive import AdaptiveLoraConfig

from .fresh_process import load_adapters
from .tiny_models import TokenDataset, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def test_rank_zero_removes_modules_and_reloads_exactly(tmp_path):
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the loader processes use one thread too: identical kernels, exact logits
    try:
        base = tiny_llama()
        base.save_pretrained(tmp_path / "base")
        config = AdaptiveLoraConfig(r=4, target_modules=TARGETS, min_r=0, signal_steps=2, lora_dropout=0.0)
        model = get_peft_model(base, config)
        tuner = model.base_model
        ids = TokenDataset(n=8, length=12, seed=2).ids
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

        def step(record: bool = False):
            model(input_ids=ids, labels=ids).loss.backward()
            if record:
                tuner.record_gradients()
            optimizer.step()
            optimizer.zero_grad()

        tuner.start_signal_collection()
        for _ in range(2):
            step(record=True)
        names = sorted(tuner.adapted_modules())
        removed = [n for n in names if n.endswith("q_proj")]
        ranks = {n: 0 if n in removed else 5 for n in names}
        report = tuner.reallocate(optimizer, ranks=ranks, step=2)
        assert sorted(report.removed) == removed
        for name in removed:  # unwrapped to the base layer
            assert type(model.base_model.model.get_submodule(name)) is nn.Linear
        assert sorted(tuner.adapted_modules()) == sorted(set(names) - set(removed))
        assert config.target_modules == sorted(set(names) - set(removed))
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert held == {id(p) for p in model.parameters() if p.requires_grad}
        for _ in range(2):
            step()

        model.eval()
        with torch.no_grad():
            logits = model(ids).logits
        torch.save(ids, tmp_path / "ids.pt")
        model.save_pretrained(tmp_path / "lora")
        config.save_as_lora = False
        model.save_pretrained(tmp_path / "adaptive")
        config.save_as_lora = True
        saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
        assert sorted(saved["target_modules"]) == sorted(set(names) - set(removed))

        adapters = [tmp_path / "lora", tmp_path / "adaptive"]
        for mode in ("vanilla", "plugin"):
            result = load_adapters(
                tmp_path / "base", tmp_path / "ids.pt", tmp_path / f"logits_{mode}", adapters, plugin=mode == "plugin"
            )
            for name in ("lora", "adaptive") if mode == "plugin" else ("lora",):
                loaded = result[str(tmp_path / name)]
                assert "error" not in loaded, loaded
                assert sorted(loaded["ranks"]) == sorted(set(names) - set(removed))
                assert torch.equal(torch.load(loaded["logits"]), logits), (mode, name)

        # Trainer resume: a fresh adaptive model (all modules at r) loads the checkpoint into the live adapter
        fresh = get_peft_model(tiny_llama(), AdaptiveLoraConfig(r=4, target_modules=TARGETS, min_r=0, signal_steps=2))
        fresh.load_adapter(str(tmp_path / "lora"), adapter_name="default", is_trainable=True)
        assert fresh.base_model.ranks() == tuner.ranks()
        fresh.eval()
        with torch.no_grad():
            assert torch.equal(fresh(ids).logits, logits)
    finally:
        torch.set_num_threads(threads)
