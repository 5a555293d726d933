"""Devices and dtypes of everything the plugin creates, on a bf16 base model (CPU).

``benchmarks/gpu_check.py`` repeats these checks on a GPU; here they run on the CPU, where a dtype mistake shows
the same way (a bf16 factor, an optimizer state of the wrong dtype, linear algebra handed bf16).
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch.overrides import TorchFunctionMode

from peft_adaptive import AdaptiveLoraConfig

from .tiny_models import TINY_MODELS, tiny_llama, token_batch

TARGETS = TINY_MODELS["llama"][1]


class LinalgCalls(TorchFunctionMode):
    """Records the dtype and device of every ``torch.linalg`` call's tensor arguments."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, torch.dtype, torch.device]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name.startswith("linalg_"):
            for value in [*args, *(kwargs or {}).values()]:
                if isinstance(value, torch.Tensor):
                    self.calls.append((name, value.dtype, value.device))
        return func(*args, **(kwargs or {}))


def bf16_model(autocast_adapter_dtype: bool, seed: int = 0, **config):
    base = tiny_llama(seed=seed).to(torch.bfloat16)
    config = AdaptiveLoraConfig(r=4, target_modules=TARGETS, signal_steps=2, **config)
    return get_peft_model(base, config, autocast_adapter_dtype=autocast_adapter_dtype)


def collector_tensors(collector) -> dict[str, torch.Tensor]:
    """Every tensor a signal collector holds, by a readable name."""
    tensors = {"grad_sum": collector._grad_sum, "steps": collector._steps, "numel": collector._numel}
    for i, t in enumerate(collector._b_grad_sum or []):
        tensors[f"b_grad_sum.{i}"] = t
    if collector.sketch is not None:
        for kind in ("_psi", "_total", "_step"):
            for i, t in enumerate(getattr(collector.sketch, kind)):
                tensors[f"sketch{kind}.{i}"] = t
    return tensors


@pytest.mark.parametrize("growth", ["random", "gradient"])
@pytest.mark.parametrize(
    "autocast_adapter_dtype, adapter_dtype",
    [(True, torch.float32), (False, torch.bfloat16)],
    ids=["float32-adapters", "bf16-adapters"],
)
def test_bf16_base_keeps_every_dtype(autocast_adapter_dtype, adapter_dtype, growth):
    model = bf16_model(autocast_adapter_dtype, growth=growth, optimizer_state="migrate")  # migrated state is checked
    tuner = model.base_model
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {adapter_dtype}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    collector = tuner.start_signal_collection()
    linalg = LinalgCalls()
    report = None
    for step in (1, 2):
        ids = token_batch(seed=step)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        if step == 2:
            held = collector_tensors(collector)
            assert held and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in held.values()), {
                n: t.dtype for n, t in held.items()
            }
            with linalg:
                report = tuner.update_and_allocate(step, optimizer)
        else:
            tuner.update_and_allocate(step, optimizer)
        optimizer.zero_grad()
    assert report is not None and len(set(report.ranks_after)) > 1
    # the scores' and the resize's linear algebra ran in float32/float64, never in the adapters' bf16
    assert linalg.calls and {dtype for _, dtype, _ in linalg.calls} <= {torch.float32, torch.float64}
    # new factors keep the adapters' dtype; every optimizer state is its parameter's dtype and shape
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in trainable} == {adapter_dtype}
    layers = tuner.adapted_modules()
    grown = [layers[n].lora_A["default"].weight for n, r in tuner.ranks().items() if r > 4]
    assert grown and all(p in optimizer.state for p in grown), "a grown factor keeps its optimizer state"
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if value.dim():
                assert (value.dtype, value.shape, value.device) == (param.dtype, param.shape, param.device), key
    ids = token_batch(seed=3)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)


def test_a_step_inside_autocast_sketches_in_float32():
    """Backward and ``update_and_allocate`` run inside ``torch.autocast``, as some hand-written loops do: the
    gradient sketch's hook then runs under autocast too, and must still accumulate in float32 (it used to fail
    with "mat1 and mat2 must have the same dtype")."""
    sketches, reports = [], []
    for backward_inside in (False, True):
        model = bf16_model(True, seed=1, growth="gradient")
        tuner = model.base_model
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        collector = tuner.start_signal_collection()
        for step in (1, 2):
            ids = token_batch(seed=step)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
                if backward_inside:
                    loss.backward()
                    optimizer.step()
            if not backward_inside:
                loss.backward()
                optimizer.step()
            if step == 2:
                sketches.append({n: t.clone() for n, t in collector.sketch.totals().items()})
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=backward_inside):
                report = tuner.update_and_allocate(step, optimizer)
            optimizer.zero_grad()
        reports.append(report)
    plain, inside = sketches
    assert all(t.dtype == torch.float32 for t in inside.values())
    for name in plain:
        assert torch.equal(inside[name], plain[name]), name
    assert reports[0].ranks_after == reports[1].ranks_after
