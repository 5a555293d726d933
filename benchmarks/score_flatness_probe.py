"""Could a shrink-to-uniform rule keyed on how flat the default's scores are spare the planted family's flat member?

Exploratory, offline (no run): per family member and seed, read the shipped default's committed record
(``allocation.scores``: one value per module at the reallocation; ``allocation.predicted_gain``) and print how
concentrated its scores were, next to what the run gained over uniform LoRA and what the oracle could:

* ``H``: the scores' normalised entropy (1: all equal, 0: one module holds everything);
* ``top10%``: the share of the score held by the top tenth of the modules;
* ``gain``: the reallocation's predicted gain (the score's own value of the new ranks over the old);
* ``default − lora`` and ``oracle − lora`` (``gap_closed``, same seed).

A rule of that kind can only help if the member where every module needs about the same rank (family-07) reads
flatter than the members where the default wins.

    python benchmarks/score_flatness_probe.py   # $PEFT_ADAPTIVE_ALLOCATION_RESULTS: another results tree
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.methods import SHIPPED_DEFAULT  # noqa: E402
from bench.records import load_results, results_root  # noqa: E402
from bench.stats import paired_differences  # noqa: E402


def normalised_entropy(values: list[float]) -> float:
    """Entropy of ``values`` (non-negative, one per module) as a distribution, over its maximum ``log n``."""
    total = sum(values)
    return -sum(v / total * math.log(v / total) for v in values if v > 0) / math.log(len(values))


def top_share(values: list[float], fraction: float = 0.1) -> float:
    """The share of the total held by the top ``fraction`` of the values (at least one)."""
    ordered = sorted(values, reverse=True)
    return sum(ordered[: max(1, int(len(ordered) * fraction))]) / sum(ordered)


def rows():
    """Per family member and seed with both a default and a ``lora`` run: the table's values."""
    for member in sorted(path.name for path in results_root().glob("family-*") if path.is_dir()):
        results = load_results(member)
        default = results.get(SHIPPED_DEFAULT, {})
        gains = paired_differences(default, results.get("lora", {}), "gap_closed")
        oracle_gains = paired_differences(results.get("oracle", {}), results.get("lora", {}), "gap_closed")
        for seed, gain in gains.items():
            allocation = default[seed]["allocation"]
            scores = allocation["scores"]
            yield (
                member,
                seed,
                normalised_entropy(scores),
                top_share(scores),
                allocation["predicted_gain"],
                gain,
                oracle_gains.get(seed),
            )


def main() -> None:
    print("| member | seed | H | top10% | gain | default − lora | oracle − lora |")
    print("|---|---|---|---|---|---|---|")
    for member, seed, entropy, top, gain, default, oracle in rows():
        gap = "–" if oracle is None else f"{oracle:+.3f}"
        print(f"| {member} | {seed} | {entropy:.2f} | {top:.2f} | {gain:.3f} | {default:+.3f} | {gap} |")


if __name__ == "__main__":
    main()
