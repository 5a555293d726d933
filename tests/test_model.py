"""``AdaptiveLoraModel`` end to end on tiny BERT, Llama and GPT-2: budget, reallocation, optimizer, training."""

from __future__ import annotations

import importlib
import math
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.lora import LoraModel
from peft.utils.peft_types import PeftType

import peft_adaptive
from peft_adaptive import AdaptiveLoraConfig, AdaptiveLoraModel
from peft_adaptive.resize import cost_per_rank

from .tiny_models import TINY_MODELS, TokenDataset, adaptive_model, tiny_llama

R = 4
WARMUP = 4
AFTER = 14


def make_batch(name: str) -> dict[str, torch.Tensor]:
    data = TokenDataset(n=16, length=12, seed=1, classification=name == "bert")
    items = [data[i] for i in range(len(data))]
    return {
        "input_ids": torch.stack([item["input_ids"] for item in items]),
        "labels": torch.stack([torch.as_tensor(item["labels"]) for item in items]),
    }


def trainable_ids(model: torch.nn.Module) -> set[int]:
    return {id(p) for p in model.parameters() if p.requires_grad}


def optimizer_ids(optimizer: torch.optim.Optimizer) -> list[int]:
    return [id(p) for group in optimizer.param_groups for p in group["params"]]


def state_shapes_match(optimizer: torch.optim.Optimizer) -> bool:
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key in ("exp_avg", "exp_avg_sq"):
                if key in optimizer.state.get(p, {}) and optimizer.state[p][key].shape != p.shape:
                    return False
    return True


@pytest.fixture(scope="module", params=list(TINY_MODELS))
def run(request):
    """Warmup with signals, reallocate with the optimizer, keep training; record everything on the way."""
    name = request.param
    torch.manual_seed(0)
    model = adaptive_model(name, signal_steps=WARMUP, max_r=12, optimizer_state="migrate")  # the migration is tested
    tuner = model.base_model
    batch = make_batch(name)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = {"name": name, "model": model, "tuner": tuner, "optimizer": optimizer, "warmup_losses": []}

    def step(losses, record: bool = False):
        loss = model(**batch).loss
        loss.backward()
        if record:
            tuner.record_gradients()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())

    tuner.start_signal_collection()
    for _ in range(WARMUP):
        step(out["warmup_losses"], record=True)
    out["ranks_before"] = tuner.ranks()
    out["budget"] = tuner.param_budget()
    old_lora = [p for n, p in model.named_parameters() if "lora_" in n]  # kept alive: ids stay unique
    out["report"] = tuner.reallocate(optimizer, step=WARMUP)
    # state right after the reallocation, before any further step
    out["ranks_after"] = tuner.ranks()
    out["used_after"] = tuner.adapter_param_count()
    out["opt_ids_after"] = optimizer_ids(optimizer)
    out["trainable_after"] = trainable_ids(model)
    # replaced factors must be gone from the optimizer (unchanged layers keep theirs, still trainable)
    out["stale_after"] = ({id(p) for p in old_lora} & set(out["opt_ids_after"])) - out["trainable_after"]
    out["replaced"] = sum(id(p) not in out["trainable_after"] for p in old_lora)
    out["shapes_ok_after"] = state_shapes_match(optimizer)
    out["state_after"] = {  # AdamW updates its state in place: copy it
        n: {k: v.clone() for k, v in optimizer.state.get(layer.lora_A["default"].weight, {}).items()}
        for n, layer in tuner.adapted_modules().items()
    }
    out["after_losses"] = []
    for _ in range(AFTER):
        step(out["after_losses"])
    out["opt_ids_end"] = optimizer_ids(optimizer)
    out["trainable_end"] = trainable_ids(model)
    out["shapes_ok_end"] = state_shapes_match(optimizer)
    return out


def optimizer_ids_params(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


# --- construction ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_default_budget_is_plain_lora_at_rank_r(name):
    factory, targets, task = TINY_MODELS[name]
    model = adaptive_model(name, signal_steps=WARMUP)
    tuner = model.base_model
    assert type(tuner) is AdaptiveLoraModel
    assert isinstance(tuner, LoraModel)
    assert model.peft_config["default"].peft_type is PeftType.ADAPTIVE_LORA
    plain = get_peft_model(factory(), LoraConfig(r=R, target_modules=targets, task_type=task))
    plain_lora = {n: p.numel() for n, p in plain.named_parameters() if "lora_" in n and p.requires_grad}
    adaptive_lora = {n: p.numel() for n, p in model.named_parameters() if "lora_" in n and p.requires_grad}
    assert adaptive_lora == plain_lora  # same modules, same shapes before any reallocation
    assert tuner.param_budget() == sum(plain_lora.values())
    assert tuner.adapter_param_count() == sum(plain_lora.values())
    assert set(tuner.ranks().values()) == {R}
    assert len(tuner.adapted_modules()) == len(plain_lora) // 2
    if name == "gpt2":
        assert all(layer.fan_in_fan_out for layer in tuner.adapted_modules().values())


def test_explicit_param_budget_is_used():
    model = adaptive_model("llama", signal_steps=WARMUP, param_budget=5000)
    assert model.base_model.param_budget() == 5000


# --- reallocation in a hand-written loop ----------------------------------------------------------


def test_budget_is_met_and_fully_used(run):
    tuner, budget, used = run["tuner"], run["budget"], run["used_after"]
    config = tuner.peft_config["default"]
    modules = tuner.adapted_modules()
    assert used == sum(r * cost_per_rank(modules[n], "default") for n, r in run["ranks_after"].items())
    assert used <= budget
    below_max = [cost_per_rank(modules[n], "default") for n, r in run["ranks_after"].items() if r < config.max_r]
    assert below_max  # the budget (plain LoRA at r=4) cannot put every module at max_r=12
    assert budget - used < min(below_max), (budget, used, below_max)
    assert all(config.min_r <= r <= config.max_r for r in run["ranks_after"].values())
    report = run["report"]
    assert report.used == used and report.budget == budget
    assert report.signal_steps == WARMUP
    assert report.ranks_before == list(run["ranks_before"].values())
    assert report.ranks_after == [run["ranks_after"][n] for n in report.names]
    # the default (a spectrum score) values its new ranks above the uniform ones it started from
    assert report.predicted_gain > 1.0


def test_ranks_changed_and_differ(run):
    ranks = run["ranks_after"]
    assert set(run["ranks_before"].values()) == {R}
    assert len(set(ranks.values())) > 1, ranks
    assert ranks != run["ranks_before"]
    # the layers really have the new shapes
    for n, layer in run["tuner"].adapted_modules().items():
        assert layer.lora_A["default"].weight.shape[0] == ranks[n]
        assert layer.lora_B["default"].weight.shape[1] == ranks[n]


def _warm_and_reallocate(name: str = "llama", **config):
    """Signal steps on a tiny model, then the reallocation: (tuner, optimizer, report, the optimizer's state ids)."""
    torch.manual_seed(0)
    model = adaptive_model(name, signal_steps=WARMUP, max_r=12, **config)
    tuner, batch = model.base_model, make_batch(name)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tuner.start_signal_collection()
    for _ in range(WARMUP):
        model(**batch).loss.backward()
        tuner.record_gradients()
        optimizer.step()
        optimizer.zero_grad()
    before = optimizer_ids(optimizer)
    return tuner, optimizer, tuner.reallocate(optimizer, step=WARMUP), before


def test_min_predicted_gain_keeps_the_ranks_below_it_and_changes_nothing_above_it():
    _, _, free, _ = _warm_and_reallocate()
    assert free.predicted_gain > 1.0 and not free.kept_ranks and len(set(free.ranks_after)) > 1
    # a threshold just below the gain reallocates exactly as without one
    _, _, below, _ = _warm_and_reallocate(min_predicted_gain=free.predicted_gain * 0.999)
    assert below.ranks_after == free.ranks_after and not below.kept_ranks
    # just above it: the ranks stay, no parameter is replaced, the budget and the report say what happened
    tuner, optimizer, above, before = _warm_and_reallocate(min_predicted_gain=free.predicted_gain * 1.001)
    assert above.kept_ranks and above.predicted_gain == pytest.approx(free.predicted_gain)
    assert above.ranks_after == above.ranks_before == [R] * len(above.names)
    assert set(tuner.ranks().values()) == {R} and optimizer_ids(optimizer) == before
    assert tuner.adapter_param_count() == tuner.param_budget()
    assert "min_predicted_gain: the ranks stay as they were" in above.table()


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_higher_score_never_gets_fewer_ranks_at_equal_cost(name):
    """Proportional scores (here sensitivity): ranks follow the score among modules of the same cost. (The spectrum
    scores, the default among them, allocate per singular direction, so a module's total is not what orders them.)"""
    tuner, _, report, _ = _warm_and_reallocate(name, score="sensitivity")
    assert len(set(report.ranks_after)) > 1  # the property below is not vacuous
    assert report.predicted_gain is None  # a proportional score has no spectra to value ranks by
    costs = [cost_per_rank(tuner.adapted_modules()[n], "default") for n in report.names]
    for i in range(len(costs)):
        for j in range(len(costs)):
            if costs[i] == costs[j] and report.scores[i] > report.scores[j]:
                assert report.ranks_after[i] >= report.ranks_after[j]


def test_config_records_exact_patterns(run):
    config = run["tuner"].peft_config["default"]
    ranks = run["ranks_after"]
    assert config.rank_pattern == {f"^{re.escape(n)}$": r for n, r in ranks.items()}
    assert set(config.alpha_pattern) == set(config.rank_pattern)
    assert config.reallocation_step == WARMUP
    assert config.allocation["ranks_after"] == run["report"].ranks_after


def test_optimizer_holds_exactly_the_trainable_parameters(run):
    for opt_ids, trainable in [
        (run["opt_ids_after"], run["trainable_after"]),
        (run["opt_ids_end"], run["trainable_end"]),
    ]:
        assert len(opt_ids) == len(set(opt_ids))  # no parameter twice
        assert set(opt_ids) == trainable  # no stale, no missing
    assert not run["stale_after"]
    assert run["replaced"] > 0
    assert run["opt_ids_after"] == run["opt_ids_end"]


def test_optimizer_state_matches_parameters(run):
    assert run["shapes_ok_after"] and run["shapes_ok_end"]
    optimizer = run["optimizer"]
    for p in optimizer_ids_params(optimizer):
        assert optimizer.state[p]["exp_avg"].shape == p.shape
    # grown layers kept their moments (step count kept), shrunk layers were reset
    for n, state in run["state_after"].items():
        before, after = run["ranks_before"][n], run["ranks_after"][n]
        if after > before:
            assert float(state["step"]) == WARMUP
            assert state["exp_avg"].shape[0] == after
            assert torch.count_nonzero(state["exp_avg"][before:]) == 0
            assert torch.count_nonzero(state["exp_avg"][:before]) > 0
        elif after < before:
            assert state == {}


def _reallocated(**config):
    """A tiny Llama (r=4, alpha 8) trained 2 signal steps and reallocated with its optimizer; returns the model, the
    optimizer, each module's rank and scaling before, and each ``B``'s second moments before."""
    model = adaptive_model("llama", r=4, lora_alpha=8, signal_steps=2, lora_dropout=0.0, **config)
    tuner = model.base_model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tuner.start_signal_collection()
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        tuner.record_gradients()
        optimizer.step()
        optimizer.zero_grad()
    modules = tuner.adapted_modules()
    before = {n: (m.r["default"], m.scaling["default"]) for n, m in modules.items()}
    moments = {n: optimizer.state[m.lora_B["default"].weight]["exp_avg_sq"].clone() for n, m in modules.items()}
    tuner.reallocate(optimizer)
    return model.eval(), optimizer, before, moments


def test_optimizer_state_reset_rule_through_reallocate():
    """``AdaptiveLoraConfig(optimizer_state="reset")``: after the reallocation every resized factor has no state
    (the optimizer starts it afresh at the next step), the modules that kept their rank keep theirs."""
    model, optimizer, before, _ = _reallocated(optimizer_state="reset")
    resized = 0
    for name, module in model.base_model.adapted_modules().items():
        for p in (module.lora_A["default"].weight, module.lora_B["default"].weight):
            if module.r["default"] != before[name][0]:
                assert p not in optimizer.state
                resized += 1
            else:
                assert float(optimizer.state[p]["step"]) == 2
    assert resized > 0
    ids = torch.randint(0, 100, (2, 8))
    model.train()(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()  # the fresh states are created lazily


@pytest.mark.parametrize("rslora", [False, True])
def test_rank_scaling_after_reallocate(rslora):
    """``resize_scaling="rank"``: every resized module ends with the scaling plain LoRA gives its new rank with the
    configured alpha, the model computes what ``"keep"`` makes of the same run (the scaling moved into ``B``), a
    migrated ``B``'s moments are in the units of its new gradients, and no per-module alpha is left to save."""
    model, optimizer, before, moments = _reallocated(
        use_rslora=rslora, resize_scaling="rank", optimizer_state="migrate"
    )
    kept, *_ = _reallocated(use_rslora=rslora, resize_scaling="keep", optimizer_state="migrate")
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, kept(input_ids=ids).logits, atol=1e-5)
    grown = changed = 0
    for name, module in model.base_model.adapted_modules().items():
        r = module.r["default"]
        old_r, old_scaling = before[name]
        assert module.lora_alpha["default"] == 8
        assert module.scaling["default"] == pytest.approx(8 / math.sqrt(r) if rslora else 8 / r)
        changed += r != old_r
        if r > old_r:  # migrated: the old entries' second moments times (new scaling / old scaling)^2
            grown += 1
            state = optimizer.state[module.lora_B["default"].weight]["exp_avg_sq"]
            ratio = (module.scaling["default"] / old_scaling) ** 2
            assert torch.allclose(state[:, :old_r], moments[name] * ratio)
    assert grown > 0 and changed > grown  # some grew, some shrank
    assert set(model.base_model.peft_config["default"].alpha_pattern.values()) <= {8}


def test_optimizer_state_rule_is_checked():
    with pytest.raises(ValueError, match="optimizer_state.*'migrate', 'reset'"):
        AdaptiveLoraConfig(r=2, target_modules=["q_proj"], optimizer_state="keep")


def test_loss_keeps_falling(run):
    warmup, after = run["warmup_losses"], run["after_losses"]
    assert all(math.isfinite(x) for x in warmup + after)
    first, last = sum(after[:3]) / 3, sum(after[-3:]) / 3
    assert last < first, after
    assert last < sum(warmup[:2]) / 2
    # the reallocation itself does not throw the model off (loss right after ~ loss right before)
    assert after[0] < warmup[0]


def test_every_adapter_tensor_trains_after_reallocation(run):
    # all factors (incl. grown rows and rotated bases) keep changing; nothing is orphaned
    model, tuner, optimizer = run["model"], run["tuner"], run["optimizer"]
    batch = make_batch(run["name"])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    changed = {n: not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if "lora_" in n}
    assert all(changed.values()), [n for n, c in changed.items() if not c]
    assert len(changed) == 2 * len(tuner.adapted_modules())


def test_reallocate_needs_signals():
    model = adaptive_model("llama", signal_steps=WARMUP)
    with pytest.raises(RuntimeError, match="start_signal_collection"):
        model.base_model.reallocate()
    with pytest.raises(RuntimeError, match="start_signal_collection"):
        model.base_model.record_gradients()


# --- multiple adapters ----------------------------------------------------------------------------


def test_reallocating_one_adapter_leaves_the_other_alone():
    torch.manual_seed(0)
    model = adaptive_model("llama", signal_steps=WARMUP, max_r=12)
    model.add_adapter(
        "other",
        AdaptiveLoraConfig(r=3, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    )
    model.set_adapter("default")
    tuner = model.base_model
    other_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".other" in n}
    other_ranks = tuner.ranks("other")
    other_scaling = {n: layer.scaling["other"] for n, layer in tuner.adapted_modules("other").items()}
    assert other_before and set(other_ranks.values()) == {3}

    batch = make_batch("llama")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tuner.start_signal_collection("default")
    for _ in range(WARMUP):
        model(**batch).loss.backward()
        tuner.record_gradients("default")
        optimizer.step()
        optimizer.zero_grad()
    tuner.reallocate(optimizer, adapter_name="default")

    assert len(set(tuner.ranks("default").values())) > 1
    assert tuner.ranks("other") == other_ranks
    assert {n: layer.scaling["other"] for n, layer in tuner.adapted_modules("other").items()} == other_scaling
    other_after = {n: p.detach() for n, p in model.named_parameters() if ".other" in n}
    assert other_after.keys() == other_before.keys()
    assert all(torch.equal(other_after[n], other_before[n]) for n in other_before)
    assert not model.peft_config["other"].rank_pattern
    assert set(optimizer_ids(optimizer)) == trainable_ids(model)


# --- registration ---------------------------------------------------------------------------------


def test_registration_survives_reload():
    members = len(PeftType)
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.ADAPTIVE_LORA]
    reloaded = importlib.reload(peft_adaptive)
    importlib.reload(importlib.import_module("peft_adaptive._peft_type"))
    from peft_adaptive._peft_type import ensure_peft_type

    assert ensure_peft_type() is PeftType.ADAPTIVE_LORA
    assert len(PeftType) == members  # no duplicate member
    assert PeftType("ADAPTIVE_LORA") is PeftType.ADAPTIVE_LORA is PeftType["ADAPTIVE_LORA"]
    assert PeftType.ADAPTIVE_LORA == "ADAPTIVE_LORA" and PeftType.ADAPTIVE_LORA in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.ADAPTIVE_LORA] is config_cls is reloaded.AdaptiveLoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.ADAPTIVE_LORA] is reloaded.AdaptiveLoraModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.ADAPTIVE_LORA] == "lora_"
    model = get_peft_model(tiny_llama(), reloaded.AdaptiveLoraConfig(r=2, target_modules=["q_proj"]))
    assert type(model.base_model) is AdaptiveLoraModel


# --- config validation ----------------------------------------------------------------------------


def test_default_rank_bounds():
    config = AdaptiveLoraConfig(r=4, target_modules=["q_proj"])
    assert (config.min_r, config.max_r, config.sketch_size) == (1, 8, 16)  # max_r = 2r, sketch max_r + 8
    assert AdaptiveLoraConfig(r=4, max_r=5, target_modules=["q_proj"]).sketch_size == 13


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(r=0), r"\.r "),
        (dict(min_r=-1), "min_r"),
        (dict(score="fisher"), "score.*one of 'norms'"),
        (dict(growth="svd"), "growth.*one of 'gradient', 'random'"),
        (dict(sketch_size=0), "sketch_size"),
        (dict(min_r=5, max_r=3), r"max_r.*min_r"),
        (dict(r=1, min_r=3), r"max_r.*min_r"),  # default max_r = 2 * r = 2 < min_r
        (dict(grad_weight=-1.0), "grad_weight"),
        (dict(grad_weight=float("inf")), "grad_weight"),
        (dict(delta_weight=float("nan")), "delta_weight"),
        (dict(delta_weight=-0.5), "delta_weight"),
        (dict(score="norms", grad_weight=0.0, delta_weight=0.0), "grad_weight and delta_weight"),
        (dict(delta_weight=0.5), "delta_weight=0.5 with score='consistent_spectrum'.*only apply to score='norms'"),
        (dict(consistency_power=-1.0), "consistency_power"),
        (dict(consistency_power=float("nan")), "consistency_power"),
        (
            dict(score="gradient_spectrum", consistency_power=1.0),
            "consistency_power=1.0 with score='gradient_spectrum'",
        ),
        (dict(score="spectral", grad_weight=2.0), "grad_weight=2.0.*only apply to score='norms'"),
        (dict(min_predicted_gain=-0.1), "min_predicted_gain"),
        (dict(min_predicted_gain=float("inf")), "min_predicted_gain"),
        (
            dict(score="sensitivity", min_predicted_gain=1.02),
            "min_predicted_gain=1.02 with score='sensitivity'.*'consistent_spectrum'",
        ),
        (dict(signal_steps=0), "signal_steps"),
        (dict(param_budget=0), "param_budget"),
        (dict(param_budget=-10), "param_budget"),
        (dict(score_exponent=-0.1), "score_exponent"),
        (dict(score_exponent=float("nan")), "score_exponent"),
    ],
)
def test_invalid_config_raises(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AdaptiveLoraConfig(target_modules=["q_proj"], **kwargs)


def test_too_small_budget_raises_at_get_peft_model():
    # 2 layers x (q_proj 32+32, v_proj 32+16): min_r=1 alone costs 224 parameters
    config = AdaptiveLoraConfig(r=4, target_modules=["q_proj", "v_proj"], param_budget=223)
    with pytest.raises(ValueError, match=r"param_budget=223.*224"):
        get_peft_model(tiny_llama(), config)
    ok = get_peft_model(tiny_llama(), AdaptiveLoraConfig(r=4, target_modules=["q_proj", "v_proj"], param_budget=224))
    assert ok.base_model.param_budget() == 224
    with pytest.raises(ValueError, match="param_budget"):
        get_peft_model(
            tiny_llama(), AdaptiveLoraConfig(r=4, min_r=2, target_modules=["q_proj", "v_proj"], param_budget=447)
        )


def test_an_adapter_added_with_another_adapters_config_gets_its_own_copy():
    """``add_adapter("ref", model.peft_config["default"])`` (TRL's DPO reference adapter) must not share the config:
    the reallocation of one adapter rewrites the rank_pattern the other is saved with."""
    model = adaptive_model(
        "llama", signal_steps=1, max_r=12, score="norms"
    )  # no optimizer step: sensitivity is 0 at B = 0
    model.add_adapter("ref", model.peft_config["default"])
    tuner = model.base_model
    assert tuner.peft_config["ref"] is not tuner.peft_config["default"]
    batch = make_batch("llama")
    tuner.start_signal_collection("default")
    model(**batch).loss.backward()
    tuner.record_gradients("default")
    tuner.reallocate(adapter_name="default", step=1)
    assert set(tuner.ranks("ref").values()) == {4} and len(set(tuner.ranks("default").values())) > 1
    assert tuner.peft_config["ref"].rank_pattern == {} and tuner.peft_config["ref"].reallocation_step is None
