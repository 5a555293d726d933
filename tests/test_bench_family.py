"""The benchmark's new-script rewritings and the planted family generator (pure parts, no model)."""

from __future__ import annotations

import re
import string
import sys
from pathlib import Path

import pytest
import torch

from peft_adaptive.config import DEFAULT_SIGNAL_STEPS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench import family  # noqa: E402
from bench.kept_loss import SPREAD_GATE, adapter_svd, added, concentration  # noqa: E402
from bench.suites import SUITES  # noqa: E402
from bench.transforms import letter_cipher, text_transform, without_spaces  # noqa: E402
from canonical_probe import accumulate, canonical_correlations, module_statistics  # noqa: E402
from gradient_consistency_probe import auc, coverage  # noqa: E402
from loss_value_probe import kept, rule_ranks, running_min, weight_gradients  # noqa: E402
from loss_value_probe import rule_values as loss_rule_values  # noqa: E402
from resplit_probe import (  # noqa: E402
    best_split,
    by_kind,
    coverage_text,
    covered_share,
    crossfit_spectrum,
    final_update,
    flat_floors,
    guard_floors,
    planted_energies,
    rule_bounds,
    rule_values,
    uncovered,
)
from score_flatness_probe import normalised_entropy, top_share  # noqa: E402


def test_the_cipher_is_a_fixed_letter_permutation_without_fixed_points():
    cipher = letter_cipher()
    lower = cipher(string.ascii_lowercase)
    assert sorted(lower) == list(string.ascii_lowercase)  # a permutation: invertible
    assert all(a != b for a, b in zip(string.ascii_lowercase, lower))
    assert cipher(string.ascii_uppercase) == lower.upper()  # case kept
    assert cipher("a1 ,.!?-'\n") == lower[0] + "1 ,.!?-'\n"  # only letters change
    assert letter_cipher()("Hello") == cipher("Hello") != "Hello"  # the same in every run
    assert letter_cipher(seed=1)("Hello") != cipher("Hello")


def test_text_transforms_by_name():
    assert without_spaces(" it 's  a\tfilm .") == "it'safilm."
    assert text_transform("nospace")("a b") == "ab"
    assert text_transform(None)("a b") == "a b"
    with pytest.raises(SystemExit, match="unknown text transform 'rot13'"):
        text_transform("rot13")


@pytest.mark.parametrize("index", range(40))
def test_family_members_are_valid_ground_truths(index):
    member = family.member(index)
    costs = family.module_costs(member.teacher)
    assert member == family.member(index)  # generated from the index alone
    assert member.r in (2, 4) and member.changes
    assert {c.module for c in member.changes} <= set(costs)
    spread = len(member.changes) == len(costs)
    for change in member.changes:
        assert 1 <= change.rank <= (member.r if spread else family.MAX_R_FACTOR * member.r)
        assert 0.2 <= change.strength <= 0.8 and 0.5 <= change.decay <= 1.0
    # the oracle (exactly the changed modules at exactly their ranks) fits uniform LoRA's budget
    assert sum(c.rank * costs[c.module] for c in member.changes) <= member.r * sum(costs.values())


def test_family_roles_and_suites():
    members = [family.member(i) for i in range(family.FAMILY_SIZE)]
    for role in ("choose", "report"):
        chosen = [m for m in members if m.role == role]
        assert len(chosen) == family.FAMILY_SIZE // 2
        assert {m.teacher for m in chosen} == {"minilm", "smollm2"}
    # the report members added after the first twelve are read apart, as the held-out set
    assert [m.index for m in members if m.group == "held-out"] == [14, 15, 18, 19]
    assert {m.group for m in members[:12]} == {"choose", "report"}
    suite = SUITES["family-03"]
    assert suite.settings["member"] == 3 and suite.r == members[3].r and suite.lora_alpha == 2 * members[3].r
    assert suite.max_r == family.MAX_R_FACTOR * suite.r and suite.min_r == 1
    # v3: the SmolLM2 members run 800 steps with the package's default signal steps, the MiniLM members v2's 200 / 20
    assert (suite.steps, suite.warmup, suite.settings["family_version"]) == (800, DEFAULT_SIGNAL_STEPS, 3)
    assert (SUITES["family-02"].steps, SUITES["family-02"].warmup) == (200, 20)


def test_probe_auc_counts_planted_modules_ranked_above_the_others():
    assert auc(["p", "a", "b"], {"p"}) == 1.0
    assert auc(["a", "b", "p"], {"p"}) == 0.0
    assert auc(["p", "a", "q", "b"], {"p", "q"}) == 0.75  # pairs (p,a) (p,b) (q,b) of 4


def test_probe_coverage_is_the_share_of_the_capped_oracle_ranks_the_split_gives():
    """The probe's --allocate proxy: a spectrum that singles out the planted module covers the oracle (its rank 9 capped
    at 2r = 8) and moves rank to it; one that singles out other modules covers only the floor and moves none to it."""
    spec = family.member(4)
    names = ["encoder." + name for name in family.module_costs(spec.teacher)]
    planted = {"encoder." + change.module for change in spec.changes}

    def stats(loud: set[str], consistency: float = 1.0) -> dict:
        flat = [1.0] * 32
        return {
            n: {"spectrum": [100.0 * v for v in flat] if n in loud else flat, "consistency": consistency} for n in names
        }

    covered, moved = coverage(stats(planted), 4, power=4, by_type=False)
    assert covered == 1.0 and moved > 0.0
    elsewhere, moved_elsewhere = coverage(stats(set(names[:3]) - planted), 4, power=4, by_type=False)
    floor = sum(family.module_costs(spec.teacher)[c.module] for c in spec.changes)  # min_r = 1 each
    capped = sum(min(c.rank, 2 * spec.r) * family.module_costs(spec.teacher)[c.module] for c in spec.changes)
    assert elsewhere == pytest.approx(floor / capped) and moved_elsewhere == 0.0
    # a uniform consistency scales every value alike, so the power changes nothing
    assert coverage(stats(planted, 0.5), 4, power=8, by_type=False) == (covered, moved)


def test_resplit_probe_measures_the_planted_energy_a_split_leaves_uncovered():
    """The proxy of resplit_probe.py: the planted squared singular values beyond each module's rank; a split at the
    planted ranks leaves nothing, uniform rank r leaves the tail of every change above r."""
    spec = family.member(3)
    names = ["model." + name for name in family.module_costs(spec.teacher)]
    planted = planted_energies(3, names)
    changes = {"model." + c.module: c for c in spec.changes}
    assert [len(p) for p in planted] == [changes[n].rank if n in changes else 0 for n in names]
    top = next(c for c in spec.changes if c.rank > spec.r)
    assert planted[names.index("model." + top.module)][0] == pytest.approx(top.strength**2)
    assert uncovered(planted, [len(p) for p in planted]) == 0.0
    tails = sum(sum(p[spec.r :]) for p in planted)
    assert uncovered(planted, [spec.r] * len(names)) == pytest.approx(tails) and tails > 0


def test_cap_bound_is_the_best_split_under_the_cap_and_covers_everything_at_the_planted_ranks():
    """--cap-bound: with the planted energies as values the split covers what the cap allows and no more."""
    planted = [[16.0, 9.0, 4.0, 1.0], [1.0], [], []]  # one module needs rank 4, one rank 1, two nothing
    costs = [1, 1, 1, 1]
    # budget 2 * 4 = 8 ranks; the cap 2r = 4 lets the first module take all of its need
    ranks = best_split(planted, costs, r=2, min_r=1, cap=4)
    assert ranks[0] == 4 and ranks[1] >= 1 and sum(ranks) <= 8
    assert covered_share(planted, ranks, r=2) == 1.0
    # under a cap of 3 the fourth direction (energy 1) stays uncovered: uniform leaves 4 + 1 = 5, the best 1
    capped = best_split(planted, costs, r=2, min_r=1, cap=3)
    assert capped[0] == 3
    assert abs(covered_share(planted, capped, r=2) - (5 - 1) / 5) < 1e-12
    # nothing uncovered at uniform rank: no share
    assert covered_share([[1.0], []], [2, 2], r=2) is None


def test_final_update_splits_each_seeds_lora_record_under_each_cap_and_reports_what_flat_members_lose():
    """--final-update: one segment per committed ``lora`` seed with a value per cap; where uniform LoRA covers every
    planted rank (family-07) it reports the energy a split leaves, which the default's ranks must exceed 0 to show."""
    assert coverage_text([[16.0, 9.0], []], [1, 3], r=2) == "leaves 9.000"  # uniform covers all: the energy left
    assert coverage_text([[16.0, 9.0, 4.0], []], [3, 1], r=2) == "+1.00"
    flat = final_update(7)
    seeds = flat.split(" | ")[1:]
    assert len(seeds) == 3 and all(part.count(" leaves ") == 4 for part in seeds)  # 3 caps + the default
    left = [float(x) for x in re.findall(r"default leaves (\d+\.\d+)", flat)]
    assert len(left) == 3 and min(left) > 0  # the default cuts ranks family-07 needs on every seed
    concentrated = final_update(19)
    shares = [float(x) for x in re.findall(r"r ([+-]\d\.\d\d)", concentrated)]
    assert len(shares) == 9 and all(-2 < v <= 1.0 for v in shares)


def test_resplit_probe_rules_keep_each_module_non_increasing_and_kind_divides_by_the_kind_median():
    names = ["l0.q_proj", "l1.q_proj", "l2.q_proj", "l0.v_proj"]
    seen = {
        "names": names,
        "spectra": [[4.0, 2.0, 1.0], [2.0, 1.0, 1.0], [1.0, 1.0, 0.5], [10.0, 1.0, 1.0]],
        "consistency": [1.0, 0.5, 1.0, 0.25],
        "update": [[1.0, 0.5], [3.0, 0.0], [0.1, 0.1], [2.0, 1.0]],
        "crossfit": [[3.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [5.0, 2.0, 0.0]],
        "power": 4.0,
    }
    default = rule_values(seen, "default")
    assert default[1] == [(2.0 * 0.25) ** 2, (1.0 * 0.25) ** 2, (1.0 * 0.25) ** 2]  # (sigma * c^2)^2
    for rule in ("default", "kind", "floor", "update", "mix", "crossfit"):
        assert all(list(v) == sorted(v, reverse=True) for v in rule_values(seen, rule)), rule
    kind = rule_values(seen, "kind")
    median_q = sorted(sum(v) for v in default[:3])[1]
    assert kind[0] == pytest.approx([x / median_q for x in default[0]])
    assert kind[3] == pytest.approx([1.0 * x / sum(default[3]) for x in default[3]])  # a kind of one: its own total
    assert by_kind(["a.k"], [[0.0]]) == [[0.0]]  # an all-zero kind divides by 1, not 0
    # BERT's three kinds of ``dense`` are three kinds, each divided by its own median
    bert = ["layer.0.attention.output.dense", "layer.0.intermediate.dense", "layer.0.output.dense"]
    assert by_kind(bert, [[2.0], [4.0], [8.0]]) == [[1.0], [1.0], [1.0]]
    mix = rule_values(seen, "mix")
    assert sum(mix[0]) == pytest.approx(1.0**2 + 0.5**2)  # the update's energy, shaped as the gradient spectrum
    # crossfit: its zeros get a vanishing ramp, so a tie goes to the lower rank and never outweighs a real value
    crossfit = rule_values(seen, "crossfit")
    assert crossfit[0] == pytest.approx([3.0, 0.0, 0.0], abs=1e-20) and crossfit[0][1] > crossfit[0][2] > 0
    with pytest.raises(ValueError, match="unknown rule 'x'"):
        rule_values(seen, "x")


def test_guard_and_flat_keep_floors_up_to_r_narrow_halves_each_cap_and_wide_allows_3r():
    # r = 2 (max_r = 2r = 4); noise variance 1: a direction counts at z when its value exceeds z^2
    seen = {
        "min_r": 1,
        "max_r": 4,
        "crossfit": [[10.0, 5.0, 4.5, 0.5], [5.0, 0.1, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]],
        "half_noise": [1.0, 1.0, 1.0],
        "spectra": [[1.0, 0.5, 0.2, 0.1]] * 3,
        "consistency": [1.0, 1.0, 1.0],
        "power": 4.0,
    }
    assert guard_floors(seen, 2.0) == [2, 1, 0]  # three clear directions, capped at r = 2
    assert guard_floors(seen, 3.0) == [1, 0, 0]
    guarded = rule_values(seen, "guard2")
    assert guarded[0][:2] == [1e30, 1e30] and guarded[0][2:] == rule_values(seen, "default")[0][2:]
    assert guarded[2] == rule_values(seen, "default")[2]
    assert rule_bounds("default", seen) == (1, 4) and rule_bounds("narrow", seen) == (1, 3)
    assert rule_bounds("narrow", {**seen, "max_r": 8}) == (2, 6)  # r = 4
    # wide: the default's own values under a 3r cap
    assert rule_bounds("wide", seen) == (1, 6) and rule_bounds("wide", {**seen, "max_r": 8}) == (1, 12)
    assert rule_values(seen, "wide") == rule_values(seen, "default")
    # flat<a>: a floor of the learned update's values at least a times its largest, at most r; none without an update
    updates = {**seen, "update": [[4.0, 3.0, 2.5], [4.0, 1.0], []]}
    assert flat_floors(updates, 0.5) == [2, 1, 0] and flat_floors(updates, 0.7) == [2, 1, 0]
    assert flat_floors(updates, 0.8) == [1, 1, 0]
    flat = rule_values(updates, "flat0.5")
    assert flat[0][:2] == [1e30, 1e30] and flat[0][2:] == rule_values(seen, "default")[0][2:]
    assert flat[1][:1] == [1e30] and flat[2] == rule_values(seen, "default")[2]


def test_crossfit_spectrum_keeps_what_both_halves_share_and_drops_their_independent_noise():
    generator = torch.Generator().manual_seed(0)
    expected = torch.zeros(12, 60)
    expected[0, 0], expected[1, 1] = 5.0, 3.0  # singular values 5 and 3: energies 25 and 9
    noise = 0.1
    even = expected + noise * torch.randn(12, 60, generator=generator)
    odd = expected + noise * torch.randn(12, 60, generator=generator)
    values = crossfit_spectrum(even, odd)
    assert values == sorted(values, reverse=True) and min(values) >= 0
    # the noise (singular values about 1.1 here) shrinks each estimate somewhat: the direction found on one half is a
    # little off the expected one
    assert values[0] == pytest.approx(25.0, rel=0.1) and values[1] == pytest.approx(9.0, rel=0.25)
    assert max(values[2:]) < 0.01 * 9.0  # the noise-only directions: near zero, where sigma^2 of the sum is not
    assert torch.linalg.svdvals(even + odd)[2] ** 2 > 100 * max(values[2:])
    # two independent noise halves: every value near zero against the noise's own energy per direction
    pure = crossfit_spectrum(
        noise * torch.randn(12, 60, generator=generator), noise * torch.randn(12, 60, generator=generator)
    )
    assert max(pure) < noise**2 * 60 / 4


def test_canonical_correlations_are_one_where_a_linear_map_predicts_the_gradient_and_near_zero_for_noise():
    """The probe's scale-free statistic: d = M x with M of rank 2 gives two canonical correlations of 1, whatever the
    scale of x or d; d independent of x gives none near 1."""
    import torch

    generator = torch.Generator().manual_seed(0)
    x = 50.0 * torch.randn(4000, 12, generator=generator, dtype=torch.float64)
    mixing = torch.randn(8, 2, generator=generator, dtype=torch.float64) @ torch.randn(
        2, 12, generator=generator, dtype=torch.float64
    )
    d = 1e-4 * x @ mixing.T
    correlations = canonical_correlations(d.T @ x, x.T @ x, d.T @ d, ridge=1e-9)
    assert correlations[:2].tolist() == pytest.approx([1.0, 1.0], abs=1e-4)
    assert correlations[2:].max() < 1e-2
    noise = torch.randn(4000, 8, generator=generator, dtype=torch.float64)
    assert canonical_correlations(noise.T @ x, x.T @ x, noise.T @ noise).max() < 0.15


def test_probe_consistencies_are_one_for_identical_steps_and_tokens_and_fall_for_noise():
    import torch

    x, d = torch.ones(5, 3, dtype=torch.float64), 2.0 * torch.ones(5, 4, dtype=torch.float64)
    same: dict = {}
    for _ in range(4):
        accumulate(same, x, d)
    stats = module_statistics(same)
    assert stats["consistency"] == pytest.approx(1.0)  # four identical steps
    assert stats["token_consistency"] == pytest.approx(4 * 5)  # N aligned tokens: N = 20
    assert stats["fro"] == pytest.approx(float((d.T @ x).norm() / 5))
    generator = torch.Generator().manual_seed(1)
    noisy: dict = {}
    for _ in range(4):
        accumulate(noisy, *(torch.randn(5, k, generator=generator, dtype=torch.float64) for k in (3, 4)))
    assert module_statistics(noisy)["consistency"] < 0.8


def test_score_flatness_probe_reads_equal_scores_as_flat_and_one_module_as_concentrated():
    assert normalised_entropy([2.0] * 8) == pytest.approx(1.0)
    assert normalised_entropy([1.0, 0.0, 0.0]) == 0.0  # one module holds everything
    assert 0 < normalised_entropy([4.0, 2.0, 1.0, 1.0]) < 1
    assert top_share([1.0] * 20) == pytest.approx(0.1)  # the top tenth of equal values holds a tenth
    assert top_share([7.0, 1.0, 1.0, 1.0]) == pytest.approx(0.7)  # at least one value: the largest
    assert top_share(list(range(1, 21)), 0.1) == pytest.approx((20 + 19) / 210)


def _tiny_lora(seed: int = 0):
    """A two-layer model with LoRA (rank 2) on both layers and non-zero ``B``, so the adapter's update is real."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4))
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=2, target_modules=["0", "2"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    layers = [model.base_model.model[0], model.base_model.model[2]]
    return model, layers


class _SquaredTask:
    """The ``task.loss(model, batch, target)`` a ``HiddenStateTask`` has, on plain tensors."""

    @staticmethod
    def loss(model, batch, target):
        return (model(batch) - target).pow(2).mean()


def test_loss_value_probe_removes_the_adapters_directions_and_reads_the_weight_gradient():
    model, layers = _tiny_lora()
    x, target = torch.randn(3, 7, 6), torch.randn(3, 7, 4)
    # removing every singular direction of s B A leaves the base layer alone
    first = layers[0]
    U, S, Vh = adapter_svd(first, "default")
    assert U.shape == (5, 2) and Vh.shape == (2, 6) and S[0] >= S[1] > 0
    with torch.no_grad(), added(first, U[:, 0], Vh[0], -float(S[0])), added(first, U[:, 1], Vh[1], -float(S[1])):
        assert torch.allclose(first(x), first.base_layer(x), atol=1e-5)
        assert not torch.allclose(first(x) + 0.1, first.base_layer(x))
    # the gradient it reads is autograd's with respect to the frozen base weights, summed over the batches
    batches, targets = [x, x[:2]], [target, target[:2]]
    grads = weight_gradients(model, _SquaredTask, batches, targets, layers)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" in n)  # the probe left no gradient
    for layer in layers:
        layer.base_layer.weight.requires_grad_(True)
    sum(_SquaredTask.loss(model, b, t) / 2 for b, t in zip(batches, targets)).backward()
    for layer, grad in zip(layers, grads):
        assert torch.allclose(grad.float(), layer.base_layer.weight.grad, atol=1e-6)


def test_loss_value_rules_run_the_keep_values_into_the_growth_values_or_sort_them():
    assert running_min([3.0, 1.0, 2.0, 0.5]) == [3.0, 1.0, 1.0, 0.5]
    seen = {
        "loss_values": [{"keep": [2.0, -1.0], "growth": [1.5, 0.5]}, {"keep": [0.2, 0.1], "growth": [4.0, 3.0]}],
        "spectra": [[1.0], [1.0]],
    }
    conservative = loss_rule_values(seen, "loss")
    optimistic = loss_rule_values(seen, "loss-sorted")
    assert [round(v, 6) for v in conservative[0]] == [2.0, 0.0, 0.0, 0.0]  # a negative keep value stops growth
    assert [round(v, 6) for v in conservative[1]] == [0.2, 0.1, 0.1, 0.1]
    assert [round(v, 6) for v in optimistic[1]] == [4.0, 3.0, 0.2, 0.1]
    for values in conservative + optimistic:
        assert all(a >= b for a, b in zip(values, values[1:]))  # allocate_by_spectrum needs non-increasing lists


def test_keep_gate_splits_by_gradient_shape_times_kept_loss_unless_the_kept_loss_is_spread():
    def seen(kept: list[float]) -> dict:
        n = len(kept)
        return {
            "names": [f"m{i}" for i in range(n)],
            "loss_values": [{"keep": [k, -1.0], "growth": [0.0, 0.0]} for k in kept],  # negative: counts as 0
            "spectra": [[1.0, 1.0]] * n,  # every module's gradient spectrum the same, flat: it may grow
            "costs": [10] * n,
            "budget": 2 * 10 * n,  # uniform rank 2
            "min_r": 1,
            "max_r": 4,
        }

    concentrated, spread = seen([8.0] + [0.1] * 7), seen([1.0] * 8)
    assert concentration(kept(spread)) == pytest.approx(1.0)
    assert concentration([1.0] + [0.0] * 7) == pytest.approx(1 / 8)
    assert concentration([0.0] * 3) == 1.0  # nothing held anywhere: spread, uniform ranks
    assert concentration(kept(concentrated)) < SPREAD_GATE <= concentration(kept(spread))
    # where one module holds what was learned, it grows to the cap and the rest pay for it
    mixed = rule_ranks(concentrated, "keep-mix")
    assert mixed[0] == 4 and sum(mixed) == 16 and min(mixed[1:]) >= 1
    assert rule_ranks(concentrated, "keep-gate") == mixed
    # where every module holds as much, the gate keeps uniform LoRA's ranks
    assert rule_ranks(spread, "keep-gate") == [2] * 8
