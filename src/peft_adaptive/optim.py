"""Keep an optimizer in step with parameters that were replaced by a resize.

Each new parameter takes the exact slot (group and index) of the one it replaces, so learning rate,
weight decay and ``state_dict()`` positions are unchanged. The per-parameter state is:

* **migrated** after a grow: the old factors are kept verbatim, so their moments still describe them;
  state tensors of the parameter's shape are zero-padded along the rank dimension (the new
  directions start with fresh moments) and scalars such as Adam's ``step`` are kept. States that are not
  plain per-entry tensors (8-bit/blockwise-quantized, factored) are reset instead;
* **reset** after a shrink: the factors are rotated into a new SVD basis, where the old moments mean
  nothing; the state is dropped and the optimizer re-initialises it lazily on the next step.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .resize import ResizeKind


def replace_optimizer_params(
    optimizer: torch.optim.Optimizer,
    replaced: Mapping[nn.Parameter, nn.Parameter],
    kinds: Mapping[nn.Parameter, ResizeKind],
) -> int:
    """Swap ``old -> new`` parameters in ``optimizer`` and migrate or reset their state.

    Works through wrappers that proxy ``param_groups``/``state`` (accelerate's ``AcceleratedOptimizer``).
    Returns the number of parameters swapped. Raises if an old parameter is not in the optimizer while
    others are (a half-updated optimizer would silently train stale tensors).
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    state = inner.state
    swapped = 0
    for group in inner.param_groups:
        params = group["params"]
        for index, param in enumerate(params):
            new = replaced.get(param)
            if new is None:
                continue
            params[index] = new
            old_state = state.pop(param, None)
            if old_state and kinds[param] is ResizeKind.GROW and _is_paddable(old_state, param):
                state[new] = {key: _pad_like(value, param, new) for key, value in old_state.items()}
            swapped += 1
    if 0 < swapped < len(replaced):
        raise RuntimeError(
            f"only {swapped} of {len(replaced)} resized parameters were found in the optimizer; "
            "it must hold all of the adapter's trainable parameters or none"
        )
    return swapped


def _is_paddable(param_state: dict, param: nn.Parameter) -> bool:
    """True if every tensor in the state is a scalar or shaped like the parameter (Adam, SGD momentum...).

    Anything else (blockwise-quantized 8-bit states with their scale tables, factored Adafactor rows) cannot
    be padded entry by entry, so it is reset instead.
    """
    return all(
        not isinstance(v, torch.Tensor) or v.dim() == 0 or (v.shape == param.shape and v.is_floating_point())
        for v in param_state.values()
    )


def _pad_like(value: object, old: nn.Parameter, new: nn.Parameter) -> object:
    """Zero-pad a state tensor shaped like ``old`` to the shape of ``new`` (other values unchanged)."""
    if not isinstance(value, torch.Tensor) or value.shape != old.shape:
        return value
    padded = value.new_zeros(new.shape)
    padded[tuple(slice(0, n) for n in old.shape)] = value
    return padded
