"""Resize LoRA factors in place while keeping what they learned.

The maths works on plain matrices: ``A`` is ``[r, fan_in]`` and ``B`` is ``[fan_out, r]`` so that the
learned update is ``B @ A`` (times the layer's scaling). :func:`resize_factors` is pure;
:func:`resize_lora_layer` applies it to a PEFT ``LoraLayer`` (Linear incl. ``fan_in_fan_out``
Conv1D, Embedding, Conv1d/2d/3d with ``groups == 1``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from enum import Enum

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora import layer as lora_layers
from torch import nn


class ResizeKind(str, Enum):
    """How the factors changed; decides what happens to the optimizer state."""

    UNCHANGED = "unchanged"
    GROW = "grow"  # old factors kept verbatim, new rows/columns appended
    SHRINK = "shrink"  # factors rotated into the truncated-SVD basis
    REINIT = "reinit"  # factors replaced by a fresh initialisation (before training)


@dataclass
class FactorResize:
    A: torch.Tensor
    B: torch.Tensor
    kind: ResizeKind


def resize_factors(
    A: torch.Tensor,
    B: torch.Tensor,
    new_r: int,
    generator: torch.Generator | None = None,
    directions: torch.Tensor | None = None,
) -> FactorResize:
    """Return factors of rank ``new_r`` that keep the learned update ``B @ A``.

    * Grow: ``B`` gets zero columns and ``A`` gets new rows of the same RMS as the existing rows, so
      ``B @ A`` is bit-identical and the new directions still receive gradient (zero rows in ``A`` *and*
      zero columns in ``B`` would never train). The new rows are ``directions`` (orthonormal rows, e.g. the
      gradient's leading input directions from :func:`peft_adaptive.sketch.gradient_directions`) as far as
      they go, then random.
    * Shrink: the best rank-``new_r`` approximation of ``B @ A`` (Eckart-Young), from a QR of each factor
      and an ``r x r`` SVD, never forming the ``fan_out x fan_in`` matrix. ``A`` gets orthonormal rows
      scaled to the old row RMS and ``B`` carries the singular values: a symmetric ``sqrt(S)`` split would
      make ``A`` zero whenever ``B`` is zero (an untrained adapter) and the layer could never train again.
    """
    r = A.shape[0]
    if B.shape[1] != r:
        raise ValueError(f"A is {tuple(A.shape)} and B is {tuple(B.shape)}: inner ranks differ")
    if new_r < 1:
        raise ValueError(f"new_r must be >= 1, got {new_r}")
    if new_r == r:
        return FactorResize(A, B, ResizeKind.UNCHANGED)
    row_scale = A.float().pow(2).mean().sqrt()
    if not row_scale > 0:
        row_scale = torch.tensor(1.0 / math.sqrt(A.shape[1]), device=A.device)
    if new_r > r:
        new_A, new_B = _append_directions(A, B, new_r, row_scale, generator, directions)
        return FactorResize(new_A, new_B, ResizeKind.GROW)

    work = torch.float64 if A.device.type == "cpu" else torch.float32
    with autocast_disabled(A.device):  # under a caller's autocast the float32 products would run in bf16/fp16
        q_b, r_b = torch.linalg.qr(B.to(work))  # B = Qb Rb
        q_a, r_a = torch.linalg.qr(A.to(work).T)  # A^T = Qa Ra
        u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # B A = Qb (U S Vh) Qa^T
        # B A has at most min(fan_out, fan_in, r) singular values; a narrow layer (e.g. a 2-label head) can
        # have fewer than new_r, and the missing directions are then appended as in a grow.
        keep = min(new_r, s.shape[0])
        new_A = (vh[:keep] @ q_a.T) * row_scale.to(work) * math.sqrt(A.shape[1])
        new_B = (q_b @ u[:, :keep]) * s[:keep] / (row_scale.to(work) * math.sqrt(A.shape[1]))
    new_A, new_B = _append_directions(new_A.to(A.dtype), new_B.to(B.dtype), new_r, row_scale, generator)
    return FactorResize(new_A, new_B, ResizeKind.SHRINK)


def _append_directions(
    A: torch.Tensor,
    B: torch.Tensor,
    new_r: int,
    row_scale: torch.Tensor,
    generator: torch.Generator | None,
    directions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to rank ``new_r`` with rows of RMS ``row_scale`` in ``A`` (given directions first, then random)
    and zero columns in ``B``."""
    missing = new_r - A.shape[0]
    if missing <= 0:
        return A, B
    rows = []
    if directions is not None and directions.numel():
        given = directions[:missing].detach().to(device=A.device, dtype=torch.float32)
        # unit rows -> the RMS of an entry is row_scale, like the random rows and the existing ones
        given = given / given.norm(dim=1, keepdim=True).clamp_min(1e-30) * math.sqrt(A.shape[1])
        rows.append(given)
    random_count = missing - sum(r.shape[0] for r in rows)
    if random_count:
        # drawn on the CPU (the generator's device), so a seed gives the same rows on every device and process
        drawn = torch.randn(random_count, A.shape[1], generator=generator, device="cpu", dtype=torch.float32)
        rows.append(drawn.to(A.device))
    extra = (torch.cat(rows) * row_scale.to(A.device)).to(A.dtype)
    return torch.cat([A, extra], dim=0), torch.cat([B, B.new_zeros(B.shape[0], missing)], dim=1)


def autocast_disabled(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off for ``device``'s type: this package's maths chooses its own dtypes (float32/float64), and a
    caller's autocast (a training step, backward included, inside ``torch.autocast``) would run its products in
    bf16/fp16, or hand bf16 to linear algebra that has no bf16 kernels."""
    if device.type not in ("cpu", "cuda", "xpu", "hpu", "mps"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def eckart_young_error(A: torch.Tensor, B: torch.Tensor, new_r: int) -> float:
    """Frobenius norm of the part of ``B @ A`` that rank ``new_r`` cannot keep."""
    s = torch.linalg.svdvals(B.double() @ A.double())
    return float(s[new_r:].pow(2).sum().sqrt())


# --- LoRA layers -----------------------------------------------------------------------------------


def lora_factors(layer: LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's ``(A, B)`` as 2-D matrices ``[r, fan_in]`` and ``[fan_out, r]`` (views, no copy)."""
    _check_supported(layer, adapter)
    if isinstance(layer, lora_layers.Embedding):
        # forward is x -> embedding(x, A.T) @ B.T, i.e. delta weight (B @ A).T of shape [vocab, dim]
        return layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    weight_A = layer.lora_A[adapter].weight
    weight_B = layer.lora_B[adapter].weight
    return weight_A.reshape(weight_A.shape[0], -1), weight_B.reshape(weight_B.shape[0], -1)


def lora_parameters(layer: LoraLayer, adapter: str) -> tuple[nn.Parameter, nn.Parameter]:
    """The adapter's ``(A, B)`` parameter objects, in their layer shapes."""
    _check_supported(layer, adapter)
    if isinstance(layer, lora_layers.Embedding):
        return layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight


def layer_adapter_parameters(layer: LoraLayer, adapter_name: str) -> list[torch.nn.Parameter]:
    """Every parameter this adapter owns in the layer (factors, LoRA bias, DoRA magnitude...)."""
    params = []
    for attr in layer.adapter_layer_names:
        container = getattr(layer, attr)
        if adapter_name in container:
            item = container[adapter_name]
            params.extend([item] if isinstance(item, torch.nn.Parameter) else item.parameters())
    return params


def cost_per_rank(layer: LoraLayer, adapter: str) -> int:
    """Trainable parameters that one rank costs in this layer (``fan_in + fan_out``)."""
    A, B = lora_factors(layer, adapter)
    return A.shape[1] + B.shape[0]


def resize_lora_layer(
    layer: LoraLayer,
    adapter: str,
    new_r: int,
    generator: torch.Generator | None = None,
    directions: torch.Tensor | None = None,
) -> tuple[ResizeKind, dict[nn.Parameter, nn.Parameter]]:
    """Resize one adapter of one LoRA layer to rank ``new_r``, keeping its learned update and scaling.

    ``lora_alpha`` is rescaled so that ``scaling`` (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA) is
    unchanged (up to the last bit, see below): the output stays the same without rescaling ``B``, and
    every direction keeps the learning rate it trained with. ``directions`` are the input directions a
    grow gives to the new rows of ``A`` (see :func:`resize_factors`). Returns the kind of resize and a map
    ``old parameter -> new parameter`` for the optimizer.
    """
    from .variants import resize_handler  # variant-specific resizes (KaSA, MonteCLoRA, MiCA)

    handler = resize_handler(layer, adapter)
    if handler is not None:
        _check_supported(layer, adapter)
        return handler(layer, adapter, new_r, generator, directions)
    return _resize_generic(layer, adapter, new_r, generator, directions)


def _resize_generic(layer, adapter, new_r, generator=None, directions=None):
    A, B = lora_factors(layer, adapter)
    with torch.no_grad():
        result = resize_factors(A.detach(), B.detach(), new_r, generator, directions)
    return result.kind, _apply_resize(layer, adapter, result)


def initialise_lora_layer(
    layer: LoraLayer,
    adapter: str,
    new_r: int,
    generator: torch.Generator | None = None,
    directions: torch.Tensor | None = None,
) -> tuple[ResizeKind, dict[nn.Parameter, nn.Parameter]]:
    """Give an untrained adapter (``B == 0``) rank ``new_r`` and a fresh ``A``: ``directions`` first, then random.

    The rows keep the RMS of the current ``A`` (PEFT's initialisation) and ``B`` stays zero, so the model's
    output is unchanged and the first optimizer step moves ``B`` along ``G A^T``: with ``A`` the gradient's
    leading input directions that is the largest first step a rank-``new_r`` adapter can take.
    Scaling is kept as in :func:`resize_lora_layer`.
    """
    from .variants import resize_handler

    if resize_handler(layer, adapter) is not None:
        # variants with more rank-sized state (KaSA, MonteCLoRA, MiCA): their own resize, which keeps the function
        return resize_lora_layer(layer, adapter, new_r, generator, directions)
    A, B = lora_factors(layer, adapter)
    if B.detach().abs().max() > 0:
        raise ValueError(
            "gradient initialisation needs an untrained adapter whose B is zero (PEFT's default "
            "init_lora_weights=True); this one has a non-zero B"
        )
    if new_r < 1:
        raise ValueError(f"new_r must be >= 1, got {new_r}")
    with torch.no_grad():
        row_scale = A.detach().float().pow(2).mean().sqrt()
        new_A, new_B = _append_directions(A.detach()[:0], B.detach()[:, :0], new_r, row_scale, generator, directions)
        result = FactorResize(new_A, new_B, ResizeKind.REINIT)
    return result.kind, _apply_resize(layer, adapter, result)


def _apply_resize(layer: LoraLayer, adapter: str, result: FactorResize) -> dict[nn.Parameter, nn.Parameter]:
    """Install resized factors and keep the scaling; returns ``old parameter -> new parameter``."""
    if result.kind is ResizeKind.UNCHANGED:
        return {}
    new_r = result.A.shape[0]
    old = lora_parameters(layer, adapter)
    new = _install_factors(layer, adapter, result.A, result.B)
    rslora = layer.use_rslora.get(adapter)
    alpha = layer.scaling[adapter] * (math.sqrt(new_r) if rslora else new_r)
    layer.r[adapter] = new_r
    layer.lora_alpha[adapter] = alpha
    # Recompute the scaling from (alpha, r) exactly as PEFT's update_layer does, so that an adapter reloaded
    # from rank_pattern/alpha_pattern gets the very same float (``scaling * r / r`` can be off by one ulp).
    layer.scaling[adapter] = alpha / math.sqrt(new_r) if rslora else alpha / new_r
    _clear_dora_cache(layer, adapter)
    return dict(zip(old, new))


def _install_factors(
    layer: LoraLayer, adapter: str, A: torch.Tensor, B: torch.Tensor
) -> tuple[nn.Parameter, nn.Parameter]:
    """Put new factor values in the layer as fresh Parameters (same dtype, device, requires_grad)."""
    old_A, old_B = lora_parameters(layer, adapter)
    new_r = A.shape[0]
    if isinstance(layer, lora_layers.Embedding):
        new_A = nn.Parameter(A.contiguous(), requires_grad=old_A.requires_grad)
        new_B = nn.Parameter(B.contiguous(), requires_grad=old_B.requires_grad)
        layer.lora_embedding_A[adapter] = new_A
        layer.lora_embedding_B[adapter] = new_B
        return new_A, new_B
    module_A, module_B = layer.lora_A[adapter], layer.lora_B[adapter]
    new_A = nn.Parameter(A.reshape(new_r, *old_A.shape[1:]).contiguous(), requires_grad=old_A.requires_grad)
    new_B = nn.Parameter(B.reshape(B.shape[0], new_r, *old_B.shape[2:]).contiguous(), requires_grad=old_B.requires_grad)
    module_A.weight = new_A
    module_B.weight = new_B
    # keep the modules' metadata consistent with the new weights (repr, state_dict round trips)
    if isinstance(module_A, nn.Linear):
        module_A.out_features = new_r
        module_B.in_features = new_r
    else:  # convolutions
        module_A.out_channels = new_r
        module_B.in_channels = new_r
    return new_A, new_B


def match_rank_scaling(layer: LoraLayer, adapter: str, alpha: float) -> tuple[list[nn.Parameter], float]:
    """Give the adapter the scaling plain LoRA gives its current rank with ``alpha`` (``alpha / r``, or
    ``alpha / sqrt(r)`` with rsLoRA), moving the change into one factor so that the update and the output are
    unchanged (``B`` and its bias; KaSA's ``lora_diag``, MiCA's ``A``:
    :func:`~peft_adaptive.variants.scaling_carriers`).

    Returns those parameters and the factor they were multiplied by (old scaling / new scaling); their gradients
    scale by the inverse. Used after a resize with ``resize_scaling="rank"``: a module grown from ``r`` to ``2r``
    then trains with the step size a rank-``2r`` LoRA has instead of keeping its rank-``r`` scaling (``sqrt(2)``
    larger under rsLoRA).
    """
    from .variants import scaling_carriers

    r = layer.r[adapter]
    new_scaling = alpha / math.sqrt(r) if layer.use_rslora.get(adapter) else alpha / r
    factor = layer.scaling[adapter] / new_scaling
    carriers = scaling_carriers(layer, adapter)
    with torch.no_grad():
        for carrier in carriers:
            carrier.mul_(factor)
    layer.lora_alpha[adapter] = alpha
    layer.scaling[adapter] = new_scaling
    _clear_dora_cache(layer, adapter)
    return carriers, factor


def _clear_dora_cache(layer: LoraLayer, adapter: str) -> None:
    magnitude = getattr(layer, "lora_magnitude_vector", None)
    if magnitude is not None and adapter in magnitude and hasattr(magnitude[adapter], "_cache_clear"):
        magnitude[adapter]._cache_clear()


def _is_linear_like(layer: LoraLayer, adapter: str) -> bool:
    # Linear and every quantized backend (bnb, GPTQ, AWQ, ...) keep plain nn.Linear factors.
    return (
        not isinstance(layer, lora_layers.ParamWrapper)
        and adapter in layer.lora_A
        and type(layer.lora_A[adapter]) is nn.Linear
        and type(layer.lora_B[adapter]) is nn.Linear
    )


def _check_supported(layer: LoraLayer, adapter: str) -> None:
    if adapter not in layer.r:
        raise KeyError(f"adapter {adapter!r} is not present in this layer (has {sorted(layer.r)})")
    if isinstance(layer, lora_layers.MultiheadAttention):
        raise TypeError(
            "cannot resize LoRA layer of type MultiheadAttention: PEFT gives its out_proj adapter the rank of its "
            "in_proj adapter (no rank_pattern entry of its own), so different ranks could not be saved and reloaded; "
            "target the attention's Linear layers instead"
        )
    supported = isinstance(layer, (lora_layers.Embedding, lora_layers._ConvNd)) or _is_linear_like(layer, adapter)
    if not supported:
        raise TypeError(_unsupported_reason(layer, adapter))
    if layer.merged:
        raise RuntimeError("cannot resize a LoRA layer whose adapter is merged into the base weight; unmerge first")
    if isinstance(layer, lora_layers._ConvNd) and layer.get_base_layer().groups != 1:
        raise TypeError(f"cannot resize a grouped convolution (groups={layer.get_base_layer().groups}); use groups=1")


def _unsupported_reason(layer: LoraLayer, adapter: str) -> str:
    """Why this adapter's factors cannot be resized, naming the layer and, where it is one, the LoRA option."""
    kind = type(layer).__name__
    if isinstance(layer, lora_layers.ParamWrapper):
        return (
            f"cannot resize LoRA layer of type {kind}: it wraps a parameter (LoraConfig.target_parameters, e.g. MoE experts), "
            "whose update is not a pair of resizable factors; use target_modules"
        )
    factors = (
        [type(layer.lora_A[adapter]).__name__, type(layer.lora_B[adapter]).__name__] if adapter in layer.lora_A else []
    )
    variant = type(getattr(layer, "lora_variant", {}).get(adapter)).__name__
    if "BlockDiagonalLinear" in factors or variant == "BdLoraLinearVariant":
        return (
            f"cannot resize the BD-LoRA adapter (LoraConfig.use_bdlora) of LoRA layer {kind}: one of its factors is "
            "block-diagonal (BlockDiagonalLinear), and neither the best rank-k approximation nor new directions keep "
            "that block structure"
        )
    if factors:
        return (
            f"cannot resize LoRA layer of type {kind}: its factors are {factors[0]}/{factors[1]}, and only plain nn.Linear "
            "factors (Linear, transformers Conv1D, quantized Linear backends), Embedding and Conv1d/2d/3d layers "
            "can be resized"
        )
    return (
        f"cannot resize LoRA layer of type {kind}: only Linear (incl. transformers Conv1D and quantized Linear backends), "
        "Embedding and Conv1d/2d/3d layers can be resized"
    )
