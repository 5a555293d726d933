"""Lay module names out as a grid: rows are layers, columns are module types (for tables and heatmaps).

``model.layers.3.self_attn.q_proj`` is row ``3`` (the path up to the first integer component), column
``q_proj`` (the shortest trailing path that tells the module types apart). Modules without a layer index
(``lm_head``, ``embed_tokens``) get a row of their own, :data:`OTHER_ROW`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

#: Row label of the modules that have no layer index (``lm_head``, ``embed_tokens``, ...).
OTHER_ROW = "other"

_NATURAL = re.compile(r"(\d+)")


@dataclass
class RankGrid:
    """Modules laid out as rows (layers) x columns (module types); ``cells[row][col]`` is a name or None."""

    rows: list[str]
    columns: list[str]
    cells: list[list[str | None]]

    def values(self, per_module: dict[str, float]) -> list[list[float | None]]:
        return [[None if n is None else per_module.get(n) for n in row] for row in self.cells]


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
