"""Warmup signals: values, normalisation, skipped fp16 steps, checkpointable state."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model

from peft_adaptive import AdaptiveLoraConfig
from peft_adaptive.resize import lora_parameters
from peft_adaptive.scores.norms import combine_scores
from peft_adaptive.signals import ModuleSignals, SignalCollector

from .tiny_models import adaptive_model, token_batch

#: the signal tests: 5 warmup steps; random lora_B (init_lora_weights=False), so both factors get gradients at once
CONFIG = {"signal_steps": 5, "init_lora_weights": False, "score": "norms"}  # the norms score's signals


def loss_of(model, batch):
    return model(input_ids=batch, labels=batch).loss


def test_gradient_signal_is_the_mean_rms_over_steps():
    model = adaptive_model(**CONFIG)
    collector = model.start_signal_collection()
    layers = model.base_model.adapted_modules()
    expected = {name: 0.0 for name in layers}
    for step in range(3):
        model.zero_grad()
        loss_of(model, token_batch(seed=step)).backward()
        for name, layer in layers.items():
            a, b = layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad
            expected[name] += math.sqrt((a.pow(2).sum() + b.pow(2).sum()).item() / (a.numel() + b.numel())) / 3
        collector.record_gradients()
    signals = collector.signals()
    assert signals.steps == 3
    assert signals.grad_rms == pytest.approx([expected[n] for n in signals.names], rel=1e-5)


def test_delta_signal_equals_the_direct_computation():
    model = adaptive_model(**CONFIG, delta_weight=0.5)
    collector = model.start_signal_collection()
    assert collector.tracks_delta
    layers = model.base_model.adapted_modules()
    before = {n: layer.get_delta_weight("default").detach().clone() for n, layer in layers.items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(2):
        loss_of(model, token_batch(seed=step)).backward()
        optimizer.step()
        optimizer.zero_grad()
    got = dict(zip(collector.names, collector.delta_rms()))
    for name, layer in layers.items():
        delta = layer.get_delta_weight("default") - before[name]
        assert got[name] == pytest.approx((delta.norm() / math.sqrt(delta.numel())).item(), rel=1e-4)
        assert got[name] > 0


def test_signals_are_comparable_across_shapes():
    """Two modules whose factors have the same per-entry statistics get the same signal, whatever their size."""
    torch.manual_seed(0)
    small = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 1024))
    model = get_peft_model(small, AdaptiveLoraConfig(r=4, target_modules=["0", "1"], signal_steps=2))
    collector = model.start_signal_collection()
    for layer in model.base_model.adapted_modules().values():
        for factor in lora_parameters(layer, "default"):
            factor.grad = torch.full_like(factor, 0.5)
    collector.record_gradients()
    g_small, g_large = collector.signals().grad_rms
    assert g_small == pytest.approx(0.5) and g_large == pytest.approx(0.5)


def test_skipped_fp16_steps_add_no_signal():
    """A real GradScaler with a huge initial scale overflows and skips steps; those steps must not count."""
    model = adaptive_model(**CONFIG)
    collector = model.start_signal_collection()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, growth_interval=1000, backoff_factor=2.0**-8)
    skipped = 0
    for step in range(8):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = loss_of(model, token_batch(seed=step))
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # what Trainer does before on_pre_optimizer_step
        collector.record_gradients()
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped += scaler.get_scale() < scale
        optimizer.zero_grad()
    signals = collector.signals()
    assert 1 <= skipped < 8
    assert signals.steps == 8 - skipped
    assert all(math.isfinite(g) and g > 0 for g in signals.grad_rms)


@pytest.mark.parametrize("track_delta", [True, False])
def test_collector_state_round_trip(track_delta):
    model = adaptive_model(**CONFIG)
    collector = model.start_signal_collection(track_delta=track_delta)
    loss_of(model, token_batch()).backward()
    collector.record_gradients()
    restored = SignalCollector(model.base_model.adapted_modules(), "default", track_delta=track_delta)
    restored.load_state_dict(collector.state_dict())
    assert restored.signals() == collector.signals()
    layers = model.base_model.adapted_modules()
    summed = SignalCollector(layers, "default", track_grad_sum=True, track_step_energy=True)
    loss_of(model, token_batch()).backward()
    summed.record_gradients()
    squares = summed.b_grad_square_sum
    # one step: the squared norm of the summed dL/dB is the step's own
    assert squares == pytest.approx([float(t.double().pow(2).sum()) for t in summed.b_grad_sum], rel=1e-5)
    restored = SignalCollector(layers, "default", track_grad_sum=True, track_step_energy=True)
    restored.load_state_dict(summed.state_dict())
    assert restored.b_grad_square_sum == squares
    other = SignalCollector(dict(list(model.base_model.adapted_modules().items())[:3]), "default")
    with pytest.raises(ValueError, match="different set of adapted modules"):
        other.load_state_dict(collector.state_dict())


def test_combine_scores_normalises_each_signal():
    signals = ModuleSignals(names=["a", "b"], grad_rms=[1.0, 3.0], delta_rms=[200.0, 200.0], steps=1)
    assert combine_scores(signals, 1.0, 0.0) == pytest.approx([0.25, 0.75])
    assert combine_scores(signals, 0.0, 1.0) == pytest.approx([0.5, 0.5])
    assert combine_scores(signals, 0.5, 0.5) == pytest.approx([0.375, 0.625])


def test_default_weights_hold_no_snapshot_and_still_reallocate():
    """delta_weight == 0 (the default): no float32 copy of the adapter, no delta in the report."""
    model = adaptive_model(**CONFIG)
    collector = model.start_signal_collection()
    assert not collector.tracks_delta and collector.delta_rms() is None
    assert collector.state_dict()["snapshot"] is None
    loss_of(model, token_batch()).backward()
    model.record_gradients()
    report = model.reallocate()
    assert report.delta_signal is None and "n/a" in report.table()
    assert report.used <= report.budget and sorted(set(report.ranks_after)) != [4]


def test_delta_weight_without_the_delta_signal_is_an_error():
    signals = ModuleSignals(names=["a", "b"], grad_rms=[1.0, 3.0], delta_rms=None, steps=1)
    assert combine_scores(signals, 2.0, 0.0) == pytest.approx([0.5, 1.5])
    with pytest.raises(ValueError, match="delta_weight=0.5 .*track_delta=True"):
        combine_scores(signals, 1.0, 0.5)


def test_reallocate_without_signals_is_an_error():
    model = adaptive_model(**CONFIG)
    with pytest.raises(RuntimeError, match="start_signal_collection"):
        model.reallocate()
    with pytest.raises(RuntimeError, match="start_signal_collection"):
        model.record_gradients()


def test_a_warmup_without_a_finite_step_keeps_the_ranks_and_warns():
    """fp16 overflow on every warmup step: no allocation from garbage; the adapter stays plain LoRA."""
    model = adaptive_model(signal_steps=2, init_lora_weights=False)
    tuner = model.base_model
    before = tuner.ranks()
    tuner.start_signal_collection()
    for _ in range(2):
        model.zero_grad()
        (loss_of(model, token_batch()) * float("inf")).backward()
        tuner.record_gradients()
    with pytest.warns(UserWarning, match="no finite gradient step.*keeping the current ranks"):
        report = tuner.reallocate()
    assert tuner.ranks() == before and report.signal_steps == 0
    assert report.ranks_after == report.ranks_before
