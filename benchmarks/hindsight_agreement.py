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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.methods import SHIPPED_DEFAULT  # noqa: E402
from bench.records import final_ranks, load_results  # noqa: E402
from bench.report import hindsight_runs  # noqa: E402
from bench.stats import spearman  # noqa: E402
from bench.suites import SUITES  # noqa: E402
from bench.tables import Results  # noqa: E402

#: the ``--methods``-like name of uniform LoRA's final update energy
LATE_READING = "lora end"


def final_update_energy(run: dict) -> dict[str, float]:
    """Each module's final update energy ``sum sigma^2`` per parameter of one rank."""
    return {
        name: sum(s * s for s in spectrum) / run["rank_costs"][name] for name, spectrum in run["update_spectra"].items()
    }


def agreements(suite: str, results: Results, method: str, seeds: list[int]) -> dict[int, float]:
    """Spearman correlation with the hindsight ranks, per seed where both runs are committed (with spectra)."""
    hindsight = hindsight_runs(SUITES[suite], results)
    if method == LATE_READING:
        runs = {
            seed: final_update_energy(run) for seed, run in results.get("lora", {}).items() if run.get("update_spectra")
        }
    else:
        runs = {seed: final_ranks(run) for seed, run in results.get(method, {}).items()}
    return {
        seed: spearman(hindsight[seed]["ranks"], runs[seed]) for seed in seeds if seed in hindsight and seed in runs
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", nargs="+", required=True, choices=sorted(SUITES))
    parser.add_argument("--methods", nargs="+", default=[SHIPPED_DEFAULT])
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(10)))
    args = parser.parse_args(argv)
    for suite in args.suite:
        results = load_results(suite)
        for method in (LATE_READING, *args.methods):
            found = agreements(suite, results, method, args.seeds)
            if found:
                by_seed = " ".join(f"s{seed} {rho:+.2f}" for seed, rho in found.items())
                print(f"{suite} | {method} | {by_seed} | mean {sum(found.values()) / len(found):+.2f}")


if __name__ == "__main__":
    main()
