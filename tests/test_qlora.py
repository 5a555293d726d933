"""QLoRA: adaptive ranks on a bitsandbytes-quantized base (4-bit nf4 and 8-bit), on CPU.

bitsandbytes >= 0.49 runs both on CPU (``device_map="cpu"``). The 4-bit CPU kernel needs ``in_features`` to be a
multiple of the quantization block (64), so the model here is a little wider than the other tiny models.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from peft_adaptive import AdaptiveLoraConfig
from peft_adaptive.variants import update_factors

from .fresh_process import load_adapters
from .tiny_models import VOCAB, token_batch

bnb = pytest.importorskip("bitsandbytes")

QUANTIZATION = {
    "nf4": lambda: BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    ),
    "int8": lambda: BitsAndBytesConfig(load_in_8bit=True),
}
LAYER_TYPES = {"nf4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}


def _quantized(path, kind):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=QUANTIZATION[kind](), device_map="cpu")


def test_qlora_grows_shrinks_keeps_optimizer_state_and_reloads_with_vanilla_peft(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "fp32")
    ids = token_batch(2, 12)
    torch.save(ids, tmp_path / "ids.pt")
    specs, finals = {}, {}
    for kind in QUANTIZATION:
        base = _quantized(tmp_path / "fp32", kind)
        model = get_peft_model(
            base,
            AdaptiveLoraConfig(
                r=4,
                target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                task_type="CAUSAL_LM",
                signal_steps=1,
                optimizer_state="migrate",  # the migrated moments are checked below
            ),
        )
        tuner = model.base_model
        layers = tuner.adapted_modules()
        assert all(isinstance(m.get_base_layer(), LAYER_TYPES[kind]) for m in layers.values())
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            before = model(input_ids=ids).logits
        names = sorted(layers)

        # grow: outputs bit-identical (up to one rounding of B where resize_scaling="rank" moves the scaling into
        # it), A's Adam moments migrated (old entries verbatim, step kept)
        grown = names[0]
        old_A = layers[grown].lora_A["default"].weight
        old_state = {k: v.clone() for k, v in optimizer.state[old_A].items()}
        tuner.resize_adapter({n: 6 for n in names}, optimizer=optimizer)
        with torch.no_grad():
            after = model(input_ids=ids).logits
        if tuner.peft_config["default"].resize_scaling == "keep":
            assert torch.equal(after, before), kind
        else:
            torch.testing.assert_close(after, before, rtol=0, atol=1e-5, msg=kind)
        new_A = layers[grown].lora_A["default"].weight
        assert new_A.shape[0] == 6
        assert torch.equal(optimizer.state[new_A]["exp_avg"][:4], old_state["exp_avg"])
        assert torch.equal(optimizer.state[new_A]["step"], old_state["step"])

        # shrink: the best rank-k approximation of the update (the quantized base is untouched), state reset
        updates = {n: (lambda lr: lr[0] @ lr[1])(update_factors(layers[n], "default")) for n in names}
        targets = {n: 2 + i % 2 for i, n in enumerate(names)}
        tuner.resize_adapter(targets, optimizer=optimizer)
        for n, k in targets.items():
            left, right = update_factors(layers[n], "default")
            singular = torch.linalg.svdvals(updates[n])
            eckart_young = float(singular[k:].pow(2).sum().sqrt())
            error = float((left @ right - updates[n]).norm())
            assert abs(error - eckart_young) <= 1e-6 * float(singular.norm()), (kind, n, error, eckart_young)
            assert layers[n].lora_A["default"].weight not in optimizer.state

        # keeps training
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert torch.isfinite(loss)
        model.eval()
        with torch.no_grad():
            finals[kind] = model(input_ids=ids).logits
        model.save_pretrained(tmp_path / kind / "adapter")
        _quantized(tmp_path / "fp32", kind).save_pretrained(tmp_path / kind / "base")  # the quantized base, saved
        specs[kind] = f"{tmp_path / kind / 'adapter'}::{tmp_path / kind / 'base'}::{tmp_path / 'ids.pt'}"

    loaded = load_adapters(tmp_path / "fp32", tmp_path / "ids.pt", tmp_path / "out", list(specs.values()))
    assert loaded["plugin_imported"] is False
    for kind, spec in specs.items():
        entry = loaded[spec]
        assert "error" not in entry, (kind, entry)
        assert sorted(set(entry["ranks"].values())) == [2, 3], kind
        assert torch.equal(torch.load(entry["logits"]), finals[kind]), kind
