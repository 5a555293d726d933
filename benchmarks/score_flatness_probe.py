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

    python benchmarks/score_flatness_probe.py [--results DIR]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

DEFAULT = "warm-consistent_spectrum4-random+max2r+reset"
RESULTS = Path(__file__).resolve().parent / "results" / "allocation"


def normalised_entropy(values: list[float]) -> float:
    """Entropy of ``values`` (non-negative, one per module) as a distribution, over its maximum ``log n``."""
    total = sum(values)
    return -sum(v / total * math.log(v / total) for v in values if v > 0) / math.log(len(values))


def top_share(values: list[float], fraction: float = 0.1) -> float:
    """The share of the total held by the top ``fraction`` of the values (at least one)."""
    ordered = sorted(values, reverse=True)
    return sum(ordered[: max(1, int(len(ordered) * fraction))]) / sum(ordered)


def metric(path: Path) -> float | None:
    return json.loads(path.read_text())["metrics"]["gap_closed"] if path.is_file() else None


def rows(root: Path):
    for member in sorted(root.glob("family-*")):
        for record_path in sorted((member / DEFAULT).glob("seed*.json")):
            record = json.loads(record_path.read_text())
            lora = metric(member / "lora" / record_path.name)
            if lora is None:
                continue
            oracle = metric(member / "oracle" / record_path.name)
            scores = record["allocation"]["scores"]
            yield (
                member.name,
                record["seed"],
                normalised_entropy(scores),
                top_share(scores),
                record["allocation"]["predicted_gain"],
                record["metrics"]["gap_closed"] - lora,
                None if oracle is None else oracle - lora,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    print("| member | seed | H | top10% | gain | default − lora | oracle − lora |")
    print("|---|---|---|---|---|---|---|")
    for member, seed, entropy, top, gain, default, oracle in rows(args.results):
        gap = "–" if oracle is None else f"{oracle:+.3f}"
        print(f"| {member} | {seed} | {entropy:.2f} | {top:.2f} | {gain:.3f} | {default:+.3f} | {gap} |")


if __name__ == "__main__":
    main()
