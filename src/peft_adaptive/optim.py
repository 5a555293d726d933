"""Keep an optimizer in step with parameters that were replaced by a resize.

Each new parameter takes the exact slot (group and index) of the one it replaces, so learning rate,
weight decay and ``state_dict()`` positions are unchanged. With ``AdaptiveLoraConfig(optimizer_state="reset")``
(the default) every replaced parameter's state is dropped and the optimizer starts it afresh. With ``"migrate"``
the per-parameter state is:

* **migrated** after a grow: the old factors are kept verbatim, so their moments still describe them,
  and scalars such as Adam's ``step`` are kept. The new entries get a first moment of zero and a
  second moment equal to the mean of the old entries' second moments in the same row of ``B`` /
  column of ``A`` (:func:`grown_moments`). Zero would be wrong: Adam's bias correction runs on the shared
  ``step``, which is about 1 after a long warmup, so a zero second moment makes a new entry's first
  updates ``(1 - beta1^k) / sqrt(1 - beta2^k)`` times a normal one (measured with ``torch.optim.AdamW``
  at step 1000: 2.5x at the first update, 5.2x at the 10th, still 1.7x at the 300th). States that are
  not plain per-entry tensors (8-bit/blockwise-quantized, factored) are reset instead;
* **reset** after a shrink or a re-initialisation: the factors are rotated into a new basis, where the
  old moments mean nothing; the state is dropped and the optimizer re-initialises it lazily;
* **removed** with the parameter when a module's rank goes to 0.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .resize import ResizeKind


def replace_optimizer_params(
    optimizer: torch.optim.Optimizer,
    replaced: Mapping[nn.Parameter, nn.Parameter | None],
    kinds: Mapping[nn.Parameter, ResizeKind],
    migrate: bool = True,
) -> int:
    """Swap ``old -> new`` parameters in ``optimizer`` and migrate or reset their state.

    A ``None`` new parameter removes the old one (a module whose rank went to 0). Works through wrappers
    that proxy ``param_groups``/``state`` (accelerate's ``AcceleratedOptimizer``). Returns the number of
    parameters swapped or removed. ``migrate=False`` resets the state of every swapped parameter, grown ones
    included (``AdaptiveLoraConfig(optimizer_state="reset")``). Raises if an old parameter is not in the
    optimizer while others are (a half-updated optimizer would silently train stale tensors).
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    state = inner.state
    swapped = 0
    for group in inner.param_groups:
        kept = []
        for param in group["params"]:
            if param not in replaced:
                kept.append(param)
                continue
            new = replaced[param]
            old_state = state.pop(param, None)
            swapped += 1
            if new is None:
                continue
            kept.append(new)
            if migrate and old_state and kinds[param] is ResizeKind.GROW and _is_paddable(old_state, param):
                state[new] = {key: _grow_state(key, value, param, new) for key, value in old_state.items()}
        group["params"][:] = kept
    if 0 < swapped < len(replaced):
        raise RuntimeError(
            f"only {swapped} of {len(replaced)} resized parameters were found in the optimizer; "
            "it must hold all of the adapter's trainable parameters or none"
        )
    return swapped


def rescale_state(optimizer: torch.optim.Optimizer, param: nn.Parameter, gradient_factor: float) -> None:
    """The parameter's gradients will be ``gradient_factor`` times what they were (its layer's scaling moved into
    it): scale its per-entry state to match, first moments by the factor, second moments by its square, so Adam's
    next steps read the moments in the new units. No state, or a state that is not per-entry (reset on a resize
    anyway): nothing to do."""
    state = getattr(optimizer, "optimizer", optimizer).state.get(param)
    if not state or not _is_paddable(state, param):
        return
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            value.mul_(gradient_factor**2 if _is_second_moment(key) else gradient_factor)


def _is_paddable(param_state: dict, param: nn.Parameter) -> bool:
    """True if every tensor in the state is a scalar or shaped like the parameter (Adam, SGD momentum...).

    Anything else (blockwise-quantized 8-bit states with their scale tables, factored Adafactor rows) cannot
    be padded entry by entry, so it is reset instead.
    """
    return all(
        not isinstance(v, torch.Tensor) or v.dim() == 0 or (v.shape == param.shape and v.is_floating_point())
        for v in param_state.values()
    )


def _grow_state(key: str, value: object, old: nn.Parameter, new: nn.Parameter) -> object:
    """Grow one state entry: second moments (``exp_avg_sq``-like) by :func:`grown_moments`, others with zeros."""
    if not isinstance(value, torch.Tensor) or value.shape != old.shape:
        return value
    return grown_moments(value, new.shape, second_moment=_is_second_moment(key))


def _is_second_moment(key: str) -> bool:
    """A squared-gradient state (Adam's ``exp_avg_sq``, ``max_exp_avg_sq``): it scales with the gradient squared."""
    return "sq" in key


def grown_moments(value: torch.Tensor, new_shape: torch.Size, second_moment: bool) -> torch.Tensor:
    """Extend a per-entry optimizer state to ``new_shape`` along the one dimension that grew (the rank).

    First moments (and anything that is not a second moment) get zeros. Second moments get, along the
    grown dimension, the mean of the old entries in the same slice (same row of ``B``, same column of ``A``):
    the gradient scale those entries saw is the best estimate of what the new ones will see, so with the
    shared, bias-corrected ``step`` their updates start at or below a normal step instead of several times it.
    """
    grown = [d for d, (a, b) in enumerate(zip(value.shape, new_shape)) if a != b]
    if len(grown) != 1 or new_shape[grown[0]] < value.shape[grown[0]]:
        raise ValueError(f"cannot grow a state of shape {tuple(value.shape)} to {tuple(new_shape)}")
    dim = grown[0]
    fill_shape = list(new_shape)
    fill_shape[dim] = new_shape[dim] - value.shape[dim]
    if second_moment and value.shape[dim] > 0:
        fill = value.mean(dim=dim, keepdim=True).expand(fill_shape)
    else:
        fill = value.new_zeros(fill_shape)
    return torch.cat([value, fill.to(value.dtype)], dim=dim)
