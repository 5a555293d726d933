"""Optimizer slots and state after a resize."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_adaptive.optim import replace_optimizer_params
from peft_adaptive.resize import ResizeKind


def optimizer_with_state(param: nn.Parameter, other: nn.Parameter) -> torch.optim.AdamW:
    opt = torch.optim.AdamW([{"params": [other], "lr": 0.1}, {"params": [param], "lr": 0.01, "weight_decay": 0.5}])
    (param.sum() + other.sum()).backward()
    opt.step()
    return opt


def test_grow_keeps_slot_and_pads_moments():
    old, other = nn.Parameter(torch.randn(2, 3)), nn.Parameter(torch.randn(4))
    opt = optimizer_with_state(old, other)
    before = {k: v.clone() for k, v in opt.state[old].items()}
    new = nn.Parameter(torch.randn(5, 3))
    assert replace_optimizer_params(opt, {old: new}, {old: ResizeKind.GROW}) == 1
    assert opt.param_groups[1]["params"] == [new] and opt.param_groups[1]["lr"] == 0.01
    assert old not in opt.state
    state = opt.state[new]
    assert torch.equal(state["step"], before["step"])
    for key in ("exp_avg", "exp_avg_sq"):
        assert state[key].shape == (5, 3)
        assert torch.equal(state[key][:2], before[key]) and not state[key][2:].any()
    new.grad = torch.ones_like(new)
    opt.step()  # the migrated state is usable


def test_shrink_resets_state():
    old, other = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4))
    opt = optimizer_with_state(old, other)
    new = nn.Parameter(torch.randn(2, 3))
    replace_optimizer_params(opt, {old: new}, {old: ResizeKind.SHRINK})
    assert new not in opt.state and old not in opt.state
    assert other in opt.state


def test_state_that_is_not_per_entry_is_reset_on_grow():
    old, other = nn.Parameter(torch.randn(2, 3)), nn.Parameter(torch.randn(4))
    opt = optimizer_with_state(old, other)
    opt.state[old]["absmax"] = torch.ones(7)  # e.g. a blockwise-quantized state's scale table
    new = nn.Parameter(torch.randn(5, 3))
    replace_optimizer_params(opt, {old: new}, {old: ResizeKind.GROW})
    assert new not in opt.state


def test_partial_optimizer_is_an_error():
    a, b = nn.Parameter(torch.randn(2, 3)), nn.Parameter(torch.randn(2, 3))
    opt = torch.optim.SGD([a], lr=0.1)
    new_a, new_b = nn.Parameter(torch.randn(3, 3)), nn.Parameter(torch.randn(3, 3))
    kinds = {a: ResizeKind.GROW, b: ResizeKind.GROW}
    with pytest.raises(RuntimeError, match="only 1 of 2"):
        replace_optimizer_params(opt, {a: new_a, b: new_b}, kinds)
