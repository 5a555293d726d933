"""The benchmark's peers (AdaLoRA, EVA) and learning-rate variants, end to end through ``runner.run_one`` on a tiny
random Llama (a test-only task: no download, no data files), and AdaLoRA's orthogonal regulariser as the harness
adds it."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from .tiny_models import VOCAB, tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from bench import common, kept_loss, peers, runner  # noqa: E402
from bench.methods import SHIPPED_DEFAULT, SHIPPED_DEFAULT_SHUFFLED, build, hindsight_ranks, parse_method  # noqa: E402
from bench.records import result_path  # noqa: E402
from bench.suites import Suite  # noqa: E402
from bench.tasks import Task  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # every one costs 32 + 32 per rank: ranks budget = params budget


class TinyTask(Task):
    """Next-token prediction on random tokens; held-out and validation sets of their own."""

    model_name = "tiny"

    def __init__(self, suite: Suite):
        super().__init__(suite)
        tokens = torch.randint(0, VOCAB, (96, 8), generator=torch.Generator().manual_seed(0))
        self.train, self.dev, self.val = list(tokens[:64]), tokens[64:80], tokens[80:]

    def collate(self, items: list) -> torch.Tensor:
        return torch.stack(items)

    def base_model(self) -> LlamaForCausalLM:
        return tiny_llama(kv_heads=4)

    def targets(self) -> list[str]:
        return TARGETS

    def loss(self, model, batch) -> torch.Tensor:
        logits = model(input_ids=batch).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))

    def model_inputs(self, batch) -> dict:
        return {"input_ids": batch}

    def _mean_loss(self, model, tokens) -> dict:
        with torch.no_grad():
            return {"eval_loss": float(self.loss(model, tokens))}

    def evaluate(self, model) -> dict:
        return self._mean_loss(model, self.dev)

    def validate(self, model) -> dict:
        return self._mean_loss(model, self.val)

    def finish(self, metrics: dict, base_metrics: dict) -> dict:
        return {**metrics, "base_loss": base_metrics["eval_loss"]}


SUITE = Suite("tiny", r=2, lora_alpha=4, lr=1e-2, steps=6, warmup=2, batch_size=4, min_r=1, metric="eval_loss")


@pytest.fixture(scope="module")
def records() -> dict[str, dict]:
    task = TinyTask(SUITE)
    names = ["lora", SHIPPED_DEFAULT, "adalora", "eva", "eva-rho1", "lora+lr2x", SHIPPED_DEFAULT + "+eva"]
    return {name: runner.run_one(SUITE.name, name, 0, calib_batches=2, task=task) for name in names}


def test_every_method_lands_on_uniform_loras_budget(records):
    budget = records["lora"]["adapter_params"]
    assert budget == 2 * 64 * len(TARGETS) * 2  # r=2 on 4 modules of 2 layers, 64 parameters per rank
    for name, record in records.items():
        assert abs(record["adapter_params"] / budget - 1) <= 0.02, name  # AdaLoRA: +1/64 for its E entries
        assert record["ranks"] and all(rank >= 0 for rank in record["ranks"].values())
        assert set(record["val_metrics"]) == {"eval_loss", "base_loss"}
        assert record["val_metrics"]["eval_loss"] != record["metrics"]["eval_loss"]  # another set
        assert len(record["cost"]["step_seconds"]) == SUITE.steps


def test_adalora_record(records):
    record = records["adalora"]
    assert record["adalora"] | {"allocated_params": 0} == {
        "init_r": 3,
        "target_r": 2,
        "tinit": 2,
        "tfinal": 1,
        "deltaT": 10,
        "total_step": 6,
        "beta1": 0.85,
        "beta2": 0.85,
        "orth_reg_weight": 0.5,
        "orth_reg_added_by": "harness",
        "final_budget_step": 5,
        "budget_reached": True,
        "allocated_params": 0,
    }
    assert record["adalora"]["allocated_params"] == 3 * 65 * 8  # init_r tensors stay allocated (masking)
    assert sum(record["ranks"].values()) == 2 * 8  # target_r x modules unmasked singular values
    assert record["adapter_params"] == 2 * 8 * 65
    assert len(record["cost"]["adalora_allocate_seconds"]) == 6 and record["cost"]["allocation_steps"] == 6


def test_eva_records(records):
    for name, rho in (("eva", 2.0), ("eva-rho1", 1.0)):
        eva = records[name]["eva"]
        assert eva["rho"] == rho and eva["eva_batches"] == SUITE.warmup and eva["eva_forward_passes"] >= 1
        assert eva["eva_init_seconds"] >= 0 and records[name]["allocation"]["step"] == 0
        ranks = records[name]["ranks"]
        assert sum(ranks.values()) == 2 * 8 and max(ranks.values()) <= 2 * rho
    assert set(records["eva-rho1"]["ranks"].values()) == {2}  # rho=1: EVA's init at uniform ranks


def test_default_from_evas_initialisation_reallocates_after_it(records):
    started = records[SHIPPED_DEFAULT + "+eva"]
    assert started["eva"]["rho"] == 1.0 and started["eva"]["eva_batches"] == SUITE.warmup
    assert started["allocation"]["step"] == SUITE.warmup and started["allocation"]["scores"]  # ours, after EVA's
    assert started["cost"]["init_seconds"] > 0 and started["cost"]["reallocation_seconds"] is not None
    # same seed, same data, same allocation rule: only the starting A differs, so training does
    assert started["metrics"] != records[SHIPPED_DEFAULT]["metrics"]


def test_shipped_default_reallocates_and_lr_variant_differs(records):
    default = records[SHIPPED_DEFAULT]
    assert default["allocation"]["step"] == SUITE.warmup and default["cost"]["allocation_steps"] == SUITE.warmup
    assert default["cost"]["reallocation_seconds"] is not None
    assert max(default["ranks"].values()) <= 2 * SUITE.r
    assert records["lora+lr2x"]["lr"] == 2 * records["lora"]["lr"] == 2e-2
    assert records["lora+lr2x"]["metrics"] != records["lora"]["metrics"]


def test_full_fine_tuning_refuses_smollm2_suites():
    task = TinyTask(SUITE)
    with pytest.raises(SystemExit, match="MiniLM suites only"):
        build(parse_method("full"), task, task.base_model())


class TinyEmbeddingTask(TinyTask):
    """The same with the input embedding in the budget (as ``clm-cipher-emb``): 128 + 32 parameters per rank."""

    def targets(self) -> list[str]:
        return [*TARGETS, "embed_tokens"]


def test_the_embedding_rules_hold_it_at_min_r_and_peft_refuses_or_skips_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_ADAPTIVE_ALLOCATION_RESULTS", str(tmp_path))
    task = TinyEmbeddingTask(SUITE)
    lora = runner.run_one(SUITE.name, "lora", 0, calib_batches=2, task=task)
    common.write_json(result_path(SUITE.name, "lora", 0), lora)  # where the hand rule reads its modules from
    assert lora["rank_costs"]["model.embed_tokens"] == VOCAB + 32

    hand = runner.run_one(SUITE.name, "fixed-embedmin-random", 0, calib_batches=2, task=task)
    ranks = hand["ranks"]
    assert ranks["model.embed_tokens"] == SUITE.min_r == 1
    # the 160 freed parameters: one more rank on two of the eight 64-parameter modules, 32 left over
    assert sorted(rank for name, rank in ranks.items() if "embed" not in name) == [2] * 6 + [3] * 2
    assert lora["adapter_params"] - 64 < hand["adapter_params"] <= lora["adapter_params"]

    # check 2 for such a budget: the embedding held at min_r, the rest split by lora-4x's update spectra
    wide = runner.run_one(SUITE.name, "lora-4x", 0, calib_batches=2, task=task)
    common.write_json(result_path(SUITE.name, "lora-4x", 0), wide)
    held = runner.run_one(SUITE.name, "fixed-embedmin_hindsight-random", 0, calib_batches=2, task=task)
    assert held["ranks"] == hindsight_ranks(SUITE, wide, {"model.embed_tokens": 1})
    assert held["ranks"]["model.embed_tokens"] == 1
    assert lora["adapter_params"] - 64 < held["adapter_params"] <= lora["adapter_params"]

    with pytest.raises(ValueError, match="Target module Embedding.* is not supported"):
        build(parse_method("adalora"), task, task.base_model())  # PEFT's AdaLoRA adapts linear layers only
    eva = runner.run_one(SUITE.name, "eva", 0, calib_batches=2, task=task)
    assert eva["ranks"]["model.embed_tokens"] == SUITE.r  # EVA leaves it at r (PEFT's usual init), outside its split


def test_shuffled_default_moves_the_defaults_ranks_within_cost_groups(tmp_path, monkeypatch):
    """``warm-shuffled_default-...`` is the shipped default's run with only the places of its final ranks changed:
    same signal steps, the embedding (alone in its cost group) at the default's rank, each cost group's ranks
    permuted."""
    monkeypatch.setenv("PEFT_ADAPTIVE_ALLOCATION_RESULTS", str(tmp_path))
    task = TinyEmbeddingTask(SUITE)
    with pytest.raises(SystemExit, match=f"run {re.escape(SHIPPED_DEFAULT)} first"):
        runner.run_one(SUITE.name, SHIPPED_DEFAULT_SHUFFLED, 0, calib_batches=2, task=task)
    default = runner.run_one(SUITE.name, SHIPPED_DEFAULT, 0, calib_batches=2, task=task)
    common.write_json(result_path(SUITE.name, SHIPPED_DEFAULT, 0), default)
    shuffled = runner.run_one(SUITE.name, SHIPPED_DEFAULT_SHUFFLED, 0, calib_batches=2, task=task)
    assert shuffled["allocation"]["step"] == default["allocation"]["step"] == SUITE.warmup
    assert shuffled["adapter_params"] == default["adapter_params"]
    costs = default["rank_costs"]
    for cost in set(costs.values()):
        group = sorted(n for n in costs if costs[n] == cost)
        assert sorted(shuffled["ranks"][n] for n in group) == sorted(default["ranks"][n] for n in group)
    assert shuffled["ranks"]["model.embed_tokens"] == default["ranks"]["model.embed_tokens"]
    moved = [n for n in costs if shuffled["ranks"][n] != default["ranks"][n]]
    assert moved  # the places changed (on this tiny model, five of the eight linear modules at seed 0)


def test_adalora_orth_reg_equals_what_peft_adds():
    """On a model that returns a loss, PEFT's ``AdaLoraModel.forward`` adds ``orth_reg_weight * adalora_orth_reg``;
    a ``PeftModel`` without a task type (every method in the harness) goes past it, so the runner adds it."""
    task = TinyTask(SUITE)
    model = peers.build_adalora(task.base_model(), task)
    with torch.no_grad():  # A and B start random (std 0.02); E at 0 would leave the output unchanged anyway
        for layer in model.base_model.model.modules():
            if hasattr(layer, "lora_E"):
                layer.lora_E["default"].normal_()
    batch = task.collate(task.train[:4])
    with torch.no_grad():
        with_reg = model.base_model(input_ids=batch, labels=batch).loss  # AdaLoraModel.forward
        without = model.base_model.model(input_ids=batch, labels=batch).loss  # the same layers, no regulariser
        through_peft_model = model(input_ids=batch, labels=batch).loss
        added = peers.adalora_orth_reg_weight(model) * peers.adalora_orth_reg(model)
    assert float(added) > 0.1
    assert float(with_reg - without) == pytest.approx(float(added), rel=1e-5)
    assert float(through_peft_model) == float(without)


def test_the_oracle_held_to_a_cap_adapts_the_planted_modules_at_their_ranks_cut_to_it():
    task = TinyTask(SUITE)
    task.planted = {"model.layers.0.self_attn.q_proj": 3 * SUITE.r, "model.layers.1.self_attn.v_proj": 1}
    capped = build(parse_method("oracle+max2r"), task, task.base_model()).base_model.model
    ranks = {name: module.r["default"] for name, module in capped.named_modules() if hasattr(module, "lora_A")}
    assert ranks == {"model.layers.0.self_attn.q_proj": 2 * SUITE.r, "model.layers.1.self_attn.v_proj": 1}
    uncapped = build(parse_method("oracle"), task, task.base_model()).base_model.model
    assert uncapped.get_submodule("model.layers.0.self_attn.q_proj").r["default"] == 3 * SUITE.r


def test_keepgate_splits_the_budget_by_the_kept_loss_read_at_the_reallocation(monkeypatch):
    """``warm-keepgate-*``: the shipped default's signal steps, then each module's kept loss read on the next
    batches; the budget split by it, or uniform LoRA's ranks where the gate holds."""
    task = TinyTask(SUITE)
    name = "warm-keepgate-random+max2r+reset"
    monkeypatch.setattr(kept_loss, "SPREAD_GATE", 2.0)  # never gated: the split itself
    split = runner.run_one(SUITE.name, name, 0, calib_batches=2, task=task)
    reading = split["kept_loss"]
    assert set(reading["modules"]) == set(split["ranks"]) and not reading["gated"]
    assert min(reading["modules"].values()) >= 0 < max(reading["modules"].values())
    assert 0 < reading["spread"] <= 1
    assert split["allocation"]["step"] == SUITE.warmup
    assert split["adapter_params"] <= 2 * 64 * len(TARGETS) * 2  # uniform LoRA's budget
    assert set(split["ranks"].values()) != {SUITE.r} and max(split["ranks"].values()) <= 2 * SUITE.r
    monkeypatch.setattr(kept_loss, "SPREAD_GATE", 0.0)  # always gated
    gated = runner.run_one(SUITE.name, name, 0, calib_batches=2, task=task)
    assert gated["kept_loss"]["gated"] and set(gated["ranks"].values()) == {SUITE.r}
    assert gated["kept_loss"]["modules"] == reading["modules"]  # the same run up to the reallocation
    # it reads the shipped default's signals; a kind without a warm run's reallocation is refused
    assert build(parse_method(name), task, task.base_model(), 0).peft_config["default"].score == "consistent_spectrum"
    with pytest.raises(SystemExit, match="keepgate is read at a warm run's reallocation"):
        parse_method("calib-keepgate-random")
