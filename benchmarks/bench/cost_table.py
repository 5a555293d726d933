"""The report's cost table, from what every run records (``cost``): each method's optimizer-step time during its
allocation phase and after it, and its peak memory, as ratios to uniform LoRA on the same suite and seed, and its
one-off costs (EVA's SVD initialisation or a calibration, our reallocation event, AdaLoRA's allocation over the
run) in LoRA steps.

A run's allocation phase is its first ``cost["allocation_steps"]`` steps (our signal steps; AdaLoRA's steps up to
its final budget; none for the others); LoRA's steps over the same window are the reference, medians both. The runs
were made two at a time on a shared 2-core CPU, so these ratios are noisy: a few percent mean nothing.
"""

from __future__ import annotations

import statistics

from .suites import SUITES
from .tables import Results, markdown_table, method_order


def window_ratio(run: dict, lora: dict, during: bool) -> float | None:
    """Median step time of ``run`` over its allocation phase (``during``) or after it, over LoRA's in the same steps."""
    steps = run["cost"]["allocation_steps"]
    if during and steps == 0:
        return None
    window = slice(0, steps) if during else slice(steps, None)
    mine, reference = run["cost"]["step_seconds"][window], lora["cost"]["step_seconds"][window]
    if not mine or not reference:
        return None
    return statistics.median(mine) / statistics.median(reference)


def one_off_seconds(run: dict) -> dict[str, float]:
    """The one-off costs a run recorded, in seconds."""
    cost = run["cost"]
    found = {
        "initialisation": cost.get("init_seconds") or 0.0,
        "reallocation": cost.get("reallocation_seconds") or 0.0,
        "AdaLoRA allocation": sum(cost.get("adalora_allocate_seconds") or []),
    }
    return {name: seconds for name, seconds in found.items() if seconds > 0.0005}


def ratio_cell(ratios: list[float | None]) -> str:
    """The median over seeds of per-seed ratios, with their range."""
    values = [r for r in ratios if r is not None]
    if not values:
        return "–"
    middle = statistics.median(values)
    return f"{middle:.2f}×" if len(values) == 1 else f"{middle:.2f}× ({min(values):.2f}..{max(values):.2f})"


def cost_rows(name: str, results: Results) -> list[list[str]]:
    lora = {s: r for s, r in results.get("lora", {}).items() if "cost" in r}
    rows = []
    for method in sorted(results, key=method_order):
        pairs = [(run, lora[s]) for s, run in results[method].items() if "cost" in run and s in lora]
        if method == "lora" or not pairs:
            continue
        during = [window_ratio(run, ref, during=True) for run, ref in pairs]
        after = [window_ratio(run, ref, during=False) for run, ref in pairs]
        memory = [run["cost"]["peak_rss_mb"] / ref["cost"]["peak_rss_mb"] for run, ref in pairs]
        one_offs: dict[str, list[float]] = {}
        for run, ref in pairs:
            lora_step = statistics.median(ref["cost"]["step_seconds"])
            for kind, seconds in one_off_seconds(run).items():
                one_offs.setdefault(kind, []).append(seconds / lora_step)
        once = "; ".join(f"{kind} {statistics.median(v):.2f}" for kind, v in one_offs.items()) or "–"
        rows.append([name, method, str(len(pairs)), ratio_cell(during), ratio_cell(after), ratio_cell(memory), once])
    return rows


def cost_section(tree: dict[str, Results]) -> list[str]:
    """One row per (suite, method) with cost records beside a LoRA run of the same seed."""
    rows = [row for name, results in tree.items() if name in SUITES for row in cost_rows(name, results)]
    if not rows:
        return []
    header = [
        "suite",
        "method",
        "seeds",
        "step time during allocation (× lora)",
        "step time after (× lora)",
        "peak RSS (× lora)",
        "one-off costs (in LoRA steps)",
    ]
    return [
        "## Cost (CPU, from the runs)",
        "",
        "Ratios to uniform LoRA on the same suite and seed (median over seeds, range in brackets): the median "
        "optimizer-step time over the method's allocation phase (our signal steps; AdaLoRA's steps up to its final "
        "budget) and after it, against LoRA's over the same steps; peak resident memory sampled over "
        "initialisation and training. One-off costs in LoRA's median step times: EVA's SVD initialisation or a "
        "calibration, our reallocation event, AdaLoRA's update_and_allocate summed over the run (also inside its "
        "step times). **Noisy**: the runs ran two at a time on a shared 2-core CPU, not interleaved in one process.",
        "",
        *markdown_table(header, rows),
        "",
    ]
