"""Run under ``torchrun --nproc_per_node 2``: stock Trainer + AdaptiveLoraCallback on CPU (gloo).

After every optimizer step it measures the largest difference of the trainable parameters between the
processes and, on process 0, writes the measurements as JSON to ``argv[1]``. With ``--no-rewrap`` the
DDP re-initialisation after the resize is disabled (the negative control).
"""

import json
import sys
import warnings

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
warnings.simplefilter("ignore")

from tests.tiny_models import TokenDataset, adaptive_model  # noqa: E402

import peft_adaptive.callback  # noqa: E402
from peft_adaptive import AdaptiveLoraCallback  # noqa: E402


class CrossProcessCheck(TrainerCallback):
    def __init__(self):
        self.max_diff_per_step = {}
        self.ranks_per_process = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        flat = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
        gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())] if flat.numel() else []
        sizes = [None] * dist.get_world_size()
        dist.all_gather_object(sizes, flat.numel())
        if len(set(sizes)) > 1:
            self.max_diff_per_step[state.global_step] = float("inf")
            return
        dist.all_gather(gathered, flat)
        self.max_diff_per_step[state.global_step] = max(float((g - gathered[0]).abs().max()) for g in gathered)
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, model.base_model.ranks())
        self.ranks_per_process = ranks


def main() -> None:
    out = sys.argv[1]
    if "--no-rewrap" in sys.argv:
        peft_adaptive.callback._rewrap_distributed = lambda trainer: None
    model = adaptive_model(max_r=12)
    args = TrainingArguments(
        output_dir=out + ".run",
        max_steps=7,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        max_grad_norm=1.0,
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo",
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    check = CrossProcessCheck()
    adaptive = AdaptiveLoraCallback()
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(64), callbacks=[adaptive, check])
    trainer.train()
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(
                {
                    "world_size": dist.get_world_size(),
                    "reallocation_step": adaptive.reallocation_step,
                    "max_diff_per_step": check.max_diff_per_step,
                    "ranks_per_process": check.ranks_per_process,
                    "wrapped": type(trainer.model_wrapped).__name__,
                },
                f,
            )


if __name__ == "__main__":
    main()
