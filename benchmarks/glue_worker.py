"""One GLUE run, (task, method, seed), in its own process: load, wrap, train, evaluate, write the record as JSON.

What ``glue.py`` starts for each run (``glue.py --worker SPEC.json`` does the same)::

    python benchmarks/glue_worker.py SPEC.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import common
from bench.data import TASKS
from bench.metrics import compute_metrics
from methods import Method, adapter_facts, build_method, method_lr


@dataclass
class RunSpec:
    """Everything one worker needs; written as JSON for the subprocess."""

    task: str
    method: dict
    seed: int
    model: str
    data_dir: str
    result_path: str
    r: int
    lora_alpha: int
    lora_dropout: float
    targets: str
    lr: float
    full_lr: float
    weight_decay: float
    batch_size: int
    eval_batch_size: int
    max_steps: int
    lr_warmup_ratio: float
    adalora_init_r: int
    adalora_tinit: int
    adalora_tfinal: int
    adalora_deltat: int
    eva_rho: float
    metric_backend: str
    bf16: bool


def load_model(spec: RunSpec):
    import torch
    from transformers import AutoModelForSequenceClassification, set_seed

    num_labels = TASKS[spec.task].num_labels
    set_seed(spec.seed)  # the new classifier head is drawn from this seed, identically for every method
    model = AutoModelForSequenceClassification.from_pretrained(spec.model, num_labels=num_labels, dtype=torch.float32)
    if num_labels == 1:
        model.config.problem_type = "regression"
        start_regression_head_at_label_mean(model, spec)
    # on the training device before any method-specific init (EVA's SVD runs forward passes)
    return model.to("cuda") if torch.cuda.is_available() else model


def start_regression_head_at_label_mean(model, spec: RunSpec) -> None:
    """Set the regression output's bias to the mean training label, identically for every method.

    STS-B labels average about 2.7 on a 0-5 scale. From a zero-mean head, a short run spends its steps on that
    offset: measured on STS-B (90 steps, seed 0), LoRA reached Pearson 0.04 from a zero bias and 0.80 from the mean.
    """
    import torch
    from datasets import load_from_disk

    labels = load_from_disk(str(Path(spec.data_dir) / "train"))["labels"]
    outputs = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1]
    if not outputs or outputs[-1].bias is None:
        raise RuntimeError("regression task: no Linear output with a bias found to initialise")
    with torch.no_grad():
        outputs[-1].bias.fill_(sum(labels) / len(labels))


class DataOrderFingerprint:
    """Wraps a collator and hashes every training batch's labels and token ids, in order."""

    def __init__(self, collator) -> None:
        import hashlib

        self.collator = collator
        self.hash = hashlib.sha256()
        self.batches = 0
        self.active = True

    def __call__(self, features: list[dict]):
        batch = self.collator(features)
        if self.active:
            self.hash.update(batch["input_ids"].numpy().tobytes())
            self.hash.update(batch["labels"].numpy().tobytes())
            self.batches += 1
        return batch

    def digest(self) -> str:
        return self.hash.hexdigest()[:16]


def training_arguments(spec: RunSpec, method: Method, out_dir: str):
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out_dir,
        max_steps=spec.max_steps,
        per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=spec.eval_batch_size,
        learning_rate=method_lr(spec, method),
        weight_decay=spec.weight_decay,
        lr_scheduler_type="linear",
        warmup_steps=round(spec.lr_warmup_ratio * spec.max_steps),
        optim="adamw_torch",
        max_grad_norm=1.0,
        seed=spec.seed,
        data_seed=spec.seed,
        bf16=spec.bf16,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=max(1, spec.max_steps // 10),
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )


def predictions_and_labels(trainer, dev_ds, task: str) -> tuple[list, list]:
    output = trainer.predict(dev_ds)
    logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
    if TASKS[task].num_labels == 1:
        return logits.reshape(-1).tolist(), output.label_ids.reshape(-1).tolist()
    return logits.argmax(-1).tolist(), output.label_ids.tolist()


def run_worker(spec_path: str) -> None:
    """Train and evaluate one (task, method, seed) and write its record as JSON."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer

    spec = RunSpec(**json.loads(Path(spec_path).read_text()))
    method = Method(**spec.method)
    tokenizer = AutoTokenizer.from_pretrained(spec.model)
    train_ds = load_from_disk(str(Path(spec.data_dir) / "train"))
    dev_ds = load_from_disk(str(Path(spec.data_dir) / "dev"))
    collator = DataOrderFingerprint(DataCollatorWithPadding(tokenizer))

    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    model = load_model(spec)
    load_s = time.perf_counter() - t0
    with common.ResourceMonitor() as monitor:
        t1 = time.perf_counter()
        collator.active = False  # EVA's own batches are not part of the training data order
        model, callbacks, info = build_method(spec, method, model, train_ds, collator)
        collator.active = True
        init_s = time.perf_counter() - t1
        start_facts = adapter_facts(model, method)
        trainer = Trainer(
            model=model,
            args=training_arguments(spec, method, str(Path(spec.result_path).with_suffix(""))),
            train_dataset=train_ds,
            data_collator=collator,
            callbacks=[common.StepProgressCallback(), *callbacks],
        )
        t2 = time.perf_counter()
        train_output = trainer.train()
        train_s = time.perf_counter() - t2
    collator.active = False
    t3 = time.perf_counter()
    preds, labels = predictions_and_labels(trainer, dev_ds, spec.task)
    metrics, backend = compute_metrics(spec.task, preds, labels, spec.metric_backend)
    eval_s = time.perf_counter() - t3
    end_facts = adapter_facts(model, method)
    record = {
        "task": spec.task,
        "method": method.name,
        "kind": method.kind,
        "seed": spec.seed,
        "status": "ok",
        "model": spec.model,
        "r": spec.r,
        "lr": method_lr(spec, method),
        "targets": spec.targets,
        "metric_name": TASKS[spec.task].main_metric,
        "metric": metrics[TASKS[spec.task].main_metric],
        "metrics": metrics,
        "metric_backend": backend,
        "train_loss": train_output.training_loss,
        "steps": trainer.state.global_step,
        "data_order": collator.digest(),
        "time_s": init_s + train_s,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "load_s": load_s,
        "init_s": init_s,
        "train_s": train_s,
        "eval_s": eval_s,
        **monitor.result(),
        "start": start_facts,
        **end_facts,
        "method_config": asdict(method),
        **info,
    }
    record.update(_method_extras(model, method))
    common.write_json(Path(spec.result_path), record)


def _method_extras(model, method: Method) -> dict[str, Any]:
    config = model.peft_config["default"] if hasattr(model, "peft_config") else None
    if method.kind == "adaptive":
        return {"reallocation_step": getattr(config, "reallocation_step", None)}
    if method.kind == "adalora":
        return {"adalora_rank_pattern_set": bool(config.rank_pattern)}
    return {}


if __name__ == "__main__":
    run_worker(sys.argv[1])
