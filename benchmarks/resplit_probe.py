"""Would another split of what the default's signal steps saw cover the planted family's changes better?

Exploratory (no rule is chosen by it alone). Per family member and seed: replay the shipped default's signal steps
(``predicted_gain_replay.replay``: same seed, model, batches and optimizer as the run, stopped at the reallocation),
keep what its score read (each module's gradient spectrum and step consistency, and the adapter's learned update
spectrum at that step), then re-split the same budget by each rule below through the package's own
``allocate_by_spectrum`` and measure the planted energy the ranks leave uncovered, ``sum_m sum_{j >= rank_m}
(strength_m * decay_m ** j) ** 2`` (a proxy: it ignores how training reaches what the ranks allow). Rules:

* ``default``: the shipped default, ``sigma^2 * c^4`` (checked: its ranks equal the replayed run's);
* ``kind``: the same divided by the median total of the modules of its kind (``q_proj``, ``up_proj``, ...), so the
  kinds' gradient scales, set by the architecture, do not decide;
* ``floor``: the same less each module's tail (the mean of its last eight values), a noise floor;
* ``update``: the learned update's spectrum at the reallocation (the ``spectral`` score);
* ``mix``: the gradient spectrum's shape with the learned update's total energy as the module's size;
* ``crossfit``: noise removed per direction, not per module: the signal steps' sketches summed apart over even and
  odd steps (``X_e``, ``X_o``, noise independent between them, the expected gradient common), each direction's
  value ``max(u_eᵀ X_o v_e, 0) * max(u_oᵀ X_e v_o, 0)`` with ``(u, v)`` the ``j``-th singular pair of the other
  half: about ``sigma_j^2`` of the expected gradient where it stands above the noise, about 0 where it does not
  (the default's ``c^4`` weighs a module's whole spectrum, tail included, by one number);
* ``guard<z>``: the default's values, but no module cut below the number of its ``crossfit`` directions that stand
  ``z`` noise standard deviations clear in both halves (at most ``r``), so a need within ``r`` is not cut to fund
  growth elsewhere (``z`` 2 and 3);
* ``narrow``: the default's values within ``r/2..1.5r`` instead of ``1..2r``, half the move in each direction;
* ``wide``: the default's values within ``1..3r``: the looser cap, to read against the best ``3r`` split;
* ``flat<a>``: the default's values, but no module cut below the number of its learned update's singular values at
  least ``a`` times its largest (at most ``r``): a guard built on what the adapter uses instead of on the noise
  (``a`` 0.3, 0.5, 0.7).

``--batch-scale K`` replays with ``K`` times the suite's batch (the same signal steps, ``K`` times the tokens in each):
is the default's reading bound by the gradient noise of a CPU-sized batch? Its readings are cached apart (``-bK``).

    python benchmarks/resplit_probe.py --members 0 1 4 5 7 8 9 12 16 --seeds 0 [--cache DIR] [--batch-scale 4]
    python benchmarks/resplit_probe.py --cap-bound --members 0 1 2 3 4 8 9 10 11 14 15 19
    python benchmarks/resplit_probe.py --final-update --members 0 1 2 3 4 5 7 8 9 10 11 12 13 14 15 17 19

``--cap-bound`` replays nothing: per member, the share of uniform LoRA's uncovered planted energy that the *best*
split at the same budget covers under a ``2r``, ``3r`` and ``4r`` cap (``allocate_by_spectrum`` on the planted
energies themselves: an upper bound for any score), next to what the shipped default's recorded final ranks cover
(module names and costs from the member's ``lora`` seed-0 record).

``--final-update`` replays nothing either: per member and seed, the split of the same budget by uniform LoRA's own
learned update at the *end* of its run (the ``lora`` record's ``update_spectra``, rank ``r``, squared and extended
by ``allocate_by_spectrum`` as the ``spectral`` score's are) under each cap: more than any signal step can know of
the learned update, so it bounds what reading it at rank ``r`` could give a reallocation.

Prints one line per member and seed: the uncovered energy of uniform LoRA and of each rule, with the share of
uniform's uncovered energy each rule covers (the proxy's share of the oracle gap; the oracle covers all of it
up to the cap); and the Spearman correlation with the planted energy of the step consistency, the gradient's
energy and the learned update's energy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.family import SIGNAL_STEPS, member  # noqa: E402
from bench.methods import SHIPPED_DEFAULT  # noqa: E402
from bench.records import result_path  # noqa: E402
from bench.report import module_kind  # noqa: E402
from bench.stats import spearman  # noqa: E402
from bench.suites import SUITES  # noqa: E402
from peft_adaptive.allocation import allocate_by_spectrum  # noqa: E402
from peft_adaptive.scores import consistent_spectrum  # noqa: E402
from peft_adaptive.scores.gradient_spectrum import gradient_spectra  # noqa: E402
from peft_adaptive.scores.spectral import update_spectrum  # noqa: E402
from peft_adaptive.sketch import GradientSketch  # noqa: E402
from predicted_gain_replay import replay  # noqa: E402

RULES = (
    "default",
    "kind",
    "floor",
    "update",
    "mix",
    "crossfit",
    "guard2",
    "guard3",
    "narrow",
    "wide",
    "flat0.3",
    "flat0.5",
    "flat0.7",
)


def uniform_rank(seen: dict) -> int:
    """Uniform LoRA's rank ``r`` of a replayed run: the shipped default's cap is ``max_r = 2r``."""
    return seen["max_r"] // 2


def rule_bounds(rule: str, seen: dict) -> tuple[int, int]:
    """The rank bounds a rule splits within: the run's ``min_r..max_r`` (``max_r = 2r``), but for ``narrow``, the
    default's values kept within ``r/2..1.5r`` (a move toward uniform by half of each cap: the crude shrink), and
    for ``wide`` within ``min_r..3r``."""
    r = uniform_rank(seen)
    if rule == "narrow":
        return max(seen["min_r"], r // 2), r + r // 2
    if rule == "wide":
        return seen["min_r"], 3 * r
    return seen["min_r"], seen["max_r"]


def read_signals(suite: str, seed: int, batch_scale: int = 1) -> dict:
    """Replay the default's signal steps on ``suite``/``seed`` (with ``batch_scale`` times its batch) and return what
    its score read."""
    seen: dict = {}
    allocate = consistent_spectrum.ConsistentSpectrumScore.allocate

    def reading(self, collector, costs, budget, config):
        starts = collector.snapshot or [None] * len(collector.layers)
        seen.update(
            names=list(collector.names),
            spectra=gradient_spectra(collector),
            consistency=consistent_spectrum.module_consistencies(collector),
            update=[update_spectrum(m, collector.adapter, s) for m, s in zip(collector.layers, starts)],
            costs=list(costs),
            budget=int(budget),
            min_r=config.min_r,
            max_r=config.max_r,
            power=config.consistency_power,
        )
        scored = allocate(self, collector, costs, budget, config)
        seen["ranks"] = list(scored.allocation.ranks)
        return scored

    halves: dict[str, list] = {}
    record_step = GradientSketch.record_step

    def recording(self, scale: float = 1.0) -> bool:
        parity = self.steps % 2  # the step about to be folded in
        step = [t.clone() for t in self._step]  # record_step zeroes the step's buffers
        finite = record_step(self, scale)  # its own finiteness check: a skipped step goes into neither half
        sums = halves.setdefault("sums", [[torch.zeros_like(t) for t in self._total] for _ in range(2)])
        if finite:
            for total, folded in zip(sums[parity], step):
                total.add_(folded, alpha=1.0 / scale)
        return finite

    consistent_spectrum.ConsistentSpectrumScore.allocate = reading
    GradientSketch.record_step = recording
    try:
        seen.update(replay(suite, SHIPPED_DEFAULT, seed, batch_scale))
    finally:
        consistent_spectrum.ConsistentSpectrumScore.allocate = allocate
        GradientSketch.record_step = record_step
    even, odd = halves["sums"]
    seen["crossfit"] = [crossfit_spectrum(e, o) for e, o in zip(even, odd)]
    seen["half_noise"] = [half_noise(e, o) for e, o in zip(even, odd)]
    return seen


def half_noise(even: torch.Tensor, odd: torch.Tensor) -> float:
    """The noise variance of one entry of one half's sketch, ``|X_e - X_o|^2 / (2 numel)`` (the expected gradient
    cancels in the difference, the two halves' noise adds): the variance of each factor of a ``crossfit`` value."""
    return float((even.double() - odd.double()).pow(2).sum() / (2 * even.numel()))


def crossfit_spectrum(even: torch.Tensor, odd: torch.Tensor) -> list[float]:
    """Per direction ``j``, ``max(u_eᵀ X_o v_e, 0) * max(u_oᵀ X_e v_o, 0)`` (sorted, largest first): the product of two
    estimates of the expected gradient's ``j``-th singular value, each read on the half its direction was not found
    on, so their noise is independent of the direction (sketches of sums; only ratios between modules matter)."""
    even, odd = even.double(), odd.double()
    u_e, _, vh_e = torch.linalg.svd(even, full_matrices=False)
    u_o, _, vh_o = torch.linalg.svd(odd, full_matrices=False)
    along_e = torch.einsum("ij,il,jl->j", u_e, odd, vh_e).clamp_min(0)
    along_o = torch.einsum("ij,il,jl->j", u_o, even, vh_o).clamp_min(0)
    return sorted((along_e * along_o).tolist(), reverse=True)


def by_kind(names: list[str], values: list[list[float]]) -> list[list[float]]:
    """Each module's values over the median total of its kind's modules (``bench.report.module_kind``: ``q_proj``,
    or on BERT ``attention.output.dense`` apart from ``output.dense``)."""
    kinds = [module_kind(name) for name in names]
    totals: dict[str, list[float]] = {}
    for kind, v in zip(kinds, values):
        totals.setdefault(kind, []).append(sum(v))
    median = {kind: statistics.median(t) or 1.0 for kind, t in totals.items()}
    return [[x / median[kind] for x in v] for kind, v in zip(kinds, values)]


def rule_values(seen: dict, rule: str) -> list[list[float]]:
    """What each rank of each module is worth under ``rule`` (non-increasing per module)."""
    default = [
        [(s * c ** (seen["power"] / 2)) ** 2 for s in spectrum]
        for spectrum, c in zip(seen["spectra"], seen["consistency"])
    ]
    if rule in ("default", "narrow", "wide"):
        return default
    if rule == "kind":
        return by_kind(seen["names"], default)
    if rule == "floor":  # a tiny ramp keeps each list non-increasing where the floor zeroes its tail
        return [
            [max(v - statistics.mean(e[-8:]), 0.0) + 1e-30 * (len(e) - j) for j, v in enumerate(e)] for e in default
        ]
    if rule == "update":
        return [[s * s for s in u] for u in seen["update"]]
    floored = next((prefix for prefix in FLOORS if rule.startswith(prefix)), None)
    if floored:  # the default's values, after a floor no module is cut below (guard_floors, flat_floors)
        floors = FLOORS[floored](seen, float(rule.removeprefix(floored)))
        return [[GUARDED] * floor + v[floor:] for v, floor in zip(default, floors)]
    if rule == "crossfit":  # a vanishing ramp: where values tie at zero, a module's lower ranks come first
        return [[v + 1e-30 * (len(e) - j) for j, v in enumerate(e)] for e in seen["crossfit"]]
    if rule == "mix":
        return [
            [s * s / (sum(x * x for x in g) or 1.0) * sum(x * x for x in u) for s in g]
            for g, u in zip(seen["spectra"], seen["update"])
        ]
    raise ValueError(f"unknown rule {rule!r}; allowed: {RULES}")


GUARDED = 1e30  # a value no gradient energy reaches: the guarded ranks are handed out first


def guard_floors(seen: dict, z: float) -> list[int]:
    """Per module, how many of its cross-fitted directions stand clear of the noise (both factors above ``z`` noise
    standard deviations: value ``> (z sd)^2``), at most uniform LoRA's rank ``r`` (``max_r / 2`` for the shipped
    default): a module keeps at least that many ranks, so a need within ``r`` is not cut to fund growth elsewhere."""
    r = uniform_rank(seen)
    return [
        min(r, sum(v > z * z * noise for v in values)) for values, noise in zip(seen["crossfit"], seen["half_noise"])
    ]


def flat_floors(seen: dict, share: float) -> list[int]:
    """Per module, how many of its learned update's singular values at the reallocation are at least ``share`` times
    its largest, at most ``r``: the directions the adapter already uses, a module keeps at least that many ranks."""
    r = uniform_rank(seen)
    return [min(r, sum(s >= share * u[0] > 0 for s in u)) if u else 0 for u in seen["update"]]


#: the floor rules, by prefix: ``guard<z>`` and ``flat<a>``
FLOORS = {"guard": guard_floors, "flat": flat_floors}


def planted_energies(index: int, names: list[str]) -> list[list[float]]:
    """Per module (in ``names``' order) the planted change's squared singular values, [] where nothing is planted."""
    changes = {c.module: c for c in member(index).changes}
    out = []
    for name in names:
        change = next((c for module, c in changes.items() if module.endswith(name) or name.endswith(module)), None)
        out.append([] if change is None else [(change.strength * change.decay**j) ** 2 for j in range(change.rank)])
    return out


def uncovered(planted: list[list[float]], ranks: list[int]) -> float:
    return sum(sum(energies[rank:]) for energies, rank in zip(planted, ranks))


def covered_share(planted: list[list[float]], ranks: list[int], r: int) -> float | None:
    """The share of uniform LoRA's (rank ``r``) uncovered planted energy that ``ranks`` cover; None: none uncovered."""
    uniform = uncovered(planted, [r] * len(planted))
    return None if uniform <= 1e-9 else (uniform - uncovered(planted, ranks)) / uniform


def share_text(share: float | None, spec: str = ".2f") -> str:
    return "-" if share is None else format(share, spec)


def probe(index: int, seed: int, cache: Path | None, batch_scale: int = 1) -> str:
    suite = f"family-{index:02d}"
    scaled = "" if batch_scale == 1 else f"-b{batch_scale}"
    path = cache / f"{suite}-s{seed}{scaled}.json" if cache else None
    if path and path.is_file():
        seen = json.loads(path.read_text())
    else:
        seen = read_signals(suite, seed, batch_scale)
        if path:
            path.write_text(json.dumps(seen))
    m = member(index)
    planted = planted_energies(index, seen["names"])
    uniform = uncovered(planted, [m.r] * len(planted))
    line = f"{suite}{scaled} seed {seed} ({m.group}, {m.teacher}, r={m.r}, {len(m.changes)} changed): uniform {uniform:.3f}"
    for rule in RULES:
        ranks = allocate_by_spectrum(rule_values(seen, rule), seen["costs"], seen["budget"], *rule_bounds(rule, seen))
        if rule == "default" and list(ranks.ranks) != seen["ranks"]:
            raise SystemExit(f"{suite} seed {seed}: the re-split default's ranks differ from the replayed run's")
        share = share_text(covered_share(planted, ranks.ranks, m.r), "+.2f")
        line += f" | {rule} {uncovered(planted, ranks.ranks):.3f} ({share})"
    if "half_noise" in seen:
        line += " | guarded ranks (z 2, 3): " + ", ".join(
            f"{sum(guard_floors(seen, z))}/{m.r * len(planted)}" for z in (2.0, 3.0)
        )
    totals = [sum(p) for p in planted]
    steps = SIGNAL_STEPS[m.teacher]
    readings = {
        "step consistency": [steps * c for c in seen["consistency"]],
        "gradient energy": [sum(s * s for s in g) for g in seen["spectra"]],
        "update energy": [sum(s * s for s in u) for u in seen["update"]],
    }
    names = seen["names"]
    planted_total = dict(zip(names, totals))
    correlations = (f"{k} {spearman(dict(zip(names, v)), planted_total):+.2f}" for k, v in readings.items())
    return line + " || " + ", ".join(correlations)


def best_split(planted: list[list[float]], costs: list[int], r: int, min_r: int, cap: int) -> list[int]:
    """The ranks at uniform LoRA's budget (``r`` everywhere) that leave the least planted energy uncovered with every
    module in ``min_r..cap``: the planted energies are the values, so this bounds what any score can reach."""
    values = [energies + [0.0] * max(0, cap - len(energies)) for energies in planted]
    return list(allocate_by_spectrum(values, costs, r * sum(costs), min_r, cap).ranks)


CAP_FACTORS = (2, 3, 4)


def module_layout(record: dict) -> tuple[list[str], list[int]]:
    """A run record's adapted modules, in order, and each one's parameter cost per rank."""
    names = list(record["rank_costs"])
    return names, [record["rank_costs"][n] for n in names]


def default_ranks(suite: str, seed: int, names: list[str]) -> list[int] | None:
    """The ranks the shipped default's run of ``suite``/``seed`` ended with, in ``names``' order; None if not run."""
    path = result_path(suite, SHIPPED_DEFAULT, seed)
    if not path.is_file():
        return None
    ranks = json.loads(path.read_text())["ranks"]
    return [ranks[n] for n in names]


def cap_bound(index: int) -> str:
    """One member's line for ``--cap-bound``."""
    suite, m = f"family-{index:02d}", member(index)
    names, costs = module_layout(json.loads(result_path(suite, "lora", 0).read_text()))
    planted = planted_energies(index, names)
    line = (
        f"{suite} ({m.group}, {m.teacher}, r={m.r}, planted ranks {sorted((c.rank for c in m.changes), reverse=True)})"
    )
    min_r = SUITES[suite].min_r
    for factor in CAP_FACTORS:
        best = best_split(planted, costs, m.r, min_r, factor * m.r)
        line += f" | best at {factor}r {share_text(covered_share(planted, best, m.r))}"
    for seed in range(3):
        ranks = default_ranks(suite, seed, names)
        if ranks is not None:
            line += f" | default seed {seed} {share_text(covered_share(planted, ranks, m.r))}"
    return line


def coverage_text(planted: list[list[float]], ranks: list[int], r: int) -> str:
    """The covered share, or where uniform LoRA leaves nothing uncovered, the planted energy ``ranks`` leave."""
    share = covered_share(planted, ranks, r)
    return f"leaves {uncovered(planted, ranks):.3f}" if share is None else format(share, "+.2f")


def final_update(index: int) -> str:
    """One member's line for ``--final-update``: the covered share per cap and seed (where uniform LoRA leaves no
    planted energy uncovered, the energy the split leaves instead), next to the shipped default's ranks'."""
    suite, m = f"family-{index:02d}", member(index)
    line = f"{suite} ({m.group}, {m.teacher}, r={m.r})"
    for seed in range(3):
        path = result_path(suite, "lora", seed)
        if not path.is_file():
            continue
        lora = json.loads(path.read_text())
        names, costs = module_layout(lora)
        planted = planted_energies(index, names)
        values = [[s * s for s in lora["update_spectra"][n]] for n in names]
        splits = [
            allocate_by_spectrum(values, costs, m.r * sum(costs), SUITES[suite].min_r, factor * m.r).ranks
            for factor in CAP_FACTORS
        ]
        line += f" | seed {seed}: " + ", ".join(
            f"{f}r {coverage_text(planted, list(r), m.r)}" for f, r in zip(CAP_FACTORS, splits)
        )
        ranks = default_ranks(suite, seed, names)
        if ranks is not None:
            line += f" (default {coverage_text(planted, ranks, m.r)})"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", nargs="+", type=int, required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--cache", type=Path, help="keep each replay's reading here and reuse it")
    parser.add_argument("--batch-scale", type=int, default=1, help="replay with this many times the suite's batch")
    parser.add_argument("--cap-bound", action="store_true", help="the best split under each cap; no replay")
    parser.add_argument(
        "--final-update", action="store_true", help="the split by uniform LoRA's learned update at its end; no replay"
    )
    args = parser.parse_args()
    if args.final_update:
        for index in args.members:
            print(final_update(index), flush=True)
        return
    if args.cap_bound:
        for index in args.members:
            print(cap_bound(index), flush=True)
        return
    if args.cache:
        args.cache.mkdir(parents=True, exist_ok=True)
    for index in args.members:
        for seed in args.seeds:
            print(probe(index, seed, args.cache, args.batch_scale), flush=True)


if __name__ == "__main__":
    main()
