"""Exploratory probe (issue 27): which per-module gradient statistic singles out the planted modules of a family member?

Trains uniform LoRA for the default's signal steps on members of the planted family (the harness's task, batches,
optimizer and schedule, seed 0), records every target module's full-weight gradient ``G_t`` at each step, and ranks
the modules by statistics of ``S = sum_t G_t`` and ``Q = sum_t ||G_t||_F^2``:

* ``fro``: ``||S||_F`` (what a full-gradient score such as ``gradient_spectrum`` grows with);
* ``top``: the largest singular value of ``S``;
* ``rel``: ``||S||_F / ||W||_F``;
* ``consistency``: ``||S||_F^2 / (T Q)`` in [0, 1], 1 when every step's gradient points the same way;
* ``fro_x_consistency``: ``||S||_F * consistency``;
* ``fro_x_sqrt_consistency``: ``||S||_F * sqrt(consistency)`` (orders modules as ``||S||_F^2 * consistency``, what
  ``score="consistent_spectrum"`` gives rank by);
* ``signal``: ``(||S||_F^2 - Q) / (T (T - 1))``, an unbiased estimate of ``||E G||_F^2`` for independent steps
  (the noise in ``||S||_F^2`` removed; the gradient-noise-scale identity of McCandlish et al., 2018).

For each it prints the AUC of planted against unplanted modules (1: every planted module above every other) and the
planted modules' positions. With ``--allocate`` it instead splits the member's budget as ``consistent_spectrum``
does (``allocate_by_spectrum`` on ``(sigma_j(S) * c ** (power / 2)) ** 2``, ``min_r`` 1, ``max_r = 2r``) for several
powers, optionally with each module's values divided by the median top value of its kind (``bench.report.module_kind``: ``q_proj`` over
the layers, ...), and prints how much of the oracle's ranks it covers (``sum min(rank, oracle rank) * cost`` over
the planted modules, over the same with the oracle's ranks capped at ``2r``) and the share of the rank moved above
``r`` that lands on planted modules. A lead, not a result: it reads no held-out metric and chooses nothing.

    python benchmarks/gradient_consistency_probe.py 0 1 4 5 8 9   # the family's choose members
    python benchmarks/gradient_consistency_probe.py 0 1 4 5 8 9 --allocate
"""

from __future__ import annotations

import argparse
import itertools

SPECTRUM_LENGTH = 32  # singular values of S kept per module for --allocate (the family's caps are at most 16)
STATISTICS = ("fro", "top", "rel", "consistency", "fro_x_consistency", "fro_x_sqrt_consistency", "signal")


def uniform_lora_on_member(member_index: int):
    """Uniform LoRA on family member ``member_index`` as the harness trains it (seed 0): the suite, the task, the
    model, its LoRA layers by name, and the tail of one training step (clip, optimizer and schedule step, zero_grad)."""
    import torch
    from transformers import set_seed

    from bench.methods import build, parse_method
    from bench.runner import CLIP_NORM, optimizer_and_schedule
    from bench.suites import SUITES
    from bench.tasks import make_task

    suite = SUITES[f"family-{member_index:02d}"]
    task, lora = make_task(suite), parse_method("lora")
    set_seed(0)
    base = task.base_model()
    set_seed(0)
    model = build(lora, task, base, 0)
    layers = {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    optimizer, schedule = optimizer_and_schedule(params, lora, suite)

    def finish_step() -> None:
        torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)

    return suite, task, model, layers, finish_step


def module_statistics(member_index: int, method_name: str) -> tuple[dict[str, dict[str, float]], set[str], int]:
    import torch

    from bench.family import member
    from bench.methods import parse_method, signal_steps

    suite, task, model, layers, finish_step = uniform_lora_on_member(member_index)
    for layer in layers.values():  # its .grad is then the full-weight gradient; it is not in the optimizer
        layer.base_layer.weight.requires_grad_(True)
    steps = signal_steps(parse_method(method_name), suite)
    sums = dict.fromkeys(layers, 0.0)
    squares = dict.fromkeys(layers, 0.0)
    for batch in task.batches(0, steps):
        task.loss(model, batch).backward()
        for name, layer in layers.items():  # the base weights are not clipped: only the LoRA factors are
            grad = layer.base_layer.weight.grad
            sums[name] = sums[name] + grad
            squares[name] += float(grad.pow(2).sum())
            layer.base_layer.weight.grad = None
        finish_step()
    stats = {}
    for name, layer in layers.items():
        total = sums[name]
        fro = float(total.norm())
        spectrum = torch.linalg.svdvals(total.detach())
        consistency = fro**2 / (steps * squares[name])
        stats[name] = {
            "fro": fro,
            "top": float(spectrum[0]),
            "spectrum": spectrum[:SPECTRUM_LENGTH].tolist(),
            "rel": fro / float(layer.base_layer.weight.norm()),
            "consistency": consistency,
            "fro_x_consistency": fro * consistency,
            "fro_x_sqrt_consistency": fro * consistency**0.5,
            "signal": (fro**2 - squares[name]) / (steps * (steps - 1)),
        }
    planted = {name for name in layers if any(name.endswith(c.module) for c in member(member_index).changes)}
    return stats, planted, steps


def auc(order: list[str], planted: set[str]) -> float:
    """The share of (planted, unplanted) pairs in which the planted module comes first in ``order``."""
    above, pairs, seen_planted = 0, 0, 0
    for name in order:
        if name in planted:
            seen_planted += 1
        else:
            above += seen_planted
            pairs += len(planted)
    return above / pairs if pairs else float("nan")


ALLOCATE_POWERS = (0, 2, 4, 8, 16)


def coverage(stats: dict[str, dict], member_index: int, power: float, by_type: bool) -> tuple[float, float]:
    """(oracle coverage, share of the moved rank on planted modules) of ``consistent_spectrum``'s split at ``power``."""
    import statistics

    from bench.family import member, module_costs
    from bench.report import module_kind
    from peft_adaptive.allocation import allocate_by_spectrum

    spec = member(member_index)
    costs_by_module = module_costs(spec.teacher)
    names = list(stats)
    costs = [next(c for m, c in costs_by_module.items() if n.endswith(m)) for n in names]
    values = [[v * stats[n]["consistency"] ** (power / 2) for v in stats[n]["spectrum"]] for n in names]
    if by_type:
        kinds = [module_kind(n) for n in names]
        tops: dict[str, list[float]] = {}
        for kind, vs in zip(kinds, values):
            tops.setdefault(kind, []).append(vs[0])
        medians = {kind: statistics.median(t) for kind, t in tops.items()}
        values = [[v / medians[kind] for v in vs] for kind, vs in zip(kinds, values)]
    cap = 2 * spec.r
    ranks = allocate_by_spectrum([[v * v for v in vs] for vs in values], costs, spec.r * sum(costs), 1, cap).ranks
    oracle = {i: rank for i, n in enumerate(names) for m, rank in spec.oracle_ranks.items() if n.endswith(m)}
    covered = sum(min(ranks[i], rank) * costs[i] for i, rank in oracle.items())
    needed = sum(min(rank, cap) * costs[i] for i, rank in oracle.items())
    moved = [max(rank - spec.r, 0) * cost for rank, cost in zip(ranks, costs)]
    return covered / needed, sum(moved[i] for i in oracle) / max(sum(moved), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("members", type=int, nargs="+", help="family member indices")
    parser.add_argument("--method", default="warm-gradient_spectrum-random+max2r+reset", help="whose signal steps")
    parser.add_argument("--allocate", action="store_true", help="the split's oracle coverage instead of the AUCs")
    args = parser.parse_args()
    for index in args.members:
        stats, planted, steps = module_statistics(index, args.method)
        if args.allocate:
            for by_type, power in itertools.product((False, True), ALLOCATE_POWERS):
                covered, moved = coverage(stats, index, power, by_type)
                label = f"power {power}" + (", per-type median" if by_type else "")
                print(f"family-{index:02d} {label:26s} oracle covered {covered:.2f}, moved rank on planted {moved:.2f}")
            continue
        print(f"family-{index:02d}: {len(planted)} planted of {len(stats)} modules, {steps} signal steps")
        for key in STATISTICS:
            order = sorted(stats, key=lambda name: -stats[name][key])
            positions = sorted(order.index(name) for name in planted)
            print(f"  {key:18s} AUC {auc(order, planted):.2f}  planted at positions (0 = top) {positions[:10]}")


if __name__ == "__main__":
    main()
