"""A plain ``accelerate`` loop with gradient accumulation and the one call ``update_and_allocate``.

The README's example itself runs in ``test_readme.py``; here the same loop must give exactly what a hand loop
that accumulates two micro-batches per optimizer step gives, and a call placed per micro-batch (outside
``if accelerator.sync_gradients:``) is refused.
"""

from __future__ import annotations

import pytest
import torch
from transformers import default_data_collator

from .tiny_models import TokenDataset, adaptive_model

SIGNAL_STEPS = 3
STEPS = 6
ACCUMULATION = 2


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def loader() -> torch.utils.data.DataLoader:
    data = TokenDataset(ACCUMULATION * STEPS * 4, seed=6)
    return torch.utils.data.DataLoader(data, batch_size=4, collate_fn=default_data_collator)


def new_model():
    return adaptive_model(max_r=12, signal_steps=SIGNAL_STEPS, lora_dropout=0.0)


def optimizer_for(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def accelerate_loop(call_per_micro_batch: bool = False):
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=ACCUMULATION)
    model = new_model()
    optimizer = optimizer_for(model)
    model, optimizer, data = accelerator.prepare(model, optimizer, loader())
    tuner = accelerator.unwrap_model(model).base_model
    step, micro, reports = 0, 0, {}
    for batch in data:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            micro += 1
            if call_per_micro_batch:
                reports[micro] = tuner.update_and_allocate(micro, optimizer, wrapper=model)
            elif accelerator.sync_gradients:
                step += 1
                reports[step] = tuner.update_and_allocate(step, optimizer, wrapper=model)
            optimizer.zero_grad()
    return accelerator.unwrap_model(model), reports


def hand_loop():
    model = new_model()
    optimizer = optimizer_for(model)
    batches = list(loader())
    for step in range(1, STEPS + 1):
        for batch in batches[(step - 1) * ACCUMULATION : step * ACCUMULATION]:
            (model(**batch).loss / ACCUMULATION).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        model.base_model.update_and_allocate(step, optimizer)
        optimizer.zero_grad()
    return model


def test_accelerate_loop_with_accumulation_is_the_hand_loop():
    model, reports = accelerate_loop()
    assert [s for s, r in reports.items() if r is not None] == [SIGNAL_STEPS] and len(reports) == STEPS
    assert reports[SIGNAL_STEPS].signal_steps == SIGNAL_STEPS  # one record per optimizer step
    reference = hand_loop()
    assert model.base_model.ranks() == reference.base_model.ranks()
    assert len(set(model.base_model.ranks().values())) > 1
    got = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expected = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[n], expected[n]) for n in got)


def test_a_call_on_a_micro_batch_without_an_optimizer_step_is_refused():
    """Outside ``if accelerator.sync_gradients:`` the call would read half-accumulated gradients as a step."""
    with pytest.raises(RuntimeError, match=r"inside `if accelerator.sync_gradients:`"):
        accelerate_loop(call_per_micro_batch=True)
