"""The GLUE benchmark's parent process: prepare the data, plan the runs and their budgets, run each in a worker
process, and write the results as they come in.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import glue_worker
from bench import common
from bench.data import TASKS, load_split, take_subset
from bench.models import resolve_model
from glue_report import write_outputs
from glue_worker import RunSpec
from methods import Method, plan_methods

#: the script each run executes in a fresh process
WORKER_SCRIPT = str(Path(glue_worker.__file__).resolve())


def prepare_task_data(task: str, args: argparse.Namespace, model_path: str, out_dir: Path) -> dict[str, Any]:
    """Read, subset and tokenize ``task`` once; every run of the task loads the same files."""
    from datasets import Dataset, disable_progress_bars
    from transformers import AutoTokenizer

    disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    spec = TASKS[task]
    facts: dict[str, Any] = {}
    for split, limit in (("train", args.train_limit), ("dev", args.eval_limit)):
        rows, source = load_split(task, split, args.glue_dir)
        facts[f"{split}_rows_total"] = len(rows["label"])
        rows = take_subset(rows, limit)
        encoded = tokenizer(*(rows[c] for c in spec.text_columns), truncation=True, max_length=args.max_length)
        dataset = Dataset.from_dict({**encoded, "labels": rows["label"]})
        dataset.save_to_disk(str(out_dir / "data" / task / split))
        facts[f"{split}_rows_used"] = len(dataset)
        facts["source"] = source
    return facts


def steps_for(task_facts: dict[str, Any], args: argparse.Namespace) -> int:
    if args.max_steps:
        return args.max_steps
    return math.ceil(task_facts["train_rows_used"] / args.batch_size) * args.epochs


def run_spec(args: argparse.Namespace, task: str, method: Method, seed: int, out_dir: Path, max_steps: int) -> RunSpec:
    tag = f"{task}-{method.name}-s{seed}".replace(" ", "_").replace("/", "-").replace("(", "").replace(")", "")
    return RunSpec(
        task=task,
        method=asdict(method),
        seed=seed,
        model=args.model_path,
        data_dir=str(out_dir / "data" / task),
        result_path=str(out_dir / "runs" / f"{tag}.json"),
        r=args.r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        targets=args.targets,
        lr=args.lr,
        full_lr=args.full_lr,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        max_steps=max_steps,
        lr_warmup_ratio=args.lr_warmup_ratio,
        adalora_init_r=args.adalora_init_r or math.ceil(1.5 * args.r),
        adalora_tinit=args.adalora_tinit if args.adalora_tinit is not None else args.signal_steps,
        adalora_tfinal=args.adalora_tfinal or max(1, round(0.2 * max_steps)),
        adalora_deltat=args.adalora_deltat or max(1, min(10, max_steps // 50)),
        eva_rho=args.eva_rho,
        metric_backend=args.metric_backend,
        bf16=args.bf16,
    )


def run_in_subprocess(spec: RunSpec, log_path: Path, bar) -> dict[str, Any]:
    """Run one worker; its progress lines advance ``bar``, everything else goes to the log."""
    spec_path = Path(spec.result_path).with_suffix(".spec.json")
    common.write_json(spec_path, asdict(spec))
    returncode = common.run_worker_process([WORKER_SCRIPT, str(spec_path)], log_path, bar, spec.max_steps)
    if returncode != 0 or not Path(spec.result_path).is_file():
        tail = log_path.read_text()[-2000:]
        return {**_identity(spec), "status": "failed", "returncode": returncode, "error_tail": tail}
    return json.loads(Path(spec.result_path).read_text())


def _identity(spec: RunSpec) -> dict[str, Any]:
    return {"task": spec.task, "method": spec.method["name"], "kind": spec.method["kind"], "seed": spec.seed}


# --- budgets ------------------------------------------------------------------------------------------


def module_costs(model_path: str, targets: str, num_labels: int = 2) -> dict[str, int]:
    """``fan_in + fan_out`` of every targeted module, from the config alone (meta device, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(model_path, num_labels=num_labels)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    names = common.block_linear_names(model, targets)
    modules = dict(model.named_modules())
    return {n: modules[n].in_features + modules[n].out_features for n in names}


def planned_budget_table(costs: dict[str, int], args: argparse.Namespace, kinds: list[str]) -> str:
    """What each method's final adapter parameter count will be, before anything runs."""
    n, values = len(costs), list(costs.values())
    budget = common.lora_budget(values, args.r)
    total_r = args.r * n
    init_r = args.adalora_init_r or math.ceil(1.5 * args.r)
    rows = {
        "lora": (f"r={args.r} on {n} modules", budget, budget),
        "adaptive": (f"budget = LoRA r={args.r}, ranks {1}..{4 * args.r}", budget - max(values), budget),
        "adalora": (
            f"init_r={init_r} -> target_r={args.r} (sum of ranks {total_r})",
            total_r * (min(values) + 1),
            total_r * (max(values) + 1),
        ),
        "eva": (
            f"r={args.r}, rho={args.eva_rho} (sum of ranks {total_r} kept)",
            total_r * min(values),
            total_r * max(values),
        ),
    }
    lines = [
        f"Adapter parameter budget (rank-dependent parameters, sum of rank * (fan_in + fan_out)); LoRA r={args.r}: {budget:,}",
        "| method | configuration | final adapter params | vs LoRA |",
        "|---|---|---|---|",
    ]
    for kind in kinds:
        if kind not in rows:
            continue
        text, low, high = rows[kind]
        span = f"{low:,}" if low == high else f"{low:,} .. {high:,}"
        ratio = f"{low / budget:.4f}" if low == high else f"{low / budget:.4f} .. {high / budget:.4f}"
        lines.append(f"| {kind} | {text} | {span} | {ratio} |")
    if any(abs(v / budget - 1) > 0.02 for _, low, high in rows.values() for v in (low, high)):
        lines.append(
            "Note: the targeted modules differ in fan_in + fan_out, so AdaLoRA/EVA (whose budgets count ranks, not "
            "parameters) are not guaranteed to land within 2%; the measured counts are checked after the runs."
        )
    return "\n".join(lines)


# --- running ------------------------------------------------------------------------------------------


def run_benchmark(args: argparse.Namespace, argv: list[str]) -> None:
    from tqdm.auto import tqdm

    args.model_path = resolve_model(args.model)
    out_dir = args.out or common.RESULTS_DIR / f"glue-{args.mode}-{common.timestamp()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    costs = module_costs(args.model_path, args.targets)
    print(
        planned_budget_table(costs, args, list(dict.fromkeys(args.methods + (["adaptive"] if args.ablation else []))))
    )
    print(f"GLUE data: {args.glue_dir or 'hub (nyu-mll/glue)'}; model: {args.model_path}; output: {out_dir}")
    task_facts: dict[str, dict] = {}
    plan: list[RunSpec] = []
    for task in args.tasks:
        task_facts[task] = prepare_task_data(task, args, args.model_path, out_dir)
        steps = steps_for(task_facts[task], args)
        task_facts[task]["steps"] = steps
        for seed in args.seeds:
            for method in plan_methods(args, steps):
                plan.append(run_spec(args, task, method, seed, out_dir, steps))
    print(
        f"{len(plan)} runs: "
        + ", ".join(sorted({s.method["name"] for s in plan}))
        + f"; tasks {args.tasks}; seeds {args.seeds}"
    )
    if args.dry_run:
        return
    payload = {
        "meta": common.run_metadata(argv),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "tasks": task_facts,
        "runs": [],
    }
    with tqdm(total=sum(s.max_steps for s in plan), unit="step", desc="GLUE") as bar:
        for spec in plan:
            bar.set_postfix_str(f"{spec.task}/{spec.method['name']}/s{spec.seed}")
            log = out_dir / "logs" / (Path(spec.result_path).stem + ".log")
            record = run_in_subprocess(spec, log, bar)
            payload["runs"].append(record)
            _print_run(record, bar)
            payload["wall_s"] = time.perf_counter() - started
            common.write_json(out_dir / "runs.json", payload)
    payload["wall_s"] = time.perf_counter() - started
    print(write_outputs(payload, out_dir))
    print(f"\nwrote {out_dir}/runs.json, results.md, metric.png, ranks_<task>.png")


def _print_run(record: dict, bar) -> None:
    if record.get("status") != "ok":
        bar.write(f"FAILED {record['task']}/{record['method']}/s{record['seed']}:\n{record.get('error_tail', '')}")
        return
    params = record.get("adapter_params", record["trainable_params"])
    bar.write(
        f"{record['task']}/{record['method']}/s{record['seed']}: {record['metric_name']}={record['metric']:.4f} "
        f"params={params:,} time={record['time_s']:.0f}s rss={record['peak_rss_mb']:.0f}MB"
    )
