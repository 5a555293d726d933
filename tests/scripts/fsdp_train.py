"""Run under ``torchrun --nproc_per_node 2``: a hand loop with ``update_and_allocate`` under FSDP2 on CPU (gloo).

The tiny Llama's base model is sharded per decoder layer with ``peft_adaptive.fsdp.shard_base_model``; each
process trains on its half of every global batch. Process 0 first runs the same loop on the whole batches in
one process (before the process group exists), as the reference. Writes, from process 0, into the folder
``argv[1]``:

* ``result.json``: both runs' allocation reports and per-step losses (the sharded run's averaged over the
  processes), the ranks on every process, the largest cross-process difference of the adapter after every step,
  and whether any process held a whole base weight after sharding;
* ``reference.pt`` / ``sharded.pt`` / ``resumed.pt``: the adapter weights at the end of the reference run, the
  sharded run, and a sharded run resumed from ``checkpoint`` (saved at step ``CHECKPOINT`` after the reallocation);
* ``accumulated.pt``: the same sharded run with two accumulated micro-batches per step (its report is in
  ``result.json``);
* ``adapter/`` (``save_pretrained`` of the sharded model), ``inputs.pt`` and ``logits.pt`` (its eval logits).

``result.json`` also holds the number of adapter gradients an all-reduce made up where no process had one,
the error ``update_and_allocate`` raises for a model whose adapter plain ``fully_shard`` sharded, and the
cross-process difference of the adapter after two steps without the adapter's gradient all-reduce (the
negative control).
"""

import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
warnings.simplefilter("ignore")

from tests.scripts.ddp_train import all_ranks, max_cross_process_diff  # noqa: E402
from tests.tiny_models import TokenDataset, adaptive_model  # noqa: E402

from peft_adaptive.fsdp import adapter_parameters, shard_base_model  # noqa: E402

STEPS, SIGNAL_STEPS, CHECKPOINT, GLOBAL_BATCH = 9, 3, 5, 8


def new_model() -> torch.nn.Module:
    return adaptive_model(max_r=12, signal_steps=SIGNAL_STEPS)


def new_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def global_batch() -> torch.Tensor:
    """The same global batch at every step, so that the loss must fall."""
    return TokenDataset(GLOBAL_BATCH, seed=4).ids


def train(model, optimizer, steps, rows: slice, on_step=None, micro_batches: int = 1) -> tuple[dict, list[float]]:
    """The README's hand loop; returns the allocation report (as a dict, or None) and the per-step losses.

    With ``micro_batches > 1`` each process's batch is split into that many micro-batches whose gradients are
    accumulated (one backward each) before the optimizer step.
    """
    report, losses = None, []
    batch = global_batch()[rows]
    for step in steps:
        loss = 0.0
        for micro in batch.chunk(micro_batches):
            micro_loss = model(input_ids=micro, labels=micro).loss / micro_batches
            micro_loss.backward()
            loss += float(micro_loss)
        optimizer.step()
        allocated = model.base_model.update_and_allocate(step, optimizer)
        optimizer.zero_grad()
        report = allocated.to_dict() if allocated is not None else report
        losses.append(loss)
        if on_step is not None:
            on_step(step, losses)
    return report, losses


def adapter_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def refusal_of_a_sharded_adapter() -> str:
    """Plain ``fully_shard`` (the adapter inside the shards): update_and_allocate must refuse at its first call."""
    model = new_model()
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model.base_model.model)
    optimizer = new_optimizer(model)
    try:
        train(model, optimizer, range(1, 2), slice(0, 1))
    except RuntimeError as error:
        return str(error)
    return ""


def drift_without_gradient_sync(rows: slice) -> float:
    """The negative control: without the adapter's all-reduce, FSDP leaves it to each process's own data."""
    model = shard_base_model(new_model())
    model.adapter_gradient_sync.remove()
    train(model, new_optimizer(model), range(1, 3), rows)
    return max_cross_process_diff(model)


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if rank == 0:  # the unsharded reference, before any process group exists
        model = new_model()
        reference_report, reference_losses = train(model, new_optimizer(model), range(1, STEPS + 1), slice(None))
        torch.save(adapter_state(model), out / "reference.pt")
    dist.init_process_group("gloo")
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)

    model = shard_base_model(new_model())
    whole_base_weights = [
        n for n, p in model.named_parameters() if not p.requires_grad and not hasattr(p, "placements")
    ]
    optimizer = new_optimizer(model)
    diffs, global_losses = {}, []

    def after_step(step, losses):
        diffs[step] = max_cross_process_diff(model)
        mean = torch.tensor(losses[-1])
        dist.all_reduce(mean)
        global_losses.append(float(mean) / world)
        if step == CHECKPOINT:
            model.save_pretrained(out / "checkpoint", is_main_process=rank == 0)
            if rank == 0:
                torch.save(optimizer.state_dict(), out / "checkpoint" / "optimizer.pt")
            dist.barrier()

    report, _ = train(model, optimizer, range(1, STEPS + 1), rows, after_step)
    model.save_pretrained(out / "adapter", is_main_process=rank == 0)
    inputs = global_batch()[:2]
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=inputs).logits
    ranks = all_ranks(model.base_model)
    model.adapter_gradient_sync.all_reduce()  # after zero_grad: no process has gradients, none may appear
    gradients_made_up = sum(p.grad is not None for p in adapter_parameters(model))
    sharded = adapter_state(model)

    # resume: a fresh model takes the checkpoint's ranks and weights before sharding, then continues
    resumed = new_model()
    resumed.load_adapter(str(out / "checkpoint"), adapter_name="default", is_trainable=True)
    resumed = shard_base_model(resumed)
    optimizer = new_optimizer(resumed)
    optimizer.load_state_dict(torch.load(out / "checkpoint" / "optimizer.pt", weights_only=True))
    train(resumed, optimizer, range(CHECKPOINT + 1, STEPS + 1), rows)

    refused = refusal_of_a_sharded_adapter()
    accumulated = shard_base_model(new_model())
    accumulated_report, _ = train(accumulated, new_optimizer(accumulated), range(1, STEPS + 1), rows, micro_batches=2)
    drift = drift_without_gradient_sync(rows)

    if rank == 0:
        torch.save(sharded, out / "sharded.pt")
        torch.save(adapter_state(accumulated), out / "accumulated.pt")
        torch.save(adapter_state(resumed), out / "resumed.pt")
        torch.save(inputs, out / "inputs.pt")
        torch.save(logits, out / "logits.pt")
        result = {
            "world_size": world,
            "reference": {"report": reference_report, "losses": reference_losses},
            "sharded": {"report": report, "losses": global_losses},
            "accumulated": {"report": accumulated_report},
            "ranks_per_process": ranks,
            "max_diff_per_step": diffs,
            "whole_base_weights": whole_base_weights,
            "adapter_parameters": len(adapter_parameters(model)),
            "refused": refused,
            "gradients_made_up": gradients_made_up,
            "drift_without_gradient_sync": drift,
        }
        (out / "result.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
