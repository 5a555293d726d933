"""Heatmaps of a saved adapter's ranks (layers x module types), and of the reallocation scores when known.

Needs matplotlib (``pip install 'peft-adaptive[plot]'``). It draws on a standalone ``Figure`` (no pyplot),
so it never opens a window or changes the global backend.

Python use::

    from peft_adaptive.plotting import plot_ranks

    plot_ranks("path/to/adapter", "ranks.png")                       # scores from the adapter, if saved
    plot_ranks("path/to/adapter", "ranks.png", logs="out/checkpoint-100")   # or from trainer_state.json
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .adapter_files import AdapterError
from .adapter_summary import AdapterSummary, inspect_adapter
from .trainer_logs import scores_from_logs

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: ``Axes.get_label()`` of the two panels, so callers and tests can find them among colorbar axes.
RANKS_PANEL = "ranks"
SCORES_PANEL = "scores"

#: Trainer logs looked for in the adapter folder when ``logs`` is not given.
TRAINER_STATE = "trainer_state.json"

_ANNOTATE_MAX_CELLS = 600


def find_scores(summary: AdapterSummary, logs: str | os.PathLike | None = None) -> dict[str, float] | None:
    """Reallocation scores for the adapter's modules: from ``logs`` if given (required to have them), else
    saved with the adapter, else from a ``trainer_state.json`` in the adapter folder; None if there are none."""
    if logs is not None:
        return scores_from_logs(logs)
    scores = summary.scores()
    if scores:
        return scores
    state = Path(summary.path) / TRAINER_STATE
    if state.is_file():
        try:
            return scores_from_logs(state)
        except AdapterError:
            return None
    return None


def rank_figure(adapter: str | os.PathLike | AdapterSummary, logs: str | os.PathLike | None = None) -> Figure:
    """A ``Figure`` with the rank heatmap, and a second panel with the scores when they are available."""
    Figure = _figure_class()
    summary = adapter if isinstance(adapter, AdapterSummary) else inspect_adapter(adapter)
    grid = summary.grid()
    scores = find_scores(summary, logs)
    if scores is not None and not set(scores) & set(summary.ranks):
        raise AdapterError(
            f"the scores found{f' in {logs}' if logs is not None else ''} are for other modules than the adapter's "
            f"(e.g. {next(iter(scores))!r})"
        )
    panels = [(RANKS_PANEL, grid.values({k: float(v) for k, v in summary.ranks.items()}))]
    if scores is not None:
        panels.append((SCORES_PANEL, grid.values(scores)))

    n_rows, n_cols = len(grid.rows), len(grid.columns)
    cell_w, cell_h = 0.6, 0.32
    width = max(4.5, 1.8 + cell_w * n_cols)
    height = max(2.5, 1.6 + cell_h * n_rows)
    fig = Figure(figsize=(width * len(panels), height), layout="constrained")
    annotate = n_rows * n_cols <= _ANNOTATE_MAX_CELLS
    for i, (label, values) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1, label=label)
        data = [[math.nan if v is None else v for v in row] for row in values]
        finite = [v for row in data for v in row if not math.isnan(v)]
        vmin, vmax = (min(finite), max(finite)) if finite else (0.0, 1.0)
        image = ax.imshow(data, aspect="auto", cmap=_cmap(label), vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1)
        ax.set_xticks(range(n_cols), grid.columns, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n_rows), grid.rows, fontsize=8)
        ax.set_xlabel("module type")
        ax.set_ylabel("layer")
        if label == RANKS_PANEL:
            ax.set_title(f"LoRA rank per module (start r={summary.r})")
            fig.colorbar(image, ax=ax, label="rank")
        else:
            ax.set_title("reallocation score")
            fig.colorbar(image, ax=ax, label="score")
        if annotate:
            for y, row in enumerate(data):
                for x, v in enumerate(row):
                    if math.isnan(v):
                        continue
                    text = str(int(v)) if label == RANKS_PANEL else f"{v:.2g}"
                    bright = (v - vmin) / (vmax - vmin) > 0.6 if vmax > vmin else False
                    ax.text(x, y, text, ha="center", va="center", fontsize=7, color="black" if bright else "white")
    fig.suptitle(
        f"{Path(summary.path).name}: {summary.lora_params:,} LoRA parameters "
        f"({summary.plain_lora_params:,} for plain LoRA at r={summary.r})",
        fontsize=9,
    )
    return fig


def plot_ranks(
    path: str | os.PathLike | AdapterSummary,
    output: str | os.PathLike,
    logs: str | os.PathLike | None = None,
    dpi: int = 150,
) -> Path:
    """Draw :func:`rank_figure` for the adapter in ``path`` (a folder, a hub repo id, or the summary from
    :func:`inspect_adapter`) into ``output`` (format from the suffix, default PNG).

    Returns the written path.
    """
    fig = rank_figure(path, logs)
    output = Path(output)
    if not output.suffix:
        output = output.with_suffix(".png")
    if output.is_dir():
        raise AdapterError(f"{output} is a directory; pass a file name such as ranks.png")
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(output, dpi=dpi)
    except ValueError as exc:  # unsupported format
        raise AdapterError(f"cannot write {output}: {exc}") from exc
    return output


def panel_count(fig: Figure) -> int:
    """Number of heatmap panels in a figure from :func:`rank_figure` (colorbars not counted)."""
    return sum(ax.get_label() in (RANKS_PANEL, SCORES_PANEL) for ax in fig.axes)


def _cmap(label: str):
    from matplotlib import colormaps

    # grey: module type not adapted in that layer
    return colormaps["viridis" if label == RANKS_PANEL else "magma"].with_extremes(bad="#dddddd")


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise AdapterError("plotting needs matplotlib: pip install 'peft-adaptive[plot]'") from exc
    return Figure
