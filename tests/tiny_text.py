"""A word-level tokenizer over the tiny models' vocabulary and text datasets for TRL's trainers (no downloads)."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast

from .tiny_models import VOCAB

WORDS = [f"w{i}" for i in range(VOCAB - 3)]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Token ids 0..VOCAB-1: ``<unk>``, ``<pad>``, ``<eos>`` and the words ``w0``, ``w1``, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<pad>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def _sentences(n: int, words: int, generator: torch.Generator, prefix: str = "") -> list[str]:
    ids = torch.randint(0, 40, (n, words), generator=generator)  # a small sub-vocabulary: something to learn
    return [prefix + " ".join(WORDS[i] for i in row.tolist()) for row in ids]


def text_dataset(n: int = 64, words: int = 12, seed: int = 0):
    """SFT data: a ``text`` column."""
    from datasets import Dataset

    return Dataset.from_dict({"text": _sentences(n, words, torch.Generator().manual_seed(seed))})


def preference_dataset(n: int = 32, seed: int = 0):
    """DPO data: ``prompt``, ``chosen``, ``rejected`` columns (the standard, non-conversational format).

    Completions start with a space, so that prompt + completion tokenizes as the prompt's tokens followed by
    the completion's (TRL checks that).
    """
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    prompts, chosen, rejected = _sentences(n, 6, g), _sentences(n, 4, g, " "), _sentences(n, 4, g, " ")
    return Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": rejected})
