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
from dataclasses import asdict, dataclass, field
from typing import Any

from . import common, kept_loss, peers
from .methods import (
    BASELINE_ALLOCATIONS,
    KEPT_LOSS_ALLOCATIONS,
    SIGNAL_STEP_KINDS,
    Method,
    baseline_ranks,
    build,
    method_lr,
    parse_method,
    signal_steps,
)
from .records import result_path
from .suites import SUITES, Suite, apply_overrides, suite_model
from .tasks import Task, make_task

Job = tuple[str, str, int]  # (suite, method, seed)
CLIP_NORM = 1.0  # every run clips the global gradient norm of its trainable parameters to this


@dataclass
class Training:
    """What the training loop saw: losses, wall time per optimizer step, and the allocation events' cost."""

    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)  # forward to zero_grad, AdaLoRA's allocation included
    report: Any = None  # the reallocation's AllocationReport (or the calibration's), if any
    reallocation_seconds: float | None = None  # our in-place reallocation, not in step_seconds
    allocate_seconds: list[float] = field(default_factory=list)  # AdaLoRA's update_and_allocate, per step
    kept_loss: dict | None = None  # a kept-loss allocation's reading (bench.kept_loss), if any


def run_one(suite_name: str, method_name: str, seed: int, calib_batches: int, task: Task | None = None) -> dict:
    """Train ``method_name`` on ``suite_name`` (or on ``task``, e.g. a test's) with ``seed`` in this process;
    returns the run's JSON record."""
    method = parse_method(method_name)
    task = task or make_task(SUITES[suite_name])
    suite = task.suite
    model, base_metrics, base_val = seeded_model(method, task, seed)
    with common.ResourceMonitor(interval=0.5) as monitor:
        started = time.perf_counter()
        before_training = initialise(method, task, model, seed, calib_batches)
        init_seconds = time.perf_counter() - started
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer, schedule = optimizer_and_schedule(params, method, suite)
        training = train(model, method, task, seed, optimizer, schedule, started, before_training.get("report"))
        train_seconds = time.perf_counter() - started
    metrics = task.finish(task.evaluate(model), base_metrics)
    val = task.validate(model)  # after training only: training and metrics are those of a run without it
    record = {
        "suite": suite.name,
        "method": method_name,
        "seed": seed,
        "metrics": metrics,
        "val_metrics": None if val is None else task.finish(val, base_val),
        "train_loss_last50": statistics.fmean(training.losses[-50:]),
        "train_loss_curve": [
            round(statistics.fmean(training.losses[i : i + 10]), 5) for i in range(0, len(training.losses), 10)
        ],
        **budget_record(model, method),
        "allocation": allocation_record(training.report, before_training.get("eva")),
        **({"kept_loss": training.kept_loss} if training.kept_loss is not None else {}),
        "calib_batches": calib_batches if method.kind == "calib" else 0,
        "train_seconds": round(train_seconds, 1),
        "lr": method_lr(method, suite),
        "cost": cost_record(method, task, training, init_seconds, monitor),
        **peer_record(model, method, task, before_training),
        "settings": {**asdict(suite), "method": asdict(method)},
        **common.run_metadata(sys.argv),
    }
    return record


def seeded_model(method: Method, task: Task, seed: int) -> tuple[Any, Any, Any]:
    """The run's model before its first step, with the base model's held-out and validation metrics: the seed is
    set, the base evaluated (its data may be built lazily and draw from the seed), the seed set again, the method
    built. Every run, and a replay of one (``predicted_gain_replay.py``), starts here, so they draw alike."""
    from transformers import set_seed

    set_seed(seed)
    base = task.base_model()
    base_metrics = task.evaluate(base)
    base_val = task.validate(base)  # before the seed is set again: nothing here draws from it
    set_seed(seed)
    return build(method, task, base, seed), base_metrics, base_val


def optimizer_and_schedule(params: list, method: Method, suite: Suite) -> tuple[Any, Any]:
    """Every run's optimizer: AdamW without weight decay at the method's learning rate, linear warmup over 6% of the
    suite's steps, then linear decay to 0."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW(params, lr=method_lr(method, suite), weight_decay=0.0)
    return optimizer, get_linear_schedule_with_warmup(optimizer, max(1, int(0.06 * suite.steps)), suite.steps)


def initialise(method: Method, task: Task, model, seed: int, calib_batches: int) -> dict[str, Any]:
    """What a method does before its first step: calibration (``report``) or EVA's initialisation (``eva``: the
    ``eva`` peers, and an adaptive run with ``+eva``)."""
    if method.eva_rho is not None:
        return {"eva": peers.init_eva(model, task, seed)}
    if method.kind != "calib":
        return {}
    from peft_adaptive import calibrate_adaptive_lora

    calibration = task.batches(seed + 10_000, calib_batches)  # not the training batches
    ranks = None
    if method.allocation in BASELINE_ALLOCATIONS:
        ranks = baseline_ranks(method.allocation, model.base_model, seed, task.suite)
    report = calibrate_adaptive_lora(
        model, calibration, loss_fn=task.loss, allocate=method.allocation != "uniform", ranks=ranks, seed=seed
    )
    return {"report": report}


def train(
    model,
    method: Method,
    task: Task,
    seed: int,
    optimizer,
    schedule,
    started: float,
    report,
    last_step: int | None = None,
) -> Training:
    """The hand loop: AdamW with clipping and a linear schedule, the same batches for every method of a seed; the
    adaptive kinds collect signals and reallocate in place after their signal steps, AdaLoRA allocates every step.
    ``last_step`` stops early (the schedule still spans the suite's steps, as in a whole run)."""
    import torch

    suite, tuner = task.suite, model.base_model
    training = Training(report=report)
    collecting = method.kind in (*SIGNAL_STEP_KINDS, "default")
    if collecting:
        tuner.start_signal_collection(seed=seed)
    # AdaLoRA's orthogonal regulariser, which PEFT's AdaLoraModel.forward is never asked to add here (peers.py)
    orth_reg = method.kind == "adalora"
    for step, batch in enumerate(task.batches(seed, last_step or suite.steps), start=1):
        tick = time.perf_counter()
        loss = task.loss(model, batch)
        if orth_reg:
            loss = loss + peers.adalora_orth_reg_weight(model) * peers.adalora_orth_reg(model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], CLIP_NORM)
        if collecting:
            tuner.record_gradients()
        optimizer.step()
        if method.kind == "adalora":  # after the step, before zero_grad: it reads the gradients
            allocate = time.perf_counter()
            tuner.update_and_allocate(step - 1)  # the 0-based index of this step, as Trainer's global_step
            training.allocate_seconds.append(time.perf_counter() - allocate)
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        training.losses.append(float(loss.detach()))
        training.step_seconds.append(time.perf_counter() - tick)
        if step % 50 == 0:
            recent = statistics.fmean(training.losses[-50:])
            print(
                f"step {step}/{suite.steps}: train loss {recent:.5f} ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
        if collecting and step == signal_steps(method, suite):
            collecting = False
            ranks = None
            if method.allocation in BASELINE_ALLOCATIONS:
                ranks = baseline_ranks(method.allocation, tuner, seed, suite)
            elif method.allocation in KEPT_LOSS_ALLOCATIONS:
                ranks, training.kept_loss = kept_loss.keep_gate_allocation(model, task, seed, step, tuner)
            tick = time.perf_counter()
            training.report = tuner.reallocate(optimizer, step=step, seed=seed, ranks=ranks)
            training.reallocation_seconds = time.perf_counter() - tick
    return training


def budget_record(model, method: Method) -> dict[str, Any]:
    """Final ranks, what one rank costs in each module, the rank-dependent adapter parameters they make, and the
    learned updates' singular values (not for AdaLoRA, whose update is ``B diag(E) A``; none for full
    fine-tuning)."""
    from peft_adaptive.resize import cost_per_rank

    trainable = common.trainable_param_count(model)
    if method.kind == "full":
        return {"adapter_params": 0, "trainable_params": trainable, "ranks": {}, "update_spectra": {}, "rank_costs": {}}
    if method.kind == "adalora":  # unmasked singular values; each costs a row of A, a column of B and E's entry
        layers = common.lora_layers(model)
        ranks = common.adapter_ranks(model)
        costs = {n: common.rank_cost(layers[n]) for n in ranks}
        spectra: dict[str, list[float]] = {}
    else:
        modules = {n: m for n, m in model.base_model.model.named_modules() if hasattr(m, "r") and isinstance(m.r, dict)}
        ranks = {n: m.r["default"] for n, m in modules.items() if "default" in m.r}
        costs = {n: cost_per_rank(modules[n], "default") for n in ranks}
        spectra = update_spectra({n: modules[n] for n in ranks})
    return {
        "adapter_params": sum(r * costs[n] for n, r in ranks.items()),
        "trainable_params": trainable,
        "ranks": ranks,
        "update_spectra": spectra,
        "rank_costs": costs,
    }


def allocation_record(report, eva: dict | None) -> dict | None:
    """The allocation event: our reallocation or calibration (its step, scores, removed modules), or, where there is
    none, EVA's initialisation (step 0, the modules it gave rank 0)."""
    if report is None:
        return None if eva is None else {"step": 0, "scores": None, "removed": eva["removed"], "by": "eva"}
    return {
        "step": report.step,
        "scores": report.scores,
        "removed": report.removed,
        "predicted_gain": report.predicted_gain,
    }


def cost_record(method: Method, task: Task, training: Training, init_seconds: float, monitor) -> dict[str, Any]:
    """What a cost table needs: wall time of every optimizer step, how many of the first steps are the method's
    allocation phase, the one-off costs, and peak memory. Noisy on a shared CPU: compare ratios to LoRA's."""
    return {
        "step_seconds": [round(t, 5) for t in training.step_seconds],
        "allocation_steps": allocation_steps(method, task),
        "init_seconds": round(init_seconds, 3),  # EVA's SVD or the calibration, before the first step
        "reallocation_seconds": None
        if training.reallocation_seconds is None
        else round(training.reallocation_seconds, 4),
        "adalora_allocate_seconds": [round(t, 5) for t in training.allocate_seconds] or None,
        "peak_rss_mb": round(monitor.peak_rss_mb, 1),  # sampled every 0.5 s over initialisation and training
        "process_peak_rss_mb": round(common.process_peak_rss_mb(), 1),
    }


def allocation_steps(method: Method, task: Task) -> int:
    """The first steps that carry the method's allocation work: our signal steps, AdaLoRA's steps up to its final
    budget (importance scores every step); 0 for methods that allocate before training or never."""
    if method.kind in (*SIGNAL_STEP_KINDS, "default"):
        return signal_steps(method, task.suite)
    if method.kind == "adalora":
        return peers.adalora_final_step(task.suite) + 1
    return 0


def peer_record(model, method: Method, task: Task, before_training: dict) -> dict[str, Any]:
    """The peers' own facts: AdaLoRA's schedule and final budget, EVA's initialisation."""
    if method.kind == "adalora":
        return {"adalora": peers.adalora_record(model, task.suite)}
    if "eva" in before_training:  # the eva peers, and an adaptive run started from EVA's initialisation
        return {"eva": {k: v for k, v in before_training["eva"].items() if k != "removed"}}
    return {}


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
    for name in args.methods:  # refuse an unknown name, or a method that cannot run on a suite, before any run
        method = parse_method(name)
        for suite in args.suite:
            peers.refuse_unfit(method, SUITES[suite], suite_model(SUITES[suite]))
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
