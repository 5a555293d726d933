"""``clm*``: SmolLM2-135M fine-tuned as a causal LM on one of three corpora (``CORPORA``), held-out loss."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .. import data, models
from ..suites import Suite
from ..transforms import text_transform
from .base import Task, sst2_sentences

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def news_texts(split: str) -> list[str]:
    """News and encyclopedia text: RTE's premises and MRPC's sentences (both columns), first occurrences only."""
    glue_dir = data.default_glue_dir()
    rte, _ = data.load_split("rte", split, glue_dir)
    mrpc, _ = data.load_split("mrpc", split, glue_dir)
    texts = rte["sentence1"] + [s for pair in zip(mrpc["sentence1"], mrpc["sentence2"]) for s in pair]
    return list(dict.fromkeys(t.strip() for t in texts))


def review_texts(split: str) -> list[str]:
    """SST-2's movie-review sentences (lower-cased, tokenized): the first 20,000 of the training split."""
    sentences = sst2_sentences(split)
    return sentences[:20000] if split == "train" else sentences


def wiki_texts(split: str) -> list[str]:
    """Wikipedia sentences and the questions asked about them, from QNLI. No labelled train split ships with
    the local GLUE files, and none is needed: the unlabelled test split is the training text, dev the held-out."""
    rows = data.load_texts(
        "qnli", "test" if split == "train" else split, ("question", "sentence"), data.default_glue_dir()
    )
    texts = [t for pair in zip(rows["question"], rows["sentence"]) for t in pair]
    return list(dict.fromkeys(t.strip() for t in texts))


# the causal-LM suites' text, by ``Suite.settings["corpus"]``
CORPORA = {"sst2": review_texts, "news": news_texts, "wiki": wiki_texts}


class CausalLMTask(Task):
    """Held-out: the first 128 dev blocks; validation: the next 128."""

    model_name = "smollm2"

    def __init__(self, suite: Suite):
        super().__init__(suite)
        import torch
        from transformers import AutoTokenizer

        self.path = models.smollm2_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        length = suite.settings.get("length", 64)
        corpus = CORPORA[suite.settings.get("corpus", "sst2")]
        transform = text_transform(suite.settings.get("transform"))  # the same rewriting of train and dev
        self.train = list(self._blocks([transform(t) for t in corpus("train")], length))
        dev = list(self._blocks([transform(t) for t in corpus("dev")], length))
        self.dev = torch.stack(dev[:128])
        self.val = torch.stack(dev[128:256]) if len(dev) >= 256 else None

    def _blocks(self, texts: list[str], length: int) -> Iterator[Any]:
        import torch

        ids: list[int] = []
        for text in texts:
            ids += self.tokenizer(text)["input_ids"] + [self.tokenizer.eos_token_id]
        for start in range(0, len(ids) - length + 1, length):
            yield torch.tensor(ids[start : start + length])

    def collate(self, items: list) -> Any:
        import torch

        return torch.stack(items)

    def base_model(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.path)

    def targets(self) -> list[str]:
        # ``settings["embeddings"]``: the input embedding in the same budget as the linear modules
        return LLAMA_TARGETS + (["embed_tokens"] if self.suite.settings.get("embeddings") else [])

    def loss(self, model, batch) -> Any:
        return model(input_ids=batch, labels=batch).loss

    def model_inputs(self, batch) -> dict:
        return {"input_ids": batch}

    def evaluate(self, model) -> dict:
        return {"eval_loss": self._mean_loss(model, self.dev)}

    def validate(self, model) -> dict | None:
        return None if self.val is None else {"eval_loss": self._mean_loss(model, self.val)}

    @staticmethod
    def _mean_loss(model, blocks) -> float:
        import torch

        model.eval()
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(blocks), 32):
                x = blocks[start : start + 32]
                total += float(model(input_ids=x, labels=x).loss) * len(x)
        model.train()
        return total / len(blocks)

    def finish(self, metrics: dict, base_metrics: dict) -> dict:
        metrics["base_loss"] = base_metrics["eval_loss"]
        return metrics
