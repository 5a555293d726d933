"""What the report's sections share: the results of a suite by method and seed, the display order of methods, the
compact cell of a paired difference, and Markdown tables."""

from __future__ import annotations

from .methods import DEFAULT_RUNS, EARLIER_DEFAULT, MIGRATE_DEFAULT, PREVIOUS_DEFAULT, SHIPPED_DEFAULT
from .stats import Diff, is_better

Results = dict[str, dict[int, dict]]  # {method: {seed: run record}}

#: The methods of the peers comparison, in column order, with their column titles: uniform LoRA (the reference),
#: the shipped default, PEFT's AdaLoRA and EVA, then the reference columns (calibration, hindsight, full).
PEER_COLUMNS = {
    "lora": "uniform LoRA",
    SHIPPED_DEFAULT: "our default",
    PREVIOUS_DEFAULT: "previous default (consistency_power=2)",
    EARLIER_DEFAULT: "earlier default (score='gradient_spectrum')",
    MIGRATE_DEFAULT: "older default (also optimizer_state='migrate')",
    "adalora": "AdaLoRA",
    "eva": "EVA ρ=2",
    "eva-rho1": "EVA ρ=1",
    "lora-4x": "LoRA 4× (calibration)",
    "fixed-hindsight-random": "hindsight allocation",
    "full": "full fine-tuning",
}


def method_order(name: str) -> tuple:
    """Sort key: uniform LoRA and its calibration first, then the defaults and the oracle, then the rest by name."""
    order = ["lora", "lora-4x", "adaptive", "oracle", *DEFAULT_RUNS]
    return (order.index(name) if name in order else len(order), name)


#: appended to a paired cell where some seed ran on another CPU type for the method than for its reference
CROSSES_MACHINES = " ‡"
CROSSES_MACHINES_NOTE = (
    "‡: on some of the paired seeds the two runs ran on different CPU types (AMD EPYC, Intel Xeon): the difference "
    "then holds the machines' too (at rank 2 on the causal LM the CPU alone moved a result by up to 0.027: "
    "results/allocation/reruns/README.md)."
)


def crosses_machines(runs: dict[int, dict], reference: dict[int, dict]) -> bool:
    """Some seed both have ran on another CPU type (``hardware.cpu``) in ``runs`` than in ``reference``."""
    return any(_cpu(runs[seed]) != _cpu(reference[seed]) for seed in set(runs) & set(reference))


def _cpu(run: dict) -> str | None:
    return (run.get("hardware") or {}).get("cpu")


def machines_mark(runs: dict[int, dict] | None, reference: dict[int, dict]) -> str:
    """:data:`CROSSES_MACHINES` where the pair crosses machines, else nothing."""
    return CROSSES_MACHINES if runs and crosses_machines(runs, reference) else ""


def verdict_word(diff: Diff | None, higher_is_better: bool) -> str:
    """**better** / **worse** outside the 95% interval, "inside" otherwise."""
    if diff is None:
        return "n/a"
    if is_better(diff, higher_is_better):
        return "**better**"
    mean, _, half, _, _ = diff
    return "**worse**" if abs(mean) > half else "inside"


def diff_cell(diff: Diff | None, higher_is_better: bool) -> str:
    """``+0.0123 ± 0.0045 better (3)``: a paired difference, its 95% half-width, the verdict word and the seeds."""
    if diff is None:
        return "–"
    mean, _, half, n, _ = diff
    return f"{mean:+.4f} ± {half:.4f} {verdict_word(diff, higher_is_better)} ({n})"


def share_cell(share: tuple[float, float | None, float | None, int] | None) -> str:
    """``0.56, 95% [0.31, 0.81] (3 seeds)``: a ratio of paired means (:func:`~bench.stats.fieller`), its interval
    ("unbounded" where the denominator is not clearly away from 0) and the seeds it is over."""
    if share is None:
        return "–"
    ratio, low, high, n = share
    interval = "unbounded" if low is None else f"[{low:.2f}, {high:.2f}]"
    return f"{ratio:.2f}, 95% {interval} ({n} seeds)"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table as lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]
