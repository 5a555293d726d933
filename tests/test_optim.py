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
        assert torch.equal(state[key][:2], before[key])
    assert not state["exp_avg"][2:].any()
    # second moments of the new rows: the old rows' mean, column by column (the grown dimension is 0)
    assert torch.allclose(state["exp_avg_sq"][2:], before["exp_avg_sq"].mean(dim=0).expand(3, 3))
    new.grad = torch.ones_like(new)
    opt.step()  # the migrated state is usable


def test_shrink_resets_state():
    old, other = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4))
    opt = optimizer_with_state(old, other)
    new = nn.Parameter(torch.randn(2, 3))
    replace_optimizer_params(opt, {old: new}, {old: ResizeKind.SHRINK})
    assert new not in opt.state and old not in opt.state
    assert other in opt.state


def test_reset_rule_drops_a_grown_parameters_state():
    """``optimizer_state="reset"``: a grown parameter restarts like a fresh one (no moments, no step)."""
    old, other = nn.Parameter(torch.randn(2, 3)), nn.Parameter(torch.randn(4))
    opt = optimizer_with_state(old, other)
    new = nn.Parameter(torch.randn(5, 3))
    assert replace_optimizer_params(opt, {old: new}, {old: ResizeKind.GROW}, migrate=False) == 1
    assert opt.param_groups[1]["params"] == [new]
    assert new not in opt.state and old not in opt.state
    assert other in opt.state  # parameters that were not resized keep theirs
    new.grad = torch.ones_like(new)
    opt.step()
    assert float(opt.state[new]["step"]) == 1


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


def _adam_update_sizes(zero_second_moment: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Train a ``[256, 4]`` factor with AdamW on stationary noisy gradients for 1000 steps, grow it to rank 8,
    continue for 300 steps; return the mean |update| / lr of the old and of the new columns, per 10 steps."""
    g = torch.Generator().manual_seed(seed)
    lr = 1e-3
    old = nn.Parameter(torch.zeros(256, 4))
    opt = torch.optim.AdamW([old], lr=lr, weight_decay=0.0)

    def gradient(shape):  # the same distribution for every entry: mean 0.1, std 1
        return 0.1 + torch.randn(shape, generator=g)

    for _ in range(1000):
        old.grad = gradient(old.shape)
        opt.step()
    new = nn.Parameter(torch.cat([old.detach(), torch.zeros(256, 4)], dim=1))
    replace_optimizer_params(opt, {old: new}, {old: ResizeKind.GROW})
    if zero_second_moment:  # the previous rule: fresh moments at zero under the shared, long-run step
        opt.state[new]["exp_avg_sq"][:, 4:] = 0
    old_sizes, new_sizes = [], []
    for _ in range(300):
        before = new.detach().clone()
        new.grad = gradient(new.shape)
        opt.step()
        step = (new.detach() - before).abs() / lr
        old_sizes.append(step[:, :4].mean())
        new_sizes.append(step[:, 4:].mean())
    return torch.stack(old_sizes).view(30, 10).mean(1), torch.stack(new_sizes).view(30, 10).mean(1)


def test_grown_entries_take_normal_adam_steps():
    """With the state's step at 1000, a grown entry moves like the entries that trained all along under the same
    gradient statistics: never more (10-step means), and the same once its first moment has filled."""
    old_sizes, new_sizes = _adam_update_sizes(zero_second_moment=False)
    ratio = new_sizes / old_sizes
    assert ratio.max() < 1.15, ratio
    assert ratio[1:].min() > 0.85, ratio
    assert ratio[1:].mean() == pytest.approx(1.0, abs=0.05)


def test_zero_second_moments_would_overshoot():
    """The control: zero-initialised second moments under a long-run step move grown entries several times too far
    (the rule before: about 9x in the first 10 steps, still 1.7x after 300)."""
    old_sizes, new_sizes = _adam_update_sizes(zero_second_moment=True)
    ratio = new_sizes / old_sizes
    assert ratio[0] > 5.0
    assert ratio[-5:].mean() > 1.5
