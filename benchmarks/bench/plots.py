"""The report's figure: a forest plot of every method's paired difference to uniform LoRA, per suite, with its 95%
interval (``forest.png``). Matplotlib is imported only when drawing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MARKERS = "osD^vP*Xhp"
LEGEND_COLUMNS = 4


@dataclass(frozen=True)
class SuiteRow:
    """One suite's panel: its name and metric, and per method the mean paired difference and its 95% half-width."""

    suite: str
    metric: str
    higher_is_better: bool
    differences: dict[str, tuple[float, float]]


def forest_plot(rows: list[SuiteRow], labels: dict[str, str], path: Path, columns: int = 2) -> bool:
    """Draw one panel per suite (its own x scale), ``columns`` panels a row, one marker per method in ``labels``
    (shared legend above; a method without runs on a suite has no marker there); "lower is better" suites are
    flipped so that right is better. Returns False (and writes nothing) when no suite has a difference to draw."""
    rows = [row for row in rows if any(m in row.differences for m in labels)]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in labels if any(m in row.differences for row in rows)]
    columns = min(columns, len(rows))
    grid = -(-len(rows) // columns)  # panel rows, rounded up
    panel_height = 0.55 + 0.2 * len(methods)
    fig, axes = plt.subplots(grid, columns, figsize=(6.0 * columns, panel_height * grid), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, row in zip(axes.flat, rows):
        sign = 1.0 if row.higher_is_better else -1.0
        for slot, method in enumerate(methods):
            if method not in row.differences:
                continue
            mean, half = row.differences[method]
            ax.errorbar(
                sign * mean,
                -slot,
                xerr=half,
                fmt=MARKERS[slot % len(MARKERS)],
                color=colours(slot % 10),
                capsize=3,
                label=labels[method],
            )
        ax.axvline(0.0, color="0.5", linewidth=0.8)
        ax.set_yticks([])
        ax.set_ylim(-len(methods) + 0.4, 0.6)
        flipped = " (lower is better: flipped)" if not row.higher_is_better else ""
        ax.set_title(f"{row.suite}: {row.metric}{flipped}", fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=8)
    for ax in axes.flat[len(rows) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("difference to uniform LoRA, paired by seed, 95% t interval (right = better)", fontsize=8)
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    legend_rows = -(-len(handles) // LEGEND_COLUMNS)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.15 + 0.22 * legend_rows) / fig.get_figheight()))
    fig.legend(handles.values(), handles.keys(), loc="upper center", ncol=min(LEGEND_COLUMNS, len(handles)), fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight": nothing of the legend is cut off
    plt.close(fig)
    return True
