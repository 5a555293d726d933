"""``glue-<task>``: MiniLM sequence classification on a GLUE task, scored on the full dev set."""

from __future__ import annotations

import statistics
from typing import Any

from .. import data, models
from ..metrics import compute_metrics
from ..suites import Suite
from ..transforms import text_transform
from .base import MINILM_TARGETS, Task

#: validation rows: this many from the GLUE training split outside the fixed training subset (SST-2's dev size)
VALIDATION_ROWS = 872


class GlueTask(Task):
    """Held-out: the full dev set; validation: ``VALIDATION_ROWS`` training rows outside the training subset (none
    where the subset is the whole training split, as on STS-B)."""

    def __init__(self, suite: Suite):
        super().__init__(suite)
        from transformers import AutoTokenizer

        self.task = suite.name.split("-")[1]
        self.spec = data.TASKS[self.task]
        self.path = models.resolve_model("minilm")
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.transform = text_transform(suite.settings.get("transform"))  # the same rewriting of train and dev
        train, _ = data.load_split(self.task, "train", data.default_glue_dir())
        dev, _ = data.load_split(self.task, "dev", data.default_glue_dir())
        limit = suite.settings.get("train_limit", 8000)
        self._val_source = data.rows_outside_subset(train, limit, VALIDATION_ROWS)  # encoded when first validated
        train = data.take_subset(train, limit)
        self.train = self._encode(train)
        self.dev_rows = self._encode(dev)
        self.label_mean = statistics.fmean(train["label"]) if self.spec.num_labels == 1 else None

    def _encode(self, rows: dict) -> list[dict]:
        columns = self.spec.text_columns
        texts = [[self.transform(text) for text in rows[c]] for c in columns]
        encoded = self.tokenizer(*texts, truncation=True, max_length=64)
        return [
            {
                "input_ids": encoded["input_ids"][i],
                "attention_mask": encoded["attention_mask"][i],
                "labels": rows["label"][i],
            }
            for i in range(len(rows["label"]))
        ]

    def collate(self, items: list[dict]) -> dict:
        import torch

        labels = [item["labels"] for item in items]
        batch = dict(
            self.tokenizer.pad(
                [{k: v for k, v in item.items() if k != "labels"} for item in items], return_tensors="pt"
            )
        )
        batch["labels"] = torch.tensor(labels, dtype=torch.float32 if self.spec.num_labels == 1 else torch.long)
        return batch

    def base_model(self):
        import torch
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(self.path, num_labels=self.spec.num_labels)
        if self.label_mean is not None:  # regression: start the head at the label mean (see benchmarks/README.md)
            with torch.no_grad():
                model.classifier.bias.fill_(self.label_mean)
        return model

    def targets(self) -> list[str]:
        return MINILM_TARGETS

    def loss(self, model, batch) -> Any:
        return model(**batch).loss

    def model_inputs(self, batch) -> dict:
        return {k: v for k, v in batch.items() if k != "labels"}

    def evaluate(self, model) -> dict:
        return self._scores(model, self.dev_rows)

    def validate(self, model) -> dict | None:
        if not self._val_source["label"]:
            return None
        return self._scores(model, self._encode(self._val_source))

    def _scores(self, model, rows: list[dict]) -> dict:
        import torch

        model.eval()
        preds, labels, total = [], [], 0.0
        with torch.no_grad():
            for start in range(0, len(rows), 128):
                batch = self.collate(rows[start : start + 128])
                out = model(**batch)
                total += float(out.loss) * len(batch["labels"])
                logits = out.logits
                preds += (logits.squeeze(-1) if self.spec.num_labels == 1 else logits.argmax(-1)).tolist()
                labels += batch["labels"].tolist()
        model.train()
        metrics, _ = compute_metrics(self.task, preds, labels, "sklearn")
        return {**metrics, "eval_loss": total / len(labels)}

    def finish(self, metrics: dict, base_metrics: dict) -> dict:
        return metrics
