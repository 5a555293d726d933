"""The summary of a saved LoRA adapter: per-module ranks, scalings, parameter counts, budget, report.

* The rank of a module is the first dimension of its saved ``lora_A`` (or ``lora_embedding_A``) tensor,
  read from the safetensors header, so the weights are never loaded for a summary.
* Its ``lora_alpha`` and configured rank are resolved from ``alpha_pattern``/``rank_pattern`` exactly as
  PEFT resolves them when loading (:func:`peft.utils.other.get_pattern_key`, first match in on-disk order).
* The parameter count of a module is ``rank * (fan_in + fan_out)``; the budget is compared with plain LoRA
  at the starting rank ``r`` of the config on the same modules.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from peft.utils.other import get_pattern_key

from .adapter_files import (
    AdapterError,
    locate_adapter,
    lora_factor_keys,
    read_adapter_config,
    read_adaptive_fields,
    read_weight_shapes,
    weights_file,
)
from .layer_grid import RankGrid, natural_key, rank_grid
from .trainer_logs import scores_from_allocation


@dataclass
class ModuleInfo:
    """One adapted module of a saved adapter."""

    name: str
    rank: int  # from the saved tensors
    fan_in: int
    fan_out: int
    lora_alpha: float  # resolved from alpha_pattern / lora_alpha
    config_rank: int  # resolved from rank_pattern / r (what PEFT builds when loading)
    scaling: float  # what PEFT applies: lora_alpha / config_rank (sqrt with rsLoRA)

    @property
    def params(self) -> int:
        """Trainable parameters of the LoRA factors: ``rank * (fan_in + fan_out)``."""
        return self.rank * (self.fan_in + self.fan_out)


@dataclass
class AdapterSummary:
    """What :func:`inspect_adapter` found in a saved adapter. ``str(summary)`` is the full report."""

    path: str
    peft_type: str
    saved_by_plugin: bool
    base_model: str | None
    task_type: str | None
    r: int
    lora_alpha: float
    use_rslora: bool
    modules: list[ModuleInfo]
    total_params: int  # every tensor in the weights file (LoRA factors, modules_to_save, biases, DoRA, ...)
    adaptive: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    # --- numbers ---

    @property
    def lora_params(self) -> int:
        """Parameters of the LoRA factors, ``sum(rank * (fan_in + fan_out))``."""
        return sum(m.params for m in self.modules)

    @property
    def plain_lora_params(self) -> int:
        """What plain LoRA at the starting rank ``r`` would have on the same modules."""
        return sum(self.r * (m.fan_in + m.fan_out) for m in self.modules)

    @property
    def ranks(self) -> dict[str, int]:
        return {m.name: m.rank for m in self.modules}

    @property
    def allocation(self) -> dict[str, Any] | None:
        value = (self.adaptive or {}).get("allocation")
        return value if isinstance(value, dict) else None

    @property
    def budget(self) -> int | None:
        """The reallocation budget (from the saved allocation or ``param_budget``), if the adapter has one."""
        if self.allocation and isinstance(self.allocation.get("budget"), int):
            return self.allocation["budget"]
        value = (self.adaptive or {}).get("param_budget")
        return value if isinstance(value, int) else None

    def scores(self) -> dict[str, float] | None:
        """Reallocation score of each module, when the adapter was saved with its allocation."""
        return scores_from_allocation(self.allocation) if self.allocation else None

    # --- layout ---

    def grid(self) -> RankGrid:
        """Rows are layers (the first integer in the module path), columns module types (the path after it)."""
        return rank_grid([m.name for m in self.modules])

    def table(self) -> str:
        """The ranks as a text table, layers x module types (``-``: module type not adapted in that layer)."""
        grid = self.grid()
        ranks = self.ranks
        header = ["layer", *grid.columns]
        body = [
            [row, *("-" if n is None else str(ranks[n]) for n in cells)] for row, cells in zip(grid.rows, grid.cells)
        ]
        widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
        lines = []
        for line in [header, *body]:
            lines.append(
                "  ".join(text.ljust(w) if i == 0 else text.rjust(w) for i, (text, w) in enumerate(zip(line, widths)))
            )
        return "\n".join(line.rstrip() for line in lines)

    def report(self) -> str:
        ranks = [m.rank for m in self.modules]
        origin = "saved by peft-adaptive" if self.saved_by_plugin else "plain PEFT LoRA"
        lines = [
            f"Adapter: {self.path}",
            f"Type: {self.peft_type} ({origin}); base model: {self.base_model or 'not recorded'}; "
            f"task: {self.task_type or 'not recorded'}",
            f"Config: r={self.r}, lora_alpha={_number(self.lora_alpha)}, rsLoRA={'yes' if self.use_rslora else 'no'}",
            "",
            "Rank per module (rows: layers, columns: module types):",
            self.table(),
            "",
        ]
        if ranks:
            lines.append(
                f"Modules: {len(ranks)}; rank min {min(ranks)}, mean {sum(ranks) / len(ranks):.2f}, max {max(ranks)}"
            )
        other = self.total_params - self.lora_params
        lines.append(
            f"Trainable parameters: {self.total_params:,} (LoRA factors {self.lora_params:,}"
            + (f", other saved tensors {other:,})" if other else ")")
        )
        plain = self.plain_lora_params
        share = f" ({100 * self.lora_params / plain:.1f}%)" if plain else ""
        lines.append(f"Budget: {self.lora_params:,} LoRA parameters vs {plain:,} for plain LoRA at r={self.r}{share}")
        if self.budget is not None:
            step = (self.allocation or {}).get("step")
            at = f" at step {step}" if step is not None else ""
            lines.append(f"Reallocation{at}: budget {self.budget:,} parameters")
        lines.extend(f"Warning: {w}" for w in self.warnings)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.report()

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (used by ``peft-adaptive inspect --json``)."""
        return {
            "path": self.path,
            "peft_type": self.peft_type,
            "saved_by_plugin": self.saved_by_plugin,
            "base_model": self.base_model,
            "task_type": self.task_type,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "use_rslora": self.use_rslora,
            "modules": [{**asdict(m), "params": m.params} for m in self.modules],
            "total_params": self.total_params,
            "lora_params": self.lora_params,
            "plain_lora_params": self.plain_lora_params,
            "budget": self.budget,
            "scores": self.scores(),
            "warnings": list(self.warnings),
        }


def inspect_adapter(path: str | os.PathLike, subfolder: str | None = None, **hub_kwargs: Any) -> AdapterSummary:
    """Summarise the saved LoRA adapter in folder ``path`` (no base model needed).

    ``path`` may also be a Hugging Face Hub repo id: its files are fetched into the hub cache with
    ``huggingface_hub.hf_hub_download`` and ``hub_kwargs`` (``revision``, ``cache_dir``, ``token``, ...).
    ``subfolder`` is the adapter's folder inside ``path`` or the repo.

    Raises :class:`AdapterError` when ``path`` is not a readable LoRA adapter.
    """
    directory, name, notes = locate_adapter(path, subfolder, **hub_kwargs)
    config = read_adapter_config(directory)
    shapes = read_weight_shapes(directory)
    adaptive = read_adaptive_fields(directory, config)
    modules, warnings = _module_infos(config, shapes, order=_allocation_names(adaptive))
    if not modules:
        raise AdapterError(f"{weights_file(directory)} holds no LoRA factors (no lora_A/lora_B tensors)")
    return AdapterSummary(
        path=name,
        peft_type=str(config.get("peft_type")),
        saved_by_plugin=adaptive is not None,
        base_model=config.get("base_model_name_or_path"),
        task_type=config.get("task_type"),
        r=int(config.get("r", 8)),
        lora_alpha=config.get("lora_alpha", 8),
        use_rslora=bool(config.get("use_rslora", False)),
        modules=modules,
        total_params=sum(math.prod(s) for s in shapes.values()),
        adaptive=adaptive,
        warnings=notes + warnings,
    )


def _module_infos(
    config: dict[str, Any], shapes: dict[str, tuple[int, ...]], order: list[str] | None = None
) -> tuple[list[ModuleInfo], list[str]]:
    r = int(config.get("r", 8))
    alpha = config.get("lora_alpha", 8)
    rslora = bool(config.get("use_rslora", False))
    infos, warnings = [], []
    for name, keys in lora_factor_keys(shapes).items():
        if set(keys) != {"A", "B"}:
            warnings.append(f"module {name} has only lora_{''.join(keys)} saved; skipped")
            continue
        shape_a, shape_b = shapes[keys["A"]], shapes[keys["B"]]
        rank = shape_a[0]
        config_rank = int(pattern_value(config.get("rank_pattern"), name, r))
        module_alpha = pattern_value(config.get("alpha_pattern"), name, alpha)
        if config_rank != rank:
            warnings.append(
                f"module {name}: the weights have rank {rank} but the config (rank_pattern/r) says {config_rank}; "
                "PEFT will not load this adapter as saved"
            )
        infos.append(
            ModuleInfo(
                name=name,
                rank=rank,
                fan_in=math.prod(shape_a[1:]),
                fan_out=shape_b[0],
                lora_alpha=module_alpha,
                config_rank=config_rank,
                scaling=lora_scaling(module_alpha, config_rank, rslora),
            )
        )
    position = {n: i for i, n in enumerate(order or [])}
    infos.sort(key=lambda m: (position.get(m.name, len(position)), natural_key(m.name)))
    return infos, warnings


def _allocation_names(adaptive: dict[str, Any] | None) -> list[str] | None:
    allocation = (adaptive or {}).get("allocation")
    names = allocation.get("names") if isinstance(allocation, dict) else None
    return list(names) if isinstance(names, list) else None


def pattern_value(pattern: dict[str, Any] | None, name: str, default: Any) -> Any:
    """The value PEFT uses for module ``name`` from ``rank_pattern``/``alpha_pattern`` (first match wins)."""
    if not pattern:
        return default
    return pattern.get(get_pattern_key(list(pattern), name), default)


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's LoRA scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
