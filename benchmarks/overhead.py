"""Cost benchmark: step time and peak memory of adaptive LoRA against plain LoRA and PEFT AdaLoRA.

A Llama-style decoder is built from a config (random weights: only time and memory are measured) and
trained with ``transformers.Trainer`` on random tokens, with LoRA on every linear layer of every block.
Measured, all at the same adapter budget (LoRA rank ``r``; AdaLoRA ``init_r=1.5r -> target_r=r``):

* ``lora``: plain LoRA;
* ``adaptive warmup``: adaptive LoRA while it collects its signals (``AdaptiveLoraCallback`` on);
* ``adaptive after``: the same run after the in-place reallocation;
* ``adalora``: PEFT AdaLoRA with ``update_and_allocate`` called every step;
* the reallocation event itself (wall time of ``reallocate``, which the callback calls).

Every configuration runs ``2 * (skip + measure)`` steps and is measured over the same two windows
(``early``: steps ``skip+1 .. skip+measure``; ``late``: the last ``measure`` steps). Adaptive LoRA
reallocates between them, so its early window is "during warmup" and its late one "after
reallocation", and each is compared with plain LoRA's window at the same point of a run. Each
configuration runs in a fresh subprocess, ``--rounds`` times, the configurations interleaved; the table
gives the median over all measured steps and the ratio to LoRA round by round (a target counts as met or
not met only when every round agrees). Memory: ``torch.cuda.max_memory_allocated`` within the window on
a GPU; on a CPU the largest resident set size sampled during the window (it includes the Python/torch
baseline).

    python benchmarks/overhead.py --mode cpu      # a few minutes on 2 CPU cores
    python benchmarks/overhead.py --mode gpu      # 16 layers, hidden 2048, 8 x 512 tokens, bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import common  # noqa: E402

# --- configurations ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """Model and batch size of one mode."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int
    dtype: str
    skip: int  # unmeasured steps at the start of each phase
    measure: int  # measured steps per phase


SHAPES: dict[str, Shape] = {
    # 14 layers x 7 linear modules = 98 adapted modules
    "cpu": Shape(
        layers=14,
        hidden=256,
        intermediate=688,
        heads=8,
        kv_heads=4,
        vocab=4096,
        batch=4,
        seq=64,
        dtype="float32",
        skip=5,
        measure=20,
    ),
    # 16 x 7 = 112 modules; fills an 80-140 GB GPU with the optimizer state and activations
    "gpu": Shape(
        layers=16,
        hidden=2048,
        intermediate=5632,
        heads=16,
        kv_heads=8,
        vocab=32000,
        batch=8,
        seq=512,
        dtype="bfloat16",
        skip=10,
        measure=50,
    ),
}

CONFIGS = ("lora", "adaptive", "adalora")


@dataclass
class WorkerSpec:
    config: str
    shape: dict
    r: int
    lr: float
    seed: int
    result_path: str


def phase_plan(config: str, shape: Shape) -> tuple[int, dict[str, tuple[int, int]]]:
    """Total steps and the two measured windows (1-based inclusive step ranges), the same for every config.

    Adaptive LoRA collects signals during steps ``1..k+m`` and reallocates right after step ``k+m``, so its
    first window is "during warmup" and its second "after reallocation". Plain LoRA and AdaLoRA are measured
    over the same windows, so each adaptive phase is compared with LoRA at the same point of a run.
    """
    k, m = shape.skip, shape.measure
    early, late = (k + 1, k + m), (2 * k + m + 1, 2 * k + 2 * m)
    names = WINDOW_NAMES[config]
    return 2 * k + 2 * m, {names[0]: early, names[1]: late}


WINDOW_NAMES = {
    "lora": ("lora early", "lora late"),
    "adaptive": ("adaptive warmup", "adaptive after"),
    "adalora": ("adalora early", "adalora late"),
}
#: each measured phase and the LoRA window it is compared with
REFERENCE = {
    "adaptive warmup": "lora early",
    "adaptive after": "lora late",
    "adalora early": "lora early",
    "adalora late": "lora late",
}
LIMITS = {"adaptive warmup": 1.02, "adaptive after": 1.00}


# --- model and data (worker) ------------------------------------------------------------------------


def build_base_model(shape: Shape, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max(2048, shape.seq),
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, shape.dtype))
    return model


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def wrap_model(model, config: str, spec: WorkerSpec, total_steps: int, warmup: int):
    """The PEFT model and its callbacks for ``config`` (same targets and budget for all)."""
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    if config == "lora":
        return get_peft_model(model, LoraConfig(r=spec.r, lora_alpha=2 * spec.r, target_modules=TARGETS)), []
    if config == "adaptive":
        import peft_adaptive
        from peft_adaptive.callback import AdaptiveLoraCallback

        peft_config = peft_adaptive.AdaptiveLoraConfig(
            r=spec.r, lora_alpha=2 * spec.r, target_modules=TARGETS, signal_steps=warmup
        )
        return get_peft_model(model, peft_config), [AdaptiveLoraCallback()]
    if config == "adalora":
        shape = Shape(**spec.shape)
        peft_config = AdaLoraConfig(
            init_r=(3 * spec.r + 1) // 2,
            target_r=spec.r,
            lora_alpha=2 * spec.r,
            target_modules=TARGETS,
            tinit=shape.skip,
            tfinal=shape.skip,
            deltaT=10,
            total_step=total_steps,
        )
        return get_peft_model(model, peft_config), [common.AdaLoraAllocateCallback()]
    raise ValueError(config)


class RandomTokens:
    """``n`` random sequences for causal LM (labels = inputs)."""

    def __init__(self, n: int, seq: int, vocab: int, seed: int):
        import torch

        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, seq), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


# --- measurement callbacks (worker) -------------------------------------------------------------------


class PhaseMemory(common.TrainerCallback):
    """Peak memory within each phase (1-based inclusive step ranges)."""

    def __init__(self, phases: dict[str, tuple[int, int]]):
        self.phases = phases
        self.peaks: dict[str, dict] = {}
        self._monitor: common.ResourceMonitor | None = None

    def _phase_starting(self, step: int) -> str | None:
        return next((name for name, (first, _) in self.phases.items() if first == step), None)

    def _phase_ending(self, step: int) -> str | None:
        return next((name for name, (_, last) in self.phases.items() if last == step), None)

    def on_step_begin(self, args, state, control, **kwargs):
        if self._phase_starting(state.global_step + 1) is not None:
            self._monitor = common.ResourceMonitor().__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        name = self._phase_ending(state.global_step)
        if name is not None and self._monitor is not None:
            self._monitor.__exit__(None, None, None)
            self.peaks[name] = self._monitor.result()
            self._monitor = None


def time_reallocations(tuner) -> list[float]:
    """Wrap ``tuner.reallocate`` so every call's wall time is appended to the returned list."""
    times: list[float] = []
    original = tuner.reallocate

    def timed(*args, **kwargs):
        common.synchronize()
        start = time.perf_counter()
        result = original(*args, **kwargs)
        common.synchronize()
        times.append(time.perf_counter() - start)
        return result

    tuner.reallocate = timed
    return times


def training_arguments(spec: WorkerSpec, total_steps: int, out_dir: str):
    import torch
    from transformers import TrainingArguments

    shape = Shape(**spec.shape)
    return TrainingArguments(
        output_dir=out_dir,
        max_steps=total_steps,
        per_device_train_batch_size=shape.batch,
        learning_rate=spec.lr,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        max_grad_norm=1.0,
        seed=spec.seed,
        bf16=shape.dtype == "bfloat16",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )


def run_worker(spec_path: str) -> None:
    """Train one configuration and write its step times, phase peaks and reallocation times."""
    from transformers import Trainer

    spec = WorkerSpec(**json.loads(Path(spec_path).read_text()))
    shape = Shape(**spec.shape)
    total, phases = phase_plan(spec.config, shape)
    warmup = shape.skip + shape.measure
    model, callbacks = wrap_model(build_base_model(shape, spec.seed), spec.config, spec, total, warmup)
    realloc_times = time_reallocations(model.base_model) if spec.config == "adaptive" else []
    timer, memory = common.StepTimer(), PhaseMemory(phases)
    start_params = common.allocated_adapter_params(model)
    trainer = Trainer(
        model=model,
        args=training_arguments(spec, total, str(Path(spec.result_path).with_suffix(""))),
        train_dataset=RandomTokens(total * shape.batch, shape.seq, shape.vocab, spec.seed),
        # timer first: its on_step_end runs before the adaptive callback's reallocation
        callbacks=[timer, memory, common.StepProgressCallback(), *callbacks],
    )
    trainer.train()
    record = {
        "config": spec.config,
        "phases": {
            name: {"steps": [first, last], "step_times_s": timer.times[first - 1 : last], **memory.peaks.get(name, {})}
            for name, (first, last) in phases.items()
        },
        "adapted_modules": len(common.lora_layers(model)),
        "adapter_params_start": start_params,
        "adapter_params_end": common.allocated_adapter_params(model),
        "adapter_params_effective_end": common.adapter_param_count(model),
        "reallocation_s": realloc_times,
        "ranks_end": common.adapter_ranks(model),
    }
    common.write_json(Path(spec.result_path), record)


# --- reallocation time on a large model without training (worker) ---------------------------------------


def run_realloc_worker(spec_path: str) -> None:
    """Time one reallocation of a large model (signals from two real optimizer steps on random data)."""
    import torch
    from peft import get_peft_model

    import peft_adaptive

    spec = WorkerSpec(**json.loads(Path(spec_path).read_text()))
    shape = Shape(**spec.shape)
    if not torch.cuda.is_available():
        # bf16 matmuls are very slow on CPUs; the adapters are float32 either way (PEFT's autocast_adapter_dtype)
        shape = replace(shape, dtype="float32")
    model = build_base_model(shape, spec.seed)
    config = peft_adaptive.AdaptiveLoraConfig(r=spec.r, lora_alpha=2 * spec.r, target_modules=TARGETS)
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=spec.lr)
    tuner = peft_model.base_model
    tuner.start_signal_collection()
    ids = torch.randint(0, shape.vocab, (1, 16), device=next(model.parameters()).device)
    for _ in range(2):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        tuner.record_gradients()
        optimizer.step()
        optimizer.zero_grad()
        print("@@progress 1 2", flush=True)
    common.synchronize()
    start = time.perf_counter()
    report = tuner.reallocate(optimizer, step=2)
    common.synchronize()
    record = {
        "config": "reallocation",
        "shape": asdict(shape),
        "device": str(next(model.parameters()).device),
        "adapted_modules": len(report.names),
        "reallocation_s": time.perf_counter() - start,
        "ranks_changed": sum(a != b for a, b in zip(report.ranks_before, report.ranks_after)),
    }
    common.write_json(Path(spec.result_path), record)


# --- parent: plan, run, summarise ----------------------------------------------------------------------


def run_configs(args: argparse.Namespace, shape: Shape, out_dir: Path) -> list[dict]:
    from tqdm.auto import tqdm

    plan = [(round_, config) for round_ in range(args.rounds) for config in args.configs]
    total = sum(phase_plan(config, shape)[0] for _, config in plan)
    records = []
    with tqdm(total=total, unit="step", desc="overhead") as bar:
        for round_, config in plan:
            bar.set_postfix_str(f"{config} round {round_ + 1}/{args.rounds}")
            spec = WorkerSpec(
                config, asdict(shape), args.r, args.lr, args.seed, str(out_dir / f"{config}-{round_}.json")
            )
            record = run_spec(spec, "--worker", out_dir, bar, phase_plan(config, shape)[0])
            records.append({**record, "round": round_})
    return records


def run_spec(spec: WorkerSpec, flag: str, out_dir: Path, bar, steps: int) -> dict:
    spec_path = Path(spec.result_path).with_suffix(".spec.json")
    common.write_json(spec_path, asdict(spec))
    log = out_dir / "logs" / (Path(spec.result_path).stem + ".log")
    code = common.run_worker_process([__file__, flag, str(spec_path)], log, bar, steps)
    if code != 0:
        raise SystemExit(f"{spec.config} failed (exit {code}); see {log}:\n{log.read_text()[-3000:]}")
    return json.loads(Path(spec.result_path).read_text())


def run_large_realloc(args: argparse.Namespace, out_dir: Path) -> dict:
    from tqdm.auto import tqdm

    shape = SHAPES["gpu"]
    spec = WorkerSpec("reallocation", asdict(shape), args.r, args.lr, args.seed, str(out_dir / "realloc-large.json"))
    with tqdm(total=2, unit="step", desc="reallocation, GPU-sized model") as bar:
        return run_spec(spec, "--realloc-worker", out_dir, bar, 2)


def summarise(records: list[dict]) -> dict[str, dict]:
    """Per phase: pooled median step time, per-round medians, and peak memory."""
    phases: dict[str, dict] = {}
    for record in sorted(records, key=lambda r: r["round"]):
        for name, phase in record["phases"].items():
            entry = phases.setdefault(name, {"times": [], "round_medians": [], "peaks": [], "params": []})
            entry["times"] += phase["step_times_s"]
            entry["round_medians"].append(statistics.median(phase["step_times_s"]))
            entry["peaks"].append(phase.get("peak_gpu_mb") or phase.get("peak_rss_mb"))
            entry["params"].append(record["adapter_params_end" if "after" in name else "adapter_params_start"])
    return {
        name: {
            "median_step_s": statistics.median(e["times"]),
            "round_median_step_s": e["round_medians"],
            "n_steps": len(e["times"]),
            "peak_mb": max(e["peaks"]),
            "peak_mb_per_round": e["peaks"],
            "adapter_params": e["params"][0],
        }
        for name, e in phases.items()
    }


def round_ratios(summary: dict[str, dict], name: str) -> list[float]:
    """Step-time ratio to the matching LoRA window, round by round (rounds run back to back)."""
    reference = summary[REFERENCE[name]]["round_median_step_s"]
    return [a / b for a, b in zip(summary[name]["round_median_step_s"], reference)]


def step_verdict(ratios: list[float], limit: float) -> str:
    """Met / not met when every round agrees; otherwise undecided (the spread straddles the limit)."""
    if max(ratios) <= limit:
        return "met"
    if min(ratios) > limit:
        return "NOT met"
    return f"undecided (rounds straddle {limit:.2f}x)"


def memory_verdict(phase: dict, reference: dict, gpu: bool) -> str:
    """GPU: strict. CPU: a difference smaller than LoRA's own round-to-round RSS spread is not called."""
    diff = phase["peak_mb"] - reference["peak_mb"]
    if diff <= 0:
        return "met"
    noise = max(reference["peak_mb_per_round"]) - min(reference["peak_mb_per_round"])
    if not gpu and diff <= noise:
        return f"within RSS noise (+{diff:.0f} MB; LoRA's rounds differ by {noise:.0f} MB)"
    return f"NOT met (+{diff:.0f} MB)"


def table(summary: dict[str, dict], realloc: list[float], large: dict | None, gpu: bool) -> str:
    mem = "peak GPU memory (MB)" if gpu else "peak RSS (MB)"
    lines = [
        f"| phase | median step (ms) | vs LoRA, same window | per round | {mem} | vs LoRA | adapter params | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        ref = summary.get(REFERENCE.get(name, ""), s)
        ratio = s["median_step_s"] / ref["median_step_s"]
        per_round = round_ratios(summary, name) if name in REFERENCE else [1.0] * len(s["round_median_step_s"])
        mem_ratio = s["peak_mb"] / ref["peak_mb"]
        if name in LIMITS:
            mem_ok = memory_verdict(s, ref, gpu)
            target = f"step <= {LIMITS[name]:.2f}x: {step_verdict(per_round, LIMITS[name])}; memory <= LoRA: {mem_ok}"
        else:
            target = "reference" if name.startswith("lora") else "(comparison)"
        rounds = ", ".join(f"{r:.3f}" for r in per_round)
        lines.append(
            f"| {name} | {s['median_step_s'] * 1e3:.1f} | {ratio:.3f}x | {rounds} | {s['peak_mb']:.0f} | "
            f"{mem_ratio:.3f}x | {s['adapter_params']:,} | {target} |"
        )
    if realloc:
        verdict = "met" if max(realloc) < 1.0 else "NOT met"
        lines.append(
            f"\nReallocation event (the model above, {len(realloc)} runs): median "
            f"{statistics.median(realloc) * 1e3:.1f} ms, max {max(realloc) * 1e3:.1f} ms (target < 1 s: {verdict})."
        )
    if large:
        verdict = "met" if large["reallocation_s"] < 1.0 else "NOT met"
        lines.append(
            f"Reallocation event, GPU-sized model (hidden {large['shape']['hidden']}, {large['adapted_modules']} "
            f"modules, {large['ranks_changed']} resized, {large['shape']['dtype']}, on {large['device']}): "
            f"{large['reallocation_s'] * 1e3:.0f} ms (target < 1 s: {verdict})."
        )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=list(SHAPES), default=None, help="default: gpu if CUDA is available, else cpu")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--rounds", type=int, default=3, help="repeat every configuration this many times, interleaved")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", type=int, help="unmeasured steps at the start of each phase (default: the mode's)")
    p.add_argument("--measure", type=int, help="measured steps per phase (default: the mode's)")
    p.add_argument(
        "--large-realloc",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time one reallocation of the GPU-sized model here (default: on in cpu mode)",
    )
    p.add_argument("--out", type=Path)
    p.add_argument("--report", type=Path, help="re-render results.md from an existing overhead.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv if argv is None else argv
    if len(argv) == 3 and argv[1] in ("--worker", "--realloc-worker"):
        (run_worker if argv[1] == "--worker" else run_realloc_worker)(argv[2])
        return
    import torch

    args = parse_args(argv[1:])
    if args.report:
        payload = json.loads(args.report.read_text())
        print(write_report(payload, args.report.parent))
        return
    mode = args.mode or ("gpu" if torch.cuda.is_available() else "cpu")
    shape = SHAPES[mode]
    overrides = {k: v for k, v in (("skip", args.skip), ("measure", args.measure)) if v is not None}
    shape = Shape(**{**asdict(shape), **overrides})
    out_dir = args.out or common.RESULTS_DIR / f"overhead-{mode}-{common.timestamp()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    meta = common.run_metadata(argv)
    records = run_configs(args, shape, out_dir)
    large = (
        run_large_realloc(args, out_dir)
        if (args.large_realloc or (args.large_realloc is None and mode == "cpu"))
        else None
    )
    payload: dict[str, Any] = {
        "meta": meta,
        "mode": mode,
        "shape": asdict(shape),
        "r": args.r,
        "rounds": args.rounds,
        "reallocation_s": [t for r in records for t in r.get("reallocation_s", [])],
        "large_reallocation": large,
        "records": records,
        "wall_s": time.perf_counter() - started,
    }
    common.write_json(out_dir / "overhead.json", payload)
    print(write_report(payload, out_dir))
    print(f"\nwrote {out_dir}/overhead.json and results.md")


def write_report(payload: dict, out_dir: Path) -> str:
    """Summarise the records into ``results.md`` (and return its text)."""
    summary = summarise(payload["records"])
    gpu = payload["meta"]["hardware"]["gpu"] is not None
    text = _header(payload, payload["records"]) + "\n\n"
    text += table(summary, payload["reallocation_s"], payload["large_reallocation"], gpu) + "\n"
    (out_dir / "results.md").write_text(text)
    return text


def _header(payload: dict, records: list[dict]) -> str:
    meta, shape, hw = payload["meta"], payload["shape"], payload["meta"]["hardware"]
    return "\n".join(
        [
            f"# Overhead benchmark ({payload['mode']} mode)",
            "",
            f"- Date: {meta['date']}; git {meta['git']}; command: `{meta['command']}`",
            f"- Hardware: {hw['cpu']}, {hw['cpu_cores']} cores, torch threads {hw['torch_threads']}, load average at "
            f"start {hw['load_average_1_5_15min']}; GPU: {hw['gpu'] or 'none'}",
            f"- Model: Llama-style decoder from a config, random weights: {shape['layers']} layers, hidden "
            f"{shape['hidden']}, intermediate {shape['intermediate']}, {shape['heads']} heads ({shape['kv_heads']} KV), "
            f"vocab {shape['vocab']}, {shape['dtype']}; batch {shape['batch']} x {shape['seq']} tokens",
            f"- LoRA on {records[0]['adapted_modules']} modules (q,k,v,o,gate,up,down of every layer), r={payload['r']}; "
            f"AdaLoRA init_r={(3 * payload['r'] + 1) // 2} -> target_r={payload['r']}, update_and_allocate every step "
            "(tinit = tfinal = the unmeasured steps, deltaT 10)",
            f"- Every configuration: {2 * (shape['skip'] + shape['measure'])} steps; measured windows: steps "
            f"{shape['skip'] + 1}-{shape['skip'] + shape['measure']} (early; adaptive: warmup) and the last "
            f"{shape['measure']} (late; adaptive: after reallocation); {payload['rounds']} rounds, configurations "
            "interleaved, each run in a fresh process",
            f"- Total wall time: {payload['wall_s'] / 60:.1f} min",
        ]
    )


if __name__ == "__main__":
    main()
