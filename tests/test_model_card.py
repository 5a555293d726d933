"""The model card PEFT writes beside a saved adaptive adapter has the tags of a LoRA adapter."""

from __future__ import annotations

from huggingface_hub import ModelCard
from peft import LoraConfig, get_peft_model

from .tiny_models import adaptive_model, tiny_llama


def test_model_card_has_the_tags_of_a_lora_adapter(tmp_path):
    adaptive = adaptive_model()
    adaptive.base_model.resize_adapter({n: 2 for n in adaptive.base_model.ranks()})
    adaptive.save_pretrained(tmp_path / "adaptive")
    plain = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    plain.save_pretrained(tmp_path / "plain")
    tags = ModelCard.load(tmp_path / "adaptive" / "README.md").data.tags
    assert "lora" in tags
    assert tags == ModelCard.load(tmp_path / "plain" / "README.md").data.tags


def test_model_card_of_a_second_adapter_in_a_subfolder_is_tagged_too(tmp_path):
    from peft_adaptive import AdaptiveLoraConfig

    model = adaptive_model()
    model.add_adapter("other", AdaptiveLoraConfig(r=2, target_modules=["q_proj"], signal_steps=3))
    model.save_pretrained(tmp_path / "both", selected_adapters=["other"])
    assert "lora" in ModelCard.load(tmp_path / "both" / "README.md").data.tags
