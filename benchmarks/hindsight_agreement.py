"""How well does a reading of training, early or late, order the modules as the hindsight allocation does?

Reads committed runs only (no training). Per suite and seed, the Spearman correlation with the hindsight ranks
(``fixed-hindsight-random``'s, read off the same seed's ``lora-4x`` run) of

* ``lora end``: uniform LoRA's final update energy per parameter, ``sum sigma^2 / rank cost``, the reading a
  score would get if it could wait until the end of a rank-``r`` run;
* each ``--methods`` run's final ranks (the report's "agreement with hindsight").

    python benchmarks/hindsight_agreement.py --suite clm-cipher clm [--methods warm-consistent_spectrum4-random+max2r+reset]

Prints one line per suite and method: the correlations by seed and their mean.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scipy.stats import spearmanr  # noqa: E402

from bench.methods import SHIPPED_DEFAULT, hindsight_ranks  # noqa: E402
from bench.records import result_path  # noqa: E402
from bench.suites import SUITES  # noqa: E402


def final_update_energy(record: dict, names: list[str]) -> list[float]:
    """Each module's final update energy ``sum sigma^2`` per parameter of one rank (0 where it was not adapted)."""
    spectra, costs = record["update_spectra"], record["rank_costs"]
    return [sum(s * s for s in spectra.get(n, [])) / costs[n] for n in names]


def agreements(suite: str, method: str, seeds: list[int]) -> dict[int, float]:
    """Spearman correlation with the hindsight ranks, per seed where both runs are committed with spectra."""
    out = {}
    for seed in seeds:
        paths = (
            result_path(suite, "lora-4x", seed),
            result_path(suite, "lora" if method == "lora end" else method, seed),
        )
        if not all(p.is_file() for p in paths):
            continue
        four, run = (json.loads(p.read_text()) for p in paths)
        if not four.get("update_spectra") or (method == "lora end" and not run.get("update_spectra")):
            continue
        hindsight = hindsight_ranks(SUITES[suite], four)
        names = list(hindsight)
        reading = final_update_energy(run, names) if method == "lora end" else [run["ranks"].get(n, 0) for n in names]
        out[seed] = float(spearmanr(reading, [hindsight[n] for n in names])[0])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", nargs="+", required=True, choices=sorted(SUITES))
    parser.add_argument("--methods", nargs="+", default=[SHIPPED_DEFAULT])
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(10)))
    args = parser.parse_args(argv)
    for suite in args.suite:
        for method in ("lora end", *args.methods):
            found = agreements(suite, method, args.seeds)
            if found:
                by_seed = " ".join(f"s{seed} {rho:+.2f}" for seed, rho in found.items())
                print(f"{suite} | {method} | {by_seed} | mean {sum(found.values()) / len(found):+.2f}")


if __name__ == "__main__":
    main()
