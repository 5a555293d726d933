"""The report: the overviews (calibrations, peers side by side), the learning-rate section, the planted family,
the cost table, then every suite's tables, comparisons and rank profiles, rendered from the results tree to
``report.md``, with ``summary.md`` (the peers table for the project README) and ``forest.png`` beside it."""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable

from .cost_table import cost_section
from .family_report import family_section
from .methods import DEFAULT_RUN, SHIPPED_DEFAULT, hindsight_ranks, module_layer
from .overview import calibration_summary, overview_suites, peer_differences, peers_summary, summary_markdown
from .plots import SuiteRow, forest_plot
from .records import final_ranks, load_results, results_root
from .stats import paired, per_seed_differences, spearman, verdict
from .suites import LR_VARIANT_OF, RETIRED, SUITES, Suite
from .tables import PEER_COLUMNS, Results, method_order
from .tuning import tuning_section

#: Pairs the report also compares directly (first - second, paired by seed), where a suite has both: the default
#: against the previous default and against its own ranks shuffled, and allocating before training or with ranks
#: capped at 2r against it; the shipped default started from EVA's initialisation against EVA at uniform ranks.
HEAD_TO_HEAD = [
    (DEFAULT_RUN, "warm-sensitivity-random"),
    (DEFAULT_RUN, "warm-shuffled-random"),
    ("calib-gradient_spectrum-random", DEFAULT_RUN),
    ("fixed-gradient_spectrum-random", DEFAULT_RUN),
    (DEFAULT_RUN + "+max2r", DEFAULT_RUN),
    (SHIPPED_DEFAULT + "+eva", "eva-rho1"),
]


def comparison_line(label: str, a: dict[int, dict], b: dict[int, dict], suite: Suite) -> str:
    """``- label: verdict; per seed ...``: the report's line for one paired comparison a - b."""
    diff = paired(a, b, suite.metric)
    return f"- {label}: {verdict(diff, suite.higher_is_better)}; per seed {per_seed_differences(a, b, suite.metric)}"


def lr_variant_lines(suite_name: str, results: Results) -> list[str]:
    reference_name = LR_VARIANT_OF.get(suite_name)
    if reference_name is None:
        return []
    suite, reference = SUITES[suite_name], load_results(reference_name)
    lines = [
        f"Against {reference_name} (lr {SUITES[reference_name].lr} there, {suite.lr} here; paired by seed, "
        f"this suite - {reference_name}):",
        "",
    ]
    for name in sorted(set(results) & set(reference), key=method_order):
        lines.append(comparison_line(name, results[name], reference[name], suite))
    return [*lines, ""]


def suite_report(suite_name: str, results: Results | None = None) -> str:
    """One suite's section: settings, calibration, the method table, head-to-head and lr pairs, rank profiles."""
    suite = SUITES[suite_name]
    results = load_results(suite_name) if results is None else results
    if not results:
        return f"## {suite_name}\n\nno runs yet\n"
    # GLUE suites also record the dev loss: continuous, so it separates methods that accuracy cannot
    loss = suite.metric != "eval_loss" and all(
        "eval_loss" in r["metrics"] for runs in results.values() for r in runs.values()
    )
    lines = [f"## {suite_name}", "", settings_line(suite), ""]
    lines += calibration_lines(suite, results, loss)
    lines += method_table(suite, results, loss)
    lines += head_to_head_lines(suite, results)
    lines += lr_variant_lines(suite_name, results)
    lines += profile_lines(suite, results)
    return "\n".join(lines)


def settings_line(suite: Suite) -> str:
    return (
        f"Settings: r={suite.r} (budget = uniform LoRA at r), lora_alpha={suite.lora_alpha}, rsLoRA={suite.use_rslora}, "
        f"lr={suite.lr}, {suite.steps} steps of batch {suite.batch_size}, adaptive warmup {suite.warmup} steps, "
        f"min_r={suite.min_r}, max_r={suite.max_r}. Metric: `{suite.metric}` "
        f"({'higher' if suite.higher_is_better else 'lower'} is better). Paired differences: mean over seeds of "
        "(method - lora), same seed = same data order and initialisation, with the half-width of its 95% t "
        "interval; **better**/**worse** when the interval excludes 0, 'inside' otherwise; 'vs default': the same "
        f"against the shipped default (`{SHIPPED_DEFAULT}`)."
    )


def calibration_lines(suite: Suite, results: Results, loss: bool) -> list[str]:
    """lora-4x against lora: does rank bind in this suite?"""
    if "lora-4x" not in results:
        return []
    base = results.get("lora", {})
    calibration = verdict(paired(results["lora-4x"], base, suite.metric), suite.higher_is_better)
    if loss:
        calibration += f"; `eval_loss`: {verdict(paired(results['lora-4x'], base, 'eval_loss'), False)}"
    return [f"**Calibration** (does rank bind?): lora-4x - lora = {calibration}", ""]


def method_table(suite: Suite, results: Results, loss: bool) -> list[str]:
    """One row per method: its metric, the paired differences to lora and to the shipped default, budget used, time
    and rank range."""
    metric, base, default = suite.metric, results.get("lora", {}), results.get(SHIPPED_DEFAULT, {})
    loss_header = " vs lora, `eval_loss` (paired) |" if loss else ""
    lines = [
        f"| method | seeds | {metric} mean ± std | vs lora (paired) | per seed (method - lora) | vs default (paired) |"
        f"{loss_header} adapter params | train s | ranks (min..max, #0) |",
        "|---|---|---|---|---|---|" + ("---|" if loss else "") + "---|---|---|",
    ]
    for name in sorted(results, key=method_order):
        runs = results[name]
        values = [r["metrics"][metric] for r in runs.values()]
        std = statistics.stdev(values) if len(values) > 1 else float("nan")
        seconds = statistics.fmean(r["train_seconds"] for r in runs.values())
        versus = "–" if name == "lora" else verdict(paired(runs, base, metric), suite.higher_is_better)
        per_seed = "–" if name == "lora" else per_seed_differences(runs, base, metric)
        versus_default = (
            "–" if name == SHIPPED_DEFAULT else verdict(paired(runs, default, metric), suite.higher_is_better)
        )
        loss_cell = ""
        if loss:
            loss_cell = " – |" if name == "lora" else f" {verdict(paired(runs, base, 'eval_loss'), False)} |"
        lines.append(
            f"| {name} | {len(values)} | {statistics.fmean(values):.4f} ± {std:.4f} | {versus} | {per_seed} | "
            f"{versus_default} |{loss_cell} {params_cell(runs)} | {seconds:.0f} | {ranks_cell(next(iter(runs.values())))} |"
        )
    return [*lines, ""]


def params_cell(runs: dict[int, dict]) -> str:
    """Mean rank-dependent adapter parameters; full fine-tuning: all weights."""
    if any(run.get("settings", {}).get("method", {}).get("kind") == "full" for run in runs.values()):
        return f"all weights ({statistics.fmean(r['trainable_params'] for r in runs.values()):,.0f})"
    return f"{statistics.fmean(r['adapter_params'] for r in runs.values()):,.0f}"


def ranks_cell(run: dict) -> str:
    """``min..max, #0`` of one run's final ranks (a removed or fully masked module counts 0)."""
    ranks = list(final_ranks(run).values())
    if not ranks:
        return "–"
    return f"{min(ranks)}..{max(ranks)}, {sum(r == 0 for r in ranks)}"


def head_to_head_lines(suite: Suite, results: Results) -> list[str]:
    duels = [(a, b) for a, b in HEAD_TO_HEAD if a in results and b in results]
    if not duels:
        return []
    lines = ["Head to head (paired by seed):", ""]
    for a, b in duels:
        lines.append(comparison_line(f"{a} - {b}", results[a], results[b], suite))
    return [*lines, ""]


def profile_lines(suite: Suite, results: Results) -> list[str]:
    """Where each non-uniform method (and the hindsight allocation) put rank: by module kind, by depth, how
    consistently over seeds, and how close to hindsight."""
    profiles = {name: results[name] for name in sorted(results, key=method_order) if len(results[name]) > 1}
    profiles = {name: runs for name, runs in profiles.items() if _has_ranks(runs) and not _uniform(runs)}
    hindsight = hindsight_runs(suite, results)
    if len(hindsight) > 1:
        profiles["hindsight (lora-4x's update spectra)"] = hindsight
    if not profiles:
        return []
    lines = ["Where the ranks went (mean final rank over seeds; a removed module counts 0):", ""]
    for name, runs in profiles.items():
        layers = 1 + max(module_layer(module) for run in runs.values() for module in final_ranks(run))
        kinds = ", ".join(f"{kind} {rank:.2f}" for kind, rank in mean_rank_by(runs, module_kind).items())
        thirds = mean_rank_by(runs, functools.partial(depth_third, layers=layers))
        thirds = ", ".join(f"{rank:.2f}" for rank in thirds.values())
        agreement = seed_agreement(runs)
        with_hindsight = ""
        if hindsight and runs is not hindsight and set(runs) & set(hindsight):
            with_hindsight = f"; agreement with hindsight (same seed) {rank_agreement(runs, hindsight):.2f}"
        lines.append(
            f"- {name}: by module {kinds}; by depth (first, middle, last third of the layers) {thirds}; "
            f"seed agreement (mean Spearman correlation of the module ranks between two seeds) {agreement:.2f}"
            + with_hindsight
        )
    return [*lines, ""]


def _has_ranks(runs: dict[int, dict]) -> bool:
    return all(final_ranks(run) for run in runs.values())  # not full fine-tuning


def _uniform(runs: dict[int, dict]) -> bool:
    return all(len(set(final_ranks(run).values())) == 1 for run in runs.values())


def module_kind(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``q_proj``; BERT-style names keep the block (``attention.output.dense``)."""
    parts = name.split(".")
    if parts[-1] != "dense":
        return parts[-1]
    if parts[-2] == "output" and not parts[-3].isdigit():
        return ".".join(parts[-3:])
    return ".".join(parts[-2:])


def depth_third(name: str, layers: int) -> str:
    return ("first", "middle", "last")[min(2, 3 * module_layer(name) // max(1, layers))]


def mean_rank_by(runs: dict[int, dict], group: Callable[[str], str]) -> dict[str, float]:
    """Mean final rank per ``group(module name)`` over all seeds, groups in the order the modules come."""
    ranks_by_group: dict[str, list[int]] = {}
    for run in runs.values():
        for name, rank in final_ranks(run).items():
            ranks_by_group.setdefault(group(name), []).append(rank)
    return {key: statistics.fmean(ranks) for key, ranks in ranks_by_group.items()}


def seed_agreement(runs: dict[int, dict]) -> float:
    """Mean Spearman correlation between two seeds' module ranks: near 1 when the signal finds the same modules on
    every seed (structure of the model or task), near 0 when the allocation is seed noise."""
    ranks = [final_ranks(run) for run in runs.values()]
    return statistics.fmean(spearman(a, b) for i, a in enumerate(ranks) for b in ranks[i + 1 :])


def rank_agreement(runs: dict[int, dict], reference: dict[int, dict]) -> float:
    """Mean Spearman correlation of the module ranks with ``reference``'s on the same seed."""
    common = sorted(set(runs) & set(reference))
    return statistics.fmean(spearman(final_ranks(runs[s]), final_ranks(reference[s])) for s in common)


def hindsight_runs(suite: Suite, results: Results) -> dict[int, dict]:
    """Per seed with a ``lora-4x`` run that recorded its update spectra, the hindsight ranks as a run-like record."""
    return {
        seed: {"ranks": hindsight_ranks(suite, run), "allocation": None}
        for seed, run in results.get("lora-4x", {}).items()
        if run.get("update_spectra") and run.get("rank_costs")
    }


#: the forest plot's methods: the README table's (the earlier defaults stay in the report's tables)
FOREST_METHODS = (SHIPPED_DEFAULT, "adalora", "eva", "eva-rho1", "full", "lora-4x", "fixed-hindsight-random")
FOREST_LABELS = {method: PEER_COLUMNS[method] for method in FOREST_METHODS}


def forest_rows(tree: dict[str, Results]) -> list[SuiteRow]:
    """The forest plot's panels: the peers summary's differences (those with an interval), retired suites aside."""
    rows = []
    for name, results in tree.items():
        if name in RETIRED:
            continue
        suite = SUITES[name]
        differences = {m: (d[0], d[2]) for m, d in peer_differences(name, results).items() if d is not None}
        rows.append(SuiteRow(name, suite.metric, suite.higher_is_better, differences))
    return rows


def report(suites: list[str] | None = None) -> str:
    """The report of ``suites`` (default: every suite with results); of all of them, also written to report.md, with
    summary.md and forest.png beside it. A report of some suites holds only their sections and is only printed."""
    root = results_root()
    names = suites or (
        sorted(p.name for p in root.iterdir() if p.is_dir() and p.name in SUITES) if root.is_dir() else []
    )
    tree = {name: load_results(name) for name in names}
    header = "# Allocation benchmarks: raw results rendered\n\n"
    sections = "\n".join(suite_report(name, tree[name]) for name in names)
    if suites:  # report.md always holds every suite; a report of some suites is only printed
        return header + sections
    overview = overview_suites(tree)
    family = {name: results for name, results in tree.items() if name.startswith("family-") and results}
    lines = [
        *calibration_summary(overview),
        *peers_summary(overview),
        "![forest plot](forest.png)" if forest_plot(forest_rows(overview), FOREST_LABELS, root / "forest.png") else "",
        "",
        *tuning_section(tree),
        *family_section(family),
        *cost_section(tree),
    ]
    text = header + "\n".join(lines) + "\n" + sections
    (root / "report.md").write_text(text)
    (root / "summary.md").write_text(summary_markdown(overview))
    return text
