"""Faults: a training process killed at any point, corrupt or mismatched adapter files, a different base model."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from peft_adaptive import AdaptiveLoraCallback, AdaptiveLoraConfig, last_complete_checkpoint
from peft_adaptive.callback import CALLBACK_STATE_NAME
from peft_adaptive.checkpoints import is_complete_checkpoint
from peft_adaptive.config import ADAPTIVE_CONFIG_NAME

from .tiny_models import TokenDataset, adaptive_model, tiny_llama

KILLED = Path(__file__).resolve().parent / "scripts" / "train_until_killed.py"
WARMUP, STEPS = 3, 8


def train_run(out, resume=None, extra_callbacks=()) -> torch.nn.Module:
    """The run every fault test compares against: a checkpoint at every step, reallocation at step 3."""
    torch.manual_seed(0)
    model = adaptive_model(max_r=12, signal_steps=WARMUP)
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        logging_strategy="no",
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=TokenDataset(64),
        callbacks=[AdaptiveLoraCallback(), *extra_callbacks],
    )
    trainer.train(resume_from_checkpoint=resume)
    return model


def _adapter(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _start(out: Path, kill: str | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(KILLED), str(out), *([kill] if kill else [])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"},
    )


def _kill_at_random(process: subprocess.Popen, rng: random.Random) -> int:
    """SIGKILL the run right after a random step (often inside that step's checkpoint save) plus a random delay."""
    step = rng.randint(1, STEPS - 1)
    for line in process.stdout:
        if line.strip() == f"STEP {step}":
            time.sleep(rng.uniform(0.0, 0.2))
            process.send_signal(signal.SIGKILL)
            break
    process.communicate(timeout=300)
    return step


def test_sigkill_anywhere_then_resume_from_newest_complete_checkpoint_is_bit_identical(tmp_path):
    reference = train_run(tmp_path / "reference")
    expected = _adapter(reference)
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    runs = {
        "random": (_start(tmp_path / "random"), None),
        "trainer-save": (_start(tmp_path / "trainer-save", "trainer-save:5"), 5),  # after the reallocation
        "plugin-save": (_start(tmp_path / "plugin-save", "plugin-save:2"), 2),  # during the signal steps
    }
    killed_after = _kill_at_random(runs["random"][0], rng)
    for name, (process, _) in runs.items():
        if name != "random":
            _, stderr = process.communicate(timeout=300)
        assert process.returncode == -signal.SIGKILL, (name, seed, process.returncode)

    for name, (_, half_written) in runs.items():
        out = tmp_path / name
        last = last_complete_checkpoint(out)
        if half_written is not None:
            folder = out / f"checkpoint-{half_written}"
            # transformers' own choice is the half-written folder; ours is the one before it
            assert get_last_checkpoint(str(out)) == str(folder)
            assert not is_complete_checkpoint(folder)
            assert last == str(out / f"checkpoint-{half_written - 1}")
            if name == "plugin-save":
                assert not (folder / CALLBACK_STATE_NAME).exists()  # only the temporary file was written
                assert any(p.name.endswith(".tmp") for p in folder.iterdir())
            if name == "plugin-save":  # Trainer's files are all there: the callback refuses the folder
                with pytest.raises(RuntimeError, match="not a complete checkpoint.*last_complete_checkpoint"):
                    train_run(out, resume=str(folder))
            else:  # no trainer_state.json: transformers itself fails to load it
                with pytest.raises(FileNotFoundError, match="trainer_state.json"):
                    train_run(out, resume=str(folder))
        resumed = train_run(out, resume=last)
        got = _adapter(resumed)
        assert resumed.base_model.ranks() == reference.base_model.ranks(), (name, seed, killed_after)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[n], expected[n]) for n in expected), (name, seed, killed_after, last)


def test_sidecar_and_callback_state_are_written_atomically(tmp_path, monkeypatch):
    model = adaptive_model()
    model.save_pretrained(tmp_path / "a")
    before = (tmp_path / "a" / ADAPTIVE_CONFIG_NAME).read_text()

    def broken_dumps(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dumps", broken_dumps)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "a")
    monkeypatch.undo()
    assert (tmp_path / "a" / ADAPTIVE_CONFIG_NAME).read_text() == before  # the old file, whole
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.endswith(".tmp")]


# --- corrupt or mismatched adaptive_lora.json ----------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    model = adaptive_model()
    names = sorted(model.base_model.ranks())
    ranks = {n: 2 + i % 3 for i, n in enumerate(names)}
    model.base_model.peft_config["default"].allocation = {"names": names, "ranks_after": [4] * len(names)}
    model.base_model.resize_adapter(ranks)  # keeps the saved allocation's ranks in step with the weights
    assert model.base_model.peft_config["default"].allocation["ranks_after"] == [ranks[n] for n in names]
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def _edit_sidecar(folder: Path, edit) -> None:
    path = folder / ADAPTIVE_CONFIG_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _vanilla_load_ignores_the_sidecar(folder: Path) -> None:
    """PeftModel.from_pretrained (plugin imported) reads a plain-LoRA save's shapes from adapter_config.json and the
    weights only: a broken sidecar cannot give it wrong shapes."""
    model = PeftModel.from_pretrained(tiny_llama(), str(folder))
    weights = load_file(str(folder / "adapter_model.safetensors"))
    live = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert {k.replace(".default", ""): v.shape for k, v in live.items()} == {k: v.shape for k, v in weights.items()}


def test_truncated_sidecar_is_a_clear_error_naming_the_file(saved):
    text = (saved / ADAPTIVE_CONFIG_NAME).read_text()
    (saved / ADAPTIVE_CONFIG_NAME).write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=rf"{ADAPTIVE_CONFIG_NAME} is not a readable JSON file"):
        AdaptiveLoraConfig.from_pretrained(str(saved))
    _vanilla_load_ignores_the_sidecar(saved)


def test_sidecar_that_is_not_an_object_or_has_bad_values_is_a_clear_error(saved):
    (saved / ADAPTIVE_CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match=rf"{ADAPTIVE_CONFIG_NAME} does not hold a JSON object"):
        AdaptiveLoraConfig.from_pretrained(str(saved))
    (saved / ADAPTIVE_CONFIG_NAME).write_text(json.dumps({"min_r": -3}))
    with pytest.raises(ValueError, match=rf"{ADAPTIVE_CONFIG_NAME} .*not make a valid AdaptiveLoraConfig.*min_r"):
        AdaptiveLoraConfig.from_pretrained(str(saved))


def test_sidecar_with_wrong_module_names_is_a_clear_error(saved):
    _edit_sidecar(saved, lambda d: d["allocation"].update(names=["model.nothing.here"] + d["allocation"]["names"][1:]))
    with pytest.raises(ValueError, match=rf"{ADAPTIVE_CONFIG_NAME}: .*weights do not have: \['model\.nothing\.here'\]"):
        AdaptiveLoraConfig.from_pretrained(str(saved))
    _vanilla_load_ignores_the_sidecar(saved)


def test_sidecar_ranks_that_disagree_with_the_weights_are_a_clear_error(saved):
    _edit_sidecar(saved, lambda d: d["allocation"].update(ranks_after=[7] * len(d["allocation"]["ranks_after"])))
    with pytest.raises(
        ValueError, match=rf"{ADAPTIVE_CONFIG_NAME}: .*disagree.*rank 7 in the sidecar, 2 in the weights"
    ):
        AdaptiveLoraConfig.from_pretrained(str(saved))
    _vanilla_load_ignores_the_sidecar(saved)


# --- a base model with other module names or sizes -------------------------------------------------------------


@pytest.fixture
def saved_adaptive(tmp_path):
    """Saved with save_as_lora=False, so that loading goes through AdaptiveLoraModel (as a Trainer resume does)."""
    model = adaptive_model(save_as_lora=False)
    model.base_model.resize_adapter({n: 2 + i % 3 for i, n in enumerate(sorted(model.base_model.ranks()))})
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def _llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**tiny_llama().config.to_dict(), **overrides}))


def test_loading_into_a_base_with_other_sizes_names_the_modules(saved_adaptive):
    with pytest.raises(ValueError, match=r"other sizes.*mlp\.gate_proj \(saved 64x32, model 48x32\)"):
        PeftModel.from_pretrained(_llama(intermediate_size=48), str(saved_adaptive))


def test_loading_into_a_base_with_other_module_names_names_them(saved_adaptive):
    with pytest.raises(ValueError, match=r"saved modules are not in the base model: \['model\.layers\.1\."):
        PeftModel.from_pretrained(_llama(num_hidden_layers=1), str(saved_adaptive))
