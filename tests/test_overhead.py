"""``benchmarks/overhead.py`` at its tiny shape: the in-process engine runs every method with one command (what
``--mode gpu --engine loop`` runs on a GPU), and the Trainer engine's EVA worker measures EVA with its init apart."""

from __future__ import annotations

import importlib
import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

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
        for phase in record["phases"].values():
            assert len(phase["step_times_s"]) == 3 and all(t > 0 for t in phase["step_times_s"])
    # the same budget for every adapter method (AdaLoRA counts its extra E entries; EVA redistributes ranks)
    assert by_config["adaptive"]["adapter_params_effective_end"] <= by_config["lora"]["adapter_params_effective_end"]
    one_offs = payload["one_offs"]
    assert len(one_offs["reallocation_s"]) == 1 and one_offs["eva_converged"] == [True]
    assert one_offs["eva_init_s"][0] > 0 and one_offs["adalora_per_step_call_s"]
    report = (tmp_path / "results.md").read_text()
    for phase in ("| base |", "| adaptive warmup |", "| adalora late |", "| eva early |", "EVA initialisation"):
        assert phase in report


def test_trainer_engine_measures_eva_with_its_init_apart(tmp_path):
    shape = overhead.SHAPES["tiny"]
    spec = overhead.WorkerSpec("eva", asdict(shape), 4, 1e-3, 0, str(tmp_path / "eva-0.json"))
    spec_path = tmp_path / "eva-0.spec.json"
    spec_path.write_text(json.dumps(asdict(spec)))
    overhead.run_worker(str(spec_path))
    record = json.loads((tmp_path / "eva-0.json").read_text())
    assert record["eva_init_s"] > 0 and 0 < record["eva_forwards"] <= overhead.EVA_MAX_FORWARDS
    assert set(record["phases"]) == {"eva early", "eva late"}
    ranks = record["ranks_end"]
    assert len(set(ranks.values())) > 1 and sum(ranks.values()) <= 4 * len(ranks)  # rho=2: redistributed, same total


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
