"""Replay a committed run's signal steps and report its reallocation's predicted gain, without training further.

Runs recorded before the allocation report carried ``predicted_gain`` (the new ranks' value over the old ones' by
the score's own spectra, ``peft_adaptive.allocation.predicted_gain``) can be read again: the same seed, model,
batches and optimizer as the run (``bench.runner``), stopped right after the reallocation. The replayed ranks are
checked against the record's, so a replay that drifted from the run says so instead of reporting a gain.

    python benchmarks/predicted_gain_replay.py --suite family-02 glue-sst2 --seeds 0 1 2 \
        [--method warm-consistent_spectrum2-random+max2r+reset] [--out gains.json]

Prints one JSON line per run: suite, method, seed, predicted_gain, ranks_match.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.methods import SHIPPED_DEFAULT, parse_method, signal_steps  # noqa: E402
from bench.records import result_path  # noqa: E402
from bench.runner import initialise, optimizer_and_schedule, seeded_model, train  # noqa: E402
from bench.suites import SUITES  # noqa: E402
from bench.tasks import make_task  # noqa: E402


def replay(suite_name: str, method_name: str, seed: int, batch_scale: int = 1) -> dict:
    """The run's first ``signal_steps`` optimizer steps and its reallocation; returns its predicted gain. With
    ``batch_scale`` the steps take that many times the suite's batch (then the ranks cannot match the record's)."""
    method = parse_method(method_name)
    suite = SUITES[suite_name]
    task = make_task(replace(suite, batch_size=suite.batch_size * batch_scale))
    model, _, _ = seeded_model(method, task, seed)  # as the run starts, so the same random numbers are drawn
    before = initialise(method, task, model, seed, calib_batches=16)
    optimizer, schedule = optimizer_and_schedule([p for p in model.parameters() if p.requires_grad], method, task.suite)
    last = signal_steps(method, task.suite)  # the reallocation's step
    report = train(model, method, task, seed, optimizer, schedule, 0.0, before.get("report"), last_step=last).report
    record = result_path(suite_name, method_name, seed)
    recorded = json.loads(record.read_text())["ranks"] if record.is_file() else None
    replayed = dict(zip(report.names, report.ranks_after))
    match = None if recorded is None else all(recorded.get(n, 0) == r for n, r in replayed.items())
    return {
        "suite": suite_name,
        "method": method_name,
        "seed": seed,
        "predicted_gain": report.predicted_gain,
        "ranks_match": match,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--method", default=SHIPPED_DEFAULT)
    parser.add_argument("--out", type=Path, help="append the JSON lines to this file too")
    args = parser.parse_args()
    for suite, seed in itertools.product(args.suite, args.seeds):
        line = json.dumps(replay(suite, args.method, seed))
        print(line, flush=True)
        if args.out:
            with args.out.open("a") as out:
                out.write(line + "\n")


if __name__ == "__main__":
    main()
