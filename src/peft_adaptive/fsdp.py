"""FSDP2 (``fully_shard``) for adaptive LoRA: the base model sharded, the adapter replicated like under DDP.

A reallocation replaces the adapter's factors with new ``Parameter`` objects of other shapes. FSDP2 fixes each
managed parameter's shape when ``fully_shard`` builds its sharded ``DTensor`` and parameter group, so a resized
factor inside a shard would need its FSDP group rebuilt and the optimizer state re-sharded. LoRA factors are
tiny next to the base weights (typically well under 1 %), so this module keeps them out of the shards instead:

* :func:`shard_base_model` calls ``fully_shard`` on each decoder layer and on the base model with every adapter
  parameter in ``ignored_params``: FSDP shards, gathers and reduces only the base model, and no process ever
  holds all of it;
* :class:`AdapterGradientSync` averages the adapter's gradients over the processes at the end of each backward,
  as DDP would. It looks the parameters up on every backward, so it covers the new parameters after a
  reallocation without being told.

The gradients the signals read are therefore the full, averaged ones: per-module norms equal an unsharded run's
with no extra reduction, every process computes the same allocation (process 0's is broadcast anyway), and the
resize, the optimizer update and ``save_pretrained`` are exactly the single-device ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from peft.tuners.lora import LoraLayer
from torch import nn

from .resize import layer_adapter_parameters


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every LoRA adapter parameter in ``model`` (factors, LoRA biases, DoRA magnitudes; all adapters)."""
    params: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapter in module.r:
                params.update((id(p), p) for p in layer_adapter_parameters(module, adapter))
    return list(params.values())


def sharded_at_load(trainer: Any) -> bool:
    """Whether ``trainer`` trains a model that transformers sharded with FSDP2 at load time.

    ``from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=N))`` shards the base model while loading
    it, and a PEFT adapter added afterwards stays outside the shards, replicated: the design of this module. The
    ``Trainer`` then skips DDP and instead registers a gradient-averaging hook on each replicated trainable
    parameter when training starts (``_sync_replicated_trainable_parameters``).
    """
    return bool(getattr(trainer, "is_distributed_loading_by_transformers", False))


def check_trainer_resync(trainer: Any) -> None:
    """Raise ``RuntimeError`` now if :func:`resync_trainer_replicas` could not keep ``trainer``'s replicas in step."""
    if sharded_at_load(trainer) and not callable(getattr(trainer, "_sync_replicated_trainable_parameters", None)):
        raise RuntimeError(
            "this transformers Trainer trains a model sharded at load time (distributed_config) but has no "
            "_sync_replicated_trainable_parameters, which adaptive LoRA needs to synchronise the resized adapter: "
            "use the hand-written loop with peft_adaptive.fsdp.shard_base_model (docs/distributed.md)"
        )


def resync_trainer_replicas(trainer: Any) -> bool:
    """After a reallocation, give the new adapter parameters the gradient averaging the ``Trainer`` gave the old.

    The hooks are per ``Parameter`` object, so the resized factors would otherwise train on each process's data
    alone and the processes would drift apart. Re-running the ``Trainer``'s own setup registers them (and
    broadcasts process 0's replicated parameters, which are identical already). Returns True if it ran.
    """
    if not sharded_at_load(trainer):
        return False
    check_trainer_resync(trainer)
    trainer._sync_replicated_trainable_parameters(trainer.model_wrapped)
    return True


def check_adapter_unsharded(model: nn.Module) -> None:
    """Raise ``RuntimeError`` if FSDP manages the LoRA adapter in ``model``.

    A resize gives the adapter new parameters; FSDP would keep sharding, gathering and reducing the old ones,
    and the new ones would silently train on each process's data alone.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        backend = "FullyShardedDataParallel (FSDP1)"
    elif any(_is_sharded(p) for p in adapter_parameters(model)):
        backend = "fully_shard (FSDP2) without the adapter in ignored_params"
    else:
        return
    raise RuntimeError(
        f"the LoRA adapter is sharded by {backend}, so it cannot be resized in place. Shard only the base model "
        "and keep the adapter replicated: peft_adaptive.fsdp.shard_base_model(peft_model) instead of fully_shard "
        "(see docs/distributed.md)."
    )


def _is_sharded(param: nn.Parameter) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def shard_base_model(
    model: nn.Module,
    layers: Iterable[nn.Module] | None = None,
    *,
    process_group: dist.ProcessGroup | None = None,
    **fully_shard_kwargs: Any,
) -> nn.Module:
    """Apply FSDP2 to the base model inside the PEFT ``model``, keeping the LoRA adapters whole on every process.

    ``layers`` are the modules that become FSDP units (default: the transformers model's decoder layers, the
    classes named in its ``_no_split_modules``); the base model itself is the root unit. ``fully_shard_kwargs``
    (``mesh``, ``reshard_after_forward``, ``offload_policy``...) go to every ``fully_shard`` call; the adapter's
    parameters are added to ``ignored_params`` and moved to the mesh's device. The adapter's gradients are
    averaged over ``process_group`` (default: every process) by an :class:`AdapterGradientSync`, kept as
    ``model.adapter_gradient_sync``. Returns ``model``.
    """
    from torch.distributed.fsdp import fully_shard

    if fully_shard_kwargs.get("mp_policy") is not None:
        raise ValueError(
            "shard_base_model does not take mp_policy: FSDP's mixed precision would cast only the sharded base "
            "weights, not the adapter it leaves out; use torch.autocast around the forward instead"
        )
    tuner = model.base_model
    base = tuner.model
    ignored = set(adapter_parameters(base)) | set(fully_shard_kwargs.pop("ignored_params", None) or ())
    if layers is None:
        layers = _decoder_layers(base)
    for layer in layers:
        fully_shard(layer, ignored_params=ignored, **fully_shard_kwargs)
    fully_shard(base, ignored_params=ignored, **fully_shard_kwargs)
    _move_adapters_to_mesh_device(base, fully_shard_kwargs.get("mesh"))
    model.adapter_gradient_sync = AdapterGradientSync(base, process_group)
    return model


def _decoder_layers(base: nn.Module) -> list[nn.Module]:
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(base).__name__} names no decoder layer classes in _no_split_modules: pass the modules to shard, "
            "shard_base_model(model, layers=[...])"
        )
    return layers


def _move_adapters_to_mesh_device(base: nn.Module, mesh: Any) -> None:
    """FSDP does not move ignored parameters; put the adapter where the gathered base weights will be."""
    device_type = mesh.device_type if mesh is not None else _default_device_type()
    if device_type == "cpu":
        return
    module = getattr(torch, device_type)
    device = torch.device(device_type, module.current_device())
    for layer in base.modules():
        if isinstance(layer, LoraLayer):
            for attr in layer.adapter_layer_names:
                getattr(layer, attr).to(device)


def _default_device_type() -> str:
    accelerator = getattr(torch, "accelerator", None)
    current = accelerator.current_accelerator() if accelerator is not None else None
    return current.type if current is not None else "cpu"


class AdapterGradientSync:
    """Average the LoRA adapter's gradients over the processes at the end of every backward through ``module``.

    A forward hook on ``module`` marks its outputs; the first of them the backward reaches queues one
    all-reduce to run when the backward finishes (``queue_callback``), over the adapter parameters ``module``
    holds at that moment. Under gradient accumulation every backward averages the accumulated gradients
    again; averaging is linear, so the result is the same as one all-reduce at the end.
    """

    def __init__(self, module: nn.Module, process_group: dist.ProcessGroup | None = None):
        self.module = module
        self.process_group = process_group
        self._queued = False
        self._handle = module.register_forward_hook(self._mark_outputs)

    def remove(self) -> None:
        self._handle.remove()

    def _mark_outputs(self, module: nn.Module, args: Any, output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        self._queued = False  # a backward that failed before its callback must not stop the next one's
        for tensor in _tensors(output):
            if tensor.requires_grad:
                tensor.register_hook(self._queue)

    def _queue(self, grad: torch.Tensor) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.all_reduce)

    @torch.no_grad()
    def all_reduce(self) -> None:
        """Average the gradients now (the hook calls this; call it by hand only outside a backward)."""
        self._queued = False
        params = [p for p in adapter_parameters(self.module) if p.requires_grad]
        world = dist.get_world_size(self.process_group)
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in params:
            by_dtype.setdefault(p.dtype, []).append(p)
        for group in by_dtype.values():
            # a parameter without a gradient here counts as zero (it may have one elsewhere); the trailing flags
            # count the processes that have one, so a parameter no process trained keeps no gradient
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group]
            flags = torch.tensor([float(p.grad is not None) for p in group], dtype=grads[0].dtype)
            flat = torch.cat([g.reshape(-1) for g in grads] + [flags.to(grads[0].device)])
            dist.all_reduce(flat, group=self.process_group)
            *reduced, counts = flat.split([g.numel() for g in grads] + [len(group)])
            for p, total, count in zip(group, reduced, counts.tolist()):
                if count == 0:
                    continue
                total = total.div_(world).view_as(p)
                if p.grad is None:
                    p.grad = total.clone()
                else:
                    p.grad.copy_(total)


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for value in output.values() for t in _tensors(value)]
    if isinstance(output, (list, tuple)):
        return [t for value in output for t in _tensors(value)]
    return []
