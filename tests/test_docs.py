"""docs/*.md: every python block runs (tiny models, CPU) or is marked as not runnable, every link and anchor of the
README and the docs resolves, and the reference tables are the code's.

Each example test supplies only the names a block takes from its context, executes the block verbatim and checks
what it did; ``test_every_python_block_is_run_or_marked`` fails for a block that no test runs.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import warnings
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from peft_adaptive import AdaptiveLoraConfig
from peft_adaptive.options import INIT_LORA_WEIGHTS, LORA_OPTIONS

from . import test_readme  # noqa: F401  (registers the README's runners)
from .doc_examples import (
    DOC_FILES,
    ROOT,
    RUNNERS,
    all_blocks,
    anchors,
    code_blocks,
    python_blocks,
    run,
    run_printing,
    runs,
)
from .test_readme import allow_bf16_on_cpu, late_start_warnings, token_loader, trainer_args
from .tiny_models import TokenDataset, adaptive_model, tiny_llama

USAGE, CONFIGURATION = "docs/usage.md", "docs/configuration.md"
HOW, SAVING, CLI = "docs/how-it-works.md", "docs/saving-and-serving.md", "docs/cli.md"
PAGES = ["usage", "configuration", "distributed", "how-it-works", "saving-and-serving", "cli"]


def trained_model(signal_steps: int = 3, steps: int = 5):
    """A tiny adaptive Llama trained past its reallocation with the one-call loop."""
    model = adaptive_model(max_r=12, signal_steps=signal_steps, lora_dropout=0.0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step, batch in enumerate(token_loader(steps), start=1):
        model(**batch).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step, optimizer)
        optimizer.zero_grad()
    assert len(set(model.base_model.ranks().values())) > 1
    return model.eval()


def held_by(optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def trainable(model) -> set[int]:
    return {id(p) for p in model.parameters() if p.requires_grad}


# --- the examples ----------------------------------------------------------------------------------


@runs(USAGE, "With `Trainer`")
def test_usage_trainer(tmp_path):
    first, second = python_blocks(USAGE, "With `Trainer`")
    namespace = {"base_model": tiny_llama(), "args": trainer_args(tmp_path, 202), "train_dataset": TokenDataset(8)}
    run([first], namespace)  # callbacks=[AdaptiveLoraCallback()]
    assert namespace["model"].peft_config["default"].reallocation_step == 200
    assert len(set(namespace["model"].base_model.ranks().values())) > 1

    # the explicit form, on a fresh model
    namespace["model"] = get_peft_model(tiny_llama(), AdaptiveLoraConfig(r=8, target_modules="all-linear"))
    run([second], namespace)  # trainer.add_callback(AdaptiveLoraCallback(trainer=trainer))
    assert namespace["model"].peft_config["default"].reallocation_step == 200
    assert [h["step"] for h in namespace["trainer"].state.log_history if "adaptive_lora/budget" in h] == [200]


@runs(USAGE, "With TRL")
def test_usage_trl(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    from .tiny_text import text_dataset, tiny_tokenizer

    monkeypatch.chdir(tmp_path)
    allow_bf16_on_cpu(monkeypatch)
    namespace = {"base_model": tiny_llama(), "train_dataset": text_dataset(64), "tokenizer": tiny_tokenizer()}
    trainer = run(python_blocks(USAGE, "With TRL"), namespace)["trainer"]
    assert trainer.model.peft_config["default"].reallocation_step == 50 and trainer.state.global_step == 150
    assert [h["step"] for h in trainer.state.log_history if "adaptive_lora/budget" in h] == [50]
    assert '"reallocation_step": 50' in (tmp_path / "sft-adaptive" / "adaptive_lora.json").read_text()


@runs(USAGE, "With accelerate")
def test_usage_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    micro_batches = 2 * 55
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            namespace = {"base_model": tiny_llama().eval(), "loader": token_loader(micro_batches)}
            namespace = run(python_blocks(USAGE, "With accelerate"), namespace)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert not late_start_warnings(caught)
    tuner = namespace["tuner"]
    assert namespace["step"] == micro_batches // 2  # one call per optimizer step, not per micro-batch
    assert tuner.peft_config["default"].reallocation_step == 50
    assert tuner.peft_config["default"].allocation["signal_steps"] == 50
    assert held_by(namespace["optimizer"]) == trainable(tuner)


@runs(USAGE, "Hand-written loop")
def test_usage_hand_loop(capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        namespace = {"base_model": tiny_llama().eval(), "loader": token_loader(103)}
        namespace = run(python_blocks(USAGE, "Hand-written loop"), namespace)
    assert not late_start_warnings(caught)  # the collection started at the first forward: step 1 is seen
    model = namespace["model"]
    assert model.peft_config["default"].reallocation_step == 100
    assert namespace["step"] == 103 and namespace["report"] is None  # later calls return None
    table = capsys.readouterr().out
    assert "adapter parameters:" in table and table.count("->") == len(model.base_model.ranks())
    assert held_by(namespace["optimizer"]) == trainable(model)


@runs(USAGE, "Your own schedule")
def test_usage_own_schedule():
    model = adaptive_model(max_r=12, signal_steps=50)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        namespace = run(
            python_blocks(USAGE, "Your own schedule"),
            {"model": model, "optimizer": optimizer, "loader": token_loader(52)},
        )
    report = namespace["report"]
    assert report.step == 50 and report.signal_steps == 50 and model.peft_config["default"].reallocation_step == 50
    assert len(set(report.ranks_after)) > 1 and held_by(optimizer) == trainable(model)


@runs(USAGE, "Calibration only")
def test_usage_calibration():
    namespace = run(python_blocks(USAGE, "Calibration only"), {"base_model": tiny_llama(), "loader": token_loader(16)})
    model, report = namespace["model"], namespace["report"]
    assert report.step == 0 and report.signal_steps == 16
    assert model.peft_config["default"].reallocation_step == 0
    assert len(set(model.base_model.ranks().values())) > 1
    assert held_by(namespace["optimizer"]) == trainable(model)


@runs(USAGE, "From EVA's initialisation")
def test_usage_from_evas_initialisation(tmp_path):
    namespace = {
        "base_model": tiny_llama(),
        "dataloader": token_loader(4),
        "args": trainer_args(tmp_path, 102),
        "train_dataset": TokenDataset(8),
    }
    namespace = run(python_blocks(USAGE, "From EVA's initialisation"), namespace)
    tuner = namespace["model"].base_model
    config = tuner.peft_config["default"]
    assert config.init_lora_weights == "eva" and config.reallocation_step == 100
    assert len(set(tuner.ranks().values())) > 1 and tuner.adapter_param_count() <= tuner.param_budget()


@runs(USAGE, "With the embedding in the budget")
def test_usage_embedding_in_the_budget():
    namespace = run(python_blocks(USAGE, "With the embedding in the budget"), {"base_model": tiny_llama()})
    tuner = namespace["model"].base_model
    modules = tuner.adapted_modules()
    embedding = modules["model.embed_tokens"].get_base_layer()
    assert isinstance(embedding, torch.nn.Embedding) and len(modules) == 1 + 7 * 2
    # the budget counts one rank of each module at its own cost: the embedding's is num_embeddings + embedding_dim
    costs = {name: layer.in_features + layer.out_features for name, layer in modules.items()}
    assert costs["model.embed_tokens"] == embedding.num_embeddings + embedding.embedding_dim
    assert tuner.param_budget() == tuner.adapter_param_count() == 4 * sum(costs.values())


@runs(USAGE, "Explicit ranks")
def test_usage_explicit_ranks():
    model = get_peft_model(tiny_llama(), AdaptiveLoraConfig(r=8, target_modules="all-linear"))
    namespace = run(python_blocks(USAGE, "Explicit ranks"), {"model": model})
    ranks = model.base_model.ranks()
    assert ranks == namespace["wanted"] and {ranks[n] for n in ranks if n.endswith("v_proj")} == {16}
    assert held_by(namespace["optimizer"]) == trainable(model)


@runs(USAGE, "Ranks from step 0")
def test_usage_ranks_from_step_0(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the blocks save to ./probe
    probe_block, plain_block = python_blocks(USAGE, "Ranks from step 0")
    namespace = {"base_model": tiny_llama(), "args": trainer_args(tmp_path, 200), "train_dataset": TokenDataset(8)}
    run([probe_block], namespace)
    probe = namespace["probe"]
    assert probe.peft_config["default"].reallocation_step == 200  # the probe stopped at its reallocation
    found = probe.base_model.ranks()
    assert len(set(found.values())) > 1

    run([plain_block], namespace)
    model, config = namespace["model"], namespace["config"]
    assert type(config).__name__ == "LoraConfig" and not config.inference_mode
    layers = {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }
    assert {name: layer.r["default"] for name, layer in layers.items()} == found  # the probe's ranks, every module
    for layer in layers.values():
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0  # a fresh start
        assert layer.lora_A["default"].weight.requires_grad and layer.lora_B["default"].weight.requires_grad
        assert layer.scaling["default"] == config.lora_alpha / layer.r["default"]  # plain LoRA's scaling for its rank
    # the probe's adapter is gone (unload): the trainable parameters are exactly the new adapters' at the found ranks
    budget = sum(r * (layers[name].in_features + layers[name].out_features) for name, r in found.items())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == budget


@runs(CONFIGURATION, "`AdaptiveLoraConfig` fields")
def test_configuration_example():
    config = run(python_blocks(CONFIGURATION, "`AdaptiveLoraConfig` fields"), {})["config"]
    assert (config.r, config.min_r, config.max_r, config.signal_steps) == (8, 2, 16, 200)


@runs(CONFIGURATION, "Errors")
def test_configuration_errors():
    (block,) = python_blocks(CONFIGURATION, "Errors")
    run_printing(block, {})


@runs(HOW, "Allocation")
def test_how_allocation():
    for block in python_blocks(HOW, "Allocation"):  # the apportionment, then the predicted gain
        run_printing(block, {})


@runs(HOW, "Your own score")
def test_how_your_own_score():
    """The documented score registers, the config takes it, and a trained model reallocates by it."""
    from peft_adaptive.scores import SCORES

    (block,) = python_blocks(HOW, "Your own score")
    try:
        namespace = run([block], {})
        assert namespace["config"].score == "summed_gradient"
        model = get_peft_model(tiny_llama(), dataclasses.replace(namespace["config"], signal_steps=3))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        reports = []
        for step, batch in enumerate(token_loader(4), start=1):
            model(**batch).loss.backward()
            optimizer.step()
            reports.append(model.base_model.update_and_allocate(step, optimizer))
            optimizer.zero_grad()
        (report,) = [r for r in reports if r is not None]
        assert report.score == "summed_gradient"
        # the documented score's values decide the ranks: a higher value never gets fewer ranks (equal costs)
        ranked = sorted(zip(report.scores, report.ranks_after))
        assert [r for _, r in ranked] == sorted(r for _, r in ranked)
        assert len(set(report.ranks_after)) > 1
    finally:
        SCORES.pop("summed_gradient", None)


@runs(HOW, "Resizing")
def test_how_resizing():
    (block,) = python_blocks(HOW, "Resizing")
    run_printing(block, {})


@runs(SAVING, "Saving and loading")
def test_saving_and_loading(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = trained_model()
    batch = TokenDataset(2, seed=5).ids
    with torch.no_grad():
        expected = model(input_ids=batch).logits
    namespace = run(python_blocks(SAVING, "Saving and loading"), {"model": model, "base_model": tiny_llama()})
    loaded, merged = namespace["loaded"], namespace["merged"]
    assert type(loaded.base_model).__name__ == "LoraModel"  # the saved config is plain LoRA
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=batch).logits, expected, atol=1e-5)


@runs(SAVING, "The sidecar and the hub")
def test_sidecar(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = trained_model()
    model.save_pretrained("adapter")
    config = run(python_blocks(SAVING, "The sidecar and the hub"), {})["config"]
    assert config.reallocation_step == 3 and config.allocation == model.peft_config["default"].allocation
    assert capsys.readouterr().out.startswith("3 [")


@runs(CLI, "In Python")
def test_cli_in_python(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = trained_model()
    model.save_pretrained("adapter")
    run(python_blocks(CLI, "In Python"), {})
    assert "layer" in capsys.readouterr().out and (tmp_path / "ranks.png").stat().st_size > 0
    for out in ("exported/lora", "exported/vllm"):
        assert (tmp_path / out / "adapter_config.json").is_file()


# --- every block, link and table --------------------------------------------------------------------


def test_every_python_block_is_run_or_marked():
    """A python block is run by a registered test, or the line before it says why not (and it still compiles)."""
    unclaimed = []
    for block in all_blocks():
        if block.language != "python":
            continue
        block.compile()  # at least valid Python
        if block.not_run is None and (block.doc, block.heading) not in RUNNERS:
            unclaimed.append(f"{block.doc}:{block.line} ({block.heading})")
    assert not unclaimed, f"python blocks no test runs (add a runner, or <!-- not run: reason -->): {unclaimed}"
    for doc, heading in RUNNERS:  # a runner whose section was renamed or emptied fails there, not silently here
        assert python_blocks(doc, heading)


def test_docs_pages_exist_and_say_what_is_tested():
    assert [p.stem for p in DOC_FILES[1:]] == sorted(PAGES)
    for path in DOC_FILES[1:]:
        assert "Tested in" in path.read_text(), f"{path.name} has no 'Tested in' section"


_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _links(path: Path) -> list[str]:
    """The link targets of a Markdown file, outside code blocks and inline code."""
    text, fenced, targets = path.read_text(), False, []
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            targets += _LINK.findall(re.sub(r"`[^`]*`", "", line))
    return targets


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_and_anchors_resolve(path):
    checked = 0
    for target in _links(path):
        if re.match(r"[a-z]+:", target):
            continue  # https://..., mailto:
        file, _, anchor = target.partition("#")
        destination = (path.parent / file).resolve() if file else path
        assert destination.exists(), f"{path.name}: {target} does not exist"
        if anchor:
            assert destination.suffix == ".md", f"{path.name}: {target}: an anchor into a file that is not Markdown"
            assert anchor in anchors(destination), f"{path.name}: {target}: no such heading"
        checked += 1
    assert checked > 0


def test_named_test_files_exist():
    for path in DOC_FILES:
        for name in re.findall(r"tests/[\w/]+\.py", path.read_text()):
            assert (ROOT / name).is_file(), f"{path.name} names {name}, which does not exist"


def test_command_lines_parse():
    """Every ``peft-adaptive ...`` line in a bash block of the docs is accepted by the command's own parser."""
    from peft_adaptive.cli import build_parser

    lines = [
        line.split("#", 1)[0]
        for block in all_blocks()
        if block.language == "bash"
        for line in block.code.splitlines()
        if line.startswith("peft-adaptive ")
    ]
    assert len(lines) >= 5
    for line in lines:
        build_parser().parse_args(shlex.split(line)[1:])


def _table(path: Path, heading: str) -> list[list[str]]:
    """The rows (cells stripped, header and rule dropped) of the first table under ``heading``."""
    section = path.read_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows[2:]]


def test_option_table_is_the_code():
    rows = {name: (status, why) for name, status, why in _table(ROOT / CONFIGURATION, "LoRA options")}
    expected = {f"`{name}`": (o.status, o.why) for name, o in LORA_OPTIONS.items() if name != "init_lora_weights"}
    expected |= {f"`init_lora_weights={value!r}`": (o.status, o.why) for value, o in INIT_LORA_WEIGHTS.items()}
    assert rows == expected


def test_field_table_is_the_config():
    config = AdaptiveLoraConfig()
    documented = {}
    for names, default, _ in _table(ROOT / CONFIGURATION, "`AdaptiveLoraConfig` fields"):
        for name, value in zip(names.split(", "), default.split(", ")):
            documented[name.strip("`")] = value.strip("`")
    assert sorted(documented) == AdaptiveLoraConfig.adaptive_field_names()
    for name, text in documented.items():
        try:
            value = eval(text, {"r": config.r, "max_r": config.max_r})
        except (NameError, SyntaxError):
            continue  # a default in words ("plain LoRA at r")
        assert getattr(config, name) == value, name


def test_doc_blocks_parse_the_marker():
    """The not-run marker is read from the line right before the fence, and only from there."""
    marked = [b for b in code_blocks(ROOT / "docs" / "distributed.md") if b.language == "python"]
    assert marked and all(b.not_run and "torchrun" in b.not_run for b in marked)
