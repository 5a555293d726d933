"""Calibration: ranks and A from a few batches' gradients before training (GoRA / LoRA-GA without full gradients)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from peft_adaptive import AdaptiveLoraCallback, AdaptiveLoraConfig, calibrate_adaptive_lora
from peft_adaptive.resize import lora_factors

from .planted import inputs, planted_pair, row_space_fraction
from .tiny_models import TokenDataset, tiny_llama

TARGETS = ["branches.0", "branches.1", "branches.2"]


def mse(model, batch):
    x, teacher = batch
    return torch.nn.functional.mse_loss(model(x), teacher(x))


def calibrated(teacher_batches: int = 4, **config):
    student, teacher, changes = planted_pair()
    config = {
        "r": 2,
        "target_modules": TARGETS,
        "min_r": 0,
        "max_r": 4,
        "score": "gradient_spectrum",
        "growth": "gradient",
        **config,
    }
    model = get_peft_model(student, AdaptiveLoraConfig(**config))
    x = inputs(seed=99)
    with torch.no_grad():
        before = model(x)
    batches = [(inputs(seed=s), teacher) for s in range(teacher_batches)]
    report = calibrate_adaptive_lora(model, batches, loss_fn=mse)
    with torch.no_grad():
        assert torch.equal(model(x), before)  # B stays zero: calibration does not change the output
    return model, teacher, changes, report


def train(model, teacher, steps: int = 150, lr: float = 1e-2) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    for step in range(steps):
        loss = mse(model, (inputs(seed=1000 + step), teacher))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        return float(mse(model, (inputs(count=512, seed=7), teacher)))


def test_calibration_allocates_the_planted_ranks_and_directions():
    model, _, changes, report = calibrated()
    ranks = dict(zip(report.names, report.ranks_after))
    assert ranks == {"branches.0": 0, "branches.1": 4, "branches.2": 2} or (
        ranks["branches.0"] == 0 and ranks["branches.1"] >= 3 and ranks["branches.2"] >= 1
    )
    assert report.step == 0 and model.peft_config["default"].reallocation_step == 0
    layer = model.base_model.adapted_modules()["branches.1"]
    A, B = lora_factors(layer, "default")
    assert not B.any()
    # the first three rows span the gradient's row space, that of the change times the inputs' second moment
    # (a random A has 3/48 of its norm there)
    x = torch.cat([inputs(seed=s) for s in range(4)]).split(48, dim=-1)[1]
    assert row_space_fraction(A[:3].detach(), changes["branches.1"] @ (x.T @ x)) > 0.99


def test_calibrated_adapter_trains_to_a_lower_loss_than_uniform_lora_at_the_same_budget():
    model, teacher, _, _ = calibrated()
    calibrated_loss = train(model, teacher)
    student, teacher, _ = planted_pair()
    uniform = get_peft_model(student, LoraConfig(r=2, target_modules=TARGETS))
    uniform_loss = train(uniform, teacher)
    assert calibrated_loss < 0.5 * uniform_loss, (calibrated_loss, uniform_loss)


def test_uniform_calibration_keeps_the_ranks():
    student, teacher, changes = planted_pair()
    model = get_peft_model(student, AdaptiveLoraConfig(r=2, target_modules=TARGETS, growth="gradient"))
    report = calibrate_adaptive_lora(model, [(inputs(seed=s), teacher) for s in range(4)], loss_fn=mse, allocate=False)
    assert report.ranks_after == [2, 2, 2]
    A = lora_factors(model.base_model.adapted_modules()["branches.1"], "default")[0].detach()
    x = torch.cat([inputs(seed=s) for s in range(4)]).split(48, dim=-1)[1]
    assert row_space_fraction(A, changes["branches.1"] @ (x.T @ x)) > 0.99


def test_calibration_refuses_scores_that_need_training():
    student, teacher, _ = planted_pair()
    model = get_peft_model(student, AdaptiveLoraConfig(r=2, target_modules=TARGETS, score="spectral"))
    with pytest.raises(ValueError, match="score='spectral' needs training steps"):
        calibrate_adaptive_lora(model, [(inputs(), teacher)], loss_fn=mse)


def test_callback_does_not_reallocate_a_calibrated_adapter(tmp_path):
    model = get_peft_model(
        tiny_llama(),
        AdaptiveLoraConfig(
            r=4, target_modules="all-linear", signal_steps=2, score="gradient_spectrum", growth="gradient"
        ),
    )
    data = TokenDataset(n=16, length=12)
    batches = [{"input_ids": data[i]["input_ids"][None], "labels": data[i]["labels"][None]} for i in range(4)]
    report = calibrate_adaptive_lora(model, batches)
    ranks = model.base_model.ranks()
    assert len(set(ranks.values())) > 1 and report.used <= report.budget
    callback = AdaptiveLoraCallback()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to=[], save_strategy="no"
    )
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    assert callback.report is None and callback.reallocation_step == 0
    assert model.base_model.ranks() == ranks
