"""Score strategies, gradient growth and rank 0 on a model with planted changes of known rank."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_adaptive import AdaptiveLoraConfig
from peft_adaptive.resize import lora_factors
from peft_adaptive.scores import SCORES
from peft_adaptive.scores.consistent_spectrum import consistency

from .planted import inputs, planted_pair, row_space_fraction
from .tiny_models import tiny_llama, token_batch

TARGETS = ["branches.0", "branches.1", "branches.2"]


def planted_student(**config):
    student, teacher, changes = planted_pair()
    config = {"r": 2, "target_modules": TARGETS, "signal_steps": 5, "min_r": 0, "max_r": 6, **config}
    return get_peft_model(student, AdaptiveLoraConfig(**config)), teacher, changes


def warmup(model, teacher, steps: int = 5, lr: float = 1e-2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.start_signal_collection()
    for step in range(steps):
        x = inputs(seed=step)
        torch.nn.functional.mse_loss(model(x), teacher(x)).backward()
        model.record_gradients()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


@pytest.mark.parametrize(
    "score", ["gradient_spectrum", "consistent_spectrum", "sketch_energy", "spectral", "sensitivity", "norms"]
)
def test_scores_find_the_planted_modules(score):
    """Every strategy sends the unchanged branch to rank 0 and the rank-3 change the most rank."""
    model, teacher, _ = planted_student(score=score)
    optimizer = warmup(model, teacher)
    report = model.reallocate(optimizer)
    ranks = dict(zip(report.names, report.ranks_after))
    assert report.score == score
    assert report.used <= report.budget
    assert ranks["branches.0"] == 0 and report.removed == ["branches.0"]
    assert ranks["branches.1"] >= ranks["branches.2"] >= 1


@pytest.mark.parametrize("score", ["gradient_spectrum", "consistent_spectrum", "spectral"])
def test_spectrum_scores_find_the_planted_ranks(score):
    """The spectrum strategies read the *rank* of each change, not only its size: 3 and 1 of a 6-rank budget."""
    model, teacher, _ = planted_student(score=score, max_r=4)
    report = model.reallocate(warmup(model, teacher))
    ranks = dict(zip(report.names, report.ranks_after))
    assert ranks["branches.1"] >= 3 and ranks["branches.2"] >= 1 and ranks["branches.0"] == 0


def test_consistency_identities():
    g = torch.Generator().manual_seed(0)
    noise = [torch.randn(40, 50, generator=g) for _ in range(400)]

    def of(gradients):
        total = torch.stack(gradients).sum(0)
        return consistency(float(total.pow(2).sum()), float(sum(x.pow(2).sum() for x in gradients)), len(gradients))

    same = torch.randn(40, 50, generator=g)
    assert of([same] * 10) == pytest.approx(1.0)  # every step agrees
    assert of([same, -same]) == 0.0  # they cancel
    assert of([same, 2 * same, 0.5 * same]) < 1.0  # same direction, unequal sizes: Cauchy-Schwarz is strict
    assert of(noise) == pytest.approx(1 / 400, rel=0.2)  # independent zero-mean noise: 1/T
    # per-step signal |E G|^2 = 0.25 N against noise N: c = 0.25 / 1.25 + (1/T)(1 / 1.25)
    assert of([x + 0.5 for x in noise]) == pytest.approx(0.2 + 0.8 / 400, abs=0.01)
    assert consistency(4.0, 0.0, samples=5) == 1.0  # no per-step energies recorded (an older checkpoint)
    assert consistency(4.0, 1.0, samples=0) == 1.0


def test_consistent_spectrum_discounts_a_module_whose_gradient_is_noise():
    """Branch 0 is fitted to fresh random targets every step (a large gradient that never agrees with itself), the
    planted rank-3 change in branch 1 is smaller and consistent: gradient_spectrum gives branch 0 the most rank,
    consistent_spectrum moves rank from it to branch 1."""
    ranks = {}
    for score in ("gradient_spectrum", "consistent_spectrum"):
        model, teacher, _ = planted_student(score=score, r=2, max_r=4, min_r=0, signal_steps=8)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model.start_signal_collection()
        for step in range(8):
            x = inputs(seed=step)
            with torch.no_grad():
                target = teacher(x)
                target[:, :48] += 1.5 * torch.randn(x.shape[0], 48, generator=torch.Generator().manual_seed(100 + step))
            torch.nn.functional.mse_loss(model(x), target).backward()
            model.record_gradients()
            optimizer.step()
            optimizer.zero_grad()
        report = model.reallocate(optimizer)
        ranks[score] = dict(zip(report.names, report.ranks_after))
    spectrum, consistent = ranks["gradient_spectrum"], ranks["consistent_spectrum"]
    assert spectrum["branches.0"] > spectrum["branches.1"]
    assert consistent["branches.0"] < spectrum["branches.0"] and consistent["branches.1"] > spectrum["branches.1"]


def test_gradient_growth_takes_the_directions_the_gradient_wants():
    """New rows of A lie in the planted change's row space (random rows would put about 3/48 of their norm there)
    and are orthogonal to the rows A had; B is zero there, so the output does not move."""
    model, teacher, changes = planted_student(score="gradient_spectrum", growth="gradient")
    optimizer = warmup(model, teacher)
    layer = model.base_model.adapted_modules()["branches.1"]
    old_A = lora_factors(layer, "default")[0].detach().clone()
    x = inputs(seed=99)
    with torch.no_grad():
        before = model(x)
    model.reallocate(optimizer)
    A, B = lora_factors(layer, "default")
    new_rows = A[old_A.shape[0] :].detach()
    assert new_rows.shape[0] >= 1
    # not 1: A already learned part of the change, and the new rows must be orthogonal to it
    assert row_space_fraction(new_rows, changes["branches.1"]) > 0.7
    assert (new_rows @ old_A.T).abs().max() < 1e-5 * new_rows.norm() * old_A.norm()
    assert not B[:, old_A.shape[0] :].any()
    assert new_rows.pow(2).mean().sqrt() == pytest.approx(old_A.pow(2).mean().sqrt().item(), rel=0.05)
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-6)


def test_random_growth_is_the_control():
    model, teacher, changes = planted_student(score="gradient_spectrum", growth="random")
    optimizer = warmup(model, teacher)
    layer = model.base_model.adapted_modules()["branches.1"]
    r = layer.r["default"]
    model.reallocate(optimizer)
    new_rows = lora_factors(layer, "default")[0][r:].detach()
    assert row_space_fraction(new_rows, changes["branches.1"]) < 0.25


def test_every_score_reallocates_a_real_model_within_budget():
    for score in SCORES:
        model = get_peft_model(
            tiny_llama(), AdaptiveLoraConfig(r=4, target_modules="all-linear", signal_steps=2, score=score)
        )
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.start_signal_collection()
        for step in range(2):
            ids = token_batch(seed=step)
            model(input_ids=ids, labels=ids).loss.backward()
            model.record_gradients()
            optimizer.step()
            optimizer.zero_grad()
        report = model.reallocate(optimizer)
        assert report.used <= report.budget and report.used >= report.budget - max(
            a + b for a, b in (lora_factors(m, "default")[0].shape for m in model.base_model.adapted_modules().values())
        ), score
        ids = token_batch(seed=5)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()  # the optimizer is consistent with the new parameters


def test_explicit_ranks_are_checked():
    model, teacher, _ = planted_student()
    warmup(model, teacher, steps=1)
    with pytest.raises(ValueError, match="missing"):
        model.reallocate(ranks={"branches.0": 2})
    with pytest.raises(ValueError, match="fit the budget"):
        model.reallocate(ranks={"branches.0": 6, "branches.1": 6, "branches.2": 6})
    report = model.reallocate(ranks={"branches.0": 1, "branches.1": 4, "branches.2": 1})
    assert report.ranks_after == [1, 4, 1]


def test_a_registered_score_is_one_class_and_one_call():
    """A user's score: what it needs collected and how it allocates; the config and the reallocation take it."""
    from peft_adaptive.allocation import allocate_ranks
    from peft_adaptive.scores import Needs, Score, ScoredAllocation, register_score

    class LastBranchScore(Score):
        name = "last_branch"
        gradient_only = True

        def needs(self, config, layers, adapter):
            return Needs(grad_sum=True)

        def allocate(self, collector, costs, budget, config):
            assert collector.b_grad_sum is not None  # what needs() asked for was collected
            values = [1.0 if name == "branches.2" else 0.0 for name in collector.names]
            return ScoredAllocation(values, allocate_ranks(values, costs, budget, config.min_r, config.max_r))

    with pytest.raises(ValueError, match="score must be one of"):
        AdaptiveLoraConfig(score="last_branch")
    register_score(LastBranchScore())
    try:
        model, teacher, _ = planted_student(score="last_branch")
        report = model.reallocate(warmup(model, teacher, steps=2))
        assert dict(zip(report.names, report.ranks_after)) == {"branches.0": 0, "branches.1": 0, "branches.2": 6}
        assert report.score == "last_branch"
    finally:
        SCORES.pop("last_branch")
