"""Tiny randomly initialised models built from configs (no downloads), shared by the tests.

:func:`adaptive_model` is the one factory of adaptive PEFT models on them.
"""

from __future__ import annotations

import torch
from peft import PeftModel, get_peft_model
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 128


def tiny_llama(seed: int = 0, layers: int = 2, kv_heads: int = 2) -> LlamaForCausalLM:
    """``kv_heads=4``: key and value as wide as the query, so every attention projection costs the same per rank."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def tiny_bert(seed: int = 0, layers: int = 2, num_labels: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


def tiny_gpt2(seed: int = 0, layers: int = 2) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config)


#: name -> (factory, the linear layers of its blocks, PEFT task type)
TINY_MODELS = {
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "CAUSAL_LM"),
    "bert": (tiny_bert, ["query", "key", "value", "dense"], "SEQ_CLS"),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], "CAUSAL_LM"),
}


def adaptive_model(base: str = "llama", seed: int = 0, **config) -> PeftModel:
    """``get_peft_model`` of the tiny ``base`` model (drawn from ``seed``) with ``AdaptiveLoraConfig(**config)``.

    Defaults: r=4 on the linear layers of every block, the model's task type, 3 signal steps.
    """
    from peft_adaptive import AdaptiveLoraConfig

    factory, targets, task = TINY_MODELS[base]
    config = {"r": 4, "target_modules": targets, "task_type": task, "signal_steps": 3, **config}
    return get_peft_model(factory(seed=seed), AdaptiveLoraConfig(**config))


def token_batch(batch: int = 4, length: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


class TokenDataset(torch.utils.data.Dataset):
    """A learnable synthetic causal-LM/classification dataset: the label is a function of the tokens."""

    def __init__(self, n: int = 64, length: int = 16, seed: int = 0, classification: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, length), generator=g)
        self.classification = classification

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        ids = self.ids[i]
        if self.classification:
            return {"input_ids": ids, "labels": int(ids[0] < VOCAB // 2)}
        return {"input_ids": ids, "labels": ids}
