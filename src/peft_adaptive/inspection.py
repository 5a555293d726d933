"""Read a saved LoRA adapter from disk and summarise its per-module ranks, without the base model.

Works on adapters saved by this plugin (plain ``LORA`` config plus the ``adaptive_lora.json`` sidecar, or
an ``ADAPTIVE_LORA`` config) and on plain PEFT LoRA adapters, with or without ``rank_pattern``.

This module is the public entry point; the work is done by one module per job:

* :mod:`peft_adaptive.adapter_files`: reading and validating the adapter's files;
* :mod:`peft_adaptive.adapter_summary`: :func:`inspect_adapter` and the :class:`AdapterSummary` report;
* :mod:`peft_adaptive.layer_grid`: the layers x module types layout of tables and heatmaps;
* :mod:`peft_adaptive.trainer_logs`: reallocation scores from training logs.

Python use::

    from peft_adaptive.inspection import inspect_adapter

    summary = inspect_adapter("path/to/adapter")
    print(summary)           # full report
    print(summary.table())   # ranks, layers x module types
"""

from __future__ import annotations

from .adapter_files import (
    LORA_PEFT_TYPES,
    STATE_DICT_PREFIX,
    AdapterError,
    adaptive_field_names,
    load_weights,
    lora_factor_keys,
    module_name,
    read_adapter_config,
    read_adaptive_fields,
    read_weight_shapes,
    weights_file,
)
from .adapter_summary import AdapterSummary, ModuleInfo, inspect_adapter, lora_scaling, pattern_value
from .layer_grid import OTHER_ROW, RankGrid, natural_key, rank_grid, split_module_name
from .trainer_logs import LOGGED_SCORE_PREFIX, scores_from_allocation, scores_from_logs

__all__ = [
    "LOGGED_SCORE_PREFIX",
    "LORA_PEFT_TYPES",
    "OTHER_ROW",
    "STATE_DICT_PREFIX",
    "AdapterError",
    "AdapterSummary",
    "ModuleInfo",
    "RankGrid",
    "adaptive_field_names",
    "inspect_adapter",
    "load_weights",
    "lora_factor_keys",
    "lora_scaling",
    "module_name",
    "natural_key",
    "pattern_value",
    "rank_grid",
    "read_adapter_config",
    "read_adaptive_fields",
    "read_weight_shapes",
    "scores_from_allocation",
    "scores_from_logs",
    "split_module_name",
    "weights_file",
]
