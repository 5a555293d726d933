"""``benchmarks/overhead.py`` at its tiny shape: the in-process engine runs every method with one command (what
``--mode gpu --engine loop`` runs on a GPU), and the Trainer engine's EVA worker measures EVA with its init apart."""

from __future__ import annotations

import gzip
import importlib
import json
import math
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from .tiny_models import VOCAB, tiny_bert, tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
overhead = importlib.import_module("overhead")


def test_loop_engine_runs_every_method_in_one_command(tmp_path):
    overhead.main(["overhead.py", "--mode", "tiny", "--engine", "loop", "--rounds", "1", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "overhead.json").read_text())
    assert [r["config"] for r in payload["records"]] == list(overhead.LOOP_CONFIGS)
    by_config = {r["config"]: r for r in payload["records"]}
    assert set(by_config["base"]["phases"]) == {"base"} and by_config["base"]["adapter_params_start"] == 0
    assert set(by_config["adaptive"]["phases"]) == {"adaptive warmup", "adaptive after"}
    for record in payload["records"]:
        assert set(record["phases"]) == set(overhead.WINDOW_NAMES[record["config"]])
        for phase in record["phases"].values():
            assert len(phase["step_times_s"]) == 3 and all(0 < t < math.inf for t in phase["step_times_s"])
    # the same budget for every adapter method (AdaLoRA counts its extra E entries; EVA redistributes ranks)
    assert by_config["adaptive"]["adapter_params_effective_end"] <= by_config["lora"]["adapter_params_effective_end"]
    r, lora = payload["r"], by_config["lora"]
    assert set(lora["ranks_end"].values()) == {r} and set(by_config["eva-rho1"]["ranks_end"].values()) == {r}
    assert set(by_config["lora-4x"]["ranks_end"].values()) == {4 * r}
    assert by_config["lora-4x"]["adapter_params_start"] == 4 * lora["adapter_params_start"]
    # full fine-tuning: no adapter, every weight trained, more memory than LoRA in both windows
    full = by_config["full"]
    assert full["adapted_modules"] == 0 and full["adapter_params_start"] == 0 and full["ranks_end"] == {}
    assert full["trainable_params"] > by_config["lora-4x"]["trainable_params"] > lora["trainable_params"] > 0
    for window in ("early", "late"):
        assert full["phases"][f"full {window}"]["peak_tensor_mb"] > lora["phases"][f"lora {window}"]["peak_tensor_mb"]
    one_offs = payload["one_offs"]
    assert len(one_offs["reallocation_s"]) == 1 and one_offs["eva_converged"] == [True]
    assert one_offs["eva_init_s"][0] > 0 and one_offs["adalora_per_step_call_s"]
    # EVA at rho=1 computes its own initialisation (its state dict is not rho=2's), timed apart as rho=2's
    assert one_offs["eva_rho1_converged"] == [True] and not one_offs["eva_rho1_state_reused"]
    assert one_offs["eva_rho1_init_s"][0] > 0 and one_offs["eva_rho1_forwards"][0] > 0
    report = (tmp_path / "results.md").read_text()
    for phase in ("| base |", "| adaptive warmup |", "| adalora late |", "| eva early |", "EVA initialisation (rho=2)"):
        assert phase in report
    for phase in ("| eva-rho1 early |", "| lora-4x late |", "| full early |", "EVA initialisation (rho=1)"):
        assert phase in report


def run_trainer_worker(tmp_path: Path, config: str, r: int = 4) -> dict:
    """One configuration through the Trainer engine's worker at the tiny shape; its record."""
    shape = overhead.SHAPES["tiny"]
    spec = overhead.WorkerSpec(config, asdict(shape), r, 1e-3, 0, str(tmp_path / f"{config}-0.json"))
    spec_path = tmp_path / f"{config}-0.spec.json"
    spec_path.write_text(json.dumps(asdict(spec)))
    overhead.run_worker(str(spec_path))
    record = json.loads((tmp_path / f"{config}-0.json").read_text())
    assert set(record["phases"]) == set(overhead.WINDOW_NAMES[config])
    for phase in record["phases"].values():
        assert len(phase["step_times_s"]) == shape.measure and all(0 < t < math.inf for t in phase["step_times_s"])
    return record


def test_trainer_engine_measures_eva_with_its_init_apart(tmp_path):
    record = run_trainer_worker(tmp_path, "eva")
    assert record["eva_init_s"] > 0 and 0 < record["eva_forwards"] <= overhead.EVA_MAX_FORWARDS
    ranks = record["ranks_end"]
    assert len(set(ranks.values())) > 1 and sum(ranks.values()) <= 4 * len(ranks)  # rho=2: redistributed, same total


def test_trainer_engine_measures_eva_rho1_lora_4x_and_full(tmp_path):
    eva = run_trainer_worker(tmp_path, "eva-rho1")
    assert eva["eva_init_s"] > 0 and 0 < eva["eva_forwards"] <= overhead.EVA_MAX_FORWARDS
    assert len(eva["ranks_end"]) == 14 and set(eva["ranks_end"].values()) == {4}  # rho=1: uniform ranks
    lora = run_trainer_worker(tmp_path, "lora-4x")
    assert len(lora["ranks_end"]) == 14 and set(lora["ranks_end"].values()) == {16}
    assert lora["trainable_params"] == lora["adapter_params_start"] == 4 * eva["adapter_params_start"]
    full = run_trainer_worker(tmp_path, "full")
    base = overhead.build_base_model(overhead.SHAPES["tiny"], 0, device="cpu")
    assert full["trainable_params"] == sum(p.numel() for p in base.parameters()) > lora["trainable_params"]
    assert full["adapted_modules"] == full["adapter_params_start"] == 0 and full["ranks_end"] == {}


def test_trainer_engine_refuses_the_frozen_base(tmp_path):
    with pytest.raises(SystemExit, match="needs --engine loop"):
        overhead.main(["overhead.py", "--mode", "tiny", "--configs", "base", "--out", str(tmp_path)])


def test_frozen_base_computes_no_weight_gradient():
    """The base row is the frozen model's forward and backward, in the first round too (a freshly built model's
    weights require gradients until PEFT freezes them)."""
    shape = overhead.SHAPES["tiny"]
    base = overhead.build_base_model(shape, 0, device="cpu")
    assert all(p.requires_grad for p in base.parameters())
    seen = []
    hooks = [p.register_hook(lambda grad: seen.append(grad)) for p in base.parameters()]
    record, base = overhead.run_loop_config(base, "base", shape, 4, 1e-3, 0)
    for hook in hooks:
        hook.remove()
    assert seen == [] and not any(p.requires_grad for p in base.parameters())
    assert len(record["phases"]["base"]["step_times_s"]) == shape.measure


def test_full_fine_tuning_trains_every_weight_and_gives_the_base_back_unchanged():
    """``full`` trains the shared base model itself (at the harness's FULL_LR); the next configuration must get the
    weights it would have got without it, frozen as PEFT's unload leaves them."""
    shape = overhead.SHAPES["tiny"]
    base = overhead.build_base_model(shape, 0, device="cpu")
    before = {name: value.clone() for name, value in base.state_dict().items()}
    seen: set[str] = set()
    hooks = [p.register_hook(lambda grad, n=n: seen.add(n)) for n, p in base.named_parameters()]
    record, base = overhead.run_loop_config(base, "full", shape, 4, 1e-3, 0)
    for hook in hooks:
        hook.remove()
    names = {name for name, _ in base.named_parameters()}
    assert seen == names and record["trainable_params"] == sum(p.numel() for p in base.parameters())
    assert record["adapter_params_start"] == 0 and math.isfinite(record["final_loss"])
    assert overhead.config_lr("full", 1e-3) == overhead.FULL_LR and overhead.config_lr("lora", 1e-3) == 1e-3
    assert all(torch.equal(before[name], value) for name, value in base.state_dict().items())
    assert not any(p.requires_grad for p in base.parameters())


# --- the suites' pretrained models (--model minilm / smollm2), on tiny models of the same families ---------------


def tiny_pretrained(folder: Path, family: str) -> Path:
    """A tiny BERT classifier or Llama causal LM saved with a word-level tokenizer (SST-2 words, pad, unk, eos), the
    stand-in for MiniLM or SmolLM2: the real ones are not installed in CI."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "</s>", *sorted({w for s in SENTENCES for w in s.split()})]
    assert len(words) <= VOCAB
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")
    model = tiny_bert() if family == "bert" else tiny_llama()
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


SENTENCES = [f"the film was {w} and {x}" for w in ("good", "bad", "long", "fine") for x in ("slow", "warm", "odd")]


def write_sst2(glue_dir: Path, rows: int = 200) -> Path:
    lines = ["sentence\tlabel"] + [f"{SENTENCES[i % len(SENTENCES)]}\t{i % 2}" for i in range(rows)]
    (glue_dir / "sst2").mkdir(parents=True)
    with gzip.open(glue_dir / "sst2" / "train.tsv.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    return glue_dir


def resolve(*argv: str):
    return overhead.resolve_args(overhead.parse_args(list(argv)), cuda=False)


def test_model_options_default_to_the_suites_and_refuse_what_does_not_apply():
    args, mode, shape, workload = resolve()  # today's default: the Llama config at the CPU shape, r=8, random tokens
    assert (workload.name, mode, args.r, args.tokens) == ("llama-config", "cpu", 8, "random")
    assert shape == overhead.SHAPES["cpu"] and workload.alpha(8) == 16 and not workload.use_rslora
    args, mode, shape, workload = resolve("--engine", "loop", "--model", "minilm", "--model-path", "x")
    assert (args.r, args.tokens, shape.batch, shape.seq, shape.dtype) == (2, "sst2", 32, 64, "float32")
    assert workload.targets == tuple(overhead.MINILM_TARGETS) and workload.alpha(2) == 4 and workload.use_rslora
    assert args.configs == list(overhead.LOOP_CONFIGS)
    args, _, shape, workload = resolve("--engine", "loop", "--model", "smollm2", "--model-path", "x", "--batch", "2")
    assert (shape.batch, shape.seq, workload.kind, workload.targets) == (2, 64, "causal-lm", tuple(overhead.TARGETS))
    for argv, message in (
        (("--model", "minilm", "--model-path", "x"), "needs --engine loop"),
        (("--engine", "loop", "--model", "smollm2", "--model-path", "x", "--mode", "cpu"), "--mode sets"),
        (("--engine", "loop", "--tokens", "sst2"), "needs a pretrained model"),
    ):
        with pytest.raises(SystemExit, match=message):
            resolve(*argv)


@pytest.mark.parametrize(
    ("model", "family", "tokens", "modules"), [("minilm", "bert", "sst2", 12), ("smollm2", "llama", "sst2", 14)]
)
def test_loop_engine_on_a_pretrained_model_of_the_suites_family(tmp_path, monkeypatch, model, family, tokens, modules):
    monkeypatch.setenv("PEFT_ADAPTIVE_GLUE_DIR", str(write_sst2(tmp_path / "glue")))
    path = tiny_pretrained(tmp_path / family, family)
    out = tmp_path / "out"
    argv = ["--engine", "loop", "--model", model, "--model-path", str(path), "--tokens", tokens]
    argv += ["--batch", "2", "--seq", "8", "--skip", "1", "--measure", "2", "--rounds", "1", "--out", str(out)]
    overhead.main(["overhead.py", *argv])
    payload = json.loads((out / "overhead.json").read_text())
    assert payload["model"] == model and payload["r"] == 2 and payload["shape"]["layers"] == 2
    by_config = {r["config"]: r for r in payload["records"]}
    assert list(by_config) == list(overhead.LOOP_CONFIGS)
    adapters = ("lora", "adaptive", "adalora", "eva", "eva-rho1", "lora-4x")
    assert (
        all(by_config[c]["adapted_modules"] == modules for c in adapters) and by_config["full"]["adapted_modules"] == 0
    )
    assert by_config["full"]["trainable_params"] > by_config["lora-4x"]["trainable_params"]
    assert len(by_config["adaptive"]["reallocation_s"]) == 1 and payload["one_offs"]["eva_converged"] == [True]
    assert payload["one_offs"]["eva_rho1_converged"] == [True]
    # tensor memory on the CPU: live tensors plus the step's peak, in every window; the signal buffers show
    for record in payload["records"]:
        for phase in record["phases"].values():
            assert phase["peak_tensor_mb"] > phase["live_tensor_mb"] > 0 and phase["step_alloc_peak_mb"] > 0
    adaptive, lora = by_config["adaptive"]["phases"], by_config["lora"]["phases"]
    assert adaptive["adaptive warmup"]["live_tensor_mb"] > lora["lora early"]["live_tensor_mb"]
    report = (out / "results.md").read_text()
    assert "peak tensor memory (MB)" in report and "lora_alpha 4, rsLoRA" in report

    overhead.main(["overhead.py", "--combine", str(out), str(out), "--out", str(tmp_path / "cost")])
    table = (tmp_path / "cost" / "results.md").read_text()
    assert table.count("| ours (default): signal steps / after reallocation |") == 1
    assert "our reallocation event (once)" in table and "| full fine-tuning (no adapter) |" in table
    assert "EVA's SVD initialisation, rho=2 (once)" in table and "EVA's SVD initialisation, rho=1 (once)" in table


def test_token_batches_are_fixed_shape_and_seeded(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_ADAPTIVE_GLUE_DIR", str(write_sst2(tmp_path / "glue")))
    path = str(tiny_pretrained(tmp_path / "bert", "bert"))
    shape = replace(overhead.SHAPES["tiny"], batch=3, seq=8)
    for workload in (overhead.WORKLOADS["minilm"], overhead.WORKLOADS["smollm2"]):
        for tokens in ("sst2", "random"):
            batches = overhead.TokenBatches(workload, replace(shape, vocab=20), tokens, path)
            train = batches.train(0, 4)
            assert len(train) == 4 and all(b["input_ids"].shape == (3, 8) for b in train)
            assert all(b["input_ids"].max() < 20 for b in train)
            assert torch.equal(train[0]["input_ids"], batches.train(0, 4)[0]["input_ids"])
            eva = batches.eva(0)
            assert len(eva) == overhead.EVA_BATCHES and not torch.equal(eva[0]["input_ids"], train[0]["input_ids"])
            assert ("labels" in eva[0]) == (workload.kind == "causal-lm")  # EVA masks per-token labels only
            if workload.kind == "seq-cls":
                assert train[0]["labels"].shape == (3,) and "attention_mask" in train[0]
