"""Read a saved LoRA adapter from disk and summarise its per-module ranks, without the base model.

Works on adapters saved by this plugin (plain ``LORA`` config plus the ``adaptive_lora.json`` sidecar, or
an ``ADAPTIVE_LORA`` config) and on plain PEFT LoRA adapters, with or without ``rank_pattern``.

* The rank of a module is the first dimension of its saved ``lora_A`` (or ``lora_embedding_A``) tensor,
  read from the safetensors header, so the weights are never loaded for a summary.
* Its ``lora_alpha`` and configured rank are resolved from ``alpha_pattern``/``rank_pattern`` exactly as
  PEFT resolves them when loading (:func:`peft.utils.other.get_pattern_key`, first match in on-disk order).
* The parameter count of a module is ``rank * (fan_in + fan_out)``; the budget is compared with plain LoRA
  at the starting rank ``r`` of the config on the same modules.

Python use::

    from peft_adaptive.inspection import inspect_adapter

    summary = inspect_adapter("path/to/adapter")
    print(summary)           # full report
    print(summary.table())   # ranks, layers x module types
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from peft.utils.other import get_pattern_key

from .config import ADAPTIVE_CONFIG_NAME, AdaptiveLoraConfig

#: peft_type values whose adapters this module understands.
LORA_PEFT_TYPES = ("LORA", "ADAPTIVE_LORA")

#: Prefix PEFT puts in front of base-model module names in the saved state dict.
STATE_DICT_PREFIX = "base_model.model."

_FACTOR_KEY = re.compile(r"^(?P<module>.+)\.(?P<factor>lora_A|lora_B)\.weight$")
_EMBEDDING_KEY = re.compile(r"^(?P<module>.+)\.(?P<factor>lora_embedding_A|lora_embedding_B)$")
_NATURAL = re.compile(r"(\d+)")


class AdapterError(ValueError):
    """A problem with the user's input (path, files, options): reported without a traceback by the CLI."""


# --- reading files -----------------------------------------------------------------------------------


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``adapter_config.json`` of adapter directory ``path`` as a dict (key order as on disk).

    Raises :class:`AdapterError` when ``path`` is not a directory holding a readable LoRA adapter config.
    """
    directory = Path(path)
    if not directory.exists():
        raise AdapterError(f"{directory}: no such file or directory")
    if not directory.is_dir():
        raise AdapterError(
            f"{directory} is not an adapter directory (it is a file; pass the folder that holds {CONFIG_NAME})"
        )
    config_file = directory / CONFIG_NAME
    if not config_file.is_file():
        raise AdapterError(f"{directory} is not a PEFT adapter directory: it has no {CONFIG_NAME}")
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{config_file} is not a readable JSON file: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{config_file} does not hold a JSON object")
    peft_type = config.get("peft_type")
    if peft_type not in LORA_PEFT_TYPES:
        raise AdapterError(
            f"{directory} holds a {peft_type!r} adapter; only LoRA adapters (peft_type {' or '.join(LORA_PEFT_TYPES)}) "
            "are supported"
        )
    return config


def read_adaptive_fields(path: str | os.PathLike, config: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The plugin's own fields (``allocation``, ``warmup_steps``, ...) of a saved adapter, or None.

    They are in the ``adaptive_lora.json`` sidecar when the adapter was saved as plain LoRA, and in
    ``adapter_config.json`` itself when it was saved with ``save_as_lora=False``.
    """
    directory = Path(path)
    sidecar = directory / ADAPTIVE_CONFIG_NAME
    if sidecar.is_file():
        try:
            with open(sidecar, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AdapterError(f"{sidecar} is not a readable JSON file: {exc}") from exc
        return data if isinstance(data, dict) else None
    config = read_adapter_config(directory) if config is None else config
    if config.get("peft_type") == "ADAPTIVE_LORA":
        return {name: config[name] for name in adaptive_field_names() if name in config}
    return None


adaptive_field_names = AdaptiveLoraConfig.adaptive_field_names


def weights_file(path: str | os.PathLike) -> Path:
    """The adapter's weights file: ``adapter_model.safetensors`` (preferred) or ``adapter_model.bin``."""
    directory = Path(path)
    for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME):
        if (directory / name).is_file():
            return directory / name
    raise AdapterError(
        f"{directory} is not a complete PEFT adapter: it has {CONFIG_NAME} but no {SAFETENSORS_WEIGHTS_NAME} "
        f"(or {WEIGHTS_NAME})"
    )


def read_weight_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor in the adapter's weights file (safetensors: header only)."""
    file = weights_file(path)
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as f:
                return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        except Exception as exc:  # safetensors raises SafetensorError or OSError subclasses
            raise AdapterError(f"{file} is not a valid safetensors file (corrupt or truncated?): {exc}") from exc
    return {key: tuple(t.shape) for key, t in load_weights(path).items()}


def load_weights(path: str | os.PathLike) -> dict[str, Any]:
    """All tensors of the adapter's weights file, on CPU, keyed as saved."""
    file = weights_file(path)
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file), device="cpu")
        import torch

        data = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AdapterError(f"{file} is not a valid adapter weights file (corrupt or truncated?): {exc}") from exc
    if not isinstance(data, dict):
        raise AdapterError(f"{file} does not hold a state dict")
    return data


def module_name(state_dict_key: str) -> str:
    """Name in the base model of the module a saved state-dict key belongs to (``base_model.model.`` stripped)."""
    return state_dict_key[len(STATE_DICT_PREFIX) :] if state_dict_key.startswith(STATE_DICT_PREFIX) else state_dict_key


def lora_factor_keys(keys: Iterable[str]) -> dict[str, dict[str, str]]:
    """``{module name: {"A": key, "B": key}}`` for the LoRA factors among saved state-dict keys."""
    modules: dict[str, dict[str, str]] = {}
    for key in keys:
        match = _FACTOR_KEY.match(key) or _EMBEDDING_KEY.match(key)
        if match is None:
            continue
        factor = "A" if match["factor"].endswith("A") else "B"
        modules.setdefault(module_name(match["module"]), {})[factor] = key
    return modules


def pattern_value(pattern: dict[str, Any] | None, name: str, default: Any) -> Any:
    """The value PEFT uses for module ``name`` from ``rank_pattern``/``alpha_pattern`` (first match wins)."""
    if not pattern:
        return default
    return pattern.get(get_pattern_key(list(pattern), name), default)


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's LoRA scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


# --- summary -------------------------------------------------------------------------------------------


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
class RankGrid:
    """Modules laid out as rows (layers) x columns (module types); ``cells[row][col]`` is a name or None."""

    rows: list[str]
    columns: list[str]
    cells: list[list[str | None]]

    def values(self, per_module: dict[str, float]) -> list[list[float | None]]:
        return [[None if n is None else per_module.get(n) for n in row] for row in self.cells]


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


def inspect_adapter(path: str | os.PathLike) -> AdapterSummary:
    """Summarise the saved LoRA adapter in directory ``path`` (no base model needed).

    Raises :class:`AdapterError` when ``path`` is not a readable LoRA adapter.
    """
    config = read_adapter_config(path)
    shapes = read_weight_shapes(path)
    adaptive = read_adaptive_fields(path, config)
    modules, warnings = _module_infos(config, shapes, order=_allocation_names(adaptive))
    if not modules:
        raise AdapterError(f"{weights_file(path)} holds no LoRA factors (no lora_A/lora_B tensors)")
    return AdapterSummary(
        path=str(path),
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
        warnings=warnings,
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


def natural_key(name: str) -> list[Any]:
    """Sort key that puts ``layers.2`` before ``layers.10``."""
    return [int(part) if part.isdigit() else part for part in _NATURAL.split(name)]


def split_module_name(name: str) -> tuple[str | None, str]:
    """``(layer, module type)``: ``model.layers.3.self_attn.q_proj`` -> ``("model.layers.3", "self_attn.q_proj")``.

    The layer is the path up to the first integer component; modules without one get ``None``.
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit() and i + 1 < len(parts):
            return ".".join(parts[: i + 1]), ".".join(parts[i + 1 :])
    return None, name


#: Row label of the modules that have no layer index (``lm_head``, ``embed_tokens``, ...).
OTHER_ROW = "other"


def rank_grid(names: list[str]) -> RankGrid:
    """Lay module names out as layers x module types, in the order the names first appear."""
    split = {n: split_module_name(n) for n in names}
    layers = list(dict.fromkeys(layer for layer, _ in split.values() if layer is not None))
    # layer module types first, then the names of the modules without a layer (their own row)
    types = [kind for layer, kind in split.values() if layer is not None]
    types = list(dict.fromkeys(types + [kind for layer, kind in split.values() if layer is None]))
    if any(layer is None for layer, _ in split.values()):
        layers.append(None)
    cells: list[list[str | None]] = [[None] * len(types) for _ in layers]
    row_of = {layer: i for i, layer in enumerate(layers)}
    col_of = {kind: j for j, kind in enumerate(types)}
    for name, (layer, kind) in split.items():
        cells[row_of[layer]][col_of[kind]] = name
    return RankGrid(rows=_row_labels(layers), columns=_column_labels(types), cells=cells)


def _row_labels(layers: list[str | None]) -> list[str]:
    indexed = [layer for layer in layers if layer is not None]
    stacks = {layer.rsplit(".", 1)[0] for layer in indexed}
    labels = []
    for layer in layers:
        if layer is None:
            labels.append(OTHER_ROW)
        elif len(stacks) == 1:
            labels.append(layer.rsplit(".", 1)[1])  # one stack of layers: just the index
        else:
            labels.append(layer)  # e.g. encoder.block.0 / decoder.block.0
    return labels


def _column_labels(types: list[str]) -> list[str]:
    """Each type's shortest trailing path that no other type shares (``q_proj``, ``output.dense``)."""
    parts = [kind.split(".") for kind in types]
    labels = []
    for i, own in enumerate(parts):
        for k in range(1, len(own) + 1):
            if all(other[-k:] != own[-k:] for j, other in enumerate(parts) if j != i):
                break
        labels.append(".".join(own[-k:]))
    return labels


# --- scores from an adapter or from training logs -------------------------------------------------------


def scores_from_allocation(allocation: dict[str, Any]) -> dict[str, float] | None:
    names, scores = allocation.get("names"), allocation.get("scores")
    if isinstance(names, list) and isinstance(scores, list) and len(names) == len(scores) and names:
        return {str(n): float(s) for n, s in zip(names, scores)}
    return None


#: Prefix of the per-module scores that ``AdaptiveLoraCallback`` logs through ``Trainer.log``.
LOGGED_SCORE_PREFIX = "adaptive_lora/score/"


def scores_from_logs(path: str | os.PathLike) -> dict[str, float]:
    """Reallocation scores from training logs.

    ``path`` may be a ``trainer_state.json`` (its ``log_history`` holds the ``adaptive_lora/score/<module>``
    values that ``AdaptiveLoraCallback`` logs), a folder holding one (a checkpoint or output folder), a JSON
    file with an ``allocation`` (such as ``adaptive_lora.json``), or a JSON-lines log. The last reallocation
    found wins. Raises :class:`AdapterError` when there is none.
    """
    file = Path(path)
    if file.is_dir():
        file = file / "trainer_state.json"
    if not file.is_file():
        raise AdapterError(f"{path}: no such log file (pass a trainer_state.json, a folder holding one, or a JSON log)")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{file} is not a readable text file: {exc}") from exc
    try:
        documents = [json.loads(text)]
    except json.JSONDecodeError:
        documents = []
        for line in text.splitlines():
            try:
                documents.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        if not documents:
            raise AdapterError(f"{file} is neither JSON nor JSON lines") from None
    found = None
    for document in documents:
        found = _last_scores(document) or found
    if not found:
        raise AdapterError(f"{file} holds no reallocation scores (no {LOGGED_SCORE_PREFIX}* values or allocation)")
    return found


def _last_scores(value: Any) -> dict[str, float] | None:
    """The last set of scores in a JSON value: an allocation dict or flat ``adaptive_lora/score/...`` keys."""
    found = None
    if isinstance(value, dict):
        flat = {
            k[len(LOGGED_SCORE_PREFIX) :]: float(v)
            for k, v in value.items()
            if k.startswith(LOGGED_SCORE_PREFIX) and isinstance(v, (int, float))
        }
        if flat:
            found = flat
        elif "names" in value and "scores" in value:
            found = scores_from_allocation(value)
        for child in value.values():
            found = _last_scores(child) or found
    elif isinstance(value, list):
        for child in value:
            found = _last_scores(child) or found
    return found


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
