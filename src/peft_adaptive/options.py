"""Every ``LoraConfig`` option, and what adaptive ranks do with it: resized, no effect on resizing, or refused.

:data:`LORA_OPTIONS` has one entry per field of PEFT's ``LoraConfig`` and :data:`INIT_LORA_WEIGHTS` one per value
of ``init_lora_weights``. :func:`check_lora_options` (called by ``AdaptiveLoraConfig`` validation, so at
``get_peft_model`` at the latest) raises a ``ValueError`` that names the option and says why for every refused
value, and for a field this table does not know (a newer PEFT) set to anything but its default. The option table
of ``docs/configuration.md`` is these entries (``tests/test_docs.py`` checks it row by row);
``tests/test_options.py`` fails on a field that is in neither.
"""

from __future__ import annotations

import dataclasses
import typing
import warnings
from dataclasses import dataclass
from typing import Any

from peft import EvaConfig, LoraConfig

RESIZED = "resized"  # rank-sized tensors or the update's maths, handled by the resize
NO_EFFECT = "accepted, no effect on resizing"
REFUSED = "refused"


@dataclass(frozen=True)
class Option:
    status: str
    why: str
    #: for options refused only for some values: whether ``value`` is refused (default: any non-default value)
    refuses: typing.Callable[[Any], bool] | None = None
    #: the PEFT release that added the option (older releases do not have it)
    since: str | None = None


def _truthy(value: Any) -> bool:
    return bool(value)


LORA_OPTIONS: dict[str, Option] = {
    # metadata
    "task_type": Option(NO_EFFECT, "chooses the PeftModel wrapper; no tensor depends on it"),
    "peft_type": Option(NO_EFFECT, "set by the config class (ADAPTIVE_LORA; saved as LORA)"),
    "auto_mapping": Option(NO_EFFECT, "metadata written on save"),
    "peft_version": Option(NO_EFFECT, "metadata written on save"),
    "base_model_name_or_path": Option(NO_EFFECT, "metadata written on save"),
    "revision": Option(NO_EFFECT, "metadata written on save"),
    "inference_mode": Option(NO_EFFECT, "freezes the adapter; a frozen adapter is not reallocated"),
    # ranks and scaling
    "r": Option(RESIZED, "the starting rank of every module; the reallocation replaces it per module"),
    "lora_alpha": Option(
        RESIZED, "scaling = alpha / r is kept through a resize: alpha follows the rank (alpha_pattern on save)"
    ),
    "use_rslora": Option(RESIZED, "scaling = alpha / sqrt(r) is kept: alpha follows sqrt(rank)"),
    "rank_pattern": Option(
        RESIZED, "starting per-module ranks; after a resize it is rewritten with one exact entry per module"
    ),
    "alpha_pattern": Option(RESIZED, "starting per-module alphas; rewritten like rank_pattern"),
    "fan_in_fan_out": Option(RESIZED, "transformers Conv1D: the factors are the same, the update is transposed"),
    # targeting
    "target_modules": Option(NO_EFFECT, "which modules are adapted"),
    "exclude_modules": Option(NO_EFFECT, "which modules are not adapted"),
    "layers_to_transform": Option(NO_EFFECT, "which layers are adapted"),
    "layers_pattern": Option(NO_EFFECT, "which layers are adapted (with layers_to_transform)"),
    "modules_to_save": Option(NO_EFFECT, "fully trained copies of modules; no rank"),
    "trainable_token_indices": Option(NO_EFFECT, "trainable embedding rows (TrainableTokensLayer); no rank"),
    "layer_replication": Option(NO_EFFECT, "replicated layers get their own adapters, resized like any other"),
    # what the adapter computes
    "lora_dropout": Option(NO_EFFECT, "dropout on the adapter's input"),
    "bias": Option(NO_EFFECT, "trains base-layer biases; not rank-sized"),
    "lora_bias": Option(RESIZED, "lora_B's bias (output-sized) is kept as it is when lora_B is resized"),
    "use_dora": Option(
        RESIZED,
        "the magnitude vector is output-sized and kept; B A is resized as in plain LoRA and the weight-norm cache "
        "is cleared",
    ),
    "kasa_config": Option(
        RESIZED,
        "lora_diag is rank-sized and the update is scaling * B diag(d) A: resized in KaSA's SVD form, and the base "
        "weight's truncation follows the rank (a grow moves the next singular components from the base into the "
        "adapter, a shrink moves the largest removed ones back), as PEFT truncates at the saved rank on load",
    ),
    "monteclora_config": Option(
        RESIZED, "the sampler's std_prior, covariance and noise buffers are rank-sized and resized with A"
    ),
    "velora_config": Option(
        NO_EFFECT, "VeLoRA's projection vector has the input's group size, not the rank; the factors are plain"
    ),
    "alora_invocation_tokens": Option(NO_EFFECT, "aLoRA masks tokens in the forward; the factors are plain"),
    "runtime_config": Option(NO_EFFECT, "runtime-only settings (ephemeral GPU offload), never saved"),
    # sub-configs of init_lora_weights values
    "loftq_config": Option(NO_EFFECT, "settings of init_lora_weights='loftq' (refused, see there)"),
    "eva_config": Option(
        NO_EFFECT, "settings of init_lora_weights='eva': rho must be 1 (see there); ignored for other initialisations"
    ),
    "corda_config": Option(NO_EFFECT, "settings of init_lora_weights='corda' (refused, see there)"),
    "astra_config": Option(
        REFUSED,
        "Astra (init_lora_weights='astra') needs a calibration pass (preprocess_astra) before get_peft_model and "
        "rewrites the base weight from it, as CorDA; this combination is not verified by this package's tests",
        since="0.22.0",
    ),
    "lora_ga_config": Option(NO_EFFECT, "settings of init_lora_weights='lora_ga' (see there)"),
    "init_lora_weights": Option(RESIZED, "per value, see INIT_LORA_WEIGHTS"),
    # refused
    "target_parameters": Option(
        REFUSED,
        "parameter-wrapped LoRA layers (ParamWrapper, for MoE expert weights) hold the update of a 3-D parameter, "
        "not a pair of resizable factors; use target_modules",
        _truthy,
    ),
    "use_bdlora": Option(
        REFUSED,
        "BD-LoRA makes lora_A or lora_B block-diagonal (BlockDiagonalLinear, rank a multiple of nblocks); neither the "
        "best rank-k approximation of B A nor new directions keep that block structure",
        _truthy,
    ),
    "arrow_config": Option(
        REFUSED,
        "Arrow routes every token between several already trained LoRA experts (create_arrow_model) and caches "
        "prototypes built from their factors; it combines fixed adapters and has no ranks to reallocate",
        _truthy,
    ),
    "use_qalora": Option(
        REFUSED,
        "QA-LoRA exists only on GPTQ-quantized layers (gptqmodel), which this package cannot install or test; a "
        "resize there is unverified",
        _truthy,
    ),
    "qalora_group_size": Option(NO_EFFECT, "only used with use_qalora (refused)"),
    "megatron_config": Option(
        REFUSED,
        "Megatron tensor-parallel LoRA (LoraParallelLinear) shards lora_A or lora_B across processes; a resize "
        "would need a distributed SVD of the sharded factors",
        lambda value: value is not None,
    ),
    "megatron_core": Option(NO_EFFECT, "module name used only with megatron_config (refused)"),
    "ensure_weight_tying": Option(
        REFUSED,
        "tied adapters share the factor tensors of tied layers (embedding and output head); a resize gives each "
        "layer new factors, which would silently untie them",
        _truthy,
    ),
}


#: ``init_lora_weights`` values (a ``pissa_niter_<n>`` value is looked up as ``pissa_niter_[number of iters]``).
INIT_LORA_WEIGHTS: dict[Any, Option] = {
    True: Option(NO_EFFECT, "B = 0, A random (Kaiming): only the starting values"),
    False: Option(NO_EFFECT, "random B and A: only the starting values"),
    "gaussian": Option(NO_EFFECT, "B = 0, A Gaussian: only the starting values"),
    "orthogonal": Option(
        NO_EFFECT,
        "orthogonal starting factors; the resize works on B A as for any adapter. Saved as init_lora_weights=True: "
        "the saved weights replace the starting values anyway, and PEFT's orthogonal init refuses the odd ranks a "
        "reallocation gives when it loads the adapter",
    ),
    "pissa": Option(
        NO_EFFECT,
        "the base weight keeps the residual of its principal components, the adapter starts with them; the resize "
        "works on B A on top of that residual base. Save the residual base with the adapter (as PEFT documents); "
        "PEFT's conversion to plain LoRA (path_initial_model_for_weight_conversion) is refused after a "
        "reallocation, because it doubles every rank",
    ),
    "pissa_niter_[number of iters]": Option(NO_EFFECT, "as 'pissa' (fast SVD)"),
    "olora": Option(NO_EFFECT, "as 'pissa' (QR-based): the base keeps the residual"),
    "loftq": Option(
        REFUSED,
        "PEFT's LoftQ initialisation (loftq_init) runs on a CUDA device only, so this package's CPU tests cannot "
        "verify a resize on top of its quantized base",
    ),
    "corda": Option(
        REFUSED,
        "CorDA needs a calibration pass over your data (preprocess_corda) before get_peft_model and changes the base "
        "weight from it; this combination is not verified by this package's tests",
    ),
    "lora_ga": Option(
        NO_EFFECT,
        "LoRA-GA (after preprocess_loraga) starts the adapter from gradient directions and subtracts that start from "
        "the base weight, as PiSSA does: the resize works on B A on top of that base; save it with the adapter",
    ),
    "eva": Option(
        NO_EFFECT,
        "EVA's starting A (principal directions of each module's inputs, from initialize_lora_eva_weights after "
        "get_peft_model), B = 0; the resize works on B A as for any adapter. Only at eva_config.rho=1 (uniform "
        "ranks): EVA's rank redistribution (rho > 1) would be a second rank allocator. Warns: 2 of 5 measured runs "
        "went unstable after the reallocation. Saved as init_lora_weights=True: the saved weights replace the "
        "starting values",
    ),
    "astra": Option(REFUSED, "see astra_config", since="0.22.0"),
    "nora": Option(
        REFUSED,
        "NoRA's initialisation is newer than this package's tests: whether its adapters can be resized is unchecked",
        since="0.22.0",
    ),
    "mica": Option(
        RESIZED,
        "B is frozen at the base weight's minor singular vectors: a grow adds the next minor directions to B and "
        "zero rows to A; a shrink keeps B orthonormal and puts the singular values into A",
    ),
}


#: what was measured of EVA's initialisation followed by a reallocation (benchmarks/RESULTS.md, 2026-12-07)
EVA_WITH_ADAPTIVE_RANKS = (
    "AdaptiveLoraConfig with init_lora_weights='eva': measured on one task (SmolLM2-135M learning ciphered text, "
    "lr 2e-3), 2 of 5 runs went unstable after the reallocation, where EVA alone and adaptive ranks alone trained on "
    "every seed, and no run beat EVA alone. Consider a lower learning rate, or plain LoraConfig with EVA's "
    "initialisation (peft-adaptive's benchmarks/RESULTS.md)"
)


def init_lora_weights_values() -> list[Any]:
    """The values ``init_lora_weights`` takes in the installed PEFT (from the field's type hint)."""
    hint = typing.get_type_hints(LoraConfig)["init_lora_weights"]
    values: list[Any] = []
    stack = [hint]
    while stack:
        item = stack.pop()
        if item is bool:
            values.extend([True, False])
        elif typing.get_origin(item) is typing.Literal:
            values.extend(typing.get_args(item))
        else:
            stack.extend(typing.get_args(item))
    return values


def _init_key(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("pissa_niter_"):
        return "pissa_niter_[number of iters]"
    return value


def check_lora_options(config: LoraConfig) -> None:
    """Raise ``ValueError`` naming the option for every refused ``LoraConfig`` value of ``config``."""
    for f in dataclasses.fields(LoraConfig):
        value = getattr(config, f.name, None)
        option = LORA_OPTIONS.get(f.name)
        if option is None:
            if _differs_from_default(f, value):
                raise ValueError(
                    f"LoraConfig.{f.name}={value!r} is not supported by AdaptiveLoraConfig: this PEFT version has an "
                    "option that peft-adaptive does not know, so whether its adapters can be resized is unchecked; "
                    "leave it at its default or use plain LoraConfig"
                )
            continue
        if option.status == REFUSED and (option.refuses or _truthy)(value):
            raise ValueError(
                f"LoraConfig.{f.name}={_short(value)} is not supported by AdaptiveLoraConfig: {option.why}"
            )
    init = INIT_LORA_WEIGHTS.get(_init_key(config.init_lora_weights))
    if init is None:
        raise ValueError(
            f"LoraConfig.init_lora_weights={config.init_lora_weights!r} is not supported by AdaptiveLoraConfig: "
            "peft-adaptive does not know this initialisation, so whether its adapters can be resized is unchecked"
        )
    if init.status == REFUSED:
        raise ValueError(
            f"LoraConfig.init_lora_weights={config.init_lora_weights!r} is not supported by AdaptiveLoraConfig: "
            f"{init.why}"
        )
    if config.init_lora_weights == "eva":
        eva = config.eva_config if config.eva_config is not None else EvaConfig()  # what PEFT fills in: rho=2
        rho = eva.get("rho", EvaConfig().rho) if isinstance(eva, dict) else eva.rho
        if rho != 1:
            raise ValueError(
                f"LoraConfig.eva_config.rho={rho!r} is not supported by AdaptiveLoraConfig: EVA's rank redistribution "
                "(rho > 1) and adaptive ranks would both allocate the budget; use eva_config=EvaConfig(rho=1.0) "
                "(EVA's initialisation, uniform starting ranks, then adaptive ranks) or plain LoraConfig for EVA's own "
                "allocation"
            )
        warnings.warn(EVA_WITH_ADAPTIVE_RANKS, UserWarning, stacklevel=3)


def _differs_from_default(f: dataclasses.Field, value: Any) -> bool:
    if f.default is not dataclasses.MISSING:
        return value != f.default
    if f.default_factory is not dataclasses.MISSING:
        return value != f.default_factory()
    return value is not None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def saved_config(data: dict[str, Any]) -> dict[str, Any]:
    """Adjust a config dict about to be saved so that PEFT can load it at the reallocated ranks."""
    if data.get("init_lora_weights") in ("orthogonal", "eva"):
        # the weights on disk replace the starting values: orthogonal's odd-rank refusal and EVA's data pass are moot
        data["init_lora_weights"] = True
    return data
