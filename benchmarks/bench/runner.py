"""Running: one (suite, method, seed) in this process (``run_one``, ``worker``), or many, each in a fresh worker
process, skipping those with a result already (``run_jobs``)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict

from . import common
from .methods import BASELINE_ALLOCATIONS, SIGNAL_STEP_KINDS, baseline_ranks, build, parse_method, signal_steps
from .records import result_path
from .suites import SUITES, apply_overrides
from .tasks import make_task

Job = tuple[str, str, int]  # (suite, method, seed)


def run_one(suite_name: str, method_name: str, seed: int, calib_batches: int) -> dict:
    """Train ``method_name`` on ``suite_name`` with ``seed`` in this process; returns the run's JSON record."""
    import torch
    from transformers import get_linear_schedule_with_warmup, set_seed

    from peft_adaptive import calibrate_adaptive_lora

    suite = SUITES[suite_name]
    method = parse_method(method_name)
    task = make_task(suite)
    set_seed(seed)
    base = task.base_model()
    base_metrics = task.evaluate(base) if hasattr(task, "evaluate") else {}
    set_seed(seed)
    model = build(method, task, base, seed)
    tuner = model.base_model
    started = time.perf_counter()
    report = None
    if method.kind == "calib":
        calibration = task.batches(seed + 10_000, calib_batches)  # not the training batches
        ranks = None
        if method.allocation in BASELINE_ALLOCATIONS:
            ranks = baseline_ranks(method.allocation, tuner, seed, suite)
        report = calibrate_adaptive_lora(
            model, calibration, loss_fn=task.loss, allocate=method.allocation != "uniform", ranks=ranks, seed=seed
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=suite.lr, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, int(0.06 * suite.steps)), suite.steps)
    collecting = method.kind in (*SIGNAL_STEP_KINDS, "default")
    if collecting:
        tuner.start_signal_collection(seed=seed)
    losses = []
    for step, batch in enumerate(task.batches(seed, suite.steps), start=1):
        loss = task.loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        if collecting:
            tuner.record_gradients()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            recent = statistics.fmean(losses[-50:])
            print(
                f"step {step}/{suite.steps}: train loss {recent:.5f} ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
        if collecting and step == signal_steps(method, suite):
            collecting = False
            ranks = (
                baseline_ranks(method.allocation, tuner, seed, suite)
                if method.allocation in BASELINE_ALLOCATIONS
                else None
            )
            report = tuner.reallocate(optimizer, step=step, seed=seed, ranks=ranks)
    train_seconds = time.perf_counter() - started
    metrics = task.finish(task.evaluate(model), base_metrics)
    from peft_adaptive.resize import cost_per_rank

    modules = {n: m for n, m in model.base_model.model.named_modules() if hasattr(m, "r") and isinstance(m.r, dict)}
    ranks = {n: m.r["default"] for n, m in modules.items() if "default" in m.r}
    used = sum(r * cost_per_rank(modules[n], "default") for n, r in ranks.items())
    return {
        "suite": suite_name,
        "method": method_name,
        "seed": seed,
        "metrics": metrics,
        "train_loss_last50": statistics.fmean(losses[-50:]),
        "train_loss_curve": [round(statistics.fmean(losses[i : i + 10]), 5) for i in range(0, len(losses), 10)],
        "adapter_params": used,
        "ranks": ranks,
        "allocation": None
        if report is None
        else {"step": report.step, "scores": report.scores, "removed": report.removed},
        "update_spectra": update_spectra({n: modules[n] for n in ranks}),
        "rank_costs": {n: cost_per_rank(modules[n], "default") for n in ranks},
        "calib_batches": calib_batches if method.kind == "calib" else 0,
        "train_seconds": round(train_seconds, 1),
        "settings": {**asdict(suite), "method": asdict(method)},
        **common.run_metadata(sys.argv),
    }


def update_spectra(layers: dict) -> dict[str, list[float]]:
    """Per LoRA layer (``{name: layer}``), the singular values of its learned update ``s B A`` (4 significant
    digits)."""
    from peft_adaptive.scores.spectral import update_spectrum

    return {name: [float(f"{v:.4g}") for v in update_spectrum(layer, "default")] for name, layer in layers.items()}


def run_jobs(args: argparse.Namespace, script: str) -> None:
    """Run the (suite, method, seed) combinations of ``args`` that have no result yet, ``args.jobs`` at a time, each
    as ``python <script> worker ...`` in a fresh process; ``script`` is the command line (allocation_bench.py),
    whose path every result records in its ``command``."""
    jobs = [
        (suite, method, seed)
        for suite in args.suite
        for seed in args.seeds
        for method in args.methods
        if not result_path(suite, method, seed).is_file()
    ]
    for name in args.methods:
        parse_method(name)
    print(
        f"{len(jobs)} runs to do ({sum(1 for _ in args.methods) * len(args.seeds) * len(args.suite) - len(jobs)} done)"
    )
    running: list[tuple[subprocess.Popen, Job, float]] = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    while jobs or running:
        while jobs and len(running) < args.jobs:
            job = jobs.pop(0)
            log = result_path(*job).with_suffix(".log")
            log.parent.mkdir(parents=True, exist_ok=True)
            cmd = worker_command(script, job, args.calib_batches, args.set)
            running.append(
                (subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env), job, time.time())
            )
        time.sleep(2)
        for proc, job, start in list(running):
            if proc.poll() is None:
                continue
            running.remove((proc, job, start))
            print(finished_line(job, proc.returncode, time.time() - start), flush=True)


def worker_command(script: str, job: Job, calib_batches: int, overrides: list[str] | None) -> list[str]:
    """``python <script> worker <suite> <method> <seed> --calib-batches N [--set ...]``."""
    suite, method, seed = job
    cmd = [sys.executable, script, "worker", suite, method, str(seed), "--calib-batches", str(calib_batches)]
    return cmd + (["--set", *overrides] if overrides else [])


def finished_line(job: Job, returncode: int, seconds: float) -> str:
    """``[12:00:00] planted lora seed 0: ok gap_closed=0.0508 (38 s)``, or FAILED with the log's path."""
    path = result_path(*job)
    status = "ok" if returncode == 0 and path.is_file() else f"FAILED (rc {returncode}, see {path.with_suffix('.log')})"
    metric = ""
    if path.is_file():
        data = json.loads(path.read_text())
        metric = f"{SUITES[job[0]].metric}={data['metrics'].get(SUITES[job[0]].metric):.4f}"
    return f"[{time.strftime('%H:%M:%S')}] {job[0]} {job[1]} seed {job[2]}: {status} {metric} ({seconds:.0f} s)"


def worker(args: argparse.Namespace) -> None:
    """One run in this process (the ``worker`` subcommand), written atomically to its result path."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    apply_overrides(args.set or [])
    record = run_one(args.suite_name, args.method, args.seed, args.calib_batches)
    path = result_path(args.suite_name, args.method, args.seed)
    tmp = path.with_suffix(".tmp")
    common.write_json(tmp, record)
    tmp.replace(path)  # atomic: a killed run leaves no half-written result to skip over
