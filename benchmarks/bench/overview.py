"""The report's overviews, one row per suite: the two calibrations (is there something to find?) with the default's
captured share of the hindsight gain, and the peers side by side (each method against uniform LoRA), which is also
written as ``summary.md`` for the project README and drawn as the forest plot.

The rules are the pre-registered ones (benchmarks/RESULTS.md, "Where does allocation pay?"): check 1, rank binds,
``lora-4x - lora`` better outside the paired 95% t interval; check 2, allocation can pay,
``fixed-hindsight-random - lora`` better outside it; on a suite passing both, the shipped default's captured share
``mean(default - lora) / mean(hindsight - lora)`` over the seeds all three have, with its 95% Fieller interval.
A last column, a reference and not a check, shows where it was run the default's own ranks trained from step 0.

Check 2′, registered for budgets that hold an embedding (RESULTS.md, "with the embedding held at min_r"), where
check 2's rule misprices the embedding: ``fixed-embedmin_hindsight-random - fixed-embedmin-random`` (hindsight over
the linear modules against the hand rule, the embedding at ``min_r`` in both) better outside the interval; where it
passes, the default's share of that gain, ``mean(default - hand rule) / mean(hindsight′ - hand rule)``.
"""

from __future__ import annotations

from .methods import (
    SHIPPED_DEFAULT,
    SHIPPED_DEFAULT_RANKS_FROM_START,
    SHIPPED_DEFAULT_SHUFFLED,
    parse_method,
)
from .peers import unfit_reason
from .stats import Diff, fieller, is_better, paired, paired_differences, verdict
from .suites import RETIRED, SUITES, suite_model
from .tables import CROSSES_MACHINES_NOTE, PEER_COLUMNS, Results, diff_cell, machines_mark, markdown_table, share_cell

RANK_BINDS, CAN_PAY = "lora-4x", "fixed-hindsight-random"
HAND_RULE, CAN_PAY_EMBEDDING_HELD = "fixed-embedmin-random", "fixed-embedmin_hindsight-random"  # check 2′
Tree = dict[str, Results]  # {suite: its results}, the suites an overview covers


def overview_suites(tree: Tree) -> Tree:
    """The suites the overviews cover: those with runs, the planted family aside (its own section)."""
    return {name: results for name, results in tree.items() if results and not name.startswith("family-")}


# --- calibrations ------------------------------------------------------------------------------------------


def captured_share(
    results: Results, metric: str, hindsight_method: str = CAN_PAY, baseline: str = "lora"
) -> tuple[float, float | None, float | None, int] | None:
    """The default's share of the hindsight gain over ``baseline`` with its Fieller interval, and the seeds it is
    over."""
    base = results.get(baseline, {})
    default = paired_differences(results.get(SHIPPED_DEFAULT, {}), base, metric)
    hindsight = paired_differences(results.get(hindsight_method, {}), base, metric)
    seeds = sorted(set(default) & set(hindsight))
    ratio = fieller([default[s] for s in seeds], [hindsight[s] for s in seeds])
    return None if ratio is None else (*ratio, len(seeds))


def checks_against(
    results: Results, baseline: str, methods: tuple[str, ...], name: str
) -> tuple[list[Diff | None], list[str]]:
    """Each of ``methods``' paired difference to ``baseline`` on suite ``name`` (``None``: not run) and its cell:
    the verdict with the cross-machine mark, or "–"."""
    suite, base = SUITES[name], results.get(baseline, {})
    diffs = [paired(results[method], base, suite.metric) if method in results else None for method in methods]
    cells = [
        verdict(diff, suite.higher_is_better) + machines_mark(results.get(method), base) if diff else "–"
        for method, diff in zip(methods, diffs)
    ]
    return diffs, cells


def calibration_rows(tree: Tree) -> list[list[str]]:
    rows = []
    for name, results in tree.items():
        suite = SUITES[name]
        methods = (RANK_BINDS, CAN_PAY, SHIPPED_DEFAULT_RANKS_FROM_START)
        (rank_binds, can_pay, _), (check_1, check_2, from_start) = checks_against(results, "lora", methods, name)
        both = is_better(rank_binds, suite.higher_is_better) and is_better(can_pay, suite.higher_is_better)
        share = share_cell(captured_share(results, suite.metric)) if both else "–"
        rows.append([name, f"`{suite.metric}`", check_1, check_2, "✓" if both else "", share, from_start])
    return rows


def calibration_summary(tree: Tree) -> list[str]:
    """The summary table at the top of the report: both checks per suite, the suites passing both marked."""
    header = [
        "suite",
        "metric",
        "check 1, rank binds: lora-4x − lora",
        "check 2, allocation can pay: fixed-hindsight-random − lora",
        "both",
        f"default's captured share of the hindsight gain (`{SHIPPED_DEFAULT}`)",
        f"reference: the default's ranks from step 0 − lora (`{SHIPPED_DEFAULT_RANKS_FROM_START}`)",
    ]
    return [
        "## Summary: is there something to find?",
        "",
        "Paired by seed, mean ± half-width of the 95% t interval (seeds where the method is better / seeds); a check "
        "passes when the difference is **better** outside the interval (pre-registered in benchmarks/RESULTS.md). "
        "On the suites passing both (✓): the shipped default's share of the hindsight gain, "
        "mean(default − lora) / mean(hindsight − lora), with its 95% Fieller interval. The last column is a "
        "reference, not a check: plain LoRA trained from step 0 at the ranks the same seed's default run ended with "
        "(does the default's allocation pay without its two-phase run?).",
        "",
        *markdown_table(header, calibration_rows(tree)),
        "",
        CROSSES_MACHINES_NOTE,
        "",
        *retired_note(tree),
        *embedding_held_summary(tree),
    ]


def embedding_held_summary(tree: Tree) -> list[str]:
    """Check 2′ on the suites where it was run (budgets that hold an embedding), against the hand rule."""
    rows = []
    for name, results in tree.items():
        if CAN_PAY_EMBEDDING_HELD not in results or HAND_RULE not in results:
            continue
        suite, methods = SUITES[name], (CAN_PAY_EMBEDDING_HELD, SHIPPED_DEFAULT, SHIPPED_DEFAULT_RANKS_FROM_START)
        (can_pay, _, _), (check, default_cell, from_start_cell) = checks_against(results, HAND_RULE, methods, name)
        _, (against_shuffled,) = checks_against(results, SHIPPED_DEFAULT_SHUFFLED, (SHIPPED_DEFAULT,), name)
        passes = is_better(can_pay, suite.higher_is_better)
        share = captured_share(results, suite.metric, CAN_PAY_EMBEDDING_HELD, HAND_RULE) if passes else None
        rows.append(
            [
                name,
                f"`{suite.metric}`",
                check,
                default_cell,
                "✓" if passes else "",
                share_cell(share),
                from_start_cell,
                against_shuffled,
            ]
        )
    if not rows:
        return []
    header = [
        "suite",
        "metric",
        f"check 2′, placement among the linear modules can pay: {CAN_PAY_EMBEDDING_HELD} − {HAND_RULE}",
        f"the default − {HAND_RULE}",
        "passes",
        "default's captured share of that gain",
        f"reference: the default's ranks from step 0 − {HAND_RULE}",
        f"reference: the default − its ranks shuffled (`{SHIPPED_DEFAULT_SHUFFLED}`)",
    ]
    return [
        "Check 2′, for budgets that hold an embedding, where check 2 misprices it (its rule gives the embedding the "
        f"most rank; pre-registered in benchmarks/RESULTS.md): against the hand rule (`{HAND_RULE}`: the embedding "
        "at min_r, the rest spread at random), the embedding at min_r too and the linear modules ranked by hindsight. "
        "Where it passes, the default's share of that gain, mean(default − hand rule) / mean(hindsight′ − hand "
        "rule), with its 95% Fieller interval. The last column, a reference: the default's final ranks trained from "
        "step 0 (its embedding at min_r too), against the hand rule: does the default's placement pay by itself? And the "
        "default against its own run with its final ranks permuted among modules of equal cost per rank (the "
        "embedding, alone in its cost, keeps its rank): does its placement pay inside its two-phase run?",
        "",
        *markdown_table(header, rows),
        "",
    ]


def retired_note(tree: Tree) -> list[str]:
    """Why some suites in the summary have no checks: retired, kept as measured (``suites.RETIRED``)."""
    retired = [f"{name} ({RETIRED[name]})" for name in tree if name in RETIRED]
    return [f"Retired suites, kept as measured and not calibrated: {'; '.join(retired)}.", ""] if retired else []


# --- peers -------------------------------------------------------------------------------------------------


def peer_differences(name: str, results: Results) -> dict[str, Diff | None]:
    """Each peers-comparison method's paired difference to uniform LoRA on suite ``name`` (absent: not run)."""
    suite, lora = SUITES[name], results.get("lora", {})
    return {m: paired(results[m], lora, suite.metric) for m in PEER_COLUMNS if m in results and m != "lora"}


def peer_columns(tree: Tree) -> list[str]:
    """The columns: every method of ``PEER_COLUMNS``, full fine-tuning only where some suite ran it."""
    ran_full = any("full" in results for results in tree.values())
    return [m for m in PEER_COLUMNS if m != "full" or ran_full]


def peer_rows(tree: Tree) -> list[list[str]]:
    columns = peer_columns(tree)
    rows = []
    for name, results in tree.items():
        suite = SUITES[name]
        if "lora" not in results:
            continue
        values = [run["metrics"][suite.metric] for run in results["lora"].values()]
        direction = "↑" if suite.higher_is_better else "↓"
        cells = [f"{sum(values) / len(values):.4f} ({len(values)})"]
        differences = peer_differences(name, results)
        cells += [
            "n/a"
            if m not in differences and unfit_reason(parse_method(m), suite, suite_model(suite))
            else diff_cell(differences.get(m), suite.higher_is_better) + machines_mark(results.get(m), results["lora"])
            for m in columns
            if m != "lora"
        ]
        rows.append([f"{name} (`{suite.metric}` {direction})", *cells])
    return rows


def peers_table(tree: Tree) -> list[str]:
    header = ["suite (metric, ↑ higher / ↓ lower is better)", *(PEER_COLUMNS[m] for m in peer_columns(tree))]
    return markdown_table(header, peer_rows(tree))


PEERS_NOTE = (
    "Each cell: method − uniform LoRA, paired by seed, mean ± half-width of the 95% t interval, **better**/**worse** "
    "when the interval excludes 0 (inside otherwise), (seeds); the uniform LoRA column is its mean metric (seeds). "
    "Every method at the suite's learning rate and the same final budget as uniform LoRA at rank r (AdaLoRA and EVA "
    "budget ranks, not parameters: their counts are in each suite's table); LoRA 4× (4× the budget) and the "
    "hindsight allocation are references, not competitors. '–': not run; 'n/a': the method cannot run there "
    "(PEFT's AdaLoRA cannot adapt an embedding; full fine-tuning runs on the MiniLM suites only, this CPU). "
    + CROSSES_MACHINES_NOTE
)


def peers_summary(tree: Tree) -> list[str]:
    """The peers side by side, one row per suite (report.md's section)."""
    return ["## Peers side by side: each method against uniform LoRA", "", PEERS_NOTE, "", *peers_table(tree), ""]


def summary_markdown(tree: Tree) -> str:
    """``summary.md``: the peers table, compact, for the project README to copy."""
    return "\n".join(
        [
            "<!-- written by `python benchmarks/allocation_bench.py report` from benchmarks/results/allocation/ -->",
            "",
            *peers_table(tree),
            "",
            PEERS_NOTE,
            "",
        ]
    )
