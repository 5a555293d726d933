"""FSDP2: the base model sharded per decoder layer, the adapter replicated and reallocated in place.

``tests/scripts/fsdp_train.py`` runs under ``torchrun --nproc_per_node 2`` (CPU, gloo) once for the module: the
hand loop with ``update_and_allocate`` on a model sharded by ``peft_adaptive.fsdp.shard_base_model``, the same
loop unsharded in one process on the same data, and a resume from a checkpoint taken after the reallocation.
``tests/scripts/fsdp_trainer.py`` runs ``Trainer`` with the callback on a model that transformers sharded with
FSDP2 while loading it (``distributed_config``), and the same without the callback's re-synchronisation.
"""

from __future__ import annotations

import inspect
import json
import math
import types
from pathlib import Path

import pytest
import torch

from peft_adaptive.fsdp import check_trainer_resync, resync_trainer_replicas, shard_base_model

from .fresh_process import load_adapters
from .process_group import torchrun
from .tiny_models import adaptive_model, tiny_llama

SCRIPT = Path(__file__).resolve().parent / "scripts" / "fsdp_train.py"
TRAINER_SCRIPT = Path(__file__).resolve().parent / "scripts" / "fsdp_trainer.py"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    proc = torchrun(str(SCRIPT), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def result(run) -> dict:
    return json.loads((run / "result.json").read_text())


def test_allocation_equals_the_single_process_run(result):
    reference, sharded = result["reference"]["report"], result["sharded"]["report"]
    assert result["world_size"] == 2
    assert sharded["step"] == reference["step"] == 3
    assert sharded["ranks_after"] == reference["ranks_after"]
    assert len(set(sharded["ranks_after"])) > 1  # a real reallocation, not uniform ranks
    assert sharded["used"] == reference["used"] and sharded["budget"] == reference["budget"]
    for ours, theirs in zip(sharded["grad_signal"], reference["grad_signal"]):
        assert math.isclose(ours, theirs, rel_tol=1e-5)
    # every process resized to the same ranks
    assert result["ranks_per_process"][0] == result["ranks_per_process"][1]


def test_processes_stay_identical_and_training_continues(result, run):
    assert result["max_diff_per_step"] == {str(s): 0.0 for s in range(1, 10)}
    assert result["drift_without_gradient_sync"] > 1e-4  # FSDP itself does not reduce the ignored adapter
    assert result["gradients_made_up"] == 0  # a parameter no process has a gradient for keeps none
    losses = result["sharded"]["losses"]
    after = losses[3:]  # the steps after the reallocation at step 3
    assert all(b < a for a, b in zip(after, after[1:])), losses
    assert losses == pytest.approx(result["reference"]["losses"], rel=1e-5)
    sharded, reference = torch.load(run / "sharded.pt"), torch.load(run / "reference.pt")
    assert sharded.keys() == reference.keys()
    assert max(float((sharded[k] - reference[k]).abs().max()) for k in sharded) < 1e-4


def test_gradient_accumulation_gives_the_same_run(result, run):
    """Every micro-batch's backward averages the accumulated adapter gradients again; averaging is linear."""
    accumulated, sharded = result["accumulated"]["report"], result["sharded"]["report"]
    assert accumulated["ranks_after"] == sharded["ranks_after"]
    for ours, theirs in zip(accumulated["grad_signal"], sharded["grad_signal"]):
        assert math.isclose(ours, theirs, rel_tol=1e-5)
    weights, expected = torch.load(run / "accumulated.pt"), torch.load(run / "sharded.pt")
    assert max(float((weights[k] - expected[k]).abs().max()) for k in expected) < 1e-4


def test_no_process_holds_a_whole_base_weight(result):
    assert result["whole_base_weights"] == []
    assert result["adapter_parameters"] == 28  # 14 modules x (A, B), replicated


def test_resume_after_the_reallocation_gives_the_same_weights(run):
    resumed, sharded = torch.load(run / "resumed.pt"), torch.load(run / "sharded.pt")
    assert resumed.keys() == sharded.keys()
    assert all(torch.equal(resumed[k], sharded[k]) for k in sharded)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The tiny Llama every run starts from (``adaptive_model``'s base), saved."""
    folder = tmp_path_factory.mktemp("base")
    tiny_llama(seed=0).save_pretrained(folder)
    return folder


def _transformers_shards_at_load() -> bool:
    """transformers' FSDP2 sharding at load time, and the Trainer support for it (newer than the 5.0 floor)."""
    from transformers import Trainer

    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        return False
    return "fsdp_size" in inspect.signature(DistributedConfig).parameters and hasattr(
        Trainer, "_sync_replicated_trainable_parameters"
    )


needs_sharding_at_load = pytest.mark.skipif(
    not _transformers_shards_at_load(), reason="this transformers cannot shard a model with FSDP2 at load time"
)


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory, base) -> dict[str, Path]:
    runs = {}
    for name, extra in (("fixed", []), ("control", ["--no-resync"])):
        out = tmp_path_factory.mktemp(f"fsdp-trainer-{name}")
        proc = torchrun(str(TRAINER_SCRIPT), str(out), str(base), *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = out
    return runs


@needs_sharding_at_load
def test_trainer_on_a_model_sharded_at_load_reallocates_in_place(trainer_runs):
    result = json.loads((trainer_runs["fixed"] / "result.json").read_text())
    assert result["world_size"] == 2 and result["wrapped"] == "PeftModelForCausalLM"  # no DDP around it
    assert result["whole_base_weights"] == []
    assert result["reallocation_step"] == 3
    assert result["ranks_per_process"][0] == result["ranks_per_process"][1]
    assert len(set(result["ranks_per_process"][0].values())) > 1
    assert result["max_diff_per_step"] == {str(s): 0.0 for s in range(1, 9)}
    after = [loss for step, loss in sorted(result["losses"].items(), key=lambda kv: int(kv[0])) if int(step) > 3]
    assert len(after) >= 4 and all(b < a for a, b in zip(after, after[1:])), result["losses"]
    # without registering the Trainer's gradient averaging on the new factors, the processes drift apart
    control = json.loads((trainer_runs["control"] / "result.json").read_text())
    assert all(control["max_diff_per_step"][str(s)] == 0.0 for s in range(1, 4))
    assert control["max_diff_per_step"]["8"] > 1e-4


@pytest.mark.parametrize("which", ["hand loop", pytest.param("Trainer", marks=needs_sharding_at_load)])
def test_saved_adapter_loads_with_vanilla_peft(which, request, base, tmp_path):
    run = request.getfixturevalue("run") if which == "hand loop" else request.getfixturevalue("trainer_runs")["fixed"]
    loaded = load_adapters(base, run / "inputs.pt", tmp_path / "logits", [run / "adapter"])
    entry = loaded[str(run / "adapter")]
    assert not loaded["plugin_imported"] and entry["peft_type"] == "LORA"
    assert sorted(entry["ranks"].values()) != [4] * 14
    logits = torch.load(entry["logits"])
    assert torch.allclose(logits, torch.load(run / "logits.pt"), atol=1e-5)


def test_an_adapter_inside_the_shards_is_refused(result):
    assert "sharded by fully_shard (FSDP2) without the adapter in ignored_params" in result["refused"]
    assert "peft_adaptive.fsdp.shard_base_model(peft_model)" in result["refused"]


def test_shard_base_model_refuses_what_it_cannot_keep():
    model = adaptive_model()
    with pytest.raises(ValueError, match="does not take mp_policy"):
        shard_base_model(model, mp_policy=object())
    model.base_model.model._no_split_modules = None
    with pytest.raises(ValueError, match="pass the modules to shard"):
        shard_base_model(model)


def test_a_trainer_that_cannot_resync_is_refused_at_train_start():
    """A Trainer on a model sharded at load time without the hook registration the callback re-runs."""
    old_trainer = types.SimpleNamespace(is_distributed_loading_by_transformers=True)
    with pytest.raises(RuntimeError, match="_sync_replicated_trainable_parameters"):
        check_trainer_resync(old_trainer)
    assert resync_trainer_replicas(types.SimpleNamespace()) is False  # not sharded at load: nothing to do
    check_trainer_resync(None)
