"""Re-initialising a ``DistributedDataParallel`` wrapper in place after its module's parameters were replaced.

DDP registers its gradient hooks and buckets per ``Parameter`` object when it is built. A reallocation replaces
the resized factors with new ``Parameter`` objects, which then have no hook: under ``find_unused_parameters=True``
(what ``Trainer`` uses for PEFT models) they silently stop being all-reduced and the processes drift apart.
A training loop holds the wrapper (in a local variable, in ``Trainer.model_wrapped``, inside accelerate), so
the wrapper is re-initialised in place instead of being replaced: :func:`rewrap_ddp` runs
``DistributedDataParallel.__init__`` on it again, with every constructor setting the live wrapper still
carries, and restores what ``__init__`` would otherwise reset or drop:

* constructor settings: ``device_ids``, ``output_device``, ``dim``, the process group or a 1-D
  ``device_mesh``, bucket sizes (also ``bucket_cap_mb_list`` and the default first-bucket size),
  ``find_unused_parameters``, ``gradient_as_bucket_view``, ``static_graph``, buffer synchronisation
  (``broadcast_buffers``/``forward_sync_buffers``), ``skip_all_reduce_unused_params``, ``batched_grad_copy``
  (those that the installed torch has);
* communication hooks registered with ``register_comm_hook`` (accelerate's ``comm_hook`` option too) are
  registered again, with the same state object. PowerSGD's per-bucket memories (error feedback, warm-start
  factors) are cleared, since the buckets are rebuilt;
* hooks registered on the wrapper module itself and its ``training`` flag.

``init_sync`` is not kept: the re-initialisation always broadcasts process 0's parameters (and verifies their
shapes across processes), so every process continues from identical weights.

Settings that cannot be carried over are refused with an error that says what to do instead: DDP's
``mixed_precision`` (it hooks every submodule and keeps low-precision copies of the old parameters), delayed
all-reduce (``delay_all_reduce_named_params``), a ``device_mesh`` sliced from a larger mesh (DDP with
tensor parallelism), a built-in C++ communication hook (``_register_builtin_comm_hook``) and a fused
optimizer (``_register_fused_optim``, which holds the old parameters).
"""

from __future__ import annotations

import inspect
import warnings

import torch
from torch.nn.parallel import DistributedDataParallel

#: Hook tables that ``nn.Module.__init__`` resets; they belong to the wrapper, not to DDP.
_MODULE_HOOK_TABLES = (
    "_backward_pre_hooks",
    "_backward_hooks",
    "_is_full_backward_hook",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)

_MIB = 1024 * 1024

_WHAT_TO_DO = (
    "Either build the DistributedDataParallel wrapper without it, or run the signal steps and the reallocation "
    "first (one device, or DDP without it), save the adapter, and continue from "
    "PeftModel.from_pretrained(base, path, is_trainable=True) with the wrapper you want."
)


def find_ddp(model: torch.nn.Module | None) -> DistributedDataParallel | None:
    """The ``DistributedDataParallel`` wrapper in ``model`` (also under ``torch.compile``), or None."""
    model = getattr(model, "_orig_mod", model)
    return model if isinstance(model, DistributedDataParallel) else None


def check_ddp(model: torch.nn.Module | None) -> None:
    """Raise ``RuntimeError`` now if :func:`rewrap_ddp` would refuse ``model``'s DDP wrapper later."""
    wrapper = find_ddp(model)
    if wrapper is not None:
        _refuse_unsupported(wrapper)


def rewrap_ddp(model: torch.nn.Module | None) -> bool:
    """Re-initialise the DDP wrapper ``model`` in place over its module's current parameters.

    ``model`` may be the wrapper, a ``torch.compile``-d wrapper, or anything else (then nothing happens).
    Returns True if a wrapper was re-initialised. Raises ``RuntimeError`` for DDP settings that cannot be kept
    (see the module docstring), before changing anything.
    """
    wrapper = find_ddp(model)
    if wrapper is None:
        return False
    _refuse_unsupported(wrapper)
    kwargs = _constructor_arguments(wrapper)
    comm_hooks = list(getattr(wrapper, "_comm_hooks", []))
    hook_tables = {name: wrapper.__dict__[name] for name in _MODULE_HOOK_TABLES if name in wrapper.__dict__}
    training = wrapper.training
    for handle in getattr(wrapper, "_accum_grad_hooks", []):  # compiled-autograd ("python reducer") mode
        handle.remove()
    with warnings.catch_warnings():
        # broadcast_buffers=False is the only way to keep "no buffer sync at init" on every torch version
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        DistributedDataParallel.__init__(wrapper, wrapper.module, **kwargs)
    for hook, state in comm_hooks:
        _reset_bucket_state(state)
        wrapper.register_comm_hook(state, hook)
    for name, table in hook_tables.items():
        object.__setattr__(wrapper, name, table)
    wrapper.training = training  # nn.Module.__init__ reset it; the wrapped module keeps its own
    return True


def _constructor_arguments(wrapper: DistributedDataParallel) -> dict:
    accepted = inspect.signature(DistributedDataParallel.__init__).parameters
    kwargs = {
        "device_ids": wrapper.device_ids,
        "output_device": wrapper.output_device,
        "dim": wrapper.dim,
        "find_unused_parameters": wrapper.find_unused_parameters,
        "gradient_as_bucket_view": wrapper.gradient_as_bucket_view,
        "static_graph": wrapper.static_graph,
        "skip_all_reduce_unused_params": getattr(wrapper, "skip_all_reduce_unused_params", False),
        "batched_grad_copy": getattr(wrapper, "batched_grad_copy", False),
    }
    mesh = getattr(wrapper, "device_mesh", None)
    if mesh is not None:
        kwargs["device_mesh"] = mesh  # it names the process group; both may not be passed
    else:
        kwargs["process_group"] = wrapper.process_group
    caps = list(getattr(wrapper, "bucket_bytes_cap_list", []) or [])
    if caps and "bucket_cap_mb_list" in accepted:
        kwargs["bucket_cap_mb_list"] = [cap / _MIB for cap in caps]
    elif not getattr(wrapper, "bucket_bytes_cap_default", False):
        kwargs["bucket_cap_mb"] = wrapper.bucket_bytes_cap / _MIB
    # else: leave bucket_cap_mb unset so that the first bucket keeps DDP's smaller default size
    if not wrapper.broadcast_buffers:
        kwargs["broadcast_buffers"] = False
    if "init_sync" in accepted:
        kwargs["init_sync"] = True
    unknown = [name for name, value in kwargs.items() if name not in accepted and value]
    if unknown:
        raise RuntimeError(f"cannot re-initialise DistributedDataParallel: this torch does not accept {unknown}")
    return {name: value for name, value in kwargs.items() if name in accepted}


def _refuse_unsupported(wrapper: DistributedDataParallel) -> None:
    problems = []
    if getattr(wrapper, "mixed_precision", None) is not None:
        problems.append("DDP mixed_precision (it keeps low-precision copies of the old parameters)")
    if getattr(wrapper, "_delay_all_reduce_params", None):
        problems.append("delay_all_reduce_named_params (delayed all-reduce of named parameters)")
    mesh = getattr(wrapper, "device_mesh", None)
    if mesh is not None and _root_mesh(mesh) is not mesh:
        problems.append("a device_mesh sliced from a larger mesh (DDP with tensor parallelism)")
    hooks = getattr(wrapper, "_comm_hooks", [])
    if any("hook_then_optimizer" in getattr(hook, "__qualname__", "") for hook, _ in hooks):
        problems.append("a fused optimizer (_register_fused_optim; it holds the old parameters)")
    if not hooks and _logged_comm_hook(wrapper):
        problems.append(
            f"the built-in communication hook {_logged_comm_hook(wrapper)!r} (_register_builtin_comm_hook; "
            "register it with register_comm_hook instead, e.g. torch.distributed.algorithms.ddp_comm_hooks."
            "default_hooks.fp16_compress_hook, and it is kept)"
        )
    if problems:
        raise RuntimeError(
            "adaptive LoRA resizes the adapter in place, so the DistributedDataParallel wrapper must be "
            "re-initialised over the new parameters at the reallocation, but it uses "
            + "; ".join(problems)
            + ", which cannot be carried over. "
            + _WHAT_TO_DO
        )


def _root_mesh(mesh):
    try:
        return mesh._get_root_mesh()
    except AttributeError:
        return mesh


def _logged_comm_hook(wrapper: DistributedDataParallel) -> str:
    try:
        return str(wrapper._get_ddp_logging_data().get("comm_hook", "") or "")
    except (AttributeError, RuntimeError):
        return ""


def _reset_bucket_state(state: object) -> None:
    """Per-bucket memories of a communication hook's state (PowerSGD) describe the old buckets: clear them."""
    for name in ("error_dict", "p_memory_dict", "q_memory_dict"):
        table = getattr(state, name, None)
        if isinstance(table, dict):
            table.clear()
