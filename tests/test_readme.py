"""The README's code examples, extracted from README.md and run as written (tiny models, CPU).

Each test supplies only the names an example takes from its context (``base_model``, ``loader``, ...),
executes the example's code blocks verbatim and checks what they did.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from transformers import TrainingArguments, default_data_collator

from .tiny_models import TokenDataset, tiny_llama

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(heading: str) -> list[str]:
    """The ```python blocks of the README section ``## heading`` (up to the next ``## `` heading)."""
    text = README.read_text()
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README has no section {heading!r}"
    blocks = re.findall(r"^```python\n(.*?)^```", match.group(1), re.S | re.M)
    assert blocks, f"README section {heading!r} has no python block"
    return blocks


def run_blocks(blocks: list[str], namespace: dict) -> dict:
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    return namespace


def token_loader(batches: int, batch_size: int = 4) -> torch.utils.data.DataLoader:
    data = TokenDataset(batches * batch_size, seed=3)
    return torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=default_data_collator)


def test_quickstart_and_trainer_examples(tmp_path):
    quickstart = python_blocks("Quickstart")
    trainer_blocks = python_blocks("Use with Trainer")
    assert len(quickstart) == 1 and len(trainer_blocks) == 2
    namespace = run_blocks(quickstart, {"base_model": tiny_llama()})
    signal_steps = namespace["model"].peft_config["default"].signal_steps
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=signal_steps + 2,
        per_device_train_batch_size=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    from transformers import Trainer

    namespace.update(Trainer=Trainer, args=args, ds=TokenDataset(8, length=8))
    run_blocks(trainer_blocks[:1], namespace)  # callbacks=[AdaptiveLoraCallback()]
    config = namespace["model"].peft_config["default"]
    assert config.reallocation_step == signal_steps == 200
    assert len(set(namespace["model"].base_model.ranks().values())) > 1

    # the explicit form, on a fresh model
    namespace["base_model"] = tiny_llama()
    run_blocks(quickstart, namespace)
    run_blocks(trainer_blocks[1:], namespace)
    assert namespace["model"].peft_config["default"].reallocation_step == signal_steps
    assert [h["step"] for h in namespace["trainer"].state.log_history if "adaptive_lora/budget" in h] == [200]


def test_hand_written_loop_example(capsys):
    blocks = python_blocks("Hand-written training loop")
    assert len(blocks) == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        namespace = run_blocks(blocks, {"base_model": tiny_llama(), "loader": token_loader(103)})
    late = [w for w in caught if "signal collection" in str(w.message)]
    assert not late, late  # the example starts the collection before the first step: the sketch sees every step
    model = namespace["model"]
    assert model.peft_config["default"].reallocation_step == 100
    assert namespace["step"] == 103 and namespace["report"] is None  # later calls return None
    table = capsys.readouterr().out
    assert "adapter parameters:" in table and table.count("->") == len(model.base_model.ranks())
    held = {id(p) for group in namespace["optimizer"].param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}


def test_trl_example(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    from .tiny_text import text_dataset, tiny_tokenizer

    blocks = python_blocks("Use with TRL")
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    # TRL trains in bf16 by default; transformers accepts that on a CPU-only machine only with use_cpu=True (the
    # README says so). Run the example as on a GPU machine: bf16 autocast works on the CPU too.
    monkeypatch.setattr("transformers.training_args.is_torch_bf16_gpu_available", lambda: True)
    namespace = {"base_model": tiny_llama(), "train_dataset": text_dataset(64), "tokenizer": tiny_tokenizer()}
    namespace = run_blocks(blocks, namespace)
    trainer = namespace["trainer"]
    config = trainer.model.peft_config["default"]
    assert config.reallocation_step == 50 and trainer.state.global_step == 150
    assert [h["step"] for h in trainer.state.log_history if "adaptive_lora/budget" in h] == [50]
    saved = (tmp_path / "sft-adaptive" / "adaptive_lora.json").read_text()
    assert '"reallocation_step": 50' in saved


def test_accelerate_example():
    from accelerate.state import AcceleratorState, GradientState

    blocks = python_blocks("Use with accelerate")
    assert len(blocks) == 1
    micro_batches = 2 * 55
    try:
        namespace = run_blocks(blocks, {"base_model": tiny_llama(), "loader": token_loader(micro_batches)})
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    tuner = namespace["tuner"]
    assert namespace["step"] == micro_batches // 2  # one call per optimizer step, not per micro-batch
    assert tuner.peft_config["default"].reallocation_step == 50
    assert tuner.peft_config["default"].allocation["signal_steps"] == 50
    assert len(set(tuner.ranks().values())) > 1
    held = {id(p) for group in namespace["optimizer"].param_groups for p in group["params"]}
    assert held == {id(p) for p in tuner.parameters() if p.requires_grad}
