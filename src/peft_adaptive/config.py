"""``AdaptiveLoraConfig``: a ``LoraConfig`` with per-layer ranks chosen from warmup signals."""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from collections.abc import Iterable
from dataclasses import InitVar, dataclass, field, fields
from typing import Any

from peft import LoraConfig
from peft.utils import CONFIG_NAME

from ._peft_type import ensure_peft_type
from .checkpoints import atomic_write_text
from .hub_files import fetch_adapter_file, split_hub_kwargs
from .model_card import add_lora_tags
from .options import check_lora_options, saved_config
from .scores import SCORES

#: Values of ``AdaptiveLoraConfig.growth``.
GROWTH_RULES = ("gradient", "random")
#: Values of ``AdaptiveLoraConfig.optimizer_state``.
OPTIMIZER_STATE_RULES = ("migrate", "reset")
#: Values of ``AdaptiveLoraConfig.resize_scaling``.
RESIZE_SCALING_RULES = ("keep", "rank")

ADAPTIVE_PEFT_TYPE = ensure_peft_type()

#: Default of ``AdaptiveLoraConfig.signal_steps``.
DEFAULT_SIGNAL_STEPS = 200

_WARMUP_STEPS_RENAMED = (
    "AdaptiveLoraConfig(warmup_steps=...) is deprecated and will be removed in the next release: use "
    "signal_steps=... (optimizer steps of signal collection before the one reallocation; warmup_steps was easily "
    "mistaken for TrainingArguments.warmup_steps, the learning-rate warmup)"
)

#: Sidecar written next to ``adapter_config.json`` when the adapter is saved as plain LoRA.
ADAPTIVE_CONFIG_NAME = "adaptive_lora.json"


#: ``AdaptiveLoraConfig.consistency_power``'s default (any other value needs ``score="consistent_spectrum"``)
DEFAULT_CONSISTENCY_POWER = 4.0
#: the defaults earlier releases saved with every adapter (2.0 until 2026-12-05): they load with any score
_SAVED_DEFAULT_CONSISTENCY_POWERS = (DEFAULT_CONSISTENCY_POWER, 2.0)


@dataclass
class AdaptiveLoraConfig(LoraConfig):
    """Configuration for adaptive-rank LoRA.

    Training starts as plain LoRA at rank ``r``. After ``signal_steps`` optimizer steps every adapted module
    gets a score (``score``; by default the singular values of its accumulated full-weight gradient, estimated
    from a random sketch and weighted by how consistently the steps' gradients agreed, chosen by pre-registered
    benchmark rules, see ``benchmarks/RESULTS.md``), and
    the parameter budget is re-split into integer ranks in ``[min_r, max_r]``: the spectrum scores give rank to
    the singular directions worth the most per parameter across all modules (one global threshold), the others
    allocate ranks proportional to ``score ** score_exponent`` (:mod:`peft_adaptive.scores`). All other fields
    are ``LoraConfig``'s.

    ``grad_weight``/``delta_weight`` are called ``monitor_alpha``/``monitor_beta`` in the original write-up.
    ``warmup_steps=`` is the deprecated name of ``signal_steps`` (accepted with a ``FutureWarning`` for one
    release; it is easily mistaken for ``TrainingArguments.warmup_steps``, the learning-rate warmup).
    """

    min_r: int = field(
        default=1,
        metadata={
            "help": "Smallest rank a module can get after reallocation (>= 0; a module given rank 0 is removed "
            "from the adapter)."
        },
    )
    max_r: int | None = field(
        default=None,
        metadata={
            "help": "Largest rank a module can get after reallocation (default: 2 * r; see benchmarks/RESULTS.md for "
            "why not more)."
        },
    )
    param_budget: int | None = field(
        default=None,
        metadata={
            "help": "Total trainable adapter parameters (sum over modules of rank * (fan_in + fan_out)) after "
            "reallocation. Default: what plain LoRA at rank r has on the same targets."
        },
    )
    signal_steps: int | None = field(
        default=None,
        metadata={
            "help": "Optimizer steps of signal collection before the one reallocation (default 200). Not the "
            "learning-rate warmup (TrainingArguments.warmup_steps)."
        },
    )
    score: str = field(
        # chosen by benchmarks/allocation_bench.py (RESULTS.md, pre-registered rules): ahead of 'gradient_spectrum' on
        # the planted family's choose members and on planted, not worse than uniform LoRA on SST-2
        default="consistent_spectrum",
        metadata={
            "help": "How modules are scored and ranks allocated: 'consistent_spectrum' (default; consistency_power), "
            "'gradient_spectrum', 'sensitivity', 'norms' (grad_weight/delta_weight), 'sketch_energy' or 'spectral' "
            "(see peft_adaptive.scores)."
        },
    )
    growth: str = field(
        default="random",
        metadata={
            "help": "Directions a growing module's new rows of A take: 'gradient' (the accumulated gradient's "
            "leading input directions it does not have yet) or 'random'. B stays zero there either way."
        },
    )
    optimizer_state: str = field(
        # "reset" since 2026-12-05 (benchmarks/RESULTS.md, pre-registered): migrating a grown module's moments made its
        # loss rise after the reallocation on SmolLM2 (the in-place runs lost to the same ranks trained from step 0)
        default="reset",
        metadata={
            "help": "What a resized module's optimizer state becomes at the reallocation: 'reset' (default: every "
            "resized module restarts its state, as a fresh parameter) or 'migrate' (a grown module keeps its moments, "
            "the new entries start from the row means; a shrunk one is reset). See peft_adaptive.optim."
        },
    )
    resize_scaling: str = field(
        default="keep",
        metadata={
            "help": "A resized module's scaling: 'keep' (the scaling it trained with; lora_alpha is rescaled per "
            "module and saved in alpha_pattern) or 'rank' (the scaling LoRA gives its new rank with the configured "
            "lora_alpha: alpha / r, or alpha / sqrt(r) with use_rslora; B, or KaSA's lora_diag, MiCA's A, is "
            "rescaled so the output is unchanged)."
        },
    )
    sketch_size: int | None = field(
        default=None,
        metadata={"help": "Rows of each module's gradient sketch (default: max_r + 8). Only used when needed."},
    )
    consistency_power: float = field(
        # 4 since 2026-12-05 (benchmarks/RESULTS.md, pre-registered against 2): the family's choose members took
        # 0.40 of the oracle's gain against 0.26, worse on one of six against two; planted and SST-2 not worse
        default=DEFAULT_CONSISTENCY_POWER,
        metadata={
            "help": "score='consistent_spectrum' only: each module's sigma^2 is weighted by its gradient consistency "
            "over the signal steps to this power (>= 0; 0 is 'gradient_spectrum')."
        },
    )
    min_predicted_gain: float = field(
        default=0.0,
        metadata={
            "help": "Spectrum scores only ('consistent_spectrum', 'gradient_spectrum', 'spectral'): reallocate only "
            "when the new ranks are worth at least this many times the current ones by the score's own spectra "
            "(AllocationReport.predicted_gain); below it the ranks stay as they are (plain LoRA), which spares the "
            "resize where the score sees nothing worth moving. 0 (default): always reallocate."
        },
    )
    grad_weight: float = field(
        default=1.0, metadata={"help": "score='norms' only: weight of the gradient-norm signal (>= 0)."}
    )
    delta_weight: float = field(
        default=0.0, metadata={"help": "score='norms' only: weight of the weight-delta signal (>= 0)."}
    )
    score_exponent: float = field(
        default=1.0,
        metadata={
            "help": "Ranks are proportional to score ** score_exponent (0: uniform; >1: sharper). For the spectrum "
            "scores, a singular direction is worth sigma ** (2 * score_exponent)."
        },
    )
    save_as_lora: bool = field(
        default=True,
        metadata={
            "help": "Save adapter_config.json as a plain LoRA config (peft_type LORA, exact per-module rank_pattern "
            "and alpha_pattern) so that vanilla PEFT loads it; adaptive fields go to adaptive_lora.json."
        },
    )
    reallocation_step: int | None = field(
        default=None, metadata={"help": "Set by the plugin: optimizer step at which the ranks were reallocated."}
    )
    allocation: dict | None = field(
        default=None, metadata={"help": "Set by the plugin: ranks, scores and signals of the last reallocation."}
    )
    #: Deprecated name of ``signal_steps`` (not a field: never saved).
    warmup_steps: InitVar[int | None] = None

    def __post_init__(self, warmup_steps: int | None = None):
        if warmup_steps is not None:
            if self.signal_steps is not None and self.signal_steps != warmup_steps:
                raise ValueError(
                    f"AdaptiveLoraConfig got signal_steps={self.signal_steps!r} and warmup_steps={warmup_steps!r}, "
                    "the deprecated name of the same field: pass only signal_steps"
                )
            if sys._getframe(2).f_code.co_name != "from_peft_type":  # a saved config is read: nothing to fix in code
                warnings.warn(_WARMUP_STEPS_RENAMED, FutureWarning, stacklevel=3)
            self.signal_steps = warmup_steps
        if self.signal_steps is None:
            self.signal_steps = DEFAULT_SIGNAL_STEPS
        # Every LoraConfig option is resized, has no effect on resizing, or is refused. Checked before PEFT's own
        # checks so that a refused option gets this package's reason (PEFT's may first demand, e.g., scipy for LoftQ).
        check_lora_options(self)
        super().__post_init__()
        # LoraConfig.__post_init__ forces PeftType.LORA, so this has to come after it.
        self.peft_type = ADAPTIVE_PEFT_TYPE
        if self.max_r is None:
            # 2r: where trained adapters 4x as large used their rank, it never exceeded 2r (benchmarks/RESULTS.md)
            self.max_r = 2 * self.r
        if self.sketch_size is None and isinstance(self.max_r, int):
            self.sketch_size = self.max_r + 8
        self._validate()

    def _validate(self) -> None:
        _require(isinstance(self.r, int) and self.r >= 1, "r", self.r, "an integer >= 1")
        _require(isinstance(self.min_r, int) and self.min_r >= 0, "min_r", self.min_r, "an integer >= 0")
        _require(
            isinstance(self.max_r, int) and self.max_r >= self.min_r,
            "max_r",
            self.max_r,
            f"an integer >= min_r ({self.min_r})",
        )
        _require(
            isinstance(self.signal_steps, int) and not isinstance(self.signal_steps, bool) and self.signal_steps >= 1,
            "signal_steps",
            self.signal_steps,
            "an integer >= 1",
        )
        for name in ("grad_weight", "delta_weight", "score_exponent", "consistency_power", "min_predicted_gain"):
            value = getattr(self, name)
            _require(_is_number(value) and value >= 0, name, value, "a finite number >= 0")
        _require_one_of("score", self.score, SCORES)
        _require_one_of("growth", self.growth, GROWTH_RULES)
        _require_one_of("resize_scaling", self.resize_scaling, RESIZE_SCALING_RULES)
        _require_one_of("optimizer_state", self.optimizer_state, OPTIMIZER_STATE_RULES)
        _require(
            isinstance(self.sketch_size, int) and self.sketch_size >= 1,
            "sketch_size",
            self.sketch_size,
            "an integer >= 1",
        )
        if self.score != "norms" and (self.grad_weight != 1.0 or self.delta_weight != 0.0):
            raise ValueError(
                f"AdaptiveLoraConfig got grad_weight={self.grad_weight!r}, delta_weight={self.delta_weight!r} with "
                f"score={self.score!r}: the two weights only apply to score='norms'; pass score='norms' to use them"
            )
        if self.score != "consistent_spectrum" and self.consistency_power not in _SAVED_DEFAULT_CONSISTENCY_POWERS:
            raise ValueError(
                f"AdaptiveLoraConfig got consistency_power={self.consistency_power!r} with score={self.score!r}: it "
                "only applies to score='consistent_spectrum'; pass score='consistent_spectrum' to use it"
            )
        if self.min_predicted_gain != 0.0 and not SCORES[self.score].values_ranks:
            valued = ", ".join(repr(name) for name, score in SCORES.items() if score.values_ranks)
            raise ValueError(
                f"AdaptiveLoraConfig got min_predicted_gain={self.min_predicted_gain!r} with score={self.score!r}: "
                f"only the spectrum scores ({valued}) predict a gain; pass one of them or leave it at 0"
            )
        if self.score == "norms" and self.grad_weight == 0 and self.delta_weight == 0:
            raise ValueError(
                "grad_weight and delta_weight are both 0: at least one must be > 0 for the scores to mean anything"
            )
        if self.param_budget is not None:
            _require(
                isinstance(self.param_budget, int) and self.param_budget >= 1,
                "param_budget",
                self.param_budget,
                "None (plain LoRA's count at rank r) or an integer >= 1",
            )

    # --- saving --------------------------------------------------------------------------------------

    @staticmethod
    def adaptive_field_names() -> list[str]:
        """Names of the fields this class adds to ``LoraConfig``."""
        return sorted({f.name for f in fields(AdaptiveLoraConfig)} - {f.name for f in fields(LoraConfig)})

    def adaptive_fields(self) -> dict[str, Any]:
        """The fields this class adds to ``LoraConfig``, with their values."""
        return {name: getattr(self, name) for name in self.adaptive_field_names()}

    def to_dict(self) -> dict[str, Any]:
        return saved_config(super().to_dict())

    def to_lora_dict(self) -> dict[str, Any]:
        """This config as a plain ``LoraConfig`` dict that vanilla PEFT loads (``peft_type: LORA``)."""
        data = self.to_dict()
        for name in self.adaptive_fields():
            data.pop(name)
        data["peft_type"] = "LORA"
        return data

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        if not self.save_as_lora:
            return super().save_pretrained(save_directory, **kwargs)
        os.makedirs(save_directory, exist_ok=True)
        data = self.to_lora_dict()
        auto_mapping = kwargs.pop("auto_mapping_dict", None)
        if auto_mapping is not None:
            data["auto_mapping"] = auto_mapping
        _write_json(os.path.join(save_directory, CONFIG_NAME), data)
        _write_json(os.path.join(save_directory, ADAPTIVE_CONFIG_NAME), self.adaptive_fields())
        add_lora_tags(save_directory)  # PEFT's model card tagged it from the live peft_type (ADAPTIVE_LORA)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """Load an adaptive config, also from an adapter that was saved as plain LoRA with a sidecar.

        ``pretrained_model_name_or_path`` is a local folder or a Hugging Face Hub repo id. From the hub, the
        sidecar and ``adapter_config.json`` are fetched with ``huggingface_hub.hf_hub_download`` and the keyword
        arguments it takes (``revision``, ``cache_dir``, ``token``, ...), as ``PeftConfig.from_pretrained`` does;
        other keyword arguments that name fields of this class override the saved values. An adapter without
        the sidecar is loaded by PEFT's own loader.
        """
        hub_kwargs, overrides = split_hub_kwargs(kwargs)
        unchecked = None
        try:
            sidecar = fetch_adapter_file(pretrained_model_name_or_path, ADAPTIVE_CONFIG_NAME, subfolder, **hub_kwargs)
        except (OSError, ValueError) as exc:  # the hub cannot answer (no such repo, offline and not cached, ...)
            sidecar, unchecked = None, exc
        if sidecar is None:
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
            if unchecked is not None and config.peft_type == "LORA":
                warnings.warn(
                    f"{pretrained_model_name_or_path}: could not fetch {ADAPTIVE_CONFIG_NAME} "
                    f"({type(unchecked).__name__}), so the adaptive fields of this adapter (if it has them) are not "
                    "restored; loaded as plain LoRA",
                    stacklevel=2,
                )
            return config
        config_file = fetch_adapter_file(pretrained_model_name_or_path, CONFIG_NAME, subfolder, **hub_kwargs)
        if config_file is None:
            raise ValueError(f"Can't find '{CONFIG_NAME}' at '{pretrained_model_name_or_path}'")
        from .adapter_files import AdapterError, read_config_and_sidecar  # (adapter_files imports this module)

        data = read_config_and_sidecar(config_file, sidecar)  # checked against the weights; errors name the file
        data.pop("peft_type", None)
        data.pop("auto_mapping", None)
        data = _renamed_fields(data)
        known = {f.name for f in fields(cls)} | {"warmup_steps"}  # an override by the old name still warns
        try:
            return cls(**{k: v for k, v in {**data, **overrides}.items() if k in known})
        except (TypeError, ValueError) as exc:
            raise AdapterError(
                f"{sidecar} (with {CONFIG_NAME}) does not make a valid AdaptiveLoraConfig: {exc}"
            ) from exc

    @classmethod
    def check_kwargs(cls, **kwargs):
        """PEFT's hook before a saved config is built: read files saved with the old field names."""
        return _renamed_fields(super().check_kwargs(**kwargs))


def _deprecated_warmup_steps(self: AdaptiveLoraConfig) -> int | None:
    caller = sys._getframe(1)
    if caller.f_globals.get("__name__") == "dataclasses":
        return None  # dataclasses.replace copies init-only arguments: the old name is not one to pass on
    warnings.warn(_WARMUP_STEPS_RENAMED, FutureWarning, stacklevel=2)
    return self.signal_steps


def _set_deprecated_warmup_steps(self: AdaptiveLoraConfig, value: int) -> None:
    warnings.warn(_WARMUP_STEPS_RENAMED, FutureWarning, stacklevel=2)
    self.signal_steps = value


# Reading or setting ``config.warmup_steps`` still works for one release, with the warning. Set after the class is
# built so that the dataclass keeps ``warmup_steps=None`` as the default of its init-only argument.
AdaptiveLoraConfig.warmup_steps = property(_deprecated_warmup_steps, _set_deprecated_warmup_steps)


def _renamed_fields(data: dict[str, Any]) -> dict[str, Any]:
    """Saved configs and sidecars written before the rename carry ``warmup_steps``: read it as ``signal_steps``."""
    if "warmup_steps" not in data:
        return data
    data = dict(data)
    old = data.pop("warmup_steps")
    if data.get("signal_steps") is None:
        data["signal_steps"] = old
    return data


def _write_json(path: str, data: dict[str, Any]) -> None:
    data = {k: (sorted(v) if isinstance(v, set) else v) for k, v in data.items()}
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True))  # a killed save never leaves half a file


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require_one_of(name: str, value: Any, allowed: Iterable[str]) -> None:
    """``value`` must be one of the ``allowed`` names (the error lists them)."""
    allowed = list(allowed)
    _require(value in allowed, name, value, "one of " + ", ".join(repr(x) for x in allowed))


def _require(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"AdaptiveLoraConfig.{name} must be {allowed}, got {value!r}")
