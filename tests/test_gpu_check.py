"""``benchmarks/gpu_check.py --tiny`` on the CPU, so that the one GPU command cannot rot between GPU sessions.

The tiny run does everything the GPU run does (every correctness check, the cost rounds of every method, the
fine-tune of both methods on SST-2-format files) at tiny shapes, from the command line in a fresh process where
``datasets`` and ``evaluate`` cannot be imported (the GPU image has neither). The other tests check what the tiny
run cannot show on one device: the device audit catches work off the device; and ``--make-carry`` writes a float16
copy that loads.
"""

from __future__ import annotations

import gzip
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
gpu_check = importlib.import_module("gpu_check")

CHECKS = [
    "reallocation: default score, growth random, bf16 base",
    "reallocation: default score, growth gradient, bf16 base",
    "bf16 adapters on the bf16 base",
    "optimizer state after a grow and a shrink",
    "whole step inside bf16 autocast (float32 model)",
    "gradient checkpointing",
    "save and vanilla-PEFT reload",
    "KaSA on a model moved to the device",
    "QLoRA (bitsandbytes nf4)",
    "encoder with a classification head under bf16 autocast",
]


def write_sst2(folder: Path, rows: int = 96) -> Path:
    """SST-2-format files (``sentence<TAB>label``, gzipped): a word decides the label."""
    words = ["good", "bad", "fine", "poor", "great", "awful"]
    for split, count in (("train", rows), ("dev", rows // 2)):
        lines = ["sentence\tlabel"]
        for i in range(count):
            word = words[(i * 7 + len(split)) % len(words)]
            lines.append(f"the film was {word} and long {i % 5}\t{int(word in ('good', 'fine', 'great'))}")
        (folder / "sst2").mkdir(parents=True, exist_ok=True)
        with gzip.open(folder / "sst2" / f"{split}.tsv.gz", "wt") as f:
            f.write("\n".join(lines) + "\n")
    return folder


#: the command line, in a process where importing datasets or evaluate fails, on one thread (as conftest.py sets)
TINY_RUN = (
    "import sys, torch; sys.modules['datasets'] = None; sys.modules['evaluate'] = None; torch.set_num_threads(1); "
    f"sys.path.insert(0, {str(BENCHMARKS)!r}); import gpu_check; sys.exit(gpu_check.main(sys.argv[1:]))"
)


def test_tiny_run_checks_measures_and_fine_tunes(tmp_path):
    glue = write_sst2(tmp_path / "glue")
    out = tmp_path / "out"
    args = ["--tiny", "--device", "cpu", "--out", str(out), "--glue-dir", str(glue)]
    result = subprocess.run([sys.executable, "-c", TINY_RUN, *args], capture_output=True, text=True, timeout=600)
    assert (out / "gpu_check.json").is_file(), result.stderr[-3000:]
    data = json.loads((out / "gpu_check.json").read_text())
    checks = {c["name"]: c for c in data["checks"]}
    failed = {n: c.get("error") for n, c in checks.items() if c["status"] == "failed"}
    assert result.returncode == 0 and not failed, (failed, result.stderr[-3000:])
    assert data["meta"]["peft_adaptive"].startswith(str(BENCHMARKS.parent / "src"))

    # every correctness check ran and passed (bitsandbytes runs on this CPU), compile included
    assert [n for n in checks if n in CHECKS] == CHECKS
    assert all(checks[n]["status"] == "passed" for n in CHECKS)
    assert any(n.startswith("torch.compile") and c["status"] == "passed" for n, c in checks.items())
    default = checks[CHECKS[0]]["numbers"]
    assert default["used"] <= default["budget"] and default["grown"] and default["shrunk"]
    assert default["shrink_rel_excess"] < 1e-6 and default["linalg_calls"] > 0
    assert set(default["linalg_dtypes"]) <= {"float32", "float64"}
    assert default["signal_step_host_reads"] >= 0
    assert checks[CHECKS[2]]["numbers"]["adapter_dtype"] == "bfloat16"
    assert checks[CHECKS[1]]["numbers"]["worst_projection_on_old_rows"] < 1e-3
    assert checks["save and vanilla-PEFT reload"]["numbers"]["max_abs_diff"] == 0

    # cost: every method's windows, ratios to uniform LoRA, the one-off costs
    cost = data["cost"]
    assert "error" not in cost, cost.get("traceback")
    phases = set(cost["summary"])
    assert {"base", "lora early", "lora late", "adaptive warmup", "adaptive after", "adalora early"} <= phases
    assert {"eva early", "eva late"} <= phases
    assert all(p["median_step_s"] > 0 and p["n_steps"] == 2 * 2 for p in cost["summary"].values())
    assert cost["ratios"]["lora early"]["step_vs_lora"] == 1.0
    assert cost["ratios"]["adaptive warmup"]["step_vs_adalora"] > 0
    one_offs = cost["one_offs"]
    assert len(one_offs["reallocation_s"]) == 2 and all(t > 0 for t in one_offs["reallocation_s"])
    assert len(one_offs["eva_init_s"]) == 1 and one_offs["eva_converged"] == [True, True]
    assert one_offs["adalora_per_step_call_s"] and one_offs["adaptive_per_step_call_s"]

    # fine-tune: both methods, both seeds, same budget, the default reallocated
    finetune = data["finetune"]
    assert "error" not in finetune, finetune.get("traceback")
    runs = {(r["method"], r["seed"]): r for r in finetune["runs"]}
    assert set(runs) == {(m, s) for m in ("lora", "adaptive") for s in (0, 1)}
    for (method, seed), run in runs.items():
        assert 0 <= run["dev_accuracy"] <= 1 and run["steps"] == finetune["sizing"]["max_steps"]
        if method == "adaptive":
            assert run["reallocation_step"] == finetune["sizing"]["signal_steps"]
            assert run["adapter_params"] <= run["budget"] == runs["lora", seed]["adapter_params"]
    assert finetune["comparison"]["seeds"] == [0, 1]

    summary = (out / "summary.md").read_text()
    for heading in ("## Correctness: ", "## Cost: ", "## Fine-tune: "):
        assert heading in summary


def test_device_audit_flags_work_off_the_device():
    """On one device every op is on it; pretend the model lives elsewhere and the audit must object."""
    with gpu_check.DeviceAudit(torch.device("meta")) as audit:
        drawn = torch.randn(4, 4)  # a draw on the CPU generator: allowed
        moved = drawn.to(torch.float64)  # a copy: allowed
        assert audit.off_device == []
        product = moved @ moved  # real work on the CPU
        float(product[0, 0])  # a read back to the host
        torch.linalg.svdvals(product.float())
    assert any(op.startswith("mm") for op in audit.off_device), audit.off_device
    assert audit.host_reads == 1
    assert {call["op"] for call in audit.linalg} >= {"_linalg_svd"}
    with pytest.raises(AssertionError, match="work done off"):
        audit.check()
    with gpu_check.DeviceAudit(torch.device("cpu")) as clean:
        torch.linalg.qr(torch.randn(4, 3, dtype=torch.bfloat16).float())
    assert clean.check()["linalg_dtypes"] == ["float32"]
    with gpu_check.DeviceAudit(torch.device("cpu")) as half:
        torch.linalg.vector_norm(torch.ones(3, dtype=torch.bfloat16))
    with pytest.raises(AssertionError, match="linear algebra got"):
        half.check()


def test_make_carry_writes_a_float16_copy_that_loads(tmp_path):
    from transformers import AutoModelForSequenceClassification, BertConfig, BertModel

    torch.manual_seed(0)
    source = tmp_path / "minilm"
    config = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    BertModel(config).save_pretrained(source)
    (source / "vocab.txt").write_text("\n".join(f"w{i}" for i in range(64)))
    glue = write_sst2(tmp_path / "glue", rows=8)
    facts = gpu_check.make_carry(tmp_path / "carry", source, glue)
    assert facts["carry_mb"] < 1 and facts["travelling_mb"] is None  # outside the repository: nothing to add up
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "carry" / "minilm", dtype=torch.float32)
    reference = BertModel.from_pretrained(source)
    weight = loaded.bert.encoder.layer[0].attention.self.query.weight
    original = reference.encoder.layer[0].attention.self.query.weight
    assert weight.dtype == torch.float32 and torch.equal(weight, original.half().float())
    assert (tmp_path / "carry" / "minilm" / "vocab.txt").is_file()
    texts, labels = gpu_check.read_sst2(tmp_path / "carry" / "glue", "train")
    assert len(texts) == 8 and set(labels) <= {0, 1}


def test_finetune_is_sized_to_the_time_left(tmp_path):
    """On the GPU the steps per run come from a timed probe: an epoch when it fits, else what the budget allows."""
    plan = gpu_check.replace(gpu_check.TINY_PLAN, finetune_max_steps=None)
    ctx = gpu_check.Context(plan, torch.device("cpu"), None, None, None, tmp_path)
    train = gpu_check.Encoded([[1, 5, 7, 9]] * 400, [0, 1] * 200)  # an epoch is 50 steps of 8
    roomy = gpu_check.size_finetune(ctx, train, 0, seconds=1e6, runs=4)
    assert roomy["max_steps"] == roomy["epoch_steps"] == 50 and roomy["signal_steps"] == 10
    tight = gpu_check.size_finetune(ctx, train, 0, seconds=10 * roomy["probe_step_s"], runs=4)
    assert 1 <= tight["max_steps"] < 50 and tight["probe_step_s"] > 0
