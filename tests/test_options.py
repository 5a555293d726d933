"""Every ``LoraConfig`` option is resized correctly, has no effect on resizing, or is refused at ``get_peft_model``.

The table is :mod:`peft_adaptive.options`; these tests enumerate the installed PEFT's ``LoraConfig`` fields and
``init_lora_weights`` values, so an option added by a newer PEFT fails here until it is put in the table.
Every accepted option is exercised by at least one case of :data:`CASES`: a tiny model is trained two steps,
grown (outputs equal), shrunk (the update is the best rank-k approximation of the real update), trained one
more step through the same optimizer, saved and reloaded by vanilla PEFT in a fresh process (one for all cases)
with equal outputs.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import peft
import pytest
import torch
from packaging.version import Version
from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.config import (
    ArrowConfig,
    BdLoraConfig,
    KasaConfig,
    LoraGAConfig,
    MontecloraConfig,
    VeloraConfig,
)
from torch import nn
from transformers import Trainer

from peft_adaptive import AdaptiveLoraCallback, AdaptiveLoraConfig
from peft_adaptive.options import INIT_LORA_WEIGHTS, LORA_OPTIONS, REFUSED, init_lora_weights_values
from peft_adaptive.variants import base_matrix, update_factors

from .fresh_process import load_adapters
from .test_callback import training_args
from .tiny_models import VOCAB, TokenDataset, adaptive_model, tiny_gpt2, tiny_llama, token_batch

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Fields that no case sets to a non-default value, and why their default is what is tested.
AT_DEFAULT = {
    "peft_type": "set by the config class",
    "auto_mapping": "written on save (every custom-model case)",
    "peft_version": "written on save",
    "base_model_name_or_path": "written on save",
    "revision": "metadata",
    "inference_mode": "set on save; the reload runs in inference mode",
    "runtime_config": "runtime-only, never saved",
    "megatron_core": "used only with megatron_config (refused)",
    "qalora_group_size": "used only with use_qalora (refused)",
    "eva_config": "used only with init_lora_weights='eva' (refused)",
    "corda_config": "used only with init_lora_weights='corda' (refused)",
    "loftq_config": "used only with init_lora_weights='loftq' (refused)",
}


def _conv_model(dims: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    return nn.Sequential(conv(3, 8, 3), nn.ReLU(), conv(8, 6, 2))


def _embed_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(VOCAB, 16), nn.Linear(16, 12))


def _mha_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)


# base name -> (factory, inputs, is a transformers model)
BASES = {
    "llama": (tiny_llama, lambda: token_batch(2, 12, seed=1), True),
    "gpt2": (tiny_gpt2, lambda: token_batch(2, 12, seed=1), True),
    "embed": (_embed_model, lambda: token_batch(2, 12, seed=1), False),
    "conv1d": (lambda seed=0: _conv_model(1, seed), lambda: torch.randn(2, 3, 10, generator=_g()), False),
    "conv2d": (lambda seed=0: _conv_model(2, seed), lambda: torch.randn(2, 3, 7, 7, generator=_g()), False),
    "conv3d": (lambda seed=0: _conv_model(3, seed), lambda: torch.randn(2, 3, 5, 5, 5, generator=_g()), False),
}


def _g() -> torch.Generator:
    return torch.Generator().manual_seed(1)


@dataclass
class Case:
    id: str
    base: str
    config: dict
    covers: tuple = ()  # LoraConfig fields / init_lora_weights values this case sets
    tol: float = 0.0  # grow and reload: largest allowed |difference| of the outputs
    residual_base: bool = False  # the init changes the base weight: save that base with the adapter
    prepare: object = None  # prepare(base_model, config, inputs): a preprocessing pass PEFT needs before injection
    initialise: object = None  # initialise(peft_model, inputs): an initialisation pass PEFT runs after injection
    inputs: torch.Tensor | None = field(default=None, repr=False)


def _loraga_gradients(base: nn.Module, config: LoraConfig, inputs: torch.Tensor) -> None:
    from peft.tuners.lora.loraga import preprocess_loraga

    def train_step():
        base(input_ids=inputs, labels=inputs).loss.backward()

    preprocess_loraga(base, config, train_step=train_step)


def _eva_init(model: nn.Module, inputs: torch.Tensor) -> None:
    initialize_lora_eva_weights(model, [{"input_ids": inputs}], show_progress_bar=False)


def _cases() -> list[Case]:
    llama = {"target_modules": LLAMA_LINEAR, "task_type": "CAUSAL_LM"}
    cases = [
        Case(
            "defaults",
            "llama",
            {**llama, "lora_alpha": 8, "lora_dropout": 0.1},
            ("r", "lora_alpha", "target_modules", "task_type", "lora_dropout", True),
        ),
        Case(
            "rslora-patterns",
            "llama",
            {
                **llama,
                "use_rslora": True,
                "lora_alpha": 16,
                "rank_pattern": {"q_proj": 3},
                "alpha_pattern": {"v_proj": 4},
            },
            ("use_rslora", "rank_pattern", "alpha_pattern"),
            tol=1e-6,  # scaling = alpha / sqrt(r) is recomputed from the new alpha: equal up to the last bit
        ),
        Case("dora", "llama", {**llama, "use_dora": True}, ("use_dora",)),
        Case("init-false", "llama", {**llama, "init_lora_weights": False}, (False,)),
        Case("init-gaussian", "llama", {**llama, "init_lora_weights": "gaussian"}, ("gaussian",)),
        Case("init-orthogonal", "llama", {**llama, "init_lora_weights": "orthogonal"}, ("orthogonal",)),
        Case("pissa", "llama", {**llama, "init_lora_weights": "pissa"}, ("pissa",), residual_base=True),
        Case(
            "pissa-niter",
            "llama",
            {**llama, "init_lora_weights": "pissa_niter_2"},
            ("pissa_niter_[number of iters]",),
            tol=1e-6,
            residual_base=True,
        ),
        Case("olora", "llama", {**llama, "init_lora_weights": "olora"}, ("olora",), residual_base=True),
        Case(
            "lora-ga",
            "llama",
            {**llama, "init_lora_weights": "lora_ga", "lora_ga_config": LoraGAConfig()},
            ("lora_ga", "lora_ga_config"),
            residual_base=True,
            prepare=_loraga_gradients,
        ),
        Case("mica", "llama", {**llama, "init_lora_weights": "mica"}, ("mica",)),
        Case(
            "eva",
            "llama",
            {**llama, "init_lora_weights": "eva", "eva_config": EvaConfig(rho=1.0)},
            ("eva", "eva_config"),
            initialise=_eva_init,
        ),
        Case("kasa", "llama", {**llama, "kasa_config": KasaConfig()}, ("kasa_config",), tol=2e-5),
        Case(
            "monteclora",
            "llama",
            {**llama, "monteclora_config": MontecloraConfig(num_samples=2, buffer_size=4)},
            ("monteclora_config",),
        ),
        Case("velora", "llama", {**llama, "velora_config": VeloraConfig(num_groups=4)}, ("velora_config",)),
        Case("alora", "llama", {**llama, "alora_invocation_tokens": [5, 6]}, ("alora_invocation_tokens",)),
        Case(
            "targeting",
            "llama",
            {
                "target_modules": ["q_proj", "v_proj", "up_proj"],
                "exclude_modules": ["layers.0.self_attn.v_proj"],
                "layers_to_transform": [1],
                "layers_pattern": "layers",
                "modules_to_save": ["lm_head"],
                "trainable_token_indices": [1, 2, 3],
                "task_type": "CAUSAL_LM",
            },
            ("exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save", "trainable_token_indices"),
        ),
        Case(
            "layer-replication",
            "llama",
            {**llama, "target_modules": ["q_proj", "v_proj"], "layer_replication": [[0, 2], [1, 2]]},
            ("layer_replication",),
        ),
        Case(
            "gpt2-conv1d-bias",
            "gpt2",
            {
                "target_modules": ["c_attn", "c_proj", "c_fc"],
                "fan_in_fan_out": True,
                "bias": "lora_only",
                "lora_bias": True,
                "task_type": "CAUSAL_LM",
            },
            ("fan_in_fan_out", "bias", "lora_bias"),
        ),
        Case("embedding", "embed", {"target_modules": ["0", "1"]}),
        Case("embedding-dora", "embed", {"target_modules": ["0", "1"], "use_dora": True}),
        Case("embedding-mica", "embed", {"target_modules": ["0", "1"], "init_lora_weights": "mica"}),
        Case("conv1d", "conv1d", {"target_modules": ["0", "2"]}),
        Case("conv2d", "conv2d", {"target_modules": ["0", "2"]}),
        Case("conv2d-dora", "conv2d", {"target_modules": ["0", "2"], "use_dora": True}),
        Case("conv3d", "conv3d", {"target_modules": ["0", "2"]}),
    ]
    return cases


CASES = _cases()


def _forward(model: nn.Module, case: Case) -> torch.Tensor:
    if BASES[case.base][2]:
        return model(input_ids=case.inputs).logits
    return model(case.inputs)


def _effective(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (base matrix, base + real update)}`` of every adapted module."""
    out = {}
    for name, layer in model.base_model.adapted_modules("default").items():
        left, right = update_factors(layer, "default")
        base = base_matrix(layer)
        out[name] = (base, base + left @ right)
    return out


def _train_step(model: nn.Module, case: Case, optimizer: torch.optim.Optimizer) -> float:
    model.train()
    loss = _forward(model, case).float().pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return float(loss.detach())


def _alora_inputs(inputs: torch.Tensor) -> torch.Tensor:
    inputs = inputs.clone()
    inputs[:, 4:6] = torch.tensor([5, 6])  # the invocation tokens, so that the adapter acts on the tokens after them
    return inputs


def _run_case(case: Case, folder: Path, resize_scaling: str) -> dict:
    factory, make_inputs, is_hf = BASES[case.base]
    case.inputs = make_inputs()
    if case.id == "alora":
        case.inputs = _alora_inputs(case.inputs)
    original = factory(seed=0)
    config = AdaptiveLoraConfig(r=4, signal_steps=1, resize_scaling=resize_scaling, **case.config)
    base = copy.deepcopy(original)
    if case.prepare is not None:
        case.prepare(base, config, case.inputs)
    model = get_peft_model(base, config)
    if case.initialise is not None:
        case.initialise(model, case.inputs)
    tuner = model.base_model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(2):  # B != 0, so that the shrink has an update to approximate
        _train_step(model, case, optimizer)
    model.eval()
    with torch.no_grad():
        before = _forward(model, case)
    ranks = tuner.ranks()
    assert ranks, case.id

    # grow: the function is kept
    tuner.resize_adapter({n: r + 2 for n, r in ranks.items()}, optimizer=optimizer)
    assert set(tuner.ranks().values()) == {r + 2 for r in ranks.values()}
    with torch.no_grad():
        grown = _forward(model, case)
    grow_diff = float((grown - before).abs().max())
    assert grow_diff <= _tolerance(case, resize_scaling), (case.id, grow_diff)

    # shrink: each module's update becomes the best rank-k approximation of what it has to add to the new base
    old = _effective(model)
    targets = {n: 2 + i % 2 for i, n in enumerate(sorted(ranks))}
    tuner.resize_adapter(targets, optimizer=optimizer)
    new = _effective(model)
    worst = 0.0
    for name, k in targets.items():
        base_old, total_old = old[name]
        base_new, total_new = new[name]
        wanted = total_old - base_new  # what the adapter must add on the new base
        singular = torch.linalg.svdvals(wanted)
        eckart_young = float(singular[k:].pow(2).sum().sqrt())
        error = float((total_new - total_old).norm())
        scale = float(singular.norm()) + 1e-30
        assert abs(error - eckart_young) <= 1e-6 * scale + 1e-9, (case.id, name, error, eckart_young)
        worst = max(worst, abs(error - eckart_young) / scale)

    # keeps training through the same optimizer
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss = _train_step(model, case, optimizer)
    assert torch.isfinite(torch.tensor(loss)), case.id
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert changed, case.id

    # save; the reload happens in one fresh process for all cases
    model.eval()
    with torch.no_grad():
        final = _forward(model, case)
    target = folder / case.id
    if case.residual_base:
        # PEFT's own workflow for PiSSA/OLoRA/LoftQ: save the changed base, and the adapter as plain LoRA init
        model.peft_config["default"].init_lora_weights = True
        base_model = copy.deepcopy(model).unload()
    else:
        base_model = original
    if is_hf:
        base_model.save_pretrained(target / "base")
        base_path = target / "base"
    else:
        (target).mkdir(parents=True, exist_ok=True)
        base_path = target / "base.pt"
        torch.save(base_model, base_path)
    model.save_pretrained(target / "adapter")
    torch.save(case.inputs, target / "inputs.pt")
    return {
        "spec": f"{target / 'adapter'}::{base_path}::{target / 'inputs.pt'}",
        "final": final,
        "ranks": {n: targets[n] for n in targets},
        "grow_diff": grow_diff,
        "shrink_rel_excess": worst,
    }


def _newer_than_installed_peft(option) -> bool:
    """An option of a PEFT release newer than the installed one (the minimum-versions CI run has an older PEFT)."""
    return option.since is not None and Version(peft.__version__) < Version(option.since)


def test_every_lora_config_field_is_in_the_option_table():
    fields = [f.name for f in dataclasses.fields(LoraConfig)]
    unknown = [name for name in fields if name not in LORA_OPTIONS]
    assert not unknown, f"LoraConfig fields neither handled nor refused by peft_adaptive.options: {unknown}"
    stale = sorted(n for n in set(LORA_OPTIONS) - set(fields) if not _newer_than_installed_peft(LORA_OPTIONS[n]))
    assert not stale, f"options in the table that this PEFT's LoraConfig does not have: {stale}"
    values = [v for v in init_lora_weights_values() if v not in INIT_LORA_WEIGHTS]
    assert not values, f"init_lora_weights values neither handled nor refused: {values}"


def test_every_accepted_option_is_exercised_by_a_case():
    covered = {item for case in CASES for item in case.covers}
    for name, option in LORA_OPTIONS.items():
        if option.status != REFUSED and name != "init_lora_weights":
            assert name in covered or name in AT_DEFAULT, f"no case exercises LoraConfig.{name}"
    for value, option in INIT_LORA_WEIGHTS.items():
        if option.status != REFUSED:
            assert value in covered, f"no case exercises init_lora_weights={value!r}"
    kinds = {case.base for case in CASES}
    # Linear, Conv1D, Embedding, Conv1d/2d/3d (bitsandbytes layers: tests/test_qlora.py)
    assert {"llama", "gpt2", "embed", "conv1d", "conv2d", "conv3d"} <= kinds


def _tolerance(case: Case, resize_scaling: str) -> float:
    """``resize_scaling="rank"`` moves the scaling into a factor: the function is kept up to float rounding."""
    return case.tol if resize_scaling == "keep" else max(case.tol, 1e-6)


@pytest.mark.parametrize("resize_scaling", ["keep", "rank"])
def test_every_accepted_option_resizes_trains_and_reloads_with_vanilla_peft(tmp_path, resize_scaling):
    results = {case.id: _run_case(case, tmp_path, resize_scaling) for case in CASES}
    loaded = load_adapters(
        tmp_path / "unused", tmp_path / "unused.pt", tmp_path / "out", [r["spec"] for r in results.values()]
    )
    assert loaded["plugin_imported"] is False
    for case in CASES:
        result = results[case.id]
        entry = loaded[result["spec"]]
        assert "error" not in entry, (case.id, entry)
        ranks = {n: r for n, r in entry["ranks"].items() if n in result["ranks"]}
        assert ranks == result["ranks"], case.id
        reloaded = torch.load(entry["logits"])
        diff = float((reloaded - result["final"]).abs().max())
        assert diff <= _tolerance(case, resize_scaling), (case.id, diff)


REFUSED_EXAMPLES = {
    "astra_config": {"astra_config": getattr(peft.tuners.lora.config, "AstraConfig", dict)()},  # PEFT >= 0.22
    "target_parameters": {"target_parameters": ["mlp.down_proj.weight"], "target_modules": None},
    "use_bdlora": {"use_bdlora": BdLoraConfig(target_modules_bd_a=["q_proj"], target_modules_bd_b=["v_proj"])},
    "arrow_config": {"arrow_config": ArrowConfig()},
    "use_qalora": {"use_qalora": True},
    "megatron_config": {"megatron_config": {"tensor_model_parallel_size": 1}},
    "ensure_weight_tying": {"ensure_weight_tying": True},
}


@pytest.mark.parametrize(
    "option",
    # the installed PEFT's fields only: an option of a newer release cannot be set on this LoraConfig
    sorted(n for n, o in LORA_OPTIONS.items() if o.status == REFUSED and not _newer_than_installed_peft(o)),
)
def test_refused_option_raises_at_get_peft_model_naming_it(option):
    kwargs = {"target_modules": ["q_proj", "v_proj"], **REFUSED_EXAMPLES[option]}
    with pytest.raises(ValueError, match=rf"LoraConfig\.{option}=.*not supported by AdaptiveLoraConfig: \w+"):
        get_peft_model(tiny_llama(), AdaptiveLoraConfig(r=4, **kwargs))


@pytest.mark.parametrize("value", sorted(str(v) for v, o in INIT_LORA_WEIGHTS.items() if o.status == REFUSED))
def test_refused_init_raises_at_get_peft_model_naming_it(value):
    extra = {"loftq_config": {"loftq_bits": 4}} if value == "loftq" else {}
    with pytest.raises(ValueError, match=rf"LoraConfig\.init_lora_weights='{value}' is not supported"):
        get_peft_model(
            tiny_llama(), AdaptiveLoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=value, **extra)
        )


@pytest.mark.parametrize("eva_config", [None, EvaConfig(rho=2.0)], ids=["peft-default", "rho2"])
def test_eva_rank_redistribution_is_refused_naming_rho(eva_config):
    message = r"LoraConfig\.eva_config\.rho=2\.0 is not supported by AdaptiveLoraConfig: .*EvaConfig\(rho=1\.0\)"
    with pytest.raises(ValueError, match=message):
        get_peft_model(
            tiny_llama(),
            AdaptiveLoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="eva", eva_config=eva_config),
        )


def test_eva_initialised_adapter_trains_and_reallocates_through_the_trainer(tmp_path):
    with pytest.warns(UserWarning, match="2 of 5 runs went unstable after the reallocation"):
        model = adaptive_model("llama", init_lora_weights="eva", eva_config=EvaConfig(rho=1.0))
    tuner = model.base_model
    kaiming = {n: m.lora_A["default"].weight.detach().clone() for n, m in tuner.adapted_modules().items()}
    batches = [{"input_ids": token_batch(4, 16, seed=s)} for s in range(4)]
    initialize_lora_eva_weights(model, batches, show_progress_bar=False)
    for name, module in tuner.adapted_modules().items():
        a = module.lora_A["default"].weight.detach()
        assert not torch.equal(a, kaiming[name]), name
        # EVA's rows: orthonormal principal directions of the module's inputs
        torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0]), atol=1e-4, rtol=0)
    budget = tuner.param_budget()
    Trainer(
        model=model, args=training_args(tmp_path), train_dataset=TokenDataset(64), callbacks=[AdaptiveLoraCallback()]
    ).train()
    ranks = tuner.ranks()
    assert len(set(ranks.values())) > 1, ranks  # reallocated after the signal steps
    assert 0 < tuner.adapter_param_count() <= budget
    model.save_pretrained(tmp_path / "adapter")
    saved = LoraConfig.from_pretrained(tmp_path / "adapter")
    assert saved.init_lora_weights is True  # the saved weights replace the start: no data pass at load time


def test_bdlora_layer_resize_error_names_the_option_without_contradiction():
    from peft_adaptive import resize_lora_layer

    config = LoraConfig(
        r=4,
        target_modules=["q_proj", "v_proj"],
        use_bdlora=BdLoraConfig(target_modules_bd_a=["q_proj"], target_modules_bd_b=["v_proj"], nblocks=2),
    )
    model = get_peft_model(tiny_llama(), config)
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    with pytest.raises(TypeError, match=r"BD-LoRA adapter \(LoraConfig.use_bdlora\).*block-diagonal") as info:
        resize_lora_layer(layer, "default", 6)
    assert "supported types are Linear" not in str(info.value)


def test_path_initial_model_conversion_is_refused_after_a_reallocation(tmp_path):
    model = get_peft_model(
        tiny_llama(),
        AdaptiveLoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa", task_type="CAUSAL_LM"),
    )
    names = sorted(model.base_model.ranks())
    model.base_model.resize_adapter({n: 2 + i % 2 for i, n in enumerate(names)})
    with pytest.raises(ValueError, match="path_initial_model_for_weight_conversion.*reallocated"):
        model.save_pretrained(tmp_path / "a", path_initial_model_for_weight_conversion=str(tmp_path / "init"))


def test_multihead_attention_is_refused_at_get_peft_model():
    with pytest.raises(TypeError, match="MultiheadAttention: PEFT gives its out_proj adapter the rank of its in_proj"):
        get_peft_model(_mha_model(), AdaptiveLoraConfig(r=4, target_modules=["self_attn"]))
