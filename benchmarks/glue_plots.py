"""The GLUE benchmark's figures: metric per method (``metric.png``) and final ranks per module (``ranks_<task>.png``)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from bench import common
from glue_records import group_runs, method_order, ok_runs


def plot_metrics(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_runs(runs)
    tasks = list(dict.fromkeys(r["task"] for r in ok_runs(runs)))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        methods = [m for m in method_order(runs) if (task, m) in groups]
        stats = [common.mean_std([r["metric"] * 100 for r in groups[(task, m)]]) for m in methods]
        ax.bar(range(len(methods)), [s[0] for s in stats], yerr=[s[1] for s in stats], capsize=4, color="tab:blue")
        for i, m in enumerate(methods):
            ax.scatter([i] * len(groups[(task, m)]), [r["metric"] * 100 for r in groups[(task, m)]], color="k", s=8)
        low = min(s[0] - s[1] for s in stats)
        ax.set_ylim(max(0, low - 5), min(100, max(s[0] + s[1] for s in stats) + 2))
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
        ax.set_title(f"{task.upper()} ({groups[(task, methods[0])][0]['metric_name']})")
        ax.set_ylabel("metric (%): bars mean ± std, dots seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rank_grid(runs: list[dict]) -> tuple[list[int], list[str], list[list[float]]]:
    """Mean rank over seeds, as a layer x module-type grid."""
    sums: dict[tuple[int, str], float] = defaultdict(float)
    for run in runs:
        for name, rank in run["ranks"].items():
            parts = common.split_module_name(name)
            if parts is not None:
                sums[parts] += rank / len(runs)
    layers = sorted({k[0] for k in sums})
    kinds = list(dict.fromkeys(k[1] for k in sorted(sums, key=lambda k: k[0])))
    return layers, kinds, [[sums.get((layer, kind), math.nan) for kind in kinds] for layer in layers]


def short_labels(kinds: list[str]) -> list[str]:
    """The shortest dotted suffix of each module type that is still unique (``attention.output.dense`` -> ...)."""
    labels = []
    for kind in kinds:
        parts = kind.split(".")
        for n in range(2 if parts[-1] == "dense" else 1, len(parts) + 1):  # "dense" alone says too little
            label = ".".join(parts[-n:])
            if sum(k == label or k.endswith("." + label) for k in kinds) == 1:
                break
        labels.append(label)
    return labels


def plot_rank_heatmaps(runs: list[dict], task: str, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_runs(runs)
    methods = [m for m in method_order(runs) if (task, m) in groups and "ranks" in groups[(task, m)][0]]
    methods = [m for m in methods if m != "lora"]
    if not methods:
        return False
    grids = [rank_grid(groups[(task, m)]) for m in methods]
    vmax = max(max(v for row in g[2] for v in row if not math.isnan(v)) for g in grids)
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 + 2.4 * len(methods), 3.6), squeeze=False)
    for ax, m, (layers, kinds, grid) in zip(axes[0], methods, grids):
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(kinds)), short_labels(kinds), rotation=45, ha="right")
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_xlabel("module")
        ax.set_ylabel("layer" if ax is axes[0][0] else "")
        ax.set_title(f"{m} (n={len(groups[(task, m)])})", fontsize=9)
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    ax.text(j, i, f"{value:.0f}", ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(image, ax=axes[0].tolist(), label="final rank (mean over seeds)")
    fig.suptitle(
        f"{task.upper()}: final ranks per module (plain LoRA: r={groups[(task, methods[0])][0]['r']} everywhere)",
        fontsize=10,
    )
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True
