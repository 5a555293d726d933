"""What every task shares: the ``Task`` interface, the per-seed data order, and helpers of several task families."""

from __future__ import annotations

from typing import Any

from .. import data
from ..suites import Suite

MINILM_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


class Task:
    """Data, model and loss of one suite; everything a run needs besides the method.

    A task sets ``self.train`` (its training items) in ``__init__`` and implements the methods below ``batches``.
    Besides the held-out set it reports (``evaluate``), a task may have a validation set (``validate``) for choosing
    learning rates: never trained on, and not the reported one.
    """

    train: list[Any]
    model_name = "minilm"  # the pretrained model: "minilm" or "smollm2" (full fine-tuning runs on MiniLM only)

    def __init__(self, suite: Suite):
        self.suite = suite

    # data order: the same batches, in the same order, for every method of a seed
    def batches(self, seed: int, count: int, offset: int = 0) -> list[Any]:
        order = torch_randperm(len(self.train), seed)
        size = self.suite.batch_size
        out = []
        for step in range(offset, offset + count):
            start = (step * size) % max(len(order) - size, 1)
            out.append(self.collate([self.train[i] for i in order[start : start + size]]))
        return out

    def collate(self, items: list) -> Any:
        """One batch from training items."""
        raise NotImplementedError

    def base_model(self) -> Any:
        """A fresh pretrained model, before any adapter."""
        raise NotImplementedError

    def targets(self) -> list[str]:
        """``target_modules`` of every method's adapter."""
        raise NotImplementedError

    def loss(self, model, batch) -> Any:
        """The training loss of ``model`` on one batch (a scalar tensor)."""
        raise NotImplementedError

    def model_inputs(self, batch) -> dict:
        """The keyword inputs of the model's forward in one batch, without targets (EVA's initialisation)."""
        raise NotImplementedError

    def evaluate(self, model) -> dict:
        """Held-out metrics of ``model``."""
        raise NotImplementedError

    def validate(self, model) -> dict | None:
        """The same metrics on the validation set; ``None`` where the task has none."""
        return None

    def finish(self, metrics: dict, base_metrics: dict) -> dict:
        """The metrics a run records, given the base model's (e.g. the share of its error removed)."""
        raise NotImplementedError


def torch_randperm(n: int, seed: int) -> list[int]:
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def sst2_sentences(split: str) -> list[str]:
    """SST-2's sentences of ``split`` (planted, distillation and the ``sst2`` causal-LM corpus)."""
    rows, _ = data.load_split("sst2", split, data.default_glue_dir())
    return rows["sentence"]


def with_gap_closed(metrics: dict, base_metrics: dict) -> dict:
    """Distillation suites: the base model's held-out MSE and the share of it the adapters removed."""
    metrics["base_mse"] = base_metrics["eval_mse"]
    metrics["gap_closed"] = 1.0 - metrics["eval_mse"] / base_metrics["eval_mse"]
    return metrics
