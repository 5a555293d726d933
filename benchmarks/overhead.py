"""Cost benchmark: step time and peak memory of adaptive LoRA against plain LoRA, PEFT AdaLoRA and PEFT EVA.

A Llama-style decoder is built from a config (random weights: only time and memory are measured) and
trained with ``transformers.Trainer`` on random tokens, with LoRA on every linear layer of every block.
Measured, all at the same adapter budget (LoRA rank ``r``; AdaLoRA ``init_r=1.5r -> target_r=r``):

* ``lora``: plain LoRA;
* ``adaptive warmup``: adaptive LoRA while it collects its signals (``AdaptiveLoraCallback`` on);
* ``adaptive after``: the same run after the in-place reallocation;
* ``adalora``: PEFT AdaLoRA with ``update_and_allocate`` called every step;
* ``eva``: PEFT EVA (``rho=2``) after its initialisation, whose time is reported apart;
* the reallocation event itself (wall time of ``reallocate``, which the callback calls).

``--engine loop`` measures the same configurations, plus ``base`` (the frozen base model's forward and backward,
no adapter), in one process with a hand-written training loop, rounds interleaved and the base model built
once (:func:`run_loop_engine`; ``benchmarks/gpu_check.py`` runs it on the GPU). ``--mode tiny`` is a shape for
the test suite.

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
    python benchmarks/overhead.py --mode gpu --engine loop   # every method incl. the frozen base, one process
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
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
    # 2 x 7 = 14 modules: the test suite's shape (seconds on a CPU)
    "tiny": Shape(
        layers=2,
        hidden=64,
        intermediate=128,
        heads=4,
        kv_heads=2,
        vocab=256,
        batch=2,
        seq=16,
        dtype="float32",
        skip=1,
        measure=3,
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

CONFIGS = ("lora", "adaptive", "adalora", "eva")
#: the in-process engine also measures the frozen base model (forward and backward through the activations only)
LOOP_CONFIGS = ("base", *CONFIGS)
#: EVA's ``rho`` (ranks redistributed up to ``rho * r``, same total) and its initialisation batches
EVA_RHO = 2.0
EVA_BATCHES = 4
#: forward passes after which EVA's initialisation is given up (PEFT's own loop has no limit)
EVA_MAX_FORWARDS = 200


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
    if len(names) == 1:  # the frozen base: one window
        return k + m, {names[0]: early}
    return 2 * k + 2 * m, {names[0]: early, names[1]: late}


WINDOW_NAMES = {
    "lora": ("lora early", "lora late"),
    "adaptive": ("adaptive warmup", "adaptive after"),
    "adalora": ("adalora early", "adalora late"),
    "eva": ("eva early", "eva late"),
    "base": ("base",),
}
#: each measured phase and the LoRA window it is compared with
REFERENCE = {
    "adaptive warmup": "lora early",
    "adaptive after": "lora late",
    "adalora early": "lora early",
    "adalora late": "lora late",
    "eva early": "lora early",
    "eva late": "lora late",
    "base": "lora early",
}
LIMITS = {"adaptive warmup": 1.02, "adaptive after": 1.00}


# --- model and data (worker) ------------------------------------------------------------------------


def build_base_model(shape: Shape, seed: int, device: str | None = None):
    """The Llama-style decoder of ``shape`` with random weights, on ``device`` (default: CUDA if available)."""
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
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
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
    if config == "eva":
        return eva_model(model, spec.r), []
    raise ValueError(config)


def eva_model(model, r: int):
    """``model`` with PEFT EVA adapters (``rho`` = :data:`EVA_RHO`), not yet initialised (see :func:`init_eva`)."""
    from peft import EvaConfig, LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights="eva", eva_config=EvaConfig(rho=EVA_RHO)
    )
    return get_peft_model(model, config, low_cpu_mem_usage=True)


class EvaNotConverged(RuntimeError):
    """EVA's SVDs had not converged after the allowed number of forward passes."""


def init_eva(model, batches: list[dict], max_forwards: int, state: dict | None = None) -> tuple[dict, dict]:
    """PEFT's EVA initialisation on ``batches`` (cycled until its SVDs converge, as PEFT does), timed.

    Returns the timing facts and EVA's state dict; given ``state`` (an earlier round's), only loads it (EVA's result
    depends on the data and the base model, not on the round). PEFT loops until every layer's components converge,
    with no limit; on random data that can take long, so after ``max_forwards`` forward passes it is stopped
    (:class:`EvaNotConverged`; the adapters stay uninitialised).
    """
    from peft import get_eva_state_dict, initialize_lora_eva_weights

    info: dict[str, Any] = {"eva_state_reused": state is not None}
    if state is None:
        forwards = []

        def forward(model, inputs: dict):
            if len(forwards) >= max_forwards:
                raise EvaNotConverged(f"EVA did not converge within {max_forwards} forward passes")
            forwards.append(1)
            return model(**inputs)

        common.synchronize()
        start = time.perf_counter()
        state = get_eva_state_dict(model, batches, forward_fn=forward, show_progress_bar=False)
        initialize_lora_eva_weights(model, eva_state_dict=dict(state))  # PEFT pops the entries it loads
        common.synchronize()
        info.update(eva_init_s=time.perf_counter() - start, eva_forwards=len(forwards))
    else:
        initialize_lora_eva_weights(model, eva_state_dict=dict(state))  # PEFT pops the entries it loads
    return info, state


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
    eva = (
        init_eva(model, eva_batches(shape, spec.seed, model.device), EVA_MAX_FORWARDS)[0]
        if spec.config == "eva"
        else {}
    )
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
        **eva,
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


# --- in-process engine: every configuration in one process, rounds interleaved (shared with gpu_check.py) ------


def eva_batches(shape: Shape, seed: int, device) -> list[dict]:
    """The fixed batches EVA's initialisation cycles through (causal LM: labels = inputs)."""
    data = RandomTokens(EVA_BATCHES * shape.batch, shape.seq, shape.vocab, seed + 1)
    return [
        {k: v.to(device) for k, v in data[i * shape.batch : (i + 1) * shape.batch].items()} for i in range(EVA_BATCHES)
    ]


@dataclass
class LoopMethod:
    """One configuration wrapped for the hand-written loop: the model to train, its optimizer, its per-step call."""

    model: Any
    optimizer: Any
    after_step: Any  # (step) -> reallocation report or None; called after optimizer.step(), before zero_grad()
    info: dict = field(default_factory=dict)


def wrap_for_loop(
    base, config: str, shape: Shape, r: int, lr: float, seed: int, eva_max_forwards: int, eva_cache: dict
) -> LoopMethod:
    """Wrap ``base`` for ``config`` (same targets and budget as :func:`wrap_model`) with an AdamW optimizer.

    ``eva_cache`` keeps EVA's state dict from the first round, so EVA's initialisation is computed (and timed) once.
    """
    import torch

    torch.manual_seed(seed)  # the same adapter initialisation in every round
    total, _ = phase_plan(config, shape)
    if config == "base":
        # a backward through every layer, with no weight gradient: a freshly built or loaded model's weights require
        # gradients (only PEFT freezes them), so without this the first round would time a full backward
        base.requires_grad_(False)
        base.enable_input_require_grads()
        return LoopMethod(base, None, lambda step: None)
    if config == "eva":
        model = eva_model(base, r)
        info = {"eva_converged": False}
        if eva_cache.get("failed"):
            return LoopMethod(model, None, lambda step: None, info)
        try:
            facts, eva_cache["state"] = init_eva(
                model, eva_batches(shape, seed, base.device), eva_max_forwards, eva_cache.get("state")
            )
            info.update(facts, eva_converged=True)
        except EvaNotConverged:
            eva_cache["failed"] = True
            info.update(eva_forwards=eva_max_forwards)
    else:
        spec = WorkerSpec(config, asdict(shape), r, lr, seed, "")
        model, _ = wrap_model(base, config, spec, total, shape.skip + shape.measure)
        info = {}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    tuner = model.base_model
    if config == "adaptive":
        tuner.start_signal_collection(seed=seed)  # before the first step, as AdaptiveLoraCallback does
        return LoopMethod(model, optimizer, lambda step: tuner.update_and_allocate(step, optimizer, seed=seed), info)
    if config == "adalora":
        # PEFT's hand-loop example passes the 0-based index of the step just taken
        return LoopMethod(model, optimizer, lambda step: tuner.update_and_allocate(step - 1), info)
    return LoopMethod(model, optimizer, lambda step: None, info)


def unwrap(method: LoopMethod, config: str):
    """The base model back, with no adapter and no hook left (the next configuration wraps it again)."""
    if config == "base":
        method.model.disable_input_require_grads()
        return method.model
    return method.model.unload()


def run_loop_config(
    base,
    config: str,
    shape: Shape,
    r: int,
    lr: float,
    seed: int,
    eva_max_forwards: int = EVA_MAX_FORWARDS,
    eva_cache: dict | None = None,
):
    """Train ``config`` on ``base`` for :func:`phase_plan`'s steps in this process; returns ``(record, base)``.

    Step time runs from the forward to ``zero_grad`` (synchronised on a GPU), the per-step call (``update_and_allocate``)
    included, except at the reallocation, whose time is recorded apart. Peak memory per window as in the Trainer
    engine (:class:`common.ResourceMonitor`). bf16 shapes train under ``torch.autocast``, as ``Trainer(bf16=True)`` does.
    """
    import torch

    device = base.device
    total, phases = phase_plan(config, shape)
    method = wrap_for_loop(base, config, shape, r, lr, seed, eva_max_forwards, {} if eva_cache is None else eva_cache)
    record: dict[str, Any] = {"config": config, "phases": {}, **method.info}
    if config == "eva" and not method.info["eva_converged"]:
        unwrap(method, config)
        return {**record, "skipped": method.info}, base
    model, optimizer = method.model, method.optimizer
    model.train()
    record["adapted_modules"] = len(common.lora_layers(model))
    record["adapter_params_start"] = common.allocated_adapter_params(model) if config != "base" else 0
    data = RandomTokens(total * shape.batch, shape.seq, shape.vocab, seed)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if shape.dtype == "bfloat16" else contextlib.nullcontext()
    )
    times, calls, realloc, peaks, monitor = [], [], [], {}, None  # calls: per step, None at the reallocation
    starts = {first: name for name, (first, _) in phases.items()}
    ends = {last: name for name, (_, last) in phases.items()}
    for step in range(1, total + 1):
        batch = {k: v.to(device) for k, v in data[(step - 1) * shape.batch : step * shape.batch].items()}
        if step in starts:
            monitor = common.ResourceMonitor().__enter__()
        common.synchronize()
        start = time.perf_counter()
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        common.synchronize()
        call_start = time.perf_counter()
        report = method.after_step(step)
        common.synchronize()
        call = time.perf_counter() - call_start
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        common.synchronize()
        elapsed = time.perf_counter() - start
        if report is not None:
            realloc.append(call)
            elapsed -= call
        calls.append(None if report is not None else call)
        times.append(elapsed)
        if step in ends and monitor is not None:
            monitor.__exit__(None, None, None)
            peaks[ends[step]] = monitor.result()
            monitor = None
    for name, (first, last) in phases.items():
        window_calls = [c for c in calls[first - 1 : last] if c is not None]
        record["phases"][name] = {
            "steps": [first, last],
            "step_times_s": times[first - 1 : last],
            "per_step_call_s": statistics.median(window_calls) if window_calls else None,
            **peaks[name],
        }
    record.update(
        adapter_params_end=common.allocated_adapter_params(model) if config != "base" else 0,
        adapter_params_effective_end=common.adapter_param_count(model) if config != "base" else 0,
        reallocation_s=realloc,
        ranks_end=common.adapter_ranks(model) if config != "base" else {},
        final_loss=float(loss.detach()),
    )
    del optimizer, method.optimizer, loss
    base = unwrap(method, config)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return record, base


def run_loop_engine(
    base,
    shape: Shape,
    configs,
    rounds: int,
    r: int,
    lr: float,
    seed: int,
    progress=None,
    eva_max_forwards: int = EVA_MAX_FORWARDS,
) -> tuple[list[dict], Any]:
    """Every configuration on the same base model, ``rounds`` times, configurations interleaved; returns the
    records (the Trainer engine's format, plus each window's ``per_step_call_s`` and EVA's init facts) and the base
    model (unwrapped again)."""
    records, eva_cache = [], {}
    for round_ in range(rounds):
        for config in configs:
            if progress is not None:
                progress(f"{config} round {round_ + 1}/{rounds}")
            record, base = run_loop_config(base, config, shape, r, lr, seed, eva_max_forwards, eva_cache)
            records.append({**record, "round": round_})
    return records, base


def one_offs(records: list[dict]) -> dict[str, Any]:
    """The one-off and per-step allocation costs next to the step times: our reallocation event, EVA's
    initialisation, and the median time of each method's per-step call (``update_and_allocate``)."""

    def values(config: str, key: str) -> list[float]:
        return [r[key] for r in records if r["config"] == config and r.get(key) is not None]

    def window_calls(phase: str) -> list[float]:
        windows = [r["phases"].get(phase, {}) for r in records]
        return [w["per_step_call_s"] for w in windows if w.get("per_step_call_s") is not None]

    eva = [r for r in records if r["config"] == "eva"]
    return {
        "reallocation_s": [t for r in records for t in r.get("reallocation_s", [])],
        "eva_init_s": values("eva", "eva_init_s"),
        "eva_forwards": values("eva", "eva_forwards"),
        "eva_converged": [bool(r.get("eva_converged")) for r in eva],
        "eva_state_reused": any(r.get("eva_state_reused") for r in eva),
        "adaptive_per_step_call_s": window_calls("adaptive warmup"),
        "adalora_per_step_call_s": window_calls("adalora early"),
    }


def run_loop(args: argparse.Namespace, shape: Shape) -> list[dict]:
    """``--engine loop``: build the base once and run every configuration in this process."""
    base = build_base_model(shape, args.seed)
    records, _ = run_loop_engine(
        base, shape, args.configs, args.rounds, args.r, args.lr, args.seed, progress=lambda text: print(text)
    )
    return records


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
    p.add_argument(
        "--configs",
        nargs="+",
        choices=LOOP_CONFIGS,
        default=None,
        help=f"default: {' '.join(CONFIGS)} (with --engine loop also base); base needs --engine loop",
    )
    p.add_argument(
        "--engine",
        choices=("trainer", "loop"),
        default="trainer",
        help="trainer: each run in a fresh process under transformers.Trainer; loop: every run in this process, "
        "a hand-written loop, the base model built once",
    )
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
    if args.configs is None:
        args.configs = list(LOOP_CONFIGS if args.engine == "loop" else CONFIGS)
    if args.engine == "trainer" and "base" in args.configs:
        raise SystemExit("--configs base (the frozen base model) needs --engine loop")
    out_dir = args.out or common.RESULTS_DIR / f"overhead-{mode}-{common.timestamp()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    meta = common.run_metadata(argv)
    records = run_loop(args, shape) if args.engine == "loop" else run_configs(args, shape, out_dir)
    large = (
        run_large_realloc(args, out_dir)
        if (args.large_realloc or (args.large_realloc is None and mode == "cpu"))
        else None
    )
    payload: dict[str, Any] = {
        "meta": meta,
        "mode": mode,
        "engine": args.engine,
        "shape": asdict(shape),
        "r": args.r,
        "rounds": args.rounds,
        "reallocation_s": [t for r in records for t in r.get("reallocation_s", [])],
        "one_offs": one_offs(records),
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
    one_off_text = one_off_lines(payload.get("one_offs") or {})
    if one_off_text:
        text += "\n" + one_off_text + "\n"
    (out_dir / "results.md").write_text(text)
    return text


def one_off_lines(costs: dict[str, Any]) -> str:
    """EVA's initialisation and the per-step allocation calls, in words (medians over rounds)."""
    lines = []
    if costs.get("eva_init_s"):
        times = ", ".join(f"{t:.2f} s" for t in costs["eva_init_s"])
        forwards = ", ".join(str(n) for n in costs["eva_forwards"])
        reuse = "; computed in the first round, later rounds load its result" if costs.get("eva_state_reused") else ""
        lines.append(f"- EVA initialisation, apart from the steps: {times} ({forwards} forward passes{reuse})")
    elif costs.get("eva_converged"):
        lines.append(
            "- EVA initialisation did not converge within the allowed forward passes: EVA's steps not measured"
        )
    for name, key in (
        ("adaptive, signal steps", "adaptive_per_step_call_s"),
        ("AdaLoRA, early", "adalora_per_step_call_s"),
    ):
        if costs.get(key):
            lines.append(
                f"- {name}: update_and_allocate takes a median {statistics.median(costs[key]) * 1e3:.2f} ms per step "
                "(inside the step times above)"
            )
    return "\n".join(lines)


def _header(payload: dict, records: list[dict]) -> str:
    meta, shape, hw = payload["meta"], payload["shape"], payload["meta"]["hardware"]
    adapted = next((r["adapted_modules"] for r in records if r.get("adapted_modules")), 0)
    engine = (
        "one process, hand-written loop, the base model built once"
        if payload.get("engine") == "loop"
        else "each run in a fresh process under transformers.Trainer"
    )
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
            f"- LoRA on {adapted} modules (q,k,v,o,gate,up,down of every layer), r={payload['r']}; "
            f"AdaLoRA init_r={(3 * payload['r'] + 1) // 2} -> target_r={payload['r']}, update_and_allocate every step "
            "(tinit = tfinal = the unmeasured steps, deltaT 10); EVA rho=2 (init time apart); "
            "base: the frozen model's forward and backward, no adapter",
            f"- Every configuration: {2 * (shape['skip'] + shape['measure'])} steps; measured windows: steps "
            f"{shape['skip'] + 1}-{shape['skip'] + shape['measure']} (early; adaptive: warmup) and the last "
            f"{shape['measure']} (late; adaptive: after reallocation); {payload['rounds']} rounds, configurations "
            f"interleaved; engine: {engine}",
            f"- Total wall time: {payload['wall_s'] / 60:.1f} min",
        ]
    )


if __name__ == "__main__":
    main()
