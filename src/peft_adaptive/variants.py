"""Resize handlers for the LoRA variants whose update is not plain ``scaling * B @ A`` or that keep rank-sized state.

:func:`peft_adaptive.resize.resize_lora_layer` asks :func:`resize_handler` first; plain LoRA (and the variants
whose only rank-sized tensors are ``lora_A``/``lora_B``: DoRA, rsLoRA, VeLoRA, aLoRA, ``lora_bias``) goes
through the generic path. The variants handled here:

* **KaSA** (``kasa_config``): the update is ``scaling * B @ diag(d) @ A`` and the frozen base weight has its
  ``r`` smallest singular components removed, ``r`` being the adapter's rank. PEFT re-truncates a fresh base at
  the *saved* rank when it loads the adapter, so a resize moves the truncation with the rank: a grow takes the
  next components out of the base and puts them into the adapter's new directions (the layer's function is
  kept), a shrink puts the largest of the removed components back into the base and keeps the best rank-k
  approximation of what the adapter must then add (``scaling * B diag(d) A`` minus those components). The
  factors come out in KaSA's own SVD form: orthonormal ``A`` rows and ``B`` columns, the singular values in
  ``lora_diag``. A shrink needs the components removed at injection; :func:`before_injection` keeps them.
* **MonteCLoRA** (``monteclora_config``): its sampler draws noise for the ``r`` rows of ``A`` (``std_prior``,
  the Wishart/Gaussian draws and their buffers are rank-sized); it is resized with the factors: kept entries
  verbatim on a grow, new ones at the mean learned noise scale; after a shrink (rotated rows) every row gets
  that mean.
* **MiCA** (``init_lora_weights="mica"``): ``B`` is frozen at minor left singular vectors of the base weight and
  only ``A`` trains. A grow gives ``B`` the next minor singular vectors (orthogonal to the current ones) and ``A``
  zero rows, so the new directions train; a shrink keeps ``B`` orthonormal (``B = Q U_k``) and puts the
  singular values into ``A``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora import layer as lora_layers
from torch import nn

from . import resize as _resize

#: Attribute of a KaSA layer holding, per adapter, the base-weight components removed at injection.
KASA_REMOVED = "_adaptive_kasa_removed"

Handler = Callable[..., tuple["_resize.ResizeKind", dict]]


def variant_name(layer: LoraLayer, adapter: str) -> str | None:
    """The LoRA variant of ``adapter`` in ``layer`` (PEFT's variant class name), or None for plain LoRA."""
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    return type(variant).__name__ if variant is not None else None


def resize_handler(layer: LoraLayer, adapter: str) -> Handler | None:
    """The resize function of this adapter's variant, or None when the generic resize is right for it."""
    name = variant_name(layer, adapter)
    if name == "KasaLinearVariant":
        return resize_kasa
    if name == "MontecloraLinearVariant":
        return resize_monteclora
    if name in ("MiCALinearVariant", "MiCAEmbeddingVariant"):
        return resize_mica
    return None


def scaling_carriers(layer: LoraLayer, adapter: str) -> list[nn.Parameter]:
    """The parameters a change of the layer's scaling is moved into (``resize_scaling="rank"``) so that the update
    is unchanged: ``lora_diag`` for KaSA (its ``A``/``B`` stay orthonormal), ``A`` for MiCA (its ``B`` is frozen at
    singular vectors of the base), ``B`` otherwise, with ``B``'s bias (``lora_bias``: scaled with it)."""
    name = variant_name(layer, adapter)
    if name == "KasaLinearVariant":
        return [layer.lora_diag[adapter]]
    A, B = _resize.lora_parameters(layer, adapter)
    if name in ("MiCALinearVariant", "MiCAEmbeddingVariant"):
        return [A]
    bias = getattr(layer.lora_B[adapter], "bias", None) if adapter in getattr(layer, "lora_B", {}) else None
    return [B] if bias is None else [B, bias]


def update_factors(layer: LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, R)`` with ``L @ R`` the adapter's real update as a ``[fan_out, fan_in]`` matrix, scaling included
    (for the embedding, the transposed update, as :func:`peft_adaptive.resize.lora_factors` gives it)."""
    A, B = _resize.lora_factors(layer, adapter)
    scaling = layer.scaling[adapter]
    if variant_name(layer, adapter) == "KasaLinearVariant":
        return B.detach().double() * layer.lora_diag[adapter].detach().double() * scaling, A.detach().double()
    return B.detach().double() * scaling, A.detach().double()


def base_matrix(layer: LoraLayer) -> torch.Tensor:
    """The base weight as the ``[fan_out, fan_in]`` matrix the update is added to (float64 copy)."""
    base = layer.get_base_layer()
    weight = (base.in_proj_weight if isinstance(base, nn.MultiheadAttention) else base.weight).detach()
    if isinstance(layer, lora_layers.Embedding):
        return weight.double().T
    weight = weight.double()
    if getattr(layer, "fan_in_fan_out", False):
        weight = weight.T
    return weight.reshape(weight.shape[0], -1)


# --- KaSA --------------------------------------------------------------------------------------------


def before_injection(config, target: nn.Module) -> dict | None:
    """What a resize will need that injection destroys: for KaSA, the smallest singular components of the base.

    Called by ``AdaptiveLoraModel._create_and_replace`` before PEFT creates the layer. Keeps up to ``max_r``
    components (float64 ``U * S`` and ``Vh``, smallest last), the most a shrink can need.
    """
    if not getattr(config, "kasa_config", None):
        return None
    base = target.get_base_layer() if isinstance(target, LoraLayer) else target
    weight = getattr(base, "weight", None)
    if not isinstance(base, nn.Linear) or weight is None or weight.device.type == "meta" or weight.dim() != 2:
        return None
    if getattr(config, "fan_in_fan_out", False):
        return None  # PEFT refuses KaSA on fan_in_fan_out layers itself
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    keep = min(max(getattr(config, "max_r", None) or config.r, config.r), s.shape[0] - 1)
    return {"us": (u[:, -keep:] * s[-keep:]).contiguous(), "vh": vh[-keep:].contiguous()}


def after_injection(layer: nn.Module, adapter: str, snapshot: dict | None) -> None:
    """Attach what :func:`before_injection` kept to the new layer (not a parameter or buffer: never saved)."""
    if snapshot is None or not isinstance(layer, LoraLayer) or adapter not in getattr(layer, "lora_diag", {}):
        return
    removed = getattr(layer, KASA_REMOVED, None)
    if removed is None:
        removed = {}
        object.__setattr__(layer, KASA_REMOVED, removed)
    removed[adapter] = snapshot


def _kasa_components(layer: LoraLayer, adapter: str, first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular components ``first..last-1`` of the *original* base weight, counted from the smallest (0 = smallest)
    as ``(U * S, Vh)``, largest first."""
    snapshot = getattr(layer, KASA_REMOVED, {}).get(adapter)
    if snapshot is not None and last <= snapshot["us"].shape[1]:
        m = snapshot["us"].shape[1]
        device = layer.lora_diag[adapter].device  # the model may have moved (e.g. to a GPU) since injection
        return snapshot["us"][:, m - last : m - first].to(device), snapshot["vh"][m - last : m - first].to(device)
    current = layer.r[adapter]
    if first < current:
        raise RuntimeError(
            "cannot shrink this KaSA adapter: its base weight's removed singular components were not kept at "
            "injection (adapter created on the meta device, or not by AdaptiveLoraModel), so the base cannot be "
            "restored to the truncation PEFT applies at the new rank when it loads the adapter"
        )
    # A grow without a snapshot: the components still in the base are the original's largest ones.
    u, s, vh = torch.linalg.svd(base_matrix(layer), full_matrices=False)
    k = s.shape[0]
    # the base holds the original's components current.. (from the smallest); index j from the smallest is k-1-j
    lo, hi = k - 1 - (last - 1), k - 1 - first
    return u[:, lo : hi + 1] * s[lo : hi + 1], vh[lo : hi + 1]


def _set_base(layer: LoraLayer, change: torch.Tensor) -> None:
    """Add ``change`` (a ``[fan_out, fan_in]`` float64 matrix) to the frozen base weight in place."""
    weight = layer.get_base_layer().weight
    weight.data = (weight.data.double() + change.to(weight.device)).to(weight.dtype)


def resize_kasa(layer, adapter, new_r, generator=None, directions=None):
    A, B = _resize.lora_factors(layer, adapter)
    r = A.shape[0]
    fan_out, fan_in = B.shape[0], A.shape[1]
    if new_r >= min(fan_out, fan_in):
        raise ValueError(
            f"KaSA (kasa_config) needs a rank below min(in_features, out_features) = {min(fan_out, fan_in)}, "
            f"got {new_r}: at least one singular component of the base weight must stay"
        )
    if new_r == r:
        return _resize.ResizeKind.UNCHANGED, {}
    scaling = layer.scaling[adapter]
    diag = layer.lora_diag[adapter]
    work = torch.float64
    with torch.no_grad():
        if new_r > r:
            us, vh = _kasa_components(layer, adapter, r, new_r)  # next-smallest components, largest first
            _set_base(layer, -(us @ vh))
            row_scale = A.detach().double().pow(2).mean().sqrt()
            if not row_scale > 0:
                row_scale = torch.tensor(1.0 / math.sqrt(fan_in), dtype=work)
            norms = us.norm(dim=0).clamp_min(1e-300)
            a_scale = row_scale * math.sqrt(fan_in)
            new_A = torch.cat([A.detach().double(), vh * a_scale])
            new_B = torch.cat([B.detach().double(), us / norms], dim=1)
            new_d = torch.cat([diag.detach().double(), norms / (scaling * a_scale)])
            kind = _resize.ResizeKind.GROW
        else:
            us, vh = _kasa_components(layer, adapter, new_r, r)  # back into the base
            _set_base(layer, us @ vh)
            left = torch.cat([B.detach().double() * diag.detach().double() * scaling, -us], dim=1)
            right = torch.cat([A.detach().double(), vh])
            q_l, r_l = torch.linalg.qr(left)
            q_r, r_r = torch.linalg.qr(right.T)
            u, s, v = torch.linalg.svd(r_l @ r_r.T)
            keep = min(new_r, s.shape[0])
            new_B = q_l @ u[:, :keep]
            new_A = v[:keep] @ q_r.T
            new_d = s[:keep] / scaling
            if keep < new_r:  # fewer non-zero directions than the rank: pad like a grow (B zero columns)
                extra = new_r - keep
                rand = torch.randn(extra, fan_in, generator=generator, dtype=torch.float32).to(new_A.device).double()
                new_A = torch.cat([new_A, rand / rand.norm(dim=1, keepdim=True)])
                new_B = torch.cat([new_B, new_B.new_zeros(fan_out, extra)], dim=1)
                new_d = torch.cat([new_d, new_d.new_ones(extra)])
            kind = _resize.ResizeKind.SHRINK
        result = _resize.FactorResize(new_A.to(A.dtype), new_B.to(B.dtype), kind)
        swaps = _resize._apply_resize(layer, adapter, result)
        new_diag = nn.Parameter(new_d.to(diag.dtype).contiguous(), requires_grad=diag.requires_grad)
        layer.lora_diag[adapter] = new_diag
    swaps[diag] = new_diag
    return kind, swaps


# --- MonteCLoRA ----------------------------------------------------------------------------------------


def resize_monteclora(layer, adapter, new_r, generator=None, directions=None):
    kind, swaps = _resize._resize_generic(layer, adapter, new_r, generator, directions)
    samplers = getattr(layer, "lora_monteclora_sampler", {})
    if kind is _resize.ResizeKind.UNCHANGED or adapter not in samplers:
        return kind, swaps  # a sampler not created yet (meta device) is created at the new rank on first forward
    from peft.tuners.lora.monteclora import BufferedMontecloraSampler

    sampler = samplers[adapter]
    old = sampler.std_prior
    with torch.no_grad():
        fill = old.detach().float().exp().mean().log().to(old.dtype)
        if kind is _resize.ResizeKind.GROW:
            values = torch.cat([old.detach(), fill.expand(new_r - old.shape[0])])
            var = torch.eye(new_r, dtype=sampler.gaussian_var_prior.dtype, device=old.device)
            k = old.shape[0]
            var[:k, :k] = sampler.gaussian_var_prior[:k, :k]
        else:
            values = fill.expand(new_r).clone()
            var = torch.eye(new_r, dtype=sampler.gaussian_var_prior.dtype, device=old.device)
    new = nn.Parameter(values.contiguous(), requires_grad=old.requires_grad)
    sampler.std_prior = new
    sampler.gaussian_var_prior = var
    sampler.out_features = new_r
    sampler.sampler = BufferedMontecloraSampler(
        sampler, buffer_size=sampler.sampler.buffer_size, device=sampler.sampler.device
    )
    swaps[old] = new
    return kind, swaps


# --- MiCA ---------------------------------------------------------------------------------------------


def _minor_directions(layer: LoraLayer, current: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` orthonormal columns among the base weight's minor left singular vectors, orthogonal to ``current``."""
    u, _, _ = torch.linalg.svd(base_matrix(layer), full_matrices=False)
    basis = current.double()
    if basis.numel():
        basis, _ = torch.linalg.qr(basis)
    found = []
    for j in range(u.shape[1] - 1, -1, -1):  # smallest singular value first
        v = u[:, j]
        if basis.numel():
            v = v - basis @ (basis.T @ v)
        for w in found:
            v = v - w * (w @ v)
        if v.norm() > 0.5:
            found.append(v / v.norm())
            if len(found) == count:
                break
    if len(found) < count:
        raise ValueError(
            f"MiCA (init_lora_weights='mica') cannot grow to this rank: the base weight has only "
            f"{u.shape[1]} singular directions"
        )
    return torch.stack(found, dim=1)


def resize_mica(layer, adapter, new_r, generator=None, directions=None):
    A, B = _resize.lora_factors(layer, adapter)
    r = A.shape[0]
    if new_r == r:
        return _resize.ResizeKind.UNCHANGED, {}
    with torch.no_grad():
        if new_r > r:
            cols = _minor_directions(layer, B.detach(), new_r - r)
            new_B = torch.cat([B.detach(), cols.to(B.dtype)], dim=1)
            new_A = torch.cat([A.detach(), A.new_zeros(new_r - r, A.shape[1])])
            kind = _resize.ResizeKind.GROW
        else:
            q_b, r_b = torch.linalg.qr(B.detach().double())
            u, s, vh = torch.linalg.svd(r_b @ A.detach().double())
            new_B = (q_b @ u[:, :new_r]).to(B.dtype)
            new_A = (s[:new_r, None] * vh[:new_r]).to(A.dtype)
            kind = _resize.ResizeKind.SHRINK
    swaps = _resize._apply_resize(layer, adapter, _resize.FactorResize(new_A, new_B, kind))
    return kind, {old: new for old, new in swaps.items() if old.requires_grad}  # B is frozen: in no optimizer
