"""The gradient sketch equals Psi times the summed full-weight gradient, however the backward passes are run."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_adaptive import AdaptiveLoraConfig
from peft_adaptive.sketch import gradient_directions, sketch_spectrum

from .tiny_models import tiny_llama, token_batch

TARGETS = ["q_proj", "v_proj", "down_proj"]


def sketched_llama(**config):
    config = {"r": 2, "target_modules": TARGETS, "signal_steps": 3, "growth": "gradient", "lora_dropout": 0.0, **config}
    model = get_peft_model(tiny_llama(), AdaptiveLoraConfig(**config))
    # make the base weights collect their (normally unused) gradients so the test can compare with them
    for layer in model.base_model.adapted_modules().values():
        layer.get_base_layer().weight.requires_grad_(True)
    return model


def full_gradients(model) -> dict[str, torch.Tensor]:
    return {n: layer.get_base_layer().weight.grad.clone() for n, layer in model.base_model.adapted_modules().items()}


def loss(model, seed: int):
    ids = token_batch(batch=3, length=10, seed=seed)
    return model(input_ids=ids, labels=ids).loss


def expected_sketch(collector, gradients: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    psi = dict(zip(collector.sketch.names, collector.sketch._psi))
    return {name: psi[name] @ g for name, g in gradients.items()}


def test_sketch_is_psi_times_the_summed_full_gradient_over_steps_and_micro_batches():
    model = sketched_llama()
    collector = model.start_signal_collection()
    total = None
    for step in range(2):  # 2 optimizer steps of 2 accumulated micro-batches each
        model.zero_grad()
        for micro in range(2):
            (loss(model, 10 * step + micro) / 2).backward()
        model.record_gradients()
        grads = full_gradients(model)
        total = grads if total is None else {n: total[n] + grads[n] for n in grads}
    got = collector.sketch.totals()
    want = expected_sketch(collector, total)
    assert sorted(got) == sorted(want) and len(got) == 2 * len(TARGETS)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7)
    assert collector.sketch.steps == 2


def test_step_energies_are_each_steps_squared_sketch_norm_summed():
    """What consistent_spectrum reads: sum_t |Psi G_t|^2 per layer (micro-batches summed into their step first, a loss
    scale divided out), kept through a checkpoint; a checkpoint from before they were kept loads as zeros."""
    model = sketched_llama()
    collector = model.start_signal_collection()
    want = None
    for step in range(3):
        model.zero_grad()
        for micro in range(2):
            (loss(model, 10 * step + micro) * 512).backward()
        model.record_gradients(scale=1024.0)  # the micro-batch halves are inside the scale
        sketched = expected_sketch(collector, {n: g / 1024 for n, g in full_gradients(model).items()})
        squares = {n: float(v.double().pow(2).sum()) for n, v in sketched.items()}
        want = squares if want is None else {n: want[n] + squares[n] for n in want}
    got = collector.sketch.step_energies()
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-4)
    # the summed sketch's energy is at most T times the per-step sum (Cauchy-Schwarz), equal only if all steps agree
    for name, total in collector.sketch.totals().items():
        assert float(total.double().pow(2).sum()) <= 3 * got[name] * (1 + 1e-6)
    assert collector.sketch.steps == 3
    state = collector.sketch.state_dict()
    restored = sketched_llama().start_signal_collection().sketch
    restored.load_state_dict(state)
    assert restored.step_energies() == pytest.approx(got)
    old_format = {k: v for k, v in state.items() if k != "energy"}
    restored.load_state_dict(old_format)
    assert set(restored.step_energies().values()) == {0.0}


@pytest.mark.parametrize("reentrant", [False, True])
def test_sketch_is_unchanged_by_gradient_checkpointing(reentrant):
    plain = sketched_llama()
    plain.start_signal_collection()
    loss(plain, 0).backward()
    plain.record_gradients()

    checkpointed = sketched_llama()
    checkpointed.base_model.model.gradient_checkpointing_enable({"use_reentrant": reentrant})
    checkpointed.base_model.model.enable_input_require_grads()
    checkpointed.train()
    checkpointed.start_signal_collection()
    loss(checkpointed, 0).backward()
    checkpointed.record_gradients()
    want = plain.base_model._signal_collectors["default"].sketch.totals()
    got = checkpointed.base_model._signal_collectors["default"].sketch.totals()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7)


def test_non_finite_steps_and_loss_scales_are_handled():
    model = sketched_llama()
    collector = model.start_signal_collection()
    (loss(model, 0) * 1024).backward()
    model.record_gradients(scale=1024.0)  # a GradScaler's scaled layer-output gradients
    reference = {n: t.clone() for n, t in collector.sketch.totals().items()}
    model.zero_grad()
    (loss(model, 1) * float("inf")).backward()
    model.record_gradients()  # skipped
    assert collector.sketch.steps == 1
    for name, value in collector.sketch.totals().items():
        assert torch.equal(value, reference[name])
    model.zero_grad()
    plain = sketched_llama()
    plain_collector = plain.start_signal_collection()
    loss(plain, 0).backward()
    plain.record_gradients()
    for name, value in plain_collector.sketch.totals().items():
        torch.testing.assert_close(reference[name], value, rtol=1e-4, atol=1e-7)


def test_hooks_are_removed_after_reallocation():
    model = sketched_llama()
    model.start_signal_collection()
    loss(model, 0).backward()
    model.record_gradients()
    layers = list(model.base_model.adapted_modules().values())
    assert all(layer._forward_hooks for layer in layers)
    model.reallocate()
    assert not any(layer._forward_hooks for layer in model.base_model.adapted_modules().values())


def test_gradient_directions_recover_a_planted_row_space():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(40, 3, generator=g))
    v, _ = torch.linalg.qr(torch.randn(30, 3, generator=g))
    gradient = u @ torch.diag(torch.tensor([5.0, 3.0, 1.0])) @ v.T  # [out 40, in 30], rank 3
    psi = torch.randn(12, 40, generator=g) / 12**0.5
    sketch = psi @ gradient
    spectrum = sketch_spectrum(sketch)
    assert spectrum[:3].tolist() == pytest.approx([5.0, 3.0, 1.0], rel=0.5)
    assert spectrum[3:].abs().max() < 1e-5
    rows = gradient_directions(sketch, 3)
    assert torch.allclose(rows @ rows.T, torch.eye(3), atol=1e-5)
    assert torch.allclose(rows @ v @ v.T, rows, atol=1e-5)  # inside the gradient's row space
    # avoiding the leading direction: what is left is the other two, and only two come back
    rows = gradient_directions(sketch, 3, avoid=v[:, :1].T)
    assert rows.shape[0] == 2 and (rows @ v[:, 0]).abs().max() < 1e-5
