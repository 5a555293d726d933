"""The report's learning-rate section: each method at its own tuned learning rate, on the tuning suites.

Per method, the grid ``LR_GRID`` (x0.5, x1, x2 the suite's learning rate; runs ``<method>+lr0.5x``, ``<method>`` or
``<method>+lr1x``, ``<method>+lr2x``) is read on the validation set (``val_metrics``; seed 0, one run per point),
the best point is the method's chosen learning rate, and its runs there are compared, paired by seed, with uniform
LoRA and with the shipped default at theirs. A method is tuned only when all three points have a validation metric.
Where the best point is the grid's top, the grid grows by doubling (``EDGE_STEPS``: x4, then x8) as far as those
points were run, so that a method still improving at x2 is not judged at the edge (registered in RESULTS.md before
any such run).
This separates allocation from step size, which can fake or hide a gain.
"""

from __future__ import annotations

from .methods import SHIPPED_DEFAULT, base_name, with_lr_factor
from .stats import paired
from .suites import SUITES, Suite
from .tables import Results, diff_cell, markdown_table, method_order

TUNING_SUITES = ("planted", "clm-wiki", "glue-sst2")
LR_GRID = (0.5, 1.0, 2.0)
EDGE_STEPS = (4.0, 8.0)  # the grid's doublings past its top, read where the best point so far is the top
TUNING_SEED = 0


def grid_run(results: Results, method: str, factor: float) -> dict | None:
    """Seed 0 of ``method`` at ``factor`` times the learning rate with a validation metric; at x1 the ``+lr1x`` run
    or, where it has one, the plain run."""
    names = [with_lr_factor(method, factor)] + ([method + "+lr1x"] if factor == 1 else [])
    for name in reversed(names):  # at x1 the +lr1x run first: it exists only to carry validation metrics
        run = results.get(name, {}).get(TUNING_SEED)
        if run is not None and run.get("val_metrics"):
            return run
    return None


def validation_grid(results: Results, method: str, metric: str) -> dict[float, float | None]:
    """The validation metric at each point of the grid and its doublings (``None``: not run, or run before
    validation existed)."""
    runs = {factor: grid_run(results, method, factor) for factor in LR_GRID + EDGE_STEPS}
    return {factor: None if run is None else run["val_metrics"][metric] for factor, run in runs.items()}


def chosen_factor(grid: dict[float, float | None], higher_is_better: bool) -> float | None:
    """The best point of a complete grid (ties: the suite's own learning rate, then the smaller); while that is the
    top point read so far, the next doubling joins the grid where it was run."""
    if any(grid.get(factor) is None for factor in LR_GRID):
        return None
    read = list(LR_GRID)

    def best() -> float:
        preference = sorted(read, key=lambda f: (f != 1.0, f))
        return max(preference, key=lambda f: grid[f] if higher_is_better else -grid[f])  # first of the best

    for factor in EDGE_STEPS:
        if best() != max(read) or grid.get(factor) is None:
            break
        read.append(factor)
    return best()


def runs_at(results: Results, method: str, factor: float) -> dict[int, dict]:
    """The method's runs at ``factor`` (x1: the plain name's runs, else the ``+lr1x`` ones)."""
    if factor == 1.0:
        return results.get(method) or results.get(method + "+lr1x", {})
    return results.get(with_lr_factor(method, factor), {})


def tuned_methods(results: Results) -> list[str]:
    """The methods with a learning-rate variant in this suite, uniform LoRA and the shipped default first."""
    names = {base_name(name) for name in results if base_name(name) != name}
    return sorted(names, key=method_order)


def tuning_table(suite: Suite, results: Results) -> list[str]:
    methods = tuned_methods(results)
    grids = {m: validation_grid(results, m, suite.metric) for m in methods}
    chosen = {m: chosen_factor(grids[m], suite.higher_is_better) for m in methods}

    def at_chosen(method: str) -> dict[int, dict]:
        return {} if chosen.get(method) is None else runs_at(results, method, chosen[method])

    shown = [f for f in LR_GRID + EDGE_STEPS if f in LR_GRID or any(grids[m][f] is not None for m in methods)]
    rows = []
    for method in methods:
        cells = ["–" if grids[method][f] is None else f"{grids[method][f]:.4f}" for f in shown]
        factor = chosen[method]
        runs = at_chosen(method)
        versus = [
            "–" if method == other else diff_cell(paired(runs, at_chosen(other), suite.metric), suite.higher_is_better)
            for other in ("lora", SHIPPED_DEFAULT)
        ]
        lr = "–" if factor is None else f"×{factor:g} ({suite.lr * factor:g})"
        rows.append([method, *cells, lr, str(len(runs)), *versus])
    header = [
        "method",
        *(f"validation `{suite.metric}` at ×{f:g}" for f in shown),
        "chosen lr",
        "seeds there",
        "vs lora at its chosen lr (paired)",
        "vs the default at its chosen lr (paired)",
    ]
    return markdown_table(header, rows)


def tuning_section(tree: dict[str, Results]) -> list[str]:
    """Every tuning suite with learning-rate variants: the grid on validation, the choice, the paired comparison."""
    lines = [
        "## Each method at its own learning rate",
        "",
        f"Validation metric (seed {TUNING_SEED}, one run per point; not the reported held-out set) at ×0.5, ×1 and "
        "×2 the suite's learning rate (and ×4, ×8 where the best so far was the top point and they were run), the "
        "best as the method's chosen lr (ties: ×1), then its runs there against "
        "uniform LoRA and against the shipped default at *their* chosen lrs, paired by seed (mean ± 95% t "
        "half-width, verdict, seeds). '–': a grid point without a validation metric (not run yet).",
        "",
    ]
    tuned = [name for name in TUNING_SUITES if tuned_methods(tree.get(name, {}))]
    if not tuned:
        return [*lines, "No learning-rate variants run yet.", ""]
    for name in tuned:
        suite = SUITES[name]
        direction = "higher" if suite.higher_is_better else "lower"
        lines += [f"### {name} (`{suite.metric}`, {direction} is better)", "", *tuning_table(suite, tree[name]), ""]
    return lines
