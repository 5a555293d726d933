"""Run under ``torchrun --nproc_per_node 2``: ``Trainer`` + ``AdaptiveLoraCallback`` on a model that transformers
sharded with FSDP2 while loading it (``from_pretrained(argv[2], distributed_config=DistributedConfig(fsdp_size=2))``),
on CPU (gloo).

Writes, from process 0, into the folder ``argv[1]``: ``result.json`` (the reallocation step, the ranks on every
process, the largest cross-process difference of the adapter after every step, the logged losses, and whether
any base weight was left whole), ``adapter/`` (``trainer.save_model``), ``inputs.pt`` and ``logits.pt`` (the sharded
model's eval logits). With ``--no-resync`` the callback does not register the Trainer's gradient averaging on the
resized factors (the negative control).
"""

import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments
from transformers.distributed import DistributedConfig

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
warnings.simplefilter("ignore")

from tests.scripts.ddp_train import CrossProcessCheck  # noqa: E402
from tests.tiny_models import TINY_MODELS, TokenDataset  # noqa: E402

import peft_adaptive.callback  # noqa: E402
from peft_adaptive import AdaptiveLoraCallback, AdaptiveLoraConfig  # noqa: E402


class Losses(TrainerCallback):
    def __init__(self):
        self.losses = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]


def main() -> None:
    out, base_path = Path(sys.argv[1]), sys.argv[2]
    if "--no-resync" in sys.argv:
        peft_adaptive.callback.resync_trainer_replicas = lambda trainer: False
    torch.set_num_threads(1)
    base = AutoModelForCausalLM.from_pretrained(base_path, distributed_config=DistributedConfig(fsdp_size=2))
    whole_base_weights = [n for n, p in base.named_parameters() if not hasattr(p, "placements")]
    config = AdaptiveLoraConfig(
        r=4, target_modules=TINY_MODELS["llama"][1], task_type="CAUSAL_LM", signal_steps=3, max_r=12
    )
    model = get_peft_model(base, config)
    args = TrainingArguments(
        output_dir=str(out / "run"),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_grad_norm=1.0,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo",
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    check, losses, adaptive = CrossProcessCheck(), Losses(), AdaptiveLoraCallback()
    data = TokenDataset(8, seed=4)  # one global batch of 8 sequences per step, the same every step
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[adaptive, check, losses])
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    inputs = data.ids[:2]
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=inputs).logits
    if dist.get_rank() == 0:
        torch.save(inputs, out / "inputs.pt")
        torch.save(logits, out / "logits.pt")
        result = {
            "world_size": dist.get_world_size(),
            "wrapped": type(trainer.model_wrapped).__name__,
            "reallocation_step": adaptive.reallocation_step,
            "max_diff_per_step": check.max_diff_per_step,
            "ranks_per_process": check.ranks_per_process,
            "losses": losses.losses,
            "whole_base_weights": whole_base_weights,
        }
        (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
