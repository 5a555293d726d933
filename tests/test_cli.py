"""``peft-adaptive inspect / plot / export`` on adapters from short real training runs (tiny models, CPU).

Two adapters are trained once per module:

* ``adaptive``: tiny Llama with ``AdaptiveLoraConfig`` trained by ``Trainer`` + ``AdaptiveLoraCallback``
  (ranks reallocated at step 3), saved as plain LoRA + sidecar and, a second time, with ``save_as_lora=False``;
* ``plain``: tiny Llama with a vanilla ``LoraConfig`` using ``rank_pattern``/``alpha_pattern`` (generic keys,
  so the per-module scalings differ), trained by a hand loop, with no base model recorded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from matplotlib.image import imread
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from peft_adaptive import AdaptiveLoraCallback, AdaptiveLoraConfig
from peft_adaptive.cli import main
from peft_adaptive.export import EXPORT_FORMATS, export_adapter
from peft_adaptive.inspection import AdapterError, inspect_adapter, rank_grid, split_module_name
from peft_adaptive.plotting import panel_count, plot_ranks, rank_figure

from .fresh_process import load_adapters
from .tiny_models import TokenDataset, tiny_gpt2, tiny_llama, token_batch

WARMUP = 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cli")
    base_dir = root / "base"
    tiny_llama(seed=0).save_pretrained(base_dir)
    inputs = token_batch(batch=2, length=12, seed=1)

    # adaptive: Trainer + callback; the base is loaded from disk so base_model_name_or_path is recorded
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = AdaptiveLoraConfig(
        r=4, lora_alpha=8, min_r=1, max_r=12, target_modules="all-linear", signal_steps=WARMUP, task_type="CAUSAL_LM"
    )
    adaptive = get_peft_model(model, config)
    args = TrainingArguments(
        output_dir=str(root / "run"),
        max_steps=5,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=adaptive, args=args, train_dataset=TokenDataset(64), callbacks=[AdaptiveLoraCallback()])
    trainer.train()
    trainer.save_state()  # run/trainer_state.json, with the callback's adaptive_lora/score/* logs
    adaptive.save_pretrained(root / "adaptive")
    adaptive.peft_config["default"].save_as_lora = False
    adaptive.save_pretrained(root / "adaptive_native")
    adaptive.peft_config["default"].save_as_lora = True
    adaptive.eval()
    with torch.no_grad():
        adaptive_logits = adaptive(inputs).logits
    ranks = adaptive.base_model.ranks()
    assert len(set(ranks.values())) > 1, "the reallocation should give different ranks"

    # plain LoRA with patterns: different scalings per module, no base model recorded
    plain_config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6},
        alpha_pattern={"v_proj": 32},
    )
    plain = get_peft_model(tiny_llama(seed=0), plain_config)
    optimizer = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-2)
    loader = torch.utils.data.DataLoader(TokenDataset(32), batch_size=8)
    for batch in loader:
        plain(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    plain.save_pretrained(root / "plain")
    plain.eval()
    with torch.no_grad():
        plain_logits = plain(inputs).logits

    torch.save(inputs, root / "inputs.pt")
    return {
        "root": root,
        "base": base_dir,
        "adaptive": root / "adaptive",
        "adaptive_native": root / "adaptive_native",
        "plain": root / "plain",
        "run": root / "run",
        "inputs": inputs,
        "adaptive_logits": adaptive_logits,
        "plain_logits": plain_logits,
        "ranks": ranks,
    }


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def peft_logits(base_dir: Path, adapter: Path, inputs: torch.Tensor) -> torch.Tensor:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter)).eval()
    with torch.no_grad():
        return model(inputs).logits


def leftovers(folder: Path) -> list[str]:
    """Temporary folders an export left behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith((".tmp", ".old")))


# --- inspect ---------------------------------------------------------------------------------------------


def test_inspect_adaptive_adapter(trained, capsys):
    code, out, err = run_cli(capsys, "inspect", trained["adaptive"])
    assert code == 0, err
    summary = inspect_adapter(trained["adaptive"])
    assert summary.ranks == trained["ranks"]
    assert summary.saved_by_plugin and summary.peft_type == "LORA"
    assert summary.base_model == str(trained["base"])
    # table: 2 layers x 7 module types, in model order, each cell the saved rank
    lines = summary.table().splitlines()
    assert lines[0].split() == ["layer", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for layer, line in zip((0, 1), lines[1:]):
        cells = line.split()
        assert cells[0] == str(layer)
        for kind, cell in zip(lines[0].split()[1:], cells[1:]):
            prefix = "self_attn" if kind.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            assert int(cell) == trained["ranks"][f"model.layers.{layer}.{prefix}.{kind}"]
    assert summary.table() in out
    # parameters and budget: rank * (fan_in + fan_out), compared with plain LoRA at r=4
    weights = load_file(trained["adaptive"] / "adapter_model.safetensors")
    assert summary.total_params == sum(t.numel() for t in weights.values()) == summary.lora_params
    plain_r4 = 4 * sum(m.fan_in + m.fan_out for m in summary.modules)
    assert summary.plain_lora_params == plain_r4
    assert summary.lora_params <= summary.budget == plain_r4
    assert f"Trainable parameters: {summary.total_params:,}" in out
    assert f"vs {plain_r4:,} for plain LoRA at r=4" in out
    assert set(summary.scores()) == set(trained["ranks"])
    # the same summary from the adapter saved with save_as_lora=False (peft_type ADAPTIVE_LORA)
    native = inspect_adapter(trained["adaptive_native"])
    assert native.peft_type == "ADAPTIVE_LORA" and native.ranks == summary.ranks and native.scores() == summary.scores()


def test_inspect_plain_lora_with_rank_pattern(trained, capsys):
    code, out, err = run_cli(capsys, "inspect", trained["plain"], "--json")
    assert code == 0, err
    data = json.loads(out)
    ranks = {m["name"]: m["rank"] for m in data["modules"]}
    assert ranks == {
        "model.layers.0.self_attn.q_proj": 2,
        "model.layers.0.self_attn.v_proj": 4,
        "model.layers.0.mlp.down_proj": 4,
        "model.layers.1.self_attn.q_proj": 2,
        "model.layers.1.self_attn.v_proj": 4,
        "model.layers.1.mlp.down_proj": 6,
    }
    scaling = {m["name"]: m["scaling"] for m in data["modules"]}
    assert scaling["model.layers.0.self_attn.q_proj"] == 8 / 2
    assert scaling["model.layers.0.self_attn.v_proj"] == 32 / 4
    assert scaling["model.layers.1.mlp.down_proj"] == 8 / 6
    assert data["saved_by_plugin"] is False and data["scores"] is None and data["budget"] is None
    assert data["lora_params"] == sum(m["rank"] * (m["fan_in"] + m["fan_out"]) for m in data["modules"])
    assert data["plain_lora_params"] == sum(4 * (m["fan_in"] + m["fan_out"]) for m in data["modules"])
    code, out, _ = run_cli(capsys, "inspect", trained["plain"])
    assert code == 0 and "plain PEFT LoRA" in out and "layer" in out


def test_console_script_inspect(trained):
    exe = Path(sys.executable).parent / "peft-adaptive"
    assert exe.exists(), "run `pip install -e .` to install the console script"
    result = subprocess.run(
        [str(exe), "inspect", str(trained["adaptive"])], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert inspect_adapter(trained["adaptive"]).table() in result.stdout


def test_layer_table_layout():
    names = [
        "encoder.block.0.layer.0.SelfAttention.q",
        "encoder.block.1.layer.0.SelfAttention.q",
        "decoder.block.0.layer.0.SelfAttention.q",
        "lm_head",
    ]
    assert split_module_name("model.layers.3.self_attn.q_proj") == ("model.layers.3", "self_attn.q_proj")
    assert split_module_name("lm_head") == (None, "lm_head")
    grid = rank_grid(names)
    assert grid.rows == ["encoder.block.0", "encoder.block.1", "decoder.block.0", "other"]
    assert grid.columns == ["q", "lm_head"]
    assert grid.cells[3] == [None, "lm_head"]
    # shortest trailing path that tells the types apart (GPT-2's c_proj, BERT's dense)
    grid = rank_grid(["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"])
    assert grid.columns == ["c_attn", "attn.c_proj", "mlp.c_proj"]
    bert = ["attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense"]
    grid = rank_grid([f"bert.encoder.layer.0.{kind}" for kind in bert] + ["bert.pooler.dense"])
    assert grid.columns == ["query", "attention.output.dense", "intermediate.dense", "output.dense", "pooler.dense"]
    assert grid.rows == ["0", "other"]


# --- plot ------------------------------------------------------------------------------------------------


def test_plot_ranks_and_saved_scores(trained, capsys, tmp_path):
    out = tmp_path / "ranks.png"
    code, stdout, err = run_cli(capsys, "plot", trained["adaptive"], "-o", out)
    assert code == 0, err
    assert str(out) in stdout
    image = imread(out)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert panel_count(rank_figure(trained["adaptive"])) == 2  # scores saved in adaptive_lora.json
    assert panel_count(rank_figure(trained["adaptive_native"])) == 2  # ... or in the ADAPTIVE_LORA config


def test_plot_without_scores_has_one_panel(trained, tmp_path):
    assert panel_count(rank_figure(trained["plain"])) == 1
    path = plot_ranks(trained["plain"], tmp_path / "plain")  # no suffix: PNG
    assert path.suffix == ".png" and imread(path).ndim == 3


def test_plot_scores_from_trainer_logs(trained, tmp_path, capsys):
    exported = export_adapter(trained["adaptive"], tmp_path / "exported", "lora")  # no sidecar, no scores
    assert panel_count(rank_figure(exported)) == 1
    for logs in (trained["run"], trained["run"] / "trainer_state.json"):
        fig = rank_figure(exported, logs=logs)
        assert panel_count(fig) == 2
    code, _, err = run_cli(capsys, "plot", exported, "-o", tmp_path / "r.png", "--logs", trained["run"])
    assert code == 0, err
    assert imread(tmp_path / "r.png").ndim == 3
    # logs without any scores are an error, not a silent single panel
    empty = tmp_path / "empty_state.json"
    empty.write_text(json.dumps({"log_history": [{"loss": 1.0, "step": 1}]}))
    code, _, err = run_cli(capsys, "plot", exported, "-o", tmp_path / "x.png", "--logs", empty)
    assert code == 2 and "no reallocation scores" in err and not (tmp_path / "x.png").exists()


# --- export ----------------------------------------------------------------------------------------------


def test_export_lora_loads_in_vanilla_peft_with_identical_outputs(trained, capsys, tmp_path):
    """Both ways of saving the adaptive adapter, and the plain one, export to LoRA that vanilla PEFT (no plugin,
    fresh process) loads with bit-identical logits."""
    cases = []
    for name in ("adaptive", "adaptive_native", "plain"):
        out = tmp_path / f"{name}_lora"
        code, _, err = run_cli(capsys, "export", trained[name], out, "--format", "lora")
        assert code == 0, err
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and "allocation" not in config and "signal_steps" not in config
        assert not (out / "adaptive_lora.json").exists()
        assert all(k.startswith("^") and k.endswith("$") for k in config["rank_pattern"])
        reference = trained["plain_logits"] if name == "plain" else trained["adaptive_logits"]
        cases.append((out, reference))
    data = load_adapters(
        trained["base"], trained["root"] / "inputs.pt", tmp_path / "logits", [out for out, _ in cases], plugin=False
    )
    assert data["plugin_imported"] is False
    for adapter, reference in cases:
        assert data[str(adapter)]["config"] == "LoraConfig", data[str(adapter)]
        logits = torch.load(data[str(adapter)]["logits"])
        assert torch.equal(logits, reference), (adapter, float((logits - reference).abs().max()))


@pytest.mark.parametrize("name", ["adaptive", "plain"])
def test_export_merged_matches_adapter_model(trained, capsys, tmp_path, name):
    out = tmp_path / "merged"
    argv = ["export", trained[name], out, "--format", "merged"]
    if name == "plain":  # no base model recorded in this adapter's config
        argv += ["--base-model", trained["base"]]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        logits = merged(trained["inputs"]).logits
    torch.testing.assert_close(logits, trained[f"{name}_logits"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["adaptive", "plain"])
def test_export_global_scale_matches_without_alpha_pattern(trained, capsys, tmp_path, name):
    """An engine that ignores alpha_pattern and applies one global lora_alpha/r gives the adapter's outputs."""
    out = tmp_path / "global"
    code, _, err = run_cli(capsys, "export", trained[name], out, "--format", "lora-global-scale")
    assert code == 0, err
    config = json.loads((out / "adapter_config.json").read_text())
    max_rank = max(inspect_adapter(trained[name]).ranks.values())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == max_rank
    assert not config["use_rslora"] and not config.get("rank_pattern")
    # what the engine reads: the config without alpha_pattern (and without rank_pattern), one global scale
    config.pop("alpha_pattern", None)
    config.pop("rank_pattern", None)
    (out / "adapter_config.json").write_text(json.dumps(config))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(trained["base"]), str(out)).eval()
    global_scale = config["lora_alpha"] / config["r"]
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(m.scaling["default"] == global_scale for m in layers)
    with torch.no_grad():
        logits = model(trained["inputs"]).logits
    torch.testing.assert_close(logits, trained[f"{name}_logits"], atol=1e-5, rtol=1e-5)
    # the check has teeth: the plain LoRA export with alpha_pattern dropped does not match (scalings differ)
    if name == "plain":
        lora = export_adapter(trained[name], tmp_path / "lora", "lora")
        lora_config = json.loads((lora / "adapter_config.json").read_text())
        lora_config.pop("alpha_pattern")
        (lora / "adapter_config.json").write_text(json.dumps(lora_config))
        wrong = peft_logits(trained["base"], lora, trained["inputs"])
        assert not torch.allclose(wrong, trained["plain_logits"], atol=1e-3)


@pytest.mark.filterwarnings("ignore:.*invalid shape.*")  # PEFT's ZeRO-3 check mistakes the lora_B bias for a shard
def test_export_global_scale_other_layer_types(tmp_path):
    """GPT-2 (Conv1D, fan_in_fan_out) with rsLoRA and lora_bias: folding keeps the outputs."""
    base = tiny_gpt2(seed=0)
    config = LoraConfig(
        r=4,
        lora_alpha=6,
        use_rslora=True,
        lora_bias=True,
        init_lora_weights=False,
        target_modules=["c_attn", "c_fc"],
        fan_in_fan_out=True,
        rank_pattern={"c_fc": 2},
        alpha_pattern={"c_attn": 3},
    )
    model = get_peft_model(base, config).eval()
    inputs = token_batch(batch=2, length=8)
    with torch.no_grad():
        reference = model(inputs).logits
    model.save_pretrained(tmp_path / "gpt2")
    out = export_adapter(tmp_path / "gpt2", tmp_path / "global", "lora-global-scale")
    loaded = PeftModel.from_pretrained(tiny_gpt2(seed=0), str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs).logits, reference, atol=1e-5, rtol=1e-5)


def test_export_force_replaces_existing_output(trained, capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "export", trained["adaptive"], out, "--format", "lora")
    assert code == 2 and "--force" in err and str(out) in err
    assert sorted(os.listdir(out)) == ["keep.txt"]
    code, _, err = run_cli(capsys, "export", trained["adaptive"], out, "--format", "lora", "--force")
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert leftovers(tmp_path) == []
    # an existing empty folder is fine without --force
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(capsys, "export", trained["adaptive"], empty, "--format", "lora")[0] == 0


# --- errors: message, exit status 2, nothing written --------------------------------------------------------


def assert_user_error(capsys, argv, *fragments) -> str:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, (out, err)
    # the error is the last line (transformers may print loading progress before it), without a traceback
    assert err.strip().splitlines()[-1].startswith("peft-adaptive: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert str(fragment) in err, err
    return err


@pytest.mark.parametrize("command", ["inspect", "plot", "export"])
def test_error_not_an_adapter(capsys, tmp_path, command):
    out = tmp_path / "out"
    extra = {"inspect": [], "plot": ["-o", out / "r.png"], "export": [out, "--format", "lora"]}[command]
    missing = tmp_path / "missing"
    assert_user_error(capsys, [command, missing, *extra], missing, "no such file or directory")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    assert_user_error(capsys, [command, folder, *extra], folder, "not a PEFT adapter directory", "adapter_config.json")
    file = folder / "model.safetensors"
    assert_user_error(capsys, [command, file, *extra], file, "not an adapter directory")
    assert not out.exists()


def test_error_adapter_without_weights_or_other_type(trained, capsys, tmp_path):
    folder = tmp_path / "no_weights"
    folder.mkdir()
    shutil.copy(trained["adaptive"] / "adapter_config.json", folder)
    assert_user_error(capsys, ["inspect", folder], folder, "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    assert_user_error(capsys, ["inspect", folder], "'IA3'", "only LoRA adapters")
    (folder / "adapter_config.json").write_text("{not json")
    assert_user_error(capsys, ["inspect", folder], "adapter_config.json", "not a readable JSON file")
    (folder / "adapter_config.json").write_text("[]")
    assert_user_error(capsys, ["inspect", folder], "adapter_config.json", "does not hold a JSON object")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_error_corrupt_safetensors(trained, capsys, tmp_path, damage):
    broken = tmp_path / "broken"
    shutil.copytree(trained["adaptive"], broken)
    weights = broken / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"\x00garbage" * 10 if damage == "garbage" else data[: len(data) // 2])
    assert_user_error(capsys, ["inspect", broken], weights, "not a valid safetensors file")
    assert_user_error(capsys, ["plot", broken, "-o", tmp_path / "r.png"], weights)
    assert not (tmp_path / "r.png").exists()
    for fmt in EXPORT_FORMATS:
        out = tmp_path / f"out_{fmt}"
        assert_user_error(capsys, ["export", broken, out, "--format", fmt], weights, "corrupt")
        assert not out.exists()
    assert leftovers(tmp_path) == []


def test_error_missing_base_model(trained, capsys, tmp_path):
    out = tmp_path / "nested" / "merged"
    # the plain adapter's config records no base model
    assert_user_error(
        capsys, ["export", trained["plain"], out, "--format", "merged"], "records no base model", "--base-model"
    )
    # a base model path that does not exist
    missing = tmp_path / "no_such_model"
    assert_user_error(
        capsys,
        ["export", trained["adaptive"], out, "--format", "merged", "--base-model", missing],
        missing,
        "does not exist",
    )
    # a base model recorded in the config that has moved away
    moved = tmp_path / "moved"
    shutil.copytree(trained["adaptive"], moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(missing)
    (moved / "adapter_config.json").write_text(json.dumps(config))
    assert_user_error(capsys, ["export", moved, out, "--format", "merged"], missing, "--base-model")
    assert not out.exists() and not out.parent.exists()


def test_error_wrong_base_model_leaves_nothing(trained, capsys, tmp_path):
    """A failure after the work started (the adapter does not fit the base model) removes the temporary folder."""
    gpt2 = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(gpt2)
    capsys.readouterr()
    out = tmp_path / "merged"
    assert_user_error(
        capsys, ["export", trained["adaptive"], out, "--format", "merged", "--base-model", gpt2], "cannot load", gpt2
    )
    assert not out.exists() and leftovers(tmp_path) == []


def test_error_unknown_format(trained, capsys, tmp_path):
    out = tmp_path / "out"
    err = assert_user_error(capsys, ["export", trained["adaptive"], out, "--format", "gguf"], "'gguf'")
    for name in EXPORT_FORMATS:
        assert name in err
    assert not out.exists()
    with pytest.raises(AdapterError, match="lora-global-scale"):
        export_adapter(trained["adaptive"], out, "vllm")
    assert not out.exists()
