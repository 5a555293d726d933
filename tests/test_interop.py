"""Reallocation next to PEFT features users combine it with: merging, DoRA, accelerate's optimizer wrapper."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from peft import get_peft_model

from peft_adaptive import AdaptiveLoraConfig

from .tiny_models import tiny_llama, token_batch


def warm_up_and_reallocate(model, optimizer, steps: int = 3):
    model.start_signal_collection()
    for step in range(steps):
        batch = token_batch(seed=step)
        model(input_ids=batch, labels=batch).loss.backward()
        model.record_gradients()
        optimizer.step()
        optimizer.zero_grad()
    return model.reallocate(optimizer, step=steps)


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch).logits
    model.train()
    return out


def test_merge_and_unload_after_reallocation():
    model = get_peft_model(tiny_llama(), AdaptiveLoraConfig(r=4, max_r=12, target_modules="all-linear", signal_steps=3))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    report = warm_up_and_reallocate(model, optimizer)
    assert len(set(report.ranks_after)) > 1
    batch = token_batch(seed=9)
    expected = logits(model, batch)
    merged = model.merge_and_unload()
    assert torch.allclose(logits(merged, batch), expected, atol=1e-5)


def test_dora_grow_keeps_outputs_and_trains():
    config = AdaptiveLoraConfig(r=4, max_r=12, target_modules=["q_proj", "v_proj"], signal_steps=3, use_dora=True)
    model = get_peft_model(tiny_llama(), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    warm_up_and_reallocate(model, optimizer)
    ranks = model.base_model.ranks()
    grow_only = {name: ranks[name] + 2 for name in ranks}
    batch = token_batch(seed=9)
    before = logits(model, batch)
    model.resize_adapter(grow_only, optimizer=optimizer)
    assert torch.allclose(logits(model, batch), before, atol=1e-6)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    assert not torch.allclose(logits(model, batch), before)


def test_accelerate_prepared_optimizer():
    accelerator = Accelerator(cpu=True)
    model = get_peft_model(tiny_llama(), AdaptiveLoraConfig(r=4, max_r=12, target_modules="all-linear", signal_steps=3))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    warm_up_and_reallocate(model, optimizer)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}
    batch = token_batch(seed=5)
    losses = []
    for _ in range(5):
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
