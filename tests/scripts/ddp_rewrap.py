"""Run with plain ``python`` (one process, gloo): what ``peft_adaptive.distributed.rewrap_ddp`` keeps and refuses.

Writes a JSON report to ``argv[1]``; ``tests/test_distributed.py`` checks it. One process is enough to
build real ``DistributedDataParallel`` wrappers with every setting; that the re-initialised wrapper also
synchronises two processes is checked by ``ddp_train.py`` under torchrun.
"""

import json
import os
import sys
import tempfile
import warnings

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
warnings.simplefilter("ignore")

from tests.tiny_models import TokenDataset, adaptive_model  # noqa: E402

from peft_adaptive.distributed import check_ddp, rewrap_ddp  # noqa: E402


def net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))


def backward(wrapper: torch.nn.Module) -> None:
    wrapper(torch.randn(4, 8)).sum().backward()


def kept_settings() -> dict:
    calls = {"comm": 0, "forward": 0}

    def counting_hook(state, bucket):
        state["comm"] += 1
        return default_hooks.allreduce_hook(None, bucket)

    module = net()
    wrapper = DDP(
        module,
        find_unused_parameters=True,
        gradient_as_bucket_view=True,
        bucket_cap_mb=3,
        broadcast_buffers=False,
    )
    wrapper.register_comm_hook(calls, counting_hook)
    wrapper.register_forward_pre_hook(lambda mod, args: calls.__setitem__("forward", calls["forward"] + 1))
    group = wrapper.process_group
    module[2].weight = torch.nn.Parameter(torch.randn(2, 8))  # what a resize does: a new Parameter object
    rewrap_ddp(torch.compile(wrapper, backend="eager"))  # also through torch.compile's wrapper
    backward(wrapper)
    return {
        "comm_calls": calls["comm"],
        "forward_calls": calls["forward"],
        "new_param_has_grad": module[2].weight.grad is not None,
        "new_param_in_reducer": any(p is module[2].weight for p in wrapper._module_parameters),
        "same_process_group": wrapper.process_group is group,
        "find_unused_parameters": wrapper.find_unused_parameters,
        "gradient_as_bucket_view": wrapper.gradient_as_bucket_view,
        "bucket_bytes_cap": wrapper.bucket_bytes_cap,
        "broadcast_buffers": wrapper.broadcast_buffers,
        "training": wrapper.training,
    }


def kept_other_settings() -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    out = {}
    default = DDP(net())
    first = default._bucket_config.first_bucket_bytes_cap
    rewrap_ddp(default)
    out["default_first_bucket_kept"] = default._bucket_config.first_bucket_bytes_cap == first
    listed = DDP(net(), bucket_cap_mb_list=[1, 2])
    caps = list(listed.bucket_bytes_cap_list)
    rewrap_ddp(listed)
    out["bucket_list_kept"] = list(listed.bucket_bytes_cap_list) == caps
    static = DDP(net(), static_graph=True)
    rewrap_ddp(static)
    out["static_graph"] = static.static_graph
    mesh = init_device_mesh("cpu", (1,))
    meshed = DDP(net(), device_mesh=mesh)
    rewrap_ddp(meshed)
    out["device_mesh_kept"] = meshed.device_mesh is mesh
    state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=1, start_powerSGD_iter=2)
    powered = DDP(net())
    powered.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    for _ in range(3):
        backward(powered)
    out["powersgd_memory_before"] = len(state.error_dict) + len(state.p_memory_dict)
    rewrap_ddp(powered)
    out["powersgd_memory_after"] = len(state.error_dict) + len(state.p_memory_dict)
    out["powersgd_hook_kept"] = [hook for hook, _ in powered._comm_hooks] == [powerSGD_hook.powerSGD_hook]
    backward(powered)
    evaluating = DDP(net())
    evaluating.eval()
    rewrap_ddp(evaluating)
    out["eval_kept"] = not evaluating.training
    out["not_ddp"] = rewrap_ddp(net()) is False and rewrap_ddp(None) is False
    return out


def refusals() -> dict:
    out = {}

    def refused(wrapper) -> str:
        messages = []
        for check in (check_ddp, rewrap_ddp):
            try:
                check(wrapper)
                messages.append("")
            except RuntimeError as error:
                messages.append(str(error))
        return messages[0] if messages[0] == messages[1] else f"check/rewrap differ: {messages}"

    builtin = DDP(net())
    builtin._register_builtin_comm_hook(dist.BuiltinCommHookType.FP16_COMPRESS)
    out["builtin_hook"] = refused(builtin)
    module = net()
    names = [(n, p) for n, p in module.named_parameters() if n.startswith("0.")]
    delayed = DDP(module, delay_all_reduce_named_params=names, param_to_hook_all_reduce=module[2].weight)
    out["delay_all_reduce"] = refused(delayed)
    fused = DDP(net())
    fused._register_fused_optim(torch.optim.SGD, lr=0.1)
    out["fused_optim"] = refused(fused)
    mixed = DDP(net())
    mixed.mixed_precision = object()  # a real one needs an accelerator for its streams; the check reads this
    out["mixed_precision"] = refused(mixed)
    return out


def adaptive_model_under_ddp() -> dict:
    """update_and_allocate(..., wrapper=ddp) on a real adaptive model: the new factors are reduced by DDP."""
    model = adaptive_model(max_r=12, signal_steps=2)
    wrapper = DDP(model, find_unused_parameters=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = TokenDataset(12, seed=5)
    for step in (1, 2, 3):
        batch = data.ids[4 * (step - 1) : 4 * step]
        wrapper(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step, optimizer, wrapper=wrapper)
        optimizer.zero_grad()
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    reduced = {id(p) for p in wrapper._module_parameters if p.requires_grad}
    return {
        "reallocation_step": model.peft_config["default"].reallocation_step,
        "reducer_holds_the_trainable_parameters": trainable == reduced,
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'store')}", rank=0, world_size=1)
        try:
            result = {
                "kept": kept_settings(),
                "kept_other": kept_other_settings(),
                "refused": refusals(),
                "adaptive": adaptive_model_under_ddp(),
            }
        finally:
            dist.destroy_process_group()
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
