"""The benchmark harness's pure parts (benchmarks/bench/): method names, paired statistics, rank helpers and the
report, on hand-made records; nothing here loads a model or data."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from bench import methods, report, stats  # noqa: E402
from bench.methods import DEFAULT_RUN, Method, parse_method  # noqa: E402
from bench.suites import SUITES  # noqa: E402

# --- method names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("lora", Method("lora", "lora")),
        ("lora-4x", Method("lora-4x", "lora", rank_factor=4)),
        ("adaptive", Method("adaptive", "default")),
        ("adaptive-sensitivity", Method("adaptive-sensitivity", "default", allocation="sensitivity")),
        ("oracle", Method("oracle", "oracle")),
        (DEFAULT_RUN, Method(DEFAULT_RUN, "warm", "gradient_spectrum", "random")),
        (
            DEFAULT_RUN + "+max2r",
            Method(DEFAULT_RUN + "+max2r", "warm", "gradient_spectrum", "random", max_r_factor=2),
        ),
        ("warm-norms-gradient+s5", Method("warm-norms-gradient+s5", "warm", "norms", "gradient", signal_steps=5)),
        ("warm-spectral@0.5-random", Method("warm-spectral@0.5-random", "warm", "spectral", "random", exponent=0.5)),
        ("calib-uniform-gradient", Method("calib-uniform-gradient", "calib", "uniform", "gradient")),
        ("prune-shuffled-random", Method("prune-shuffled-random", "prune", "shuffled", "random")),
        ("fixed-hindsight-random", Method("fixed-hindsight-random", "fixed", "hindsight", "random")),
    ],
)
def test_parse_method_accepts(name, expected):
    assert parse_method(name) == expected


@pytest.mark.parametrize(
    "name, message",
    [
        ("bogus", "unknown method 'bogus': lora, lora-<k>x"),
        ("warm-nonsense-random", "with <alloc> in"),
        ("warm-norms-sideways", "<growth>/<init> in"),
        ("warm-uniform-random", "warm-uniform-\\* would be plain LoRA: use lora"),
        ("fixed-hindsight-gradient", "or fixed-hindsight-random"),
        ("warm-norms-random+x3", "the suffixes are \\+s<signal steps>"),
        ("warm-norms-random+max0r", "K >= 1"),
    ],
)
def test_parse_method_refuses_with_the_grammar(name, message):
    with pytest.raises(SystemExit, match=message):
        parse_method(name)


# --- paired statistics ----------------------------------------------------------------------------------


def runs(*values: float, metric: str = "m", first_seed: int = 0) -> dict[int, dict]:
    """``{seed: record}`` with one metric per seed, seeds counted from ``first_seed``."""
    return {first_seed + i: {"metrics": {metric: v}} for i, v in enumerate(values)}


def test_paired_mean_interval_and_count():
    # differences 0.5, 1.0, 0.5: mean 2/3, std sqrt(1/12), half-width t(2) * std / sqrt(3) = 4.303 / 6
    mean, std, half, n, up = stats.paired(runs(1.0, 2.0, 3.0), runs(0.5, 1.0, 2.5), "m")
    assert mean == pytest.approx(2 / 3)
    assert std == pytest.approx((1 / 12) ** 0.5)
    assert half == pytest.approx(4.303 / 6)
    assert (n, up) == (3, 3)


def test_paired_uses_common_seeds_only():
    a, b = runs(1.0, 2.0, 3.0), runs(0.0, 0.0, first_seed=1)  # seeds 1 and 2 in common
    assert stats.paired_differences(a, b, "m") == {1: 2.0, 2: 3.0}
    assert stats.per_seed_differences(a, b, "m") == "s1 +2.0000, s2 +3.0000"
    assert stats.paired(a, runs(0.0, first_seed=2), "m") is None  # one common seed: no interval
    assert stats.per_seed_differences(a, runs(0.0, first_seed=7), "m") == "–"


def test_verdict_words():
    inside = stats.paired(runs(1.0, 2.0, 3.0), runs(0.5, 1.0, 2.5), "m")
    assert stats.verdict(inside, True) == "+0.6667 ± 0.7172 (3/3 seeds better): inside"
    clear = stats.paired(runs(1.0, 1.1, 0.9), runs(0.0, 0.0, 0.0), "m")  # mean 1, std 0.1
    assert stats.verdict(clear, True) == "+1.0000 ± 0.2484 (3/3 seeds better): **better**"
    assert stats.verdict(clear, False) == "+1.0000 ± 0.2484 (0/3 seeds better): **worse**"
    assert stats.verdict(None, True) == "n/a (need 2+ paired seeds)"


# --- rank helpers ---------------------------------------------------------------------------------------


def test_shuffled_ranks_keeps_the_budget_and_each_cost_groups_ranks():
    ranks = {"a": 1, "b": 2, "c": 8, "d": 4, "e": 0, "f": 3}
    costs = {"a": 10, "b": 10, "c": 10, "d": 25, "e": 25, "f": 25}
    shuffled = methods.shuffled_ranks(ranks, costs, seed=3)
    assert sum(r * costs[n] for n, r in shuffled.items()) == sum(r * costs[n] for n, r in ranks.items())
    for cost in set(costs.values()):
        group = [n for n in ranks if costs[n] == cost]
        assert sorted(shuffled[n] for n in group) == sorted(ranks[n] for n in group)
    assert methods.shuffled_ranks(ranks, costs, seed=3) == shuffled  # the seed decides the permutation
    assert any(methods.shuffled_ranks(ranks, costs, seed=s) != ranks for s in range(5))


def test_hindsight_ranks_from_a_hand_made_spectra_record():
    suite = replace(SUITES["planted"], r=2, min_r=0)  # budget: 2 ranks x 2 modules of cost 100
    source = {
        "suite": "planted",
        "seed": 0,
        "update_spectra": {"layer.0.a": [10.0, 5.0, 1.0], "layer.0.b": [3.0, 0.5]},
        "rank_costs": {"layer.0.a": 100, "layer.0.b": 100},
    }
    # energies per parameter: a 100, 25, 1 and b 9, 0.25; the four best fill the budget of 400
    assert methods.hindsight_ranks(suite, source) == {"layer.0.a": 3, "layer.0.b": 1}
    with pytest.raises(SystemExit, match="ran before runs recorded update spectra"):
        methods.hindsight_ranks(suite, {**source, "update_spectra": None})


def test_module_layer():
    assert methods.module_layer("base_model.model.encoder.layer.5.output.dense") == 5
    assert methods.module_layer("model.layers.12.self_attn.q_proj") == 12
    assert methods.module_layer("classifier") == 0


# --- report ---------------------------------------------------------------------------------------------

MODULES = [f"encoder.layer.{layer}.{kind}" for layer in range(3) for kind in ("attention.self.query", "output.dense")]


def record(method: str, seed: int, gap_closed: float, ranks: list[int], **extra) -> dict:
    return {
        "suite": "planted",
        "method": method,
        "seed": seed,
        "metrics": {"gap_closed": gap_closed},
        "ranks": dict(zip(MODULES, ranks)),
        "allocation": None,
        "adapter_params": 1000 * sum(ranks),
        "train_seconds": 60.0,
        **extra,
    }


@pytest.fixture
def results_tree(tmp_path, monkeypatch):
    """A planted suite with lora, lora-4x (with update spectra: a hindsight allocation) and the default, 3 seeds."""
    monkeypatch.setenv("PEFT_ADAPTIVE_ALLOCATION_RESULTS", str(tmp_path))
    spectra = {name: [4.0 + i, 2.0, 1.0] if i % 2 else [1.0, 0.5, 0.1] for i, name in enumerate(MODULES)}
    records = []
    for seed, (lora, wide, default) in enumerate([(0.10, 0.20, 0.15), (0.12, 0.21, 0.16), (0.11, 0.23, 0.14)]):
        records.append(record("lora", seed, lora, [4] * 6))
        costs = dict.fromkeys(MODULES, 100)
        records.append(record("lora-4x", seed, wide, [16] * 6, update_spectra=spectra, rank_costs=costs))
        allocation = {"step": 30, "scores": [], "removed": []}
        ranks = [2, 8, 1, 6, 3, 4] if seed else [1, 8, 2, 6, 3, 4]
        records.append(record(DEFAULT_RUN, seed, default, ranks, allocation=allocation))
    for run in records:
        path = tmp_path / "planted" / run["method"] / f"seed{run['seed']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(run))
    (tmp_path / "not-a-suite").mkdir()  # ignored: not in SUITES
    return tmp_path


def test_report_renders_a_fake_results_tree(results_tree):
    text = report.report()
    assert (results_tree / "report.md").read_text() == text  # the full report is written
    lines = text.splitlines()
    assert lines[:3] == ["# Allocation benchmarks: raw results rendered", "", "## planted"]
    assert "Settings: r=4 (budget = uniform LoRA at r), lora_alpha=8, rsLoRA=True, lr=0.002" in lines[4]
    assert lines[6] == (
        "**Calibration** (does rank bind?): lora-4x - lora = +0.1033 ± 0.0379 (3/3 seeds better): **better**"
    )
    # rows: lora, lora-4x first, then the rest by name
    assert [line.split(" | ")[0] for line in lines[10:13]] == ["| lora", "| lora-4x", f"| {DEFAULT_RUN}"]
    assert lines[10] == "| lora | 3 | 0.1100 ± 0.0100 | – | – | 24,000 | 60 | 4..4, 0 |"
    assert lines[12] == (
        f"| {DEFAULT_RUN} | 3 | 0.1500 ± 0.0100 | +0.0400 ± 0.0248 (3/3 seeds better): **better** | "
        "s0 +0.0500, s1 +0.0400, s2 +0.0300 | 24,000 | 60 | 1..8, 0 |"
    )
    # seed 0 has two ranks swapped: Spearman 0.94 against seeds 1 and 2, which agree (1.0), so 0.96 on average
    assert lines[14:18] == [
        "Where the ranks went (mean final rank over seeds; a removed module counts 0):",
        "",
        f"- {DEFAULT_RUN}: by module query 2.00, output.dense 6.00; by depth (first, middle, last third of the "
        "layers) 4.83, 3.67, 3.50; seed agreement (mean Spearman correlation of the module ranks between two seeds) "
        "0.96; agreement with hindsight (same seed) 0.88",
        "- hindsight (lora-4x's update spectra): by module query 2.00, output.dense 6.00; by depth (first, middle, "
        "last third of the layers) 4.00, 4.00, 4.00; seed agreement (mean Spearman correlation of the module ranks "
        "between two seeds) 1.00",
    ]


def test_report_of_some_suites_is_only_printed(results_tree):
    text = report.report(["planted", "clm"])
    assert not (results_tree / "report.md").exists()
    assert text.endswith("## clm\n\nno runs yet\n")
