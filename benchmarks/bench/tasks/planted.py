"""Ground truth: a teacher with low-rank changes of known ranks planted in some modules; the students learn to match
its hidden states on SST-2 sentences, and the oracle adapts exactly the changed modules at exactly their ranks.

* ``planted``: all-MiniLM-L6-v2 with four changes of very different ranks (``PLANTED``), 32-token sentences.
* ``family-<k>``: member ``k`` of the planted family (:mod:`bench.family`), 16-token sentences.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .. import family, models
from ..suites import Suite
from .base import MINILM_TARGETS, Task, sst2_sentences, with_gap_closed
from .clm import LLAMA_TARGETS

#: The planted changes: (layer, module, rank). Very different ranks in modules of different shapes.
PLANTED = [
    (0, "attention.self.value", 8),
    (2, "intermediate.dense", 16),
    (4, "attention.output.dense", 2),
    (5, "output.dense", 12),
]
PLANTED_STRENGTH = 0.5  # each planted singular value, relative to the module weight's largest one
#: the validation sentences: SST-2 training sentences no student trains on (they train on the first 8,000)
VALIDATION_SENTENCES = slice(60000, 60872)


class HiddenStateTask(Task):
    """Students match a fixed teacher's last hidden states (masked MSE); the metric is the share of the base model's
    held-out error removed. A subclass builds the teacher (:meth:`plant`) and names the model and targets.

    Held-out: the SST-2 dev sentences; validation: ``VALIDATION_SENTENCES`` of the training split."""

    max_length: int  # tokens per sentence

    def __init__(self, suite: Suite):
        super().__init__(suite)
        import torch
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path())
        self.teacher = self.base_model().eval().requires_grad_(False)
        self.planted = self.plant(self.teacher)  # module -> rank: the oracle's ranks
        self.train = [self._encode(s) for s in sst2_sentences("train")[:8000]]
        self.dev = self.collate([self._encode(s) for s in sst2_sentences("dev")])
        with torch.no_grad():  # the teacher is fixed: its held-out targets are computed once
            self.dev_targets = [self.teacher(**batch).last_hidden_state for batch in self._batches_of(self.dev)]
        self._val: tuple[dict, list] | None = None  # built when first validated

    def model_path(self) -> Any:
        raise NotImplementedError

    def plant(self, teacher) -> dict[str, int]:
        """Add the changes to ``teacher``'s weights in place; return the changed modules and their ranks."""
        raise NotImplementedError

    @staticmethod
    def _batches_of(rows: dict) -> Iterator[dict]:
        for start in range(0, len(rows["input_ids"]), 128):
            yield {k: v[start : start + 128] for k, v in rows.items()}

    def _encode(self, text: str) -> dict:
        return self.tokenizer(text, truncation=True, max_length=self.max_length)

    def collate(self, items: list[dict]) -> dict:
        return dict(self.tokenizer.pad(items, return_tensors="pt"))

    def loss(self, model, batch, target=None) -> Any:
        import torch

        if target is None:
            with torch.no_grad():
                target = self.teacher(**batch).last_hidden_state
        output = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(output.dtype)
        return ((output - target).pow(2) * mask).sum() / (mask.sum() * output.shape[-1])

    def model_inputs(self, batch) -> dict:
        return dict(batch)

    def evaluate(self, model) -> dict:
        return {"eval_mse": self._mse(model, self.dev, self.dev_targets)}

    def validate(self, model) -> dict | None:
        if self._val is None:
            import torch

            rows = self.collate([self._encode(s) for s in sst2_sentences("train")[VALIDATION_SENTENCES]])
            with torch.no_grad():
                self._val = rows, [self.teacher(**batch).last_hidden_state for batch in self._batches_of(rows)]
        return {"eval_mse": self._mse(model, *self._val)}

    def _mse(self, model, rows: dict, targets: list) -> float:
        import torch

        model.eval()
        losses = []
        with torch.no_grad():
            for batch, target in zip(self._batches_of(rows), targets):
                losses.append((float(self.loss(model, batch, target)), len(batch["input_ids"])))
        model.train()
        return sum(v * n for v, n in losses) / sum(n for _, n in losses)

    def finish(self, metrics: dict, base_metrics: dict) -> dict:
        return with_gap_closed(metrics, base_metrics)


def random_directions(weight, rank: int, generator) -> tuple[Any, Any]:
    """Random orthonormal output and input directions ``U`` (``fan_out x rank``), ``V`` (``fan_in x rank``)."""
    import torch

    u, _ = torch.linalg.qr(torch.randn(weight.shape[0], rank, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(weight.shape[1], rank, generator=generator))
    return u, v


class PlantedTask(HiddenStateTask):
    max_length = 32

    def model_path(self) -> Any:
        return models.resolve_model("minilm")

    def plant(self, teacher) -> dict[str, int]:
        import torch

        generator = torch.Generator().manual_seed(1234)  # the task, not the run: fixed across seeds
        planted = {}
        for layer, module, rank in PLANTED:
            name = f"encoder.layer.{layer}.{module}"
            weight = teacher.get_submodule(name).weight
            u, v = random_directions(weight, rank, generator)
            top = torch.linalg.matrix_norm(weight, ord=2)
            weight.data += PLANTED_STRENGTH * top * (u @ v.T)
            planted[name] = rank
        return planted

    def base_model(self):
        from transformers import AutoModel

        return AutoModel.from_pretrained(self.model_path())

    def targets(self) -> list[str]:
        return MINILM_TARGETS


class FamilyTask(HiddenStateTask):
    max_length = 16  # short sentences keep a member's run at a few minutes

    def __init__(self, suite: Suite):
        self.member = family.member(suite.settings["member"])
        self.model_name = self.member.teacher
        super().__init__(suite)

    def model_path(self) -> Any:
        return models.resolve_model("minilm") if self.member.teacher == "minilm" else models.smollm2_path()

    def plant(self, teacher) -> dict[str, int]:
        import torch

        generator = torch.Generator().manual_seed(10_000 + self.member.index)  # the member, not the run
        for change in self.member.changes:
            weight = teacher.get_submodule(change.module).weight
            u, v = random_directions(weight, change.rank, generator)
            top = torch.linalg.matrix_norm(weight, ord=2)
            values = change.strength * top * change.decay ** torch.arange(change.rank, dtype=weight.dtype)
            weight.data += (u * values) @ v.T
        return self.member.oracle_ranks

    def base_model(self):
        from transformers import AutoModel

        if self.member.teacher == "minilm":
            # No dropout (family v2): with BERT's 0.1 the students' training error (about 0.033) dwarfed what a
            # member plants (held-out base error 0.0002-0.005), so uniform LoRA fitted the noise and ended worse
            # than the untrained student on every MiniLM member of v1 (RESULTS.md, "the planted family").
            # SmolLM2 has no dropout. The teacher runs in eval mode either way.
            return AutoModel.from_pretrained(
                self.model_path(), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
            )
        # SmolLM2's first decoder layers (the rest of the checkpoint is not loaded)
        return AutoModel.from_pretrained(self.model_path(), num_hidden_layers=family.TEACHERS["smollm2"]["layers"])

    def targets(self) -> list[str]:
        return MINILM_TARGETS if self.member.teacher == "minilm" else LLAMA_TARGETS
