"""In-place resizing of LoRA factors: grow keeps the update bit-identical, shrink meets Eckart-Young."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import peft_adaptive  # noqa: F401  (registers ADAPTIVE_LORA)
from peft_adaptive import AdaptiveLoraConfig, resize_factors, resize_lora_layer
from peft_adaptive.resize import ResizeKind, eckart_young_error, lora_factors, lora_parameters

ADAPTER = "default"


class Wrapper(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


# name -> (base layer factory, input factory)
KINDS = {
    "linear": (lambda: nn.Linear(12, 10), lambda g: torch.randn(5, 12, generator=g)),
    "conv1d_gpt2": (lambda: Conv1D(10, 12), lambda g: torch.randn(2, 5, 12, generator=g)),  # Conv1D(nf=out, nx=in)
    "embedding": (lambda: nn.Embedding(20, 10), lambda g: torch.randint(0, 20, (4, 7), generator=g)),
    "conv2d": (lambda: nn.Conv2d(3, 6, 3, padding=1), lambda g: torch.randn(2, 3, 6, 6, generator=g)),
}


def make_layer(kind: str, r: int = 6, seed: int = 0, adaptive: bool = False, **config_kwargs):
    """A tiny PEFT model with one LoRA layer of the given kind; returns (model, lora layer, input)."""
    torch.manual_seed(seed)
    base_factory, input_factory = KINDS[kind]
    config_kwargs.setdefault("init_lora_weights", False)  # non-zero B, so there is something to preserve
    config_kwargs.setdefault("lora_alpha", 16)
    if kind == "conv1d_gpt2":
        config_kwargs.setdefault("fan_in_fan_out", True)
    config_cls = AdaptiveLoraConfig if adaptive else LoraConfig
    model = get_peft_model(Wrapper(base_factory()), config_cls(r=r, target_modules=["layer"], **config_kwargs))
    layer = model.base_model.model.layer
    x = input_factory(torch.Generator().manual_seed(seed + 1))
    return model, layer, x


def factors64(layer) -> tuple[torch.Tensor, torch.Tensor]:
    A, B = lora_factors(layer, ADAPTER)
    return A.detach().double().clone(), B.detach().double().clone()


def delta64(layer) -> torch.Tensor:
    A, B = factors64(layer)
    return layer.scaling[ADAPTER] * (B @ A)


def peft_scaling(alpha: float, r: int, rslora: bool) -> float:
    """What PEFT's ``update_layer`` computes (and so what a reload from rank/alpha_pattern gives)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


# --- grow -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adaptive", [False, True], ids=["LoraConfig", "AdaptiveLoraConfig"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_grow_keeps_factors_and_output(kind, adaptive):
    model, layer, x = make_layer(kind, r=6, adaptive=adaptive)
    model.eval()
    A0, B0 = lora_factors(layer, ADAPTER)
    A0, B0 = A0.detach().clone(), B0.detach().clone()
    with torch.no_grad():
        out0 = model(x)
    scaling0 = layer.scaling[ADAPTER]

    kind_done, swaps = resize_lora_layer(layer, ADAPTER, 10, torch.Generator().manual_seed(0))

    assert kind_done is ResizeKind.GROW
    assert layer.r[ADAPTER] == 10
    A1, B1 = lora_factors(layer, ADAPTER)
    assert A1.shape == (10, A0.shape[1]) and B1.shape == (B0.shape[0], 10)
    # old factors verbatim, new B columns exactly zero: B @ A is bit-identical
    assert torch.equal(A1[:6], A0)
    assert torch.equal(B1[:, :6], B0)
    assert torch.count_nonzero(B1[:, 6:]) == 0
    assert torch.count_nonzero(A1[6:]) == A1[6:].numel()  # new A rows are random, not zero
    assert torch.equal((B1.double() @ A1.double()), (B0.double() @ A0.double()))
    assert layer.scaling[ADAPTER] == scaling0
    # the old -> new parameter map covers both factors and the model really holds the new ones
    assert len(swaps) == 2
    held = {id(p) for p in model.parameters()}
    assert all(id(new) in held and id(old) not in held for old, new in swaps.items())
    assert all(new.requires_grad for new in swaps.values())
    with torch.no_grad():
        out1 = model(x)
    # fp32 re-association in the wider matmul only (embedding outputs are O(10), hence relative)
    diff = (out1 - out0).abs().max().item()
    assert diff <= 1e-6 * max(1.0, out0.abs().max().item()), diff


@pytest.mark.parametrize("kind", list(KINDS))
def test_grow_new_directions_train(kind):
    model, layer, x = make_layer(kind, r=4)
    resize_lora_layer(layer, ADAPTER, 7, torch.Generator().manual_seed(0))
    target = torch.randn_like(model(x).detach())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)

    def grads():
        optimizer.zero_grad()
        (model(x) - target).pow(2).mean().backward()
        param_A, param_B = lora_parameters(layer, ADAPTER)
        return param_A.grad.reshape(param_A.shape[0], -1), param_B.grad.reshape(param_B.shape[0], -1)

    _, grad_B = grads()
    # B's new (zero) columns get gradient through A's new (random) rows
    assert grad_B[:, 4:].norm() > 1e-6
    optimizer.step()
    grad_A, grad_B = grads()
    # after one step the new B columns are non-zero, so A's new rows get gradient too
    assert grad_A[4:].norm() > 1e-6
    assert grad_B[:, 4:].norm() > 1e-6


# --- shrink -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("new_r", [1, 3, 5])
def test_shrink_meets_eckart_young(kind, new_r):
    model, layer, x = make_layer(kind, r=6)
    A0, B0 = factors64(layer)
    before = delta64(layer)
    bound = eckart_young_error(A0, B0, new_r) * layer.scaling[ADAPTER]
    assert bound > 0

    kind_done, _ = resize_lora_layer(layer, ADAPTER, new_r)

    assert kind_done is ResizeKind.SHRINK
    assert layer.r[ADAPTER] == new_r
    A1, B1 = factors64(layer)
    assert A1.shape == (new_r, A0.shape[1]) and B1.shape == (B0.shape[0], new_r)
    error = (delta64(layer) - before).norm().item()
    rel_error, rel_bound = error / before.norm().item(), bound / before.norm().item()
    assert abs(rel_error - rel_bound) <= 1e-6 * rel_bound, (rel_error, rel_bound)
    # the layer is coherent at the new rank: PEFT's merge (get_delta_weight) agrees with its forward
    model.eval()
    with torch.no_grad():
        out = model(x)
        layer.merge()
        merged = model(x)
        layer.unmerge()
    assert (merged - out).abs().max() <= 1e-5 * max(1.0, out.abs().max().item())


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("new_r", [2, 3])
def test_shrink_to_at_least_true_rank_is_exact(kind, new_r):
    model, layer, x = make_layer(kind, r=6)
    A, B = lora_factors(layer, ADAPTER)
    with torch.no_grad():  # make B @ A rank 2
        B.copy_(torch.randn(B.shape[0], 2) @ torch.randn(2, 6))
    singular = torch.linalg.svdvals(B.detach().double() @ A.detach().double())
    assert singular[2] < 1e-6 * singular[0]  # rank 2 up to fp32 rounding
    model.eval()
    before = delta64(layer)
    with torch.no_grad():
        out0 = model(x)

    resize_lora_layer(layer, ADAPTER, new_r)

    rel = ((delta64(layer) - before).norm() / before.norm()).item()
    assert rel < 1e-6, rel
    with torch.no_grad():
        diff = (model(x) - out0).abs().max().item()
    assert diff < 1e-5, diff


@pytest.mark.parametrize("kind", list(KINDS))
def test_untrained_adapter_still_trains_after_shrink(kind):
    # PEFT's default init: B = 0 (Linear/Conv) or A = 0 (Embedding), so B @ A = 0
    model, layer, x = make_layer(kind, r=8, init_lora_weights=True)
    assert delta64(layer).abs().max() == 0
    resize_lora_layer(layer, ADAPTER, 3)
    A, B = lora_factors(layer, ADAPTER)
    assert A.shape[0] == 3 and B.shape[1] == 3
    assert torch.count_nonzero(A) > 0  # a symmetric sqrt(S) split would have made A zero as well
    assert torch.linalg.matrix_rank(A.detach().double()).item() == 3
    assert delta64(layer).abs().max() == 0  # the (zero) update is kept

    target = torch.randn_like(model(x).detach())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = (model(x) - target).pow(2).mean()
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    assert delta64(layer).abs().max() > 0
    assert losses[-1] < losses[0]


def test_shrink_below_fan_out_of_a_narrow_layer():
    # a 2-label classifier head: rank(B A) <= 2 < new_r < r; the factors must stay consistent
    torch.manual_seed(0)
    model = get_peft_model(
        Wrapper(nn.Linear(12, 2)), LoraConfig(r=8, target_modules=["layer"], init_lora_weights=False)
    )
    layer = model.base_model.model.layer
    before = delta64(layer)
    resize_lora_layer(layer, ADAPTER, 4)
    A, B = lora_factors(layer, ADAPTER)
    assert A.shape == (4, 12) and B.shape == (2, 4)
    assert ((delta64(layer) - before).norm() / before.norm()).item() < 1e-6
    model(torch.randn(3, 12)).sum().backward()  # forward/backward work with the new shapes


# --- scaling / alpha ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "embedding", "conv2d"])
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize(("alpha", "r"), [(16, 6), (8, 8), (16, 3)])
def test_scaling_is_kept_and_consistent_with_alpha(kind, rslora, alpha, r):
    _, layer, _ = make_layer(kind, r=r, lora_alpha=alpha, use_rslora=rslora)
    scaling0 = layer.scaling[ADAPTER]
    assert scaling0 == peft_scaling(alpha, r, rslora)
    for new_r in [1, 2, 4, 7, 12, 25, 35, 49, 50, 64, 5, r]:
        resize_lora_layer(layer, ADAPTER, new_r)
        assert layer.r[ADAPTER] == new_r
        scaling = layer.scaling[ADAPTER]
        # the update's scale does not change (up to a last-bit rounding of alpha * r / r) ...
        assert math.isclose(scaling, scaling0, rel_tol=4e-16 * 12), (scaling, scaling0)
        # ... and lora_alpha/r (or alpha/sqrt(r)) gives exactly the scaling in use, which is what a reload
        # from rank_pattern/alpha_pattern computes: otherwise reloaded logits would differ in the last bits
        assert peft_scaling(layer.lora_alpha[ADAPTER], new_r, rslora) == scaling, (new_r, scaling)
        assert math.isclose(layer.lora_alpha[ADAPTER], scaling0 * (math.sqrt(new_r) if rslora else new_r))


def test_module_metadata_follows_the_new_rank():
    _, layer, _ = make_layer("linear", r=6)
    resize_lora_layer(layer, ADAPTER, 9)
    assert layer.lora_A[ADAPTER].out_features == 9 and layer.lora_B[ADAPTER].in_features == 9
    _, conv, _ = make_layer("conv2d", r=6)
    resize_lora_layer(conv, ADAPTER, 2)
    assert conv.lora_A[ADAPTER].out_channels == 2 and conv.lora_B[ADAPTER].in_channels == 2
    assert conv.lora_A[ADAPTER].weight.shape == (2, 3, 3, 3) and conv.lora_B[ADAPTER].weight.shape == (6, 2, 1, 1)


def test_same_rank_is_a_no_op():
    _, layer, _ = make_layer("linear", r=6)
    A = layer.lora_A[ADAPTER].weight
    kind, swaps = resize_lora_layer(layer, ADAPTER, 6)
    assert kind is ResizeKind.UNCHANGED and swaps == {}
    assert layer.lora_A[ADAPTER].weight is A


# --- unsupported layers and bad arguments ---------------------------------------------------------


def test_grouped_conv_is_refused():
    torch.manual_seed(0)
    model = get_peft_model(Wrapper(nn.Conv2d(4, 8, 3, groups=2)), LoraConfig(r=4, target_modules=["layer"]))
    with pytest.raises(TypeError, match="grouped convolution"):
        resize_lora_layer(model.base_model.model.layer, ADAPTER, 2)
    with pytest.raises(TypeError, match="grouped convolution"):
        get_peft_model(Wrapper(nn.Conv2d(4, 8, 3, groups=2)), AdaptiveLoraConfig(r=4, target_modules=["layer"]))


def test_merged_layer_is_refused():
    _, layer, _ = make_layer("linear", r=6)
    layer.merge()
    with pytest.raises(RuntimeError, match="merged"):
        resize_lora_layer(layer, ADAPTER, 3)
    layer.unmerge()
    assert resize_lora_layer(layer, ADAPTER, 3)[0] is ResizeKind.SHRINK


def test_parameter_wrapper_is_refused():
    model = get_peft_model(Wrapper(nn.Linear(6, 5)), LoraConfig(r=4, target_parameters=["layer.weight"]))
    with pytest.raises(TypeError, match="cannot resize LoRA layer of type ParamWrapper"):
        resize_lora_layer(model.base_model.model.layer, ADAPTER, 2)
    with pytest.raises(ValueError, match="target_parameters"):
        AdaptiveLoraConfig(r=4, target_parameters=["layer.weight"])


def test_unknown_adapter_and_bad_rank():
    _, layer, _ = make_layer("linear", r=6)
    with pytest.raises(KeyError, match="nope"):
        resize_lora_layer(layer, "nope", 3)
    with pytest.raises(ValueError, match="new_r"):
        resize_lora_layer(layer, ADAPTER, 0)
    with pytest.raises(ValueError, match="inner ranks"):
        resize_factors(torch.randn(3, 5), torch.randn(4, 2), 2)


# --- resize_factors on plain matrices (property-based) -------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 7),  # r
    st.integers(1, 7),  # fan_in
    st.integers(1, 7),  # fan_out
    st.integers(1, 9),  # new_r
    st.integers(0, 7),  # true rank cap of B
    st.integers(0, 2**31 - 1),
)
def test_resize_factors_properties(r, fan_in, fan_out, new_r, rank_cap, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, fan_in, generator=g, dtype=torch.float64)
    B = torch.randn(fan_out, r, generator=g, dtype=torch.float64)
    if rank_cap < r:  # B A of rank <= rank_cap (possibly 0)
        B = B[:, :rank_cap] @ torch.randn(rank_cap, r, generator=g, dtype=torch.float64)
    out = resize_factors(A, B, new_r, generator=torch.Generator().manual_seed(1))
    assert out.A.shape == (new_r, fan_in) and out.B.shape == (fan_out, new_r)
    assert out.A.dtype == A.dtype and out.B.dtype == B.dtype
    assert torch.isfinite(out.A).all() and torch.isfinite(out.B).all()
    before = B @ A
    error = (out.B @ out.A - before).norm().item()
    bound = eckart_young_error(A, B, new_r)
    scale = max(before.norm().item(), 1.0)
    assert abs(error - bound) <= 1e-9 * scale, (error, bound)
    if new_r > r:
        assert out.kind is ResizeKind.GROW
        assert torch.equal(out.A[:r], A) and torch.equal(out.B[:, :r], B)
        assert torch.count_nonzero(out.B[:, r:]) == 0
    elif new_r < r:
        assert out.kind is ResizeKind.SHRINK
    # A never ends up all-zero: every kept direction can still receive gradient
    assert torch.linalg.matrix_rank(out.A).item() == min(new_r, fan_in)


def test_resize_factors_float32_shrink_matches_bound():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(12, 40, generator=g)
    B = torch.randn(30, 12, generator=g)
    out = resize_factors(A, B, 5)
    before = B.double() @ A.double()
    rel = ((out.B.double() @ out.A.double() - before).norm() / before.norm()).item()
    bound = eckart_young_error(A, B, 5) / before.norm().item()
    assert 0.1 < bound < 1
    assert abs(rel - bound) <= 1e-6 * bound, (rel, bound)
    # A keeps the RMS of the old rows (so learning dynamics of A are unchanged in scale)
    assert math.isclose(out.A.pow(2).mean().sqrt().item(), A.pow(2).mean().sqrt().item(), rel_tol=1e-5)
