"""Property-based tests of ``allocate_ranks`` (the budgeted highest-averages apportionment)."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from peft_adaptive import Allocation, allocate_ranks
from peft_adaptive.allocation import _extend_spectrum, allocate_by_spectrum, predicted_gain

SETTINGS = settings(max_examples=100, deadline=None)

scores_st = st.floats(min_value=0.0, max_value=100.0, allow_nan=False, allow_infinity=False)


@st.composite
def problems(draw, equal_costs: bool = False, n_min: int = 1):
    """A valid allocation problem: scores, costs, budget (>= min_r * sum(costs)), bounds, exponent."""
    n = draw(st.integers(n_min, 8))
    scores = draw(st.lists(scores_st, min_size=n, max_size=n))
    if equal_costs:
        costs = [draw(st.integers(1, 40))] * n
    else:
        costs = draw(st.lists(st.integers(1, 40), min_size=n, max_size=n))
    min_r = draw(st.integers(0, 4))
    max_r = draw(st.integers(min_r, 16))
    floor = min_r * sum(costs)
    ceiling = max_r * sum(costs)
    # budgets from "only min_r fits" to "more than every module at max_r"
    budget = draw(st.integers(floor, ceiling + 50))
    exponent = draw(st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 3.0]))
    return scores, costs, budget, min_r, max_r, exponent


def check_invariants(alloc: Allocation, scores, costs, budget, min_r, max_r) -> None:
    assert len(alloc.ranks) == len(scores)
    assert all(isinstance(r, int) for r in alloc.ranks)
    assert all(min_r <= r <= max_r for r in alloc.ranks), alloc.ranks
    used = sum(r * c for r, c in zip(alloc.ranks, costs))
    assert alloc.used == used
    assert alloc.budget == budget
    assert used <= budget
    assert alloc.unspent == budget - used
    # no whole rank left that would still fit in the unspent budget
    for r, c in zip(alloc.ranks, costs):
        if r < max_r:
            assert c > budget - used, (alloc.ranks, costs, budget, used)


@SETTINGS
@given(problems())
def test_invariants(problem):
    scores, costs, budget, min_r, max_r, exponent = problem
    alloc = allocate_ranks(scores, costs, budget, min_r, max_r, exponent)
    check_invariants(alloc, scores, costs, budget, min_r, max_r)


@SETTINGS
@given(problems())
def test_deterministic(problem):
    scores, costs, budget, min_r, max_r, exponent = problem
    first = allocate_ranks(scores, costs, budget, min_r, max_r, exponent)
    second = allocate_ranks(list(scores), tuple(costs), budget, min_r, max_r, exponent)
    assert first == second


@SETTINGS
@given(problems(), st.integers(-60, 60))
def test_invariant_under_power_of_two_score_scaling(problem, k):
    """Only score ratios matter (the docstring's promise), also for tiny or huge scales."""
    scores, costs, budget, min_r, max_r, exponent = problem
    scaled = [s * 2.0 ** (8 * k) for s in scores]
    # stay out of subnormals (before and after scaling), where ratios are not exact, and out of underflow to 0
    assume(all(s == 0 or s > 1e-290 for s in [*scores, *scaled]))
    assume(all((s == 0) == (t == 0) for s, t in zip(scores, scaled)))
    base = allocate_ranks(scores, costs, budget, min_r, max_r, exponent)
    assert allocate_ranks(scaled, costs, budget, min_r, max_r, exponent).ranks == base.ranks


def test_extreme_score_scales_keep_proportions():
    # score ** exponent over/underflows for such scales unless ratios are taken first
    expected = allocate_ranks([1.0, 3.0, 2.0], [1, 1, 1], 36, 1, 30, exponent=2.0).ranks
    assert expected == [2, 24, 10]  # 1:9:4 of 36
    for scale in (1e-200, 1e200):
        got = allocate_ranks([1.0 * scale, 3.0 * scale, 2.0 * scale], [1, 1, 1], 36, 1, 30, exponent=2.0)
        assert got.ranks == expected


def _raise_one(draw_data, problem):
    scores, costs, budget, min_r, max_r, exponent = problem
    i = draw_data.draw(st.integers(0, len(scores) - 1))
    bump = draw_data.draw(st.floats(min_value=1e-3, max_value=100.0))
    higher = list(scores)
    higher[i] = scores[i] + bump
    return i, higher


@settings(max_examples=200, deadline=None)
@given(problems(equal_costs=True), st.data())
def test_monotone_in_own_score_equal_costs(problem, data):
    scores, costs, budget, min_r, max_r, exponent = problem
    i, higher = _raise_one(data, problem)
    before = allocate_ranks(scores, costs, budget, min_r, max_r, exponent).ranks[i]
    after = allocate_ranks(higher, costs, budget, min_r, max_r, exponent).ranks[i]
    assert after >= before


@settings(max_examples=200, deadline=None)
@given(problems(), st.data())
def test_monotone_in_own_score_unequal_costs(problem, data):
    # Not promised by the docstring (which only claims equal costs), but it holds for this greedy rule:
    # a higher score only moves the module's quotients earlier in the pop order.
    scores, costs, budget, min_r, max_r, exponent = problem
    i, higher = _raise_one(data, problem)
    before = allocate_ranks(scores, costs, budget, min_r, max_r, exponent).ranks[i]
    after = allocate_ranks(higher, costs, budget, min_r, max_r, exponent).ranks[i]
    assert after >= before


@SETTINGS
@given(
    st.integers(1, 10),
    st.integers(1, 30),
    st.integers(1, 3),
    st.integers(0, 12),
    st.lists(scores_st, min_size=10, max_size=10),
    st.integers(0, 200),
)
def test_exponent_zero_is_uniform_with_equal_costs(n, cost, min_r, span, scores, extra):
    max_r = min_r + span
    budget = min_r * n * cost + extra
    alloc = allocate_ranks(scores[:n], [cost] * n, budget, min_r, max_r, exponent=0.0)
    check_invariants(alloc, scores[:n], [cost] * n, budget, min_r, max_r)
    assert max(alloc.ranks) - min(alloc.ranks) <= 1
    # and the scores are ignored entirely
    assert alloc == allocate_ranks([1.0] * n, [cost] * n, budget, min_r, max_r, exponent=0.0)
    if budget % (n * cost) == 0 and budget // (n * cost) <= max_r:
        assert alloc.ranks == [budget // (n * cost)] * n


@SETTINGS
@given(st.integers(1, 8), st.integers(1, 50))
def test_all_zero_scores_split_uniformly(n, per_module):
    alloc = allocate_ranks([0.0] * n, [5] * n, 5 * n * per_module, 1, 64)
    assert alloc.ranks == [per_module] * n


def test_proportional_easy_cases():
    # 1:2:3:4 of 40 ranks at equal cost -> exactly 4, 8, 12, 16
    alloc = allocate_ranks([1.0, 2.0, 3.0, 4.0], [10] * 4, 400, 1, 64)
    assert alloc.ranks == [4, 8, 12, 16]
    assert alloc.used == 400 and alloc.unspent == 0
    # exponent 2 squares the ratios: 1:4 of 20 ranks -> 4, 16
    assert allocate_ranks([1.0, 2.0], [3, 3], 60, 1, 64, exponent=2.0).ranks == [4, 16]
    # exponent 0.5 on 1:4 -> 1:2 of 30 ranks -> 10, 20
    assert allocate_ranks([1.0, 4.0], [7, 7], 210, 1, 64, exponent=0.5).ranks == [10, 20]
    # a zero score keeps min_r while others are below max_r
    assert allocate_ranks([0.0, 1.0, 1.0], [1, 1, 1], 20, 2, 9).ranks == [2, 9, 9]
    # max_r caps the winner; the rest of the budget goes to the others
    assert allocate_ranks([100.0, 1.0, 1.0], [1, 1, 1], 30, 1, 12).ranks == [12, 9, 9]


def test_budget_too_small_for_the_expensive_module():
    # module 1 costs 100 per rank: once it no longer fits, the cheaper ones use up the rest
    alloc = allocate_ranks([1.0, 1000.0], [1, 100], 150, 1, 64)
    assert alloc.ranks == [50, 1]
    assert alloc.used == 150


def test_ties_go_to_the_lower_index():
    assert allocate_ranks([1.0, 1.0, 1.0], [1, 1, 1], 5, 1, 8).ranks == [2, 2, 1]
    assert allocate_ranks([1.0, 1.0, 1.0], [1, 1, 1], 4, 1, 8).ranks == [2, 1, 1]


def test_empty_problem():
    assert allocate_ranks([], [], 0, 1, 4) == Allocation(ranks=[], budget=0, used=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(budget=29), "budget"),  # below min_r * sum(costs) = 30
        (dict(budget=-1), "budget"),
        (dict(budget=float("nan")), "budget"),
        (dict(budget=float("inf")), "budget"),
        (dict(budget=100.5), "budget"),
        (dict(min_r=3, max_r=2), "min_r"),
        (dict(min_r=-1), "min_r"),
        (dict(min_r=1.5), "min_r"),
        (dict(max_r=4.5), "max_r"),
        (dict(scores=[1.0, -0.1, 1.0]), "scores"),
        (dict(scores=[1.0, float("nan"), 1.0]), "scores"),
        (dict(scores=[1.0, float("inf"), 1.0]), "scores"),
        (dict(costs=[10, 0, 10]), "cost_per_rank"),
        (dict(costs=[10, -3, 10]), "cost_per_rank"),
        (dict(costs=[10, 2.5, 10]), "cost_per_rank"),
        (dict(costs=[10, float("nan"), 10]), "cost_per_rank"),
        (dict(costs=[10, float("inf"), 10]), "cost_per_rank"),
        (dict(costs=[10, 10]), "same length"),
        (dict(exponent=-0.5), "exponent"),
        (dict(exponent=float("nan")), "exponent"),
        (dict(exponent=float("inf")), "exponent"),
    ],
)
def test_invalid_inputs_raise_value_error(kwargs, message):
    args = dict(scores=[1.0, 2.0, 3.0], costs=[10, 10, 10], budget=100, min_r=1, max_r=8, exponent=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        allocate_ranks(args["scores"], args["costs"], args["budget"], args["min_r"], args["max_r"], args["exponent"])


@SETTINGS
@given(problems(n_min=1), st.integers(1, 100))
def test_budget_below_floor_always_raises(problem, shortfall):
    scores, costs, _, min_r, max_r, exponent = problem
    with pytest.raises(ValueError, match="budget"):
        allocate_ranks(scores, costs, min_r * sum(costs) - shortfall, min_r, max_r, exponent)


def test_float_costs_with_integer_values_are_accepted():
    alloc = allocate_ranks([1.0, 1.0], [3.0, 3.0], 12, 1, 8)
    assert alloc.ranks == [2, 2]
    assert math.isclose(alloc.used, 12)


# --- allocate_by_spectrum: one global threshold on value per parameter -----------------------------


@st.composite
def spectrum_problems(draw, equal_costs: bool = False):
    n = draw(st.integers(1, 6))
    min_r = draw(st.integers(0, 2))
    max_r = draw(st.integers(max(min_r, 1), 6))
    spectra = []
    for _ in range(n):
        values = sorted(draw(st.lists(scores_st, min_size=0, max_size=max_r)), reverse=True)
        spectra.append(values)
    costs = (
        [draw(st.integers(1, 20))] * n if equal_costs else draw(st.lists(st.integers(1, 20), min_size=n, max_size=n))
    )
    budget = draw(st.integers(min_r * sum(costs), max_r * sum(costs) + 10))
    return spectra, costs, budget, min_r, max_r


@SETTINGS
@given(spectrum_problems())
def test_spectrum_allocation_invariants(problem):
    spectra, costs, budget, min_r, max_r = problem
    alloc = allocate_by_spectrum(spectra, costs, budget, min_r, max_r)
    check_invariants(alloc, spectra, costs, budget, min_r, max_r)
    assert alloc == allocate_by_spectrum([list(s) for s in spectra], tuple(costs), budget, min_r, max_r)


@SETTINGS
@given(spectrum_problems(equal_costs=True))
def test_spectrum_allocation_maximises_the_total_value_with_equal_costs(problem):
    """Brute force over every feasible allocation: none captures more value than the greedy threshold."""
    spectra, costs, budget, min_r, max_r = problem
    values = [_extend_spectrum(s, max_r, i) for i, s in enumerate(spectra)]

    def total(ranks):
        return sum(sum(v[:r]) for v, r in zip(values, ranks))

    alloc = allocate_by_spectrum(spectra, costs, budget, min_r, max_r)
    best = max(
        total(ranks)
        for ranks in itertools.product(range(min_r, max_r + 1), repeat=len(spectra))
        if sum(r * c for r, c in zip(ranks, costs)) <= budget
    )
    assert total(alloc.ranks) == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_spectrum_allocation_follows_the_planted_ranks():
    """Two modules with 2 and 6 strong directions, one with none: the ranks go where the energy is."""
    spectra = [[9.0, 8.0, 0.01], [9.0] * 6 + [0.01], [0.02, 0.01]]
    alloc = allocate_by_spectrum(spectra, [10, 10, 10], budget=80, min_r=0, max_r=8)
    assert alloc.ranks == [2, 6, 0]


def test_spectrum_allocation_extends_a_flat_spectrum_past_its_length():
    """Measured at rank 2 with no decay, a module keeps its value past rank 2 (up to max_r)."""
    alloc = allocate_by_spectrum([[5.0, 5.0], [5.0, 1.0]], [10, 10], budget=60, min_r=1, max_r=4)
    assert alloc.ranks == [4, 2]


def test_spectrum_allocation_prices_ranks_per_parameter():
    """Equal spectra, one module three times as expensive per rank: the cheap one is served first."""
    alloc = allocate_by_spectrum([[4.0, 3.0, 2.0, 1.0]] * 2, [10, 30], budget=70, min_r=0, max_r=4)
    assert alloc.ranks == [4, 1]


@pytest.mark.parametrize(
    "spectra, message",
    [([[1.0, 2.0]], "non-increasing"), ([[float("nan")]], "finite"), ([[-1.0]], "finite")],
)
def test_spectrum_allocation_rejects_bad_spectra(spectra, message):
    with pytest.raises(ValueError, match=message):
        allocate_by_spectrum(spectra, [10], budget=40, min_r=0, max_r=4)


# --- predicted gain -------------------------------------------------------------------------------------


def test_predicted_gain_by_hand():
    """Value of ranks [2, 2] = (4 + 3) + (1 + 1) = 9; of [3, 1] = (4 + 3 + 2) + 1 = 10; [1, 3] extends the flat
    second spectrum past its measured length: 4 + (1 + 1 + 1) = 7."""
    spectra = [[4.0, 3.0, 2.0], [1.0, 1.0]]
    assert predicted_gain(spectra, [2, 2], [2, 2]) == 1.0
    assert predicted_gain(spectra, [2, 2], [3, 1]) == pytest.approx(10 / 9)
    assert predicted_gain(spectra, [2, 2], [1, 3]) == pytest.approx(7 / 9)
    assert math.isnan(predicted_gain([[0.0], [0.0]], [1, 1], [2, 0]))
    with pytest.raises(ValueError, match="same length"):
        predicted_gain(spectra, [2, 2], [4])


@SETTINGS
@given(spectrum_problems(equal_costs=True))
def test_predicted_gain_of_the_allocation_is_at_least_one_against_any_ranks_it_could_have_kept(problem):
    """With equal costs the threshold allocation maximises the value, so it is worth at least as much as any other
    feasible ranks (uniform ranks among them): a gain below 1 would mean the score chose ranks it values less."""
    spectra, costs, budget, min_r, max_r = problem
    alloc = allocate_by_spectrum(spectra, costs, budget, min_r, max_r)
    uniform = min(max_r, budget // sum(costs)) if costs else 0
    assume(costs and uniform >= min_r)
    gain = predicted_gain(spectra, [uniform] * len(spectra), alloc.ranks)
    assert math.isnan(gain) or gain >= 1 - 1e-9
