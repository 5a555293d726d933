"""``planted``: a MiniLM teacher with low-rank changes of known ranks planted in four modules; the students learn
to match its hidden states."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .. import models
from ..suites import Suite
from .base import MINILM_TARGETS, Task, sst2_sentences, with_gap_closed

#: The planted changes: (layer, module, rank). Very different ranks in modules of different shapes.
PLANTED = [
    (0, "attention.self.value", 8),
    (2, "intermediate.dense", 16),
    (4, "attention.output.dense", 2),
    (5, "output.dense", 12),
]
PLANTED_STRENGTH = 0.5  # each planted singular value, relative to the module weight's largest one


class PlantedTask(Task):
    def __init__(self, suite: Suite):
        super().__init__(suite)
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.path = models.resolve_model("minilm")
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.teacher = AutoModel.from_pretrained(self.path).eval().requires_grad_(False)
        generator = torch.Generator().manual_seed(1234)  # the task, not the run: fixed across seeds
        self.planted = {}
        for layer, module, rank in PLANTED:
            name = f"encoder.layer.{layer}.{module}"
            weight = self.teacher.get_submodule(name).weight
            u, _ = torch.linalg.qr(torch.randn(weight.shape[0], rank, generator=generator))
            v, _ = torch.linalg.qr(torch.randn(weight.shape[1], rank, generator=generator))
            top = torch.linalg.matrix_norm(weight, ord=2)
            weight.data += PLANTED_STRENGTH * top * (u @ v.T)
            self.planted[name] = rank
        self.train = [self._encode(s) for s in sst2_sentences("train")[:8000]]
        self.dev = self.collate([self._encode(s) for s in sst2_sentences("dev")])
        with torch.no_grad():  # the teacher is fixed: its held-out targets are computed once
            self.dev_targets = [self.teacher(**batch).last_hidden_state for batch in self._dev_batches()]

    def _dev_batches(self) -> Iterator[dict]:
        for start in range(0, len(self.dev["input_ids"]), 128):
            yield {k: v[start : start + 128] for k, v in self.dev.items()}

    def _encode(self, text: str) -> dict:
        return self.tokenizer(text, truncation=True, max_length=32)

    def collate(self, items: list[dict]) -> dict:
        return dict(self.tokenizer.pad(items, return_tensors="pt"))

    def base_model(self):
        from transformers import AutoModel

        return AutoModel.from_pretrained(self.path)

    def targets(self) -> list[str]:
        return MINILM_TARGETS

    def loss(self, model, batch, target=None) -> Any:
        import torch

        if target is None:
            with torch.no_grad():
                target = self.teacher(**batch).last_hidden_state
        output = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(output.dtype)
        return ((output - target).pow(2) * mask).sum() / (mask.sum() * output.shape[-1])

    def evaluate(self, model) -> dict:
        import torch

        model.eval()
        losses = []
        with torch.no_grad():
            for batch, target in zip(self._dev_batches(), self.dev_targets):
                losses.append((float(self.loss(model, batch, target)), len(batch["input_ids"])))
        model.train()
        loss = sum(v * n for v, n in losses) / sum(n for _, n in losses)
        return {"eval_mse": loss}

    def finish(self, metrics: dict, base_metrics: dict) -> dict:
        return with_gap_closed(metrics, base_metrics)
