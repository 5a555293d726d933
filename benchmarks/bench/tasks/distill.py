"""``distill*``: MiniLM learns all-mpnet-base-v2's sentence embeddings through a fixed linear read-out."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .. import common, models
from ..suites import Suite
from .base import MINILM_TARGETS, Task, sst2_sentences, with_gap_closed


def fit_readout(student: Any, teacher: Any, readout: str = "pinv") -> Any:
    """Least-squares read-out ``[W^T; b]`` ([d_student + 1, d_teacher], float64) from student to teacher embeddings.

    ``"lstsq"`` is what the first ``distill`` suites ran: a plain ``torch.linalg.lstsq``. MiniLM's normalised
    embeddings plus the bias column are rank-deficient (on the 8,000 SST-2 sentences the smallest singular values
    are 2e-7 and 1e-16 against a largest of 96), so that solution puts weights of order 1e6 on directions the base
    student's embeddings do not span, and they change with rounding: rebuilt on another CPU type the base
    student's held-out error went from 0.4615 to 0.5392. ``"pinv"`` is the minimum-norm solution over the
    directions with a singular value above 1e-6 of the largest: well-posed and the same on any machine.
    """
    import torch

    design = torch.cat([student.double(), torch.ones(len(student), 1, dtype=torch.float64)], dim=1)
    if readout == "lstsq":
        return torch.linalg.lstsq(design, teacher.double()).solution
    if readout == "pinv":
        return torch.linalg.pinv(design, rtol=1e-6) @ teacher.double()
    raise SystemExit(f"unknown read-out {readout!r}; expected 'lstsq' or 'pinv'")


class DistillTask(Task):
    """MiniLM-L6 learns to produce all-mpnet-base-v2's sentence embeddings (a different, 5x larger model).

    The target needs information the student does not have, so capacity can bind. A fixed linear read-out
    ``W s + b`` (384 -> 768, least squares from the *base* student's embeddings on the training sentences) maps
    the student's normalised mean-pooled embedding ``s`` into the teacher's space; it is the same for every
    method and seed and is not trained, so the base model with it is the best linear read-out and the adapters
    learn what it cannot. Teacher embeddings and the read-out are computed once and cached. No validation set: the
    teacher's embeddings of more sentences would need the teacher at run time (the suite is not tuned).
    """

    def __init__(self, suite: Suite):
        super().__init__(suite)
        from transformers import AutoTokenizer

        self.path = models.resolve_model("minilm")
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        train_sentences = sst2_sentences("train")[: suite.settings.get("train_sentences", 8000)]
        dev_sentences = sst2_sentences("dev")
        self.train = [self._encode(s) for s in train_sentences]
        self.dev = [self._encode(s) for s in dev_sentences]
        cache = self._targets(train_sentences, dev_sentences)
        for item, target in zip(self.train, cache["train"]):
            item["target"] = target
        for item, target in zip(self.dev, cache["dev"]):
            item["target"] = target
        self.readout_weight, self.readout_bias = cache["weight"], cache["bias"]

    def _encode(self, text: str) -> dict:
        return dict(self.tokenizer(text, truncation=True, max_length=64))

    def _targets(self, train_sentences: list[str], dev_sentences: list[str]) -> dict:
        import torch

        readout = self.suite.settings.get("readout", "lstsq")
        default = common.RESULTS_DIR / "models" / "distill-mpnet-sst2.pt"
        path = Path(os.environ.get("PEFT_ADAPTIVE_DISTILL_CACHE", default))
        # one cache file per read-out, so suites with different read-outs do not evict each other
        if readout != "lstsq":
            path = path.with_name(f"{path.stem}-{readout}{path.suffix}")
        if path.is_file():
            cache = torch.load(path)
            # computed for these sentences from this teacher (another $PEFT_ADAPTIVE_MPNET_DIR recomputes it)
            if (
                cache["sizes"] == [len(train_sentences), len(dev_sentences)]
                and cache["teacher"] == models.mpnet_path()
                and cache.get("readout", "lstsq") == readout
            ):
                return cache
        from transformers import AutoModel, AutoTokenizer

        teacher_path = models.resolve_model("mpnet")
        teacher = AutoModel.from_pretrained(teacher_path).eval()
        teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_path)
        student = AutoModel.from_pretrained(self.path).eval()

        def embed(model, tokenizer, sentences):
            out = []
            with torch.no_grad():
                for start in range(0, len(sentences), 64):
                    batch = tokenizer(sentences[start : start + 64], padding=True, truncation=True, max_length=128)
                    out.append(self.pooled(model, {k: torch.tensor(v) for k, v in batch.items()}))
            return torch.cat(out)

        teacher_train = embed(teacher, teacher_tokenizer, train_sentences)
        teacher_dev = embed(teacher, teacher_tokenizer, dev_sentences)
        student_train = embed(student, self.tokenizer, train_sentences)
        # least-squares read-out with a bias column, in float64
        solution = fit_readout(student_train, teacher_train, readout)  # [385, 768]
        cache = {
            "sizes": [len(train_sentences), len(dev_sentences)],
            "train": teacher_train,
            "dev": teacher_dev,
            "weight": solution[:-1].T.float().contiguous(),
            "bias": solution[-1].float(),
            "teacher": str(teacher_path),
            "readout": readout,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(cache, tmp)
        tmp.replace(path)
        return cache

    @staticmethod
    def pooled(model, batch: dict) -> Any:
        """sentence-transformers' embedding: mean over the real tokens, L2-normalised."""
        import torch

        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return torch.nn.functional.normalize(mean, dim=-1)

    def collate(self, items: list[dict]) -> dict:
        import torch

        batch = dict(
            self.tokenizer.pad([{k: v for k, v in i.items() if k != "target"} for i in items], return_tensors="pt")
        )
        batch["target"] = torch.stack([i["target"] for i in items])
        return batch

    def base_model(self):
        from transformers import AutoModel

        return AutoModel.from_pretrained(self.path)

    def targets(self) -> list[str]:
        return MINILM_TARGETS

    def model_inputs(self, batch) -> dict:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def loss(self, model, batch) -> Any:
        prediction = self.pooled(model, batch) @ self.readout_weight.T + self.readout_bias
        return (prediction - batch["target"]).pow(2).sum(-1).mean()

    def evaluate(self, model) -> dict:
        import torch

        model.eval()
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(self.dev), 128):
                batch = self.collate(self.dev[start : start + 128])
                total += float(self.loss(model, batch)) * len(batch["target"])
        model.train()
        return {"eval_mse": total / len(self.dev)}

    def finish(self, metrics: dict, base_metrics: dict) -> dict:
        return with_gap_closed(metrics, base_metrics)
