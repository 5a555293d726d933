"""The report's figure: a forest plot of every method's paired difference to uniform LoRA, per suite, with its 95%
interval (``forest.png``). Matplotlib is imported only when drawing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MARKERS = "osD^vP*Xhp"


@dataclass(frozen=True)
class SuiteRow:
    """One suite's panel: its name and metric, and per method the mean paired difference and its 95% half-width."""

    suite: str
    metric: str
    higher_is_better: bool
    differences: dict[str, tuple[float, float]]


def forest_plot(rows: list[SuiteRow], labels: dict[str, str], path: Path) -> bool:
    """Draw one panel per suite (its own x scale), one marker per method in ``labels`` (shared legend, a method
    without runs on a suite has no marker there); "lower is better" suites are flipped so that right is better.
    Returns False (and writes nothing) when no suite has a difference to draw."""
    rows = [row for row in rows if row.differences]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in labels if any(m in row.differences for row in rows)]
    fig, axes = plt.subplots(len(rows), 1, figsize=(7.5, 0.9 + 0.32 * len(methods) * len(rows)), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, row in zip(axes[:, 0], rows):
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
        flipped = "" if row.higher_is_better else ", lower is better: flipped"
        ax.set_title(f"{row.suite}: {row.metric}{flipped}", fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=8)
    axes[-1, 0].set_xlabel("difference to uniform LoRA, paired by seed, 95% t interval (right = better)")
    handles = {}
    for ax in axes[:, 0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="upper center", ncol=min(4, len(handles)), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
