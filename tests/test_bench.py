"""The benchmark harness's pure parts (benchmarks/bench/): method names, paired statistics, rank helpers and the
report, on hand-made records; nothing here loads a model or data."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from bench import family, methods, report, stats, suites, tuning  # noqa: E402
from bench.methods import (  # noqa: E402
    DEFAULT_RUN,
    SHIPPED_DEFAULT,
    SHIPPED_DEFAULT_RANKS_FROM_START,
    SHIPPED_DEFAULT_SHUFFLED,
    Method,
    parse_method,
)
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
        ("oracle+max2r", Method("oracle+max2r", "oracle", max_r_factor=2)),
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
        ("fixed-embedmin-random", Method("fixed-embedmin-random", "fixed", "embedmin", "random")),
        (
            "fixed-embedmin_hindsight-random",
            Method("fixed-embedmin_hindsight-random", "fixed", "embedmin_hindsight", "random"),
        ),
        ("adalora", Method("adalora", "adalora")),
        ("eva", Method("eva", "eva", eva_rho=2.0)),
        ("eva-rho1", Method("eva-rho1", "eva", eva_rho=1.0)),
        ("full", Method("full", "full")),
        ("lora+lr0.5x", Method("lora+lr0.5x", "lora", lr_factor=0.5)),
        ("lora-4x+lr2x", Method("lora-4x+lr2x", "lora", rank_factor=4, lr_factor=2.0)),
        ("adalora+lr2x", Method("adalora+lr2x", "adalora", lr_factor=2.0)),
        ("eva-rho1+lr1x", Method("eva-rho1+lr1x", "eva", eva_rho=1.0)),
        ("warm-norms-random+eva", Method("warm-norms-random+eva", "warm", "norms", "random", eva_rho=1.0)),
        (
            "warm-consistent_spectrum2-random+max2r+reset+gate1.02",
            Method(
                "warm-consistent_spectrum2-random+max2r+reset+gate1.02",
                "warm",
                "consistent_spectrum2",
                "random",
                max_r_factor=2,
                optimizer_state="reset",
                min_predicted_gain=1.02,
            ),
        ),
        (
            SHIPPED_DEFAULT + "+lr2x",
            Method(
                SHIPPED_DEFAULT + "+lr2x",
                "warm",
                "consistent_spectrum4",
                "random",
                max_r_factor=2,
                lr_factor=2.0,
                optimizer_state="reset",
            ),
        ),
        (
            DEFAULT_RUN + "+max2r+rankscale",
            Method(
                DEFAULT_RUN + "+max2r+rankscale",
                "warm",
                "gradient_spectrum",
                "random",
                max_r_factor=2,
                resize_scaling="rank",
            ),
        ),
    ],
)
def test_parse_method_accepts(name, expected):
    assert parse_method(name) == expected


def test_learning_rates_and_grid_names():
    suite = SUITES["planted"]
    assert methods.method_lr(parse_method("lora"), suite) == suite.lr  # the shared lr, bit for bit
    assert methods.method_lr(parse_method("adalora+lr0.5x"), suite) == 0.5 * suite.lr
    assert methods.method_lr(parse_method("full"), suite) == methods.FULL_LR == 5e-5
    assert methods.method_lr(parse_method("full+lr2x"), suite) == 1e-4
    assert methods.base_name(SHIPPED_DEFAULT + "+lr0.5x") == SHIPPED_DEFAULT
    assert methods.with_lr_factor("eva", 0.5) == "eva+lr0.5x" and methods.with_lr_factor("eva", 1.0) == "eva"
    assert SHIPPED_DEFAULT == "warm-consistent_spectrum4-random+max2r+reset"


@pytest.mark.parametrize(
    "grid, higher_is_better, chosen",
    [
        ({0.5: 0.1, 1.0: 0.3, 2.0: 0.2}, True, 1.0),  # inside the grid: the doublings are not read
        ({0.5: 0.1, 1.0: 0.3, 2.0: 0.2, 4.0: 0.9}, True, 1.0),
        ({0.5: 0.1, 1.0: 0.2, 2.0: 0.3}, True, 2.0),  # at the top, x4 not run: the top
        ({0.5: 0.1, 1.0: 0.2, 2.0: 0.3, 4.0: 0.25}, True, 2.0),
        ({0.5: 0.1, 1.0: 0.2, 2.0: 0.3, 4.0: 0.4, 8.0: 0.35}, True, 4.0),
        ({0.5: 0.1, 1.0: 0.2, 2.0: 0.3, 4.0: 0.4, 8.0: 0.5}, True, 8.0),
        ({0.5: 0.1, 1.0: 0.2, 2.0: 0.3, 8.0: 0.9}, True, 2.0),  # x8 only joins after x4
        ({0.5: 3.0, 1.0: 2.0, 2.0: 1.0, 4.0: 0.5}, False, 4.0),  # a loss: lower is better
        ({0.5: 0.1, 1.0: 0.3, 2.0: 0.3}, True, 1.0),  # ties: the suite's own rate
        ({0.5: 0.1, 1.0: None, 2.0: 0.3, 4.0: 0.5}, True, None),  # the base grid incomplete: not tuned
    ],
)
def test_the_learning_rate_grid_grows_past_its_top_only_while_the_top_is_best(grid, higher_is_better, chosen):
    full = {factor: grid.get(factor) for factor in tuning.LR_GRID + tuning.EDGE_STEPS}
    assert tuning.chosen_factor(full, higher_is_better) == chosen


def test_the_embedding_suites_are_their_text_suites_with_the_input_embedding_adapted_too():
    from bench.tasks.clm import LLAMA_TARGETS, CausalLMTask

    task = CausalLMTask.__new__(CausalLMTask)  # targets() reads only the suite: no model or data loaded
    for plain, name in (("clm-cipher", "clm-cipher-emb"), ("clm-wiki", "clm-wiki-emb")):
        expected = replace(SUITES[plain], name=name, settings={**SUITES[plain].settings, "embeddings": True})
        assert SUITES[name] == expected
        for suite, extra in ((SUITES[plain], []), (SUITES[name], ["embed_tokens"])):
            task.suite = suite
            assert task.targets() == LLAMA_TARGETS + extra


def test_methods_that_cannot_run_on_a_suite_are_refused_before_any_run():
    from bench.peers import refuse_unfit
    from bench.suites import suite_model
    from bench.tasks import task_class

    assert [suite_model(SUITES[s]) for s in ("planted", "glue-sst2", "distill-pinv")] == ["minilm"] * 3
    assert [suite_model(SUITES[s]) for s in ("clm-wiki", "clm-cipher", "family-01")] == ["smollm2"] * 3
    assert suite_model(SUITES["family-00"]) == "minilm"
    for suite in SUITES.values():  # the name rule agrees with the model each task class loads
        if "teacher" not in suite.settings:
            assert suite_model(suite) == task_class(suite).model_name, suite.name
    refuse_unfit(parse_method("full"), SUITES["glue-sst2"], "minilm")
    refuse_unfit(parse_method("adalora"), SUITES["clm-wiki"], "smollm2")
    with pytest.raises(
        SystemExit, match=r"full\+lr2x: full fine-tuning runs on the MiniLM suites only .*not on clm-wiki"
    ):
        refuse_unfit(parse_method("full+lr2x"), SUITES["clm-wiki"], "smollm2")
    with pytest.raises(SystemExit, match="AdaLoRA cannot adapt an nn.Embedding.*not on clm-wiki-emb"):
        refuse_unfit(parse_method("adalora"), SUITES["clm-wiki-emb"], "smollm2")


@pytest.mark.parametrize(
    "name, message",
    [
        ("bogus", "unknown method 'bogus': lora, lora-<k>x"),
        ("warm-nonsense-random", "with <alloc> in"),
        ("warm-norms-sideways", "<growth>/<init> in"),
        ("warm-uniform-random", "warm-uniform-\\* would be plain LoRA: use lora"),
        (
            "fixed-hindsight-gradient",
            "fixed-hindsight-random, fixed-embedmin-random or fixed-embedmin_hindsight-random",
        ),
        ("warm-norms-random+x3", "the suffixes are \\+s<signal steps>"),
        ("warm-norms-random+max0r", "K >= 1"),
        ("adalora+s5", "\\+lr<k>x \\(the learning rate times k"),
        ("lora+max2r", "for warm/grow/prune/calib/fixed methods"),
        ("fixed-norms-random+gate1.02", "\\+gate<g> \\(min_predicted_gain=g"),
        ("eva+lr0x", "needs k > 0"),
        ("eva-rho3", "unknown method 'eva-rho3'"),
        ("calib-norms-random+eva", "\\+eva \\(EVA's initialisation at rho=1\\) for warm/grow/prune"),
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


def test_fieller_against_a_hand_computation():
    # x = default - lora, y = hindsight - lora on three seeds
    x, y = [0.03, 0.05, 0.04], [0.06, 0.07, 0.08]
    # means 0.04, 0.07; variances 1e-4, 1e-4; covariance 5e-5; t(2) = 4.303, t^2 / n = 18.515809 / 3
    t2n = 4.303**2 / 3
    a = 0.07**2 - t2n * 1e-4  # 0.0042828: > 0, a bounded interval
    b = 0.04 * 0.07 - t2n * 5e-5  # 0.0024914
    c = 0.04**2 - t2n * 1e-4  # 0.0009828
    low, high = (b - (b * b - a * c) ** 0.5) / a, (b + (b * b - a * c) ** 0.5) / a
    assert (round(low, 4), round(high, 4)) == (0.2517, 0.9118)  # sqrt(b^2 - ac) = 0.0014135
    assert stats.fieller(x, y) == pytest.approx((0.04 / 0.07, low, high))
    assert stats.fieller(x, [0.01, -0.02, 0.015]) == (pytest.approx(24.0), None, None)  # mean y 0.005 / 3: unbounded
    assert stats.fieller([1.0], [2.0]) is None


def test_is_better_and_summarise():
    assert stats.is_better(stats.summarise([1.0, 1.1, 0.9]), True)
    assert not stats.is_better(stats.summarise([1.0, 1.1, 0.9]), False)
    assert not stats.is_better(stats.summarise([1.0, -1.0, 0.5]), True)
    assert not stats.is_better(None, True) and stats.summarise([1.0]) is None


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
    # a held module keeps its rank outside the rule and the others share what is left: b held at 0, a takes the
    # whole 400 (the rule spends the budget); b held at 2 (200), a gets the other 200 although b's energies are lower
    assert methods.hindsight_ranks(suite, source, held={"layer.0.b": 0}) == {"layer.0.a": 4, "layer.0.b": 0}
    assert methods.hindsight_ranks(suite, source, held={"layer.0.b": 2}) == {"layer.0.a": 2, "layer.0.b": 2}


def test_embedding_min_ranks_gives_what_the_embedding_frees_to_the_other_modules_evenly():
    costs = {"embed": 100, "a": 10, "b": 10, "c": 25}
    ranks = methods.embedding_min_ranks(costs, {"embed"}, r=2, min_r=1, seed=0)
    # 100 freed: a, b, c one rank each (45), again (90), then the 10 left fits one more rank of a or b
    assert ranks["embed"] == 1 and ranks["c"] == 4 and sorted([ranks["a"], ranks["b"]]) == [4, 5]
    assert sum(costs[n] * ranks[n] for n in costs) == 2 * sum(costs.values())
    winners = {max("ab", key=methods.embedding_min_ranks(costs, {"embed"}, 2, 1, seed).get) for seed in range(8)}
    assert winners == {"a", "b"}  # the seed decides which module gets the odd rank
    model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(4, 2), "a": torch.nn.Linear(2, 2)})
    assert methods.embedding_names(model, ["embed", "a"], "fixed-embedmin-random") == {"embed"}
    with pytest.raises(SystemExit, match="fixed-embedmin-random: the suite adapts no embedding"):
        methods.embedding_names(model, ["a"], "fixed-embedmin-random")


def test_module_layer():
    assert methods.module_layer("base_model.model.encoder.layer.5.output.dense") == 5
    assert methods.module_layer("model.layers.12.self_attn.q_proj") == 12
    assert methods.module_layer("classifier") == 0


# --- report ---------------------------------------------------------------------------------------------

MODULES = [f"encoder.layer.{layer}.{kind}" for layer in range(3) for kind in ("attention.self.query", "output.dense")]


def record(method: str, seed: int, gap_closed: float, ranks: list[int], suite: str = "planted", **extra) -> dict:
    return {
        "suite": suite,
        "method": method,
        "seed": seed,
        "metrics": {"gap_closed": gap_closed},
        "ranks": dict(zip(MODULES, ranks)),
        "allocation": None,
        "adapter_params": 1000 * sum(ranks),
        "train_seconds": 60.0,
        **extra,
    }


def write(root: Path, records: list[dict]) -> None:
    for run in records:
        path = root / run["suite"] / run["method"] / f"seed{run['seed']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(run))


def amend(root: Path, suite: str, method: str, seed: int, **fields) -> None:
    """Add or replace ``fields`` in a written record."""
    path = root / suite / method / f"seed{seed}.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


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
    write(tmp_path, records)
    (tmp_path / "not-a-suite").mkdir()  # ignored: not in SUITES
    return tmp_path


def section(text: str, title: str) -> list[str]:
    """The lines of the report's section ``## title`` (up to the next ``## ``)."""
    lines = text.splitlines()
    start = lines.index(f"## {title}")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def test_fixed_copies_the_in_place_runs_ranks_with_or_without_reset(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_ADAPTIVE_ALLOCATION_RESULTS", str(tmp_path))
    fixed = parse_method("fixed-norms-random+max2r")
    with pytest.raises(SystemExit, match="run warm-norms-random\\+max2r first"):
        methods.fixed_ranks("planted", fixed, 0)
    allocation = {"step": 30, "scores": [], "removed": [MODULES[5]]}
    reset_run = record("warm-norms-random+max2r+reset", 0, 0.1, [1, 8, 2, 6, 3], allocation=allocation)
    write(tmp_path, [reset_run])
    assert methods.fixed_ranks("planted", fixed, 0) == dict(zip(MODULES, [1, 8, 2, 6, 3, 0]))
    write(tmp_path, [record("warm-norms-random+max2r", 0, 0.1, [4] * 6)])  # the run without +reset comes first
    assert methods.fixed_ranks("planted", fixed, 0) == dict.fromkeys(MODULES, 4)
    # the report's reference column: the shipped default's own ranks, read from its (+reset) run
    write(tmp_path, [record(SHIPPED_DEFAULT, 0, 0.1, [2, 6, 2, 6, 4, 4])])
    replay = parse_method(SHIPPED_DEFAULT_RANKS_FROM_START)
    assert methods.fixed_ranks("planted", replay, 0) == dict(zip(MODULES, [2, 6, 2, 6, 4, 4]))


def test_report_renders_a_fake_results_tree(results_tree):
    text = report.report()
    assert (results_tree / "report.md").read_text() == text  # the full report is written
    assert text.startswith("# Allocation benchmarks: raw results rendered\n\n## Summary: is there something to find?")
    lines = section(text, "planted")
    assert "Settings: r=4 (budget = uniform LoRA at r), lora_alpha=8, rsLoRA=True, lr=0.002" in lines[2]
    assert lines[4] == (
        "**Calibration** (does rank bind?): lora-4x - lora = +0.1033 ± 0.0379 (3/3 seeds better): **better**"
    )
    # rows: lora, lora-4x first, then the rest by name
    assert [line.split(" | ")[0] for line in lines[8:11]] == ["| lora", "| lora-4x", f"| {DEFAULT_RUN}"]
    assert lines[8] == "| lora | 3 | 0.1100 ± 0.0100 | – | – | n/a (need 2+ paired seeds) | 24,000 | 60 | 4..4, 0 |"
    assert lines[10] == (
        f"| {DEFAULT_RUN} | 3 | 0.1500 ± 0.0100 | +0.0400 ± 0.0248 (3/3 seeds better): **better** | "
        "s0 +0.0500, s1 +0.0400, s2 +0.0300 | n/a (need 2+ paired seeds) | 24,000 | 60 | 1..8, 0 |"
    )
    # seed 0 has two ranks swapped: Spearman 0.94 against seeds 1 and 2, which agree (1.0), so 0.96 on average
    assert lines[12:16] == [
        "Where the ranks went (mean final rank over seeds; a removed module counts 0):",
        "",
        f"- {DEFAULT_RUN}: by module query 2.00, output.dense 6.00; by depth (first, middle, last third of the "
        "layers) 4.83, 3.67, 3.50; seed agreement (mean Spearman correlation of the module ranks between two seeds) "
        "0.96; agreement with hindsight (same seed) 0.88",
        "- hindsight (lora-4x's update spectra): by module query 2.00, output.dense 6.00; by depth (first, middle, "
        "last third of the layers) 4.00, 4.00, 4.00; seed agreement (mean Spearman correlation of the module ranks "
        "between two seeds) 1.00",
    ]


def test_report_names_the_retired_suites_and_why(results_tree):
    write(results_tree, [record("lora", seed, 0.03, [2] * 6, suite="distill") for seed in range(2)])
    summary = section(report.report(), "Summary: is there something to find?")
    distill = next(line for line in summary if line.startswith("| distill |"))
    assert distill.split(" | ")[2:4] == ["–", "–"]  # no calibration: its missing checks are explained below
    assert summary[-2] == f"Retired suites, kept as measured and not calibrated: distill ({suites.RETIRED['distill']})."
    assert not any("clm-r1" in line for line in summary)  # only retired suites that have runs are named


def test_report_has_check_2_prime_where_the_embedding_held_runs_exist(results_tree):
    summary = section(report.report(), "Summary: is there something to find?")
    assert not any(line.startswith("Check 2′") for line in summary)  # not run on any suite: no table
    # hindsight′ - hand rule 0.05, 0.06, 0.04; the default - hand rule 0.04, 0.03, 0.02. Fieller's a, b, c =
    # 0.0018829, 0.0011914, 0.0002829: roots 0.13, 1.13 around 0.03 / 0.05
    for seed, (hand, gain, default) in enumerate([(0.11, 0.05, 0.04), (0.13, 0.06, 0.03), (0.12, 0.04, 0.02)]):
        write(results_tree, [record("fixed-embedmin-random", seed, hand, [4] * 6)])
        write(results_tree, [record("fixed-embedmin_hindsight-random", seed, hand + gain, [4] * 6)])
        write(results_tree, [record(SHIPPED_DEFAULT, seed, hand + default, [4] * 6)])
        write(results_tree, [record(SHIPPED_DEFAULT_RANKS_FROM_START, seed, hand - 0.01 + seed * 0.01, [4] * 6)])
        write(results_tree, [record(SHIPPED_DEFAULT_SHUFFLED, seed, hand + default - seed * 0.01, [4] * 6)])
    summary = section(report.report(), "Summary: is there something to find?")
    check = next(i for i, line in enumerate(summary) if line.startswith("Check 2′, for budgets that hold an embedding"))
    assert summary[check + 1 : check + 5] == [
        "",
        "| suite | metric | check 2′, placement among the linear modules can pay: fixed-embedmin_hindsight-random "
        "− fixed-embedmin-random | the default − fixed-embedmin-random | passes | default's captured share of that "
        "gain | reference: the default's ranks from step 0 − fixed-embedmin-random | reference: the default − its "
        f"ranks shuffled (`{SHIPPED_DEFAULT_SHUFFLED}`) |",
        "|---|---|---|---|---|---|---|---|",
        "| planted | `gap_closed` | +0.0500 ± 0.0248 (3/3 seeds better): **better** | +0.0300 ± 0.0248 (3/3 seeds "
        "better): **better** | ✓ | 0.60, 95% [0.13, 1.13] (3 seeds) | +0.0000 ± 0.0248 (1/3 seeds better): inside | "
        "+0.0100 ± 0.0248 (2/3 seeds better): inside |",
    ]


def test_report_of_some_suites_is_only_printed(results_tree):
    text = report.report(["planted", "clm"])
    assert not (results_tree / "report.md").exists()
    assert text.startswith("# Allocation benchmarks: raw results rendered\n\n## planted\n")
    assert text.endswith("## clm\n\nno runs yet\n")


def test_hindsight_agreement_of_a_late_reading_and_of_ranks(results_tree, capsys):
    import hindsight_agreement
    from bench.records import load_results

    four = json.loads((results_tree / "planted" / "lora-4x" / "seed0.json").read_text())
    hindsight = methods.hindsight_ranks(SUITES["planted"], four)
    ordered = [hindsight[name] for name in MODULES]
    # seed 0: uniform LoRA's final update in hindsight's order; seed 1: in the reverse order
    for seed, sign in ((0, 1), (1, -1)):
        spectra = {name: [float(20 + sign * rank)] for name, rank in zip(MODULES, ordered)}
        amend(results_tree, "planted", "lora", seed, update_spectra=spectra, rank_costs=four["rank_costs"])
    results = load_results("planted")
    late = hindsight_agreement.agreements("planted", results, hindsight_agreement.LATE_READING, [0, 1, 2])
    assert set(late) == {0, 1}  # seed 2's lora recorded no spectra
    assert late[0] == pytest.approx(1.0) and late[1] == pytest.approx(-1.0)
    by_ranks = hindsight_agreement.agreements("planted", results, DEFAULT_RUN, [0, 1, 2])
    assert set(by_ranks) == {0, 1, 2} and all(-1 <= rho <= 1 for rho in by_ranks.values())
    hindsight_agreement.main(["--suite", "planted", "--methods", DEFAULT_RUN, "--seeds", "0", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "planted | lora end | s0 +1.00 s1 -1.00 | mean +0.00"
    assert lines[1].startswith(f"planted | {DEFAULT_RUN} | s0 ")


def cost(step: float, steps: int = 10, allocation_steps: int = 0, **one_off) -> dict:
    """A run's cost record: ``steps`` optimizer steps of ``step`` seconds."""
    return {
        "step_seconds": [step] * steps,
        "allocation_steps": allocation_steps,
        "init_seconds": one_off.get("init", 0.0),
        "reallocation_seconds": one_off.get("reallocation"),
        "adalora_allocate_seconds": one_off.get("adalora"),
        "peak_rss_mb": 1000.0 * one_off.get("memory", 1.0),
        "process_peak_rss_mb": 1000.0,
    }


@pytest.fixture
def peers_tree(results_tree):
    """The planted suite of ``results_tree`` with the peers, the hindsight allocation, the shipped default and
    learning-rate variants (validation metrics on seed 0), cost records, and four members of the planted family."""
    records = []
    gains = {SHIPPED_DEFAULT: (0.05, 0.06, 0.04), "fixed-hindsight-random": (0.08, 0.10, 0.09), "adalora": (-0.02, 0.0, -0.01), "eva": (0.01, 0.012, 0.008), SHIPPED_DEFAULT_RANKS_FROM_START: (0.0, 0.03, -0.01)}  # fmt: skip
    for seed, lora in enumerate((0.10, 0.12, 0.11)):
        for method, gain in gains.items():
            extra = {}
            if method == "adalora":
                extra["cost"] = cost(0.2, allocation_steps=4, adalora=[0.01] * 10, memory=1.5)
            records.append(record(method, seed, lora + gain[seed], [4] * 6, **extra))
    for method, lrs in (("lora", (0.40, 0.60, 0.50)), (SHIPPED_DEFAULT, (0.55, 0.65, 0.70))):
        for factor, val in zip(("+lr0.5x", "+lr1x", "+lr2x"), lrs):
            records.append(record(method + factor, 0, val, [4] * 6, val_metrics={"gap_closed": val}))
        for seed in (1, 2):  # the chosen lr of the default (x2): paired seeds there
            records.append(record(SHIPPED_DEFAULT + "+lr2x", seed, 0.2, [4] * 6, val_metrics={"gap_closed": 0.7}))
    records.append(record("lora+lr2x", 1, 0.3, [4] * 6))
    for index, (lora, oracle, default) in enumerate([(0.5, 0.7, 0.6), (0.5, 0.51, 0.45), (0.4, 0.8, 0.5), (0.4, 0.6, 0.55)]):  # fmt: skip
        suite = f"family-{index:02d}"
        records += [record(m, 0, v, [2] * 6, suite=suite) for m, v in (("lora", lora), ("oracle", oracle))]
        records.append(record(SHIPPED_DEFAULT, 0, default, [2] * 6, suite=suite))
    for seed, runs in ((1, (0.52, 0.74, 0.63)), (2, (0.48, 0.66, 0.58))):  # family-00 at more seeds
        records += [record(m, seed, v, [2] * 6, suite="family-00") for m, v in zip(("lora", "oracle", SHIPPED_DEFAULT), runs)]  # fmt: skip
    write(results_tree, records)
    lora_cost = cost(0.1)
    for seed in range(3):  # uniform LoRA's runs with cost records (the first runs predate them)
        amend(results_tree, "planted", "lora", seed, cost=lora_cost)
    return results_tree


def test_report_overviews_tuning_family_cost_and_figure(peers_tree):
    text = report.report()
    summary = section(text, "Summary: is there something to find?")
    # default - lora 0.05, 0.06, 0.04 over hindsight - lora 0.08, 0.10, 0.09: Fieller's a, b, c = 0.0074828,
    # 0.0041914, 0.0018828, so (b -+ sqrt(b^2 - ac)) / a = 0.31, 0.81
    assert summary[6] == (
        "| planted | `gap_closed` | +0.1033 ± 0.0379 (3/3 seeds better): **better** | +0.0900 ± 0.0248 (3/3 seeds "
        "better): **better** | ✓ | 0.56, 95% [0.31, 0.81] (3 seeds) | +0.0067 ± 0.0517 (1/3 seeds better): inside |"
    )
    assert summary[4].endswith(
        f"| reference: the default's ranks from step 0 − lora (`{SHIPPED_DEFAULT_RANKS_FROM_START}`) |"
    )
    peers = section(text, "Peers side by side: each method against uniform LoRA")
    assert peers[4].startswith(
        "| suite (metric, ↑ higher / ↓ lower is better) | uniform LoRA | our default | previous default "
        "(consistency_power=2) | earlier default (score='gradient_spectrum') | older default (also "
        "optimizer_state='migrate') | AdaLoRA |"
    )
    assert peers[6] == (
        "| planted (`gap_closed` ↑) | 0.1100 (3) | +0.0500 ± 0.0248 **better** (3) | – | – | – | -0.0100 ± 0.0248 inside (3) | "
        "+0.0100 ± 0.0050 **better** (3) | – | +0.1033 ± 0.0379 **better** (3) | +0.0900 ± 0.0248 **better** (3) |"
    )
    assert (peers_tree / "summary.md").read_text().splitlines()[4] == peers[6]  # the same table, for the README
    assert (peers_tree / "forest.png").read_bytes()[:4] == b"\x89PNG"
    assert "![forest plot](forest.png)" in text
    tuning = section(text, "Each method at its own learning rate")
    rows = {line.split(" | ")[0]: line for line in tuning if line.startswith("| ")}
    # lora is best at x1 on validation: its plain runs; the default at x2: its +lr2x runs (seeds 0-2)
    assert rows["| lora"] == "| lora | 0.4000 | 0.6000 | 0.5000 | ×1 (0.002) | 3 | – | -0.2567 ± 0.7388 inside (3) |"
    assert rows[f"| {SHIPPED_DEFAULT}"].startswith(f"| {SHIPPED_DEFAULT} | 0.5500 | 0.6500 | 0.7000 | ×2 (0.004) | 3 |")
    fam = section(text, "The planted family")
    assert fam[2].endswith(
        "Family v3: steps per run and signal steps by teacher, MiniLM 200 / 20, SmolLM2 800 / 200 (the v2 SmolLM2 "
        "records, at 200 and 20: benchmarks/results/allocation-family-v2/)."
    )
    assert fam[6] == f"| family-00 | choose | minilm | {family.member(0).r} | {len(family.member(0).changes)} | +0.2000 | yes | 0.50 |"  # fmt: skip
    assert fam[7].endswith("| +0.0100 | no | – ✗ |")  # nothing to find, and worse than lora
    roles = [line for line in fam if line.startswith(("| choose", "| report"))]
    assert roles == [
        f"| choose | {SHIPPED_DEFAULT} | 0.50 | 1 | 1/2 |",
        f"| report | {SHIPPED_DEFAULT} | 0.50 ± 3.18 | 2 | 0/2 |",  # shares 0.25 and 0.75
        f"| choose | {SHIPPED_DEFAULT} | 0.52 | 1 | 0/1 | 3 |",  # with seeds, per group: family-00 alone has them
    ]
    # family-00 over seeds 0-2: default - lora 0.10, 0.11, 0.10; oracle - lora 0.20, 0.22, 0.18; Fieller's a, b, c =
    # 0.0375312, 0.0200495, 0.0104720, so the share 0.103 / 0.2 = 0.52 has the interval 0.45, 0.61
    assert f"| family-00 | choose | {SHIPPED_DEFAULT} | +0.1033 ± 0.0143 **better** (3) | +0.2000 ± 0.0497 **better** (3) | 0.52, 95% [0.45, 0.61] (3 seeds) |" in fam  # fmt: skip
    seeded = [line for line in fam if line.startswith("| family-") and f"| {SHIPPED_DEFAULT} |" in line]
    assert len(seeded) == 1  # the members with one seed are not in that table
    costs = section(text, "Cost (CPU, from the runs)")
    assert "| planted | adalora | 3 | 2.00× (2.00..2.00) | 2.00× (2.00..2.00) | 1.50× (1.50..1.50) | AdaLoRA allocation 1.00 |" in costs  # fmt: skip


def test_pairs_across_machines_are_marked(results_tree):
    """A paired cell whose method and uniform LoRA ran on different CPU types on some seed carries the mark; one
    machine on every seed (or no hardware recorded, as in the fixture) does not."""
    for method, seed, cpu in (("lora", 0, "AMD EPYC"), ("lora-4x", 0, "Intel Xeon"), ("lora", 1, "AMD EPYC")):
        amend(results_tree, "planted", method, seed, hardware={"cpu": cpu})
    text = report.report()
    peers = section(text, "Peers side by side: each method against uniform LoRA")
    # lora-4x crosses machines on seed 0 (Intel against AMD) and on seed 1 (none recorded against AMD)
    assert peers[6].endswith("| +0.1033 ± 0.0379 **better** (3) ‡ | – |")
    summary = section(text, "Summary: is there something to find?")
    assert summary[6].startswith("| planted | `gap_closed` | +0.1033 ± 0.0379 (3/3 seeds better): **better** ‡ |")
    assert any(line.startswith("‡: on some of the paired seeds") for line in summary)
    # the same machine on every paired seed: no mark
    for method, seed in (("lora-4x", 0), ("lora-4x", 1), ("lora-4x", 2), ("lora", 2)):
        amend(results_tree, "planted", method, seed, hardware={"cpu": "AMD EPYC"})
    peers = section(report.report(), "Peers side by side: each method against uniform LoRA")
    assert peers[6].endswith("| +0.1033 ± 0.0379 **better** (3) | – |")


def test_report_without_new_methods_renders_dashes(results_tree):
    text = report.report()
    peers = section(text, "Peers side by side: each method against uniform LoRA")
    assert (
        peers[6]
        == "| planted (`gap_closed` ↑) | 0.1100 (3) | – | – | – | – | – | – | – | +0.1033 ± 0.0379 **better** (3) | – |"
    )
    assert "No learning-rate variants run yet." in text and "## The planted family" not in text


def test_every_score_the_harness_names_is_a_package_config():
    """The harness's score names are the package's scores, and ``consistent_spectrum4`` its ``consistent_spectrum``
    at the default power (a name the package did not know would fail only when its first run starts)."""
    from bench.methods import SCORE_NAMES, score_kwargs
    from peft_adaptive import AdaptiveLoraConfig
    from peft_adaptive.scores import SCORES

    assert {score_kwargs(name)["score"] for name in SCORE_NAMES} == set(SCORES)
    assert score_kwargs("consistent_spectrum2") == {"score": "consistent_spectrum", "consistency_power": 2.0}
    assert score_kwargs("consistent_spectrum")["consistency_power"] == 1.0
    # the shipped default's run is the package's default configuration
    default = AdaptiveLoraConfig()
    assert score_kwargs("consistent_spectrum4") == {
        "score": default.score,
        "consistency_power": default.consistency_power,
    }


def test_the_peers_table_marks_methods_that_cannot_run_on_a_suite(results_tree):
    """'n/a' where a method cannot run (AdaLoRA on a budget with an embedding, full fine-tuning on SmolLM2), '–'
    where it could but was not run."""
    for seed, (lora, default) in enumerate([(3.40, 3.38), (3.41, 3.38), (3.39, 3.37)]):
        for method, loss in (("lora", lora), (SHIPPED_DEFAULT, default)):
            write(results_tree, [record(method, seed, 0, [2] * 6, suite="clm-wiki-emb", metrics={"eval_loss": loss})])
    write(results_tree, [record("full", seed, 0.3, [0] * 6) for seed in range(3)])  # a full column on planted
    report.report()
    header, _, *rows = [line.split(" | ") for line in (results_tree / "summary.md").read_text().splitlines()[2:6]]
    column = {name.strip("| "): i for i, name in enumerate(header)}
    emb = next(row for row in rows if row[0].startswith("| clm-wiki-emb"))
    planted = next(row for row in rows if row[0].startswith("| planted"))
    assert emb[column["our default"]] == "-0.0233 ± 0.0143 **better** (3)"
    assert [emb[column[c]] for c in ("AdaLoRA", "EVA ρ=2")] == ["n/a", "–"]
    assert emb[column["full fine-tuning"]].strip(" |") == "n/a"
    assert planted[column["AdaLoRA"]] == "–"
    assert planted[column["full fine-tuning"]].strip(" |").endswith("**better** (3)")
