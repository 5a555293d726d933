"""The report's planted-family section, by the pre-registered rules (benchmarks/RESULTS.md, "the planted family").

Members are the suites ``family-00`` .. (:mod:`bench.family`), one seed (0) each: the members are the replicates.
A member *has something to find* when ``oracle - lora > SOMETHING_TO_FIND``; a method's *share* there is
``(method - lora) / (oracle - lora)``; a method is *worse* on a member when ``method - lora < WORSE`` (2.5x the seed
spread of uniform LoRA on ``planted``). Per group (``member(i).group``: choose / report / held-out, the report members
added unseen from member 12 on), each method's mean share with its 95% t interval over the members with something to
find, and its count of worse members.

Where members also have seeds beyond 0 (pre-registered 2026-12-05: seeds 1-2 of ``lora``, ``oracle`` and the
default on the report members), a second table reads each member on its own, paired by seed: method − lora and
oracle − lora with their 95% t intervals, and the share as the ratio of those means with Fieller's interval; there
a method is worse only when its interval excludes 0 below, so one noisy seed no longer decides. A third table sums
those readings up per group: the mean share over the members where the oracle beats uniform LoRA outside its
interval, and the members where the method is worse outside its own.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from . import family
from .stats import Diff, fieller, is_better, paired_differences, summarise
from .tables import Results, diff_cell, markdown_table, method_order, share_cell

SOMETHING_TO_FIND = 0.02
WORSE = -0.01
SEED = 0
METRIC = "gap_closed"
GROUPS = ("choose", "report", "held-out")  # the values of family.Member.group, in the report's order


def member_index(suite_name: str) -> int:
    return int(suite_name.removeprefix("family-"))


def value(results: Results, method: str) -> float | None:
    run = results.get(method, {}).get(SEED)
    return None if run is None else run["metrics"][METRIC]


def member_facts(results: Results) -> tuple[float | None, float | None]:
    """``(lora, oracle - lora)`` on one member (``None`` where a run is missing)."""
    lora, oracle = value(results, "lora"), value(results, "oracle")
    return lora, None if lora is None or oracle is None else oracle - lora


def share(results: Results, method: str) -> tuple[float | None, bool]:
    """The method's share of the oracle gap on one member (``None``: nothing to find, or not run) and whether it is
    worse than uniform LoRA there."""
    lora, gap = member_facts(results)
    mine = value(results, method)
    if mine is None or lora is None:
        return None, False
    worse = mine - lora < WORSE
    if gap is None or gap <= SOMETHING_TO_FIND:
        return None, worse
    return (mine - lora) / gap, worse


def family_methods(tree: dict[str, Results]) -> list[str]:
    names = {m for results in tree.values() for m in results} - {"lora", "oracle"}
    return sorted(names, key=method_order)


def member_rows(tree: dict[str, Results], methods: list[str]) -> list[list[str]]:
    rows = []
    for name, results in sorted(tree.items()):
        member = family.member(member_index(name))
        _, gap = member_facts(results)
        cells = []
        for method in methods:
            mine, worse = share(results, method)
            ran = value(results, method) is not None
            text = "–" if mine is None else f"{mine:.2f}"
            cells.append(text + (" ✗" if worse else "") if ran else "")
        rows.append(
            [
                name,
                member.group,
                member.teacher,
                str(member.r),
                str(len(member.changes)),
                "–" if gap is None else f"{gap:+.4f}",
                "yes" if gap is not None and gap > SOMETHING_TO_FIND else "no",
                *cells,
            ]
        )
    return rows


def mean_share_cell(shares: list[float]) -> str:
    """``0.51 ± 1.42``: the mean share with the half-width of its 95% t interval (one share: itself; none: '–')."""
    stats = summarise(shares)
    if stats is not None:
        return f"{stats[0]:.2f} ± {stats[2]:.2f}"
    return f"{statistics.fmean(shares):.2f}" if shares else "–"


def group_rows(tree: dict[str, Results], methods: list[str]) -> list[list[str]]:
    rows = []
    for group in GROUPS:
        members = {n: r for n, r in tree.items() if family.member(member_index(n)).group == group}
        for method in methods:
            outcomes = [share(results, method) for results in members.values() if value(results, method) is not None]
            if not outcomes:
                continue
            shares = [s for s, _ in outcomes if s is not None]
            worse = sum(w for _, w in outcomes)
            rows.append([group, method, mean_share_cell(shares), str(len(shares)), f"{worse}/{len(outcomes)}"])
    return rows


@dataclass(frozen=True)
class SeededReading:
    """One member and method read over the seeds the method, uniform LoRA and the oracle all have (two or more)."""

    member: str
    method: str
    gain: Diff  # method − lora, paired by seed
    gap: Diff  # oracle − lora, paired by seed
    share: tuple[float, float | None, float | None] | None  # mean(gain) / mean(gap), Fieller's 95% interval

    @property
    def something_to_find(self) -> bool:
        return is_better(self.gap, higher_is_better=True)

    @property
    def worse(self) -> bool:
        return is_better(self.gain, higher_is_better=False)  # below 0 outside its interval


def seeded_readings(tree: dict[str, Results], methods: list[str]) -> list[SeededReading]:
    readings = []
    for name, results in sorted(tree.items()):
        lora, oracle = results.get("lora", {}), results.get("oracle", {})
        for method in methods:
            gain = paired_differences(results.get(method, {}), lora, METRIC)
            gap = paired_differences(oracle, lora, METRIC)
            seeds = sorted(set(gain) & set(gap))  # the seeds the method, uniform LoRA and the oracle all have
            if len(seeds) < 2:
                continue
            gains, gaps = [gain[s] for s in seeds], [gap[s] for s in seeds]
            readings.append(SeededReading(name, method, summarise(gains), summarise(gaps), fieller(gains, gaps)))
    return readings


def seeded_rows(readings: list[SeededReading]) -> list[list[str]]:
    """Per member and method: method − lora and oracle − lora (mean ± 95% half-width, verdict, seeds) and the share
    with its Fieller interval."""
    return [
        [
            r.member,
            family.member(member_index(r.member)).group,
            r.method,
            diff_cell(r.gain, True),
            diff_cell(r.gap, True),
            share_cell(None if r.share is None else (*r.share, r.gain[3])),
        ]
        for r in readings
    ]


def seeded_group_rows(readings: list[SeededReading]) -> list[list[str]]:
    """Per group and method, over the members read with seeds: the mean share over those where the oracle beats
    uniform LoRA outside its interval (± 95% t half-width over the members), and the members where the method is
    worse than uniform LoRA outside its interval. A method's row needs every member of the group that any method was
    read on with seeds, so that no method's row rests on a subset."""
    rows = []
    for group in GROUPS:
        members = sorted({r.member for r in readings if family.member(member_index(r.member)).group == group})
        for method in sorted({r.method for r in readings}, key=method_order):
            mine = [r for r in readings if r.method == method and r.member in members]
            if not mine or len(mine) < len(members):
                continue
            shares = [r.share[0] for r in mine if r.something_to_find and r.share is not None]
            seeds = sorted({r.gain[3] for r in mine})
            rows.append(
                [
                    group,
                    method,
                    mean_share_cell(shares),
                    str(len(shares)),
                    f"{sum(r.worse for r in mine)}/{len(mine)}",
                    "/".join(map(str, seeds)),
                ]
            )
    return rows


def version_settings() -> str:
    """``MiniLM 200 / 20, SmolLM2 800 / 200``: each teacher's steps per run and signal steps in this version."""
    names = {"minilm": "MiniLM", "smollm2": "SmolLM2"}
    return ", ".join(f"{names[t]} {family.RUN_STEPS[t]} / {family.SIGNAL_STEPS[t]}" for t in family.TEACHERS)


def family_section(tree: dict[str, Results]) -> list[str]:
    """Per member and per group, as pre-registered; ``tree`` holds the family suites with runs."""
    if not tree:
        return []
    methods = family_methods(tree)
    member_header = ["member", "group", "teacher", "r", "changed modules", "oracle − lora", "something to find"]
    return [
        "## The planted family",
        "",
        f"One seed ({SEED}) per member; metric `{METRIC}` (share of the teacher gap closed on held-out sentences). "
        f"Something to find: oracle − lora > {SOMETHING_TO_FIND}. Each method's cell: its share of the oracle gap, "
        f"(method − lora) / (oracle − lora), where there is something to find ('–' elsewhere); ✗: worse than uniform "
        f"LoRA (method − lora < {WORSE}); empty: not run. Family v{family.FAMILY_VERSION}: steps per run and signal "
        f"steps by teacher, {version_settings()} (the v2 SmolLM2 records, at 200 and 20: "
        "benchmarks/results/allocation-family-v2/).",
        "",
        *markdown_table(member_header + methods, member_rows(tree, methods)),
        "",
        "Per group (choose; report; held-out: the report members added unseen from member 12 on): mean share ± half-width of the 95% t interval over the members with something to find (n), and "
        "the members where the method is worse than uniform LoRA (of those it ran on).",
        "",
        *markdown_table(["group", "method", "mean share", "n", "worse"], group_rows(tree, methods)),
        "",
        *seeded_section(tree, methods),
    ]


def seeded_section(tree: dict[str, Results], methods: list[str]) -> list[str]:
    readings = seeded_readings(tree, methods)
    if not readings:
        return []
    return [
        "Members with more seeds, each read on its own, paired by seed (seeds all of method, lora and oracle have): "
        "the differences with their 95% t intervals, **worse**/**better** only outside them; the share is "
        "mean(method − lora) / mean(oracle − lora) with Fieller's 95% interval.",
        "",
        *markdown_table(
            ["member", "group", "method", "method − lora", "oracle − lora", "share"], seeded_rows(readings)
        ),
        "",
        "The same per group, where the method has seeds on every member read here: mean share ± half-width of the "
        "95% t interval over the members where the oracle beats uniform LoRA outside its interval (n), and the "
        "members where the method is **worse** than uniform LoRA outside its interval.",
        "",
        *markdown_table(["group", "method", "mean share", "n", "worse", "seeds"], seeded_group_rows(readings)),
        "",
    ]
