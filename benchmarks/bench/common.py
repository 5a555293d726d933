"""Helpers shared by the benchmark scripts: hardware facts, memory/utilisation probes, adapter
introspection that works for LoRA, adaptive LoRA, AdaLoRA and EVA, and Trainer callbacks.

Nothing here downloads anything.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

REPO_ROOT = Path(__file__).resolve().parents[2]  # benchmarks/bench/common.py
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# --- environment --------------------------------------------------------------------------------


def hub_offline() -> bool:
    """True when the user asked for offline mode (``HF_HUB_OFFLINE`` truthy)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def package_versions(names: Sequence[str] = ("torch", "transformers", "peft", "peft-adaptive", "accelerate")) -> dict:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision() -> str:
    """``<commit>`` or ``<commit>+dirty``; ``unknown`` outside a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True).stdout
        return commit + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def hardware_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpu": None,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return info


def run_metadata(argv: Sequence[str]) -> dict[str, Any]:
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *argv]),
        "git": git_revision(),
        "hardware": hardware_info(),
        "versions": package_versions(),
    }


def timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


# --- memory and utilisation -----------------------------------------------------------------------


def process_peak_rss_mb() -> float:
    """Peak resident set size of this process since it started (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def gpu_utilisation() -> float | None:
    """Instantaneous utilisation (%) of the current GPU, via NVML when available, else nvidia-smi."""
    try:
        return float(torch.cuda.utilization())
    except Exception:  # no pynvml, or no GPU
        pass
    if shutil.which("nvidia-smi") is None:
        return None
    index = torch.cuda.current_device() if torch.cuda.is_available() else 0
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", str(index)],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout
        return float(out.strip().splitlines()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


class ResourceMonitor:
    """Peak memory and mean GPU utilisation over a window (``with ResourceMonitor() as m: ...``).

    GPU: ``torch.cuda.max_memory_allocated`` since the window opened, and utilisation sampled every
    ``interval`` seconds. CPU: the largest resident set size sampled every ``interval`` seconds
    (``ru_maxrss`` cannot be reset, so it is reported separately as the process-lifetime peak).
    """

    def __init__(self, interval: float = 0.05, gpu_interval: float = 0.5):
        self.cuda = torch.cuda.is_available()
        self.interval = gpu_interval if self.cuda else interval
        self.peak_rss_mb = 0.0
        self.peak_gpu_mb: float | None = None
        self._util: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_rss_mb = max(self.peak_rss_mb, current_rss_mb())
            if self.cuda:
                util = gpu_utilisation()
                if util is not None:
                    self._util.append(util)
            self._stop.wait(self.interval)

    def __enter__(self) -> ResourceMonitor:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.peak_rss_mb = current_rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20
        self._stop.set()
        self._thread.join()
        self.peak_rss_mb = max(self.peak_rss_mb, current_rss_mb())

    @property
    def gpu_util_mean(self) -> float | None:
        return statistics.fmean(self._util) if self._util else None

    def result(self) -> dict[str, float | None]:
        return {
            "peak_gpu_mb": self.peak_gpu_mb,
            "peak_rss_mb": self.peak_rss_mb,
            "process_peak_rss_mb": process_peak_rss_mb(),
            "gpu_util_mean": self.gpu_util_mean,
        }


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --- adapter introspection (LoRA, adaptive LoRA, EVA, AdaLoRA) ----------------------------------


def strip_peft_prefix(name: str) -> str:
    """Module name as in the base model (without ``base_model.model.``)."""
    return name.removeprefix("base_model.model.")


def lora_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    """Every PEFT LoRA-family layer (LoRA, adaptive, EVA, AdaLoRA ``SVDLinear``) by base-model name."""
    from peft.tuners.lora import LoraLayer

    return {strip_peft_prefix(n): m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def _adalora_mask_ranks(peft_model: nn.Module, adapter: str) -> dict[str, int] | None:
    """AdaLoRA's effective ranks from its ``rank_pattern`` masks (``None`` before the final budget)."""
    pattern = getattr(peft_model.peft_config[adapter], "rank_pattern", None)
    if not pattern:
        return None
    ranks = {}
    for key, mask in pattern.items():
        name = strip_peft_prefix(re.sub(rf"\.lora_E(\.{re.escape(adapter)})?$", "", key))
        ranks[name] = int(sum(bool(v) for v in mask))
    return ranks


def is_adalora(peft_model: nn.Module) -> bool:
    from peft.tuners.adalora import AdaLoraModel

    return isinstance(getattr(peft_model, "base_model", None), AdaLoraModel)


def adapter_ranks(peft_model: nn.Module, adapter: str = "default") -> dict[str, int]:
    """Rank of every adapted module; for AdaLoRA the *effective* rank (unmasked singular values)."""
    layers = lora_layers(peft_model)
    ranks = {name: int(layer.r[adapter]) for name, layer in layers.items() if adapter in layer.r}
    if is_adalora(peft_model):
        masked = _adalora_mask_ranks(peft_model, adapter)
        if masked is not None:
            ranks.update({n: r for n, r in masked.items() if n in ranks})
    return ranks


def rank_cost(layer: nn.Module, adapter: str = "default") -> int:
    """Trainable parameters one rank costs in ``layer``: ``fan_in + fan_out`` (``+1`` for AdaLoRA's ``E``)."""
    base = layer.get_base_layer()
    if isinstance(base, nn.Linear):
        cost = base.in_features + base.out_features
    else:
        weight = base.weight
        cost = weight.shape[0] + weight[0].numel()
    lora_E = getattr(layer, "lora_E", None)
    if lora_E is not None and adapter in lora_E:
        cost += 1
    return cost


def adapter_param_count(peft_model: nn.Module, adapter: str = "default") -> int:
    """Rank-dependent adapter parameters ``sum(rank_i * cost_i)`` (effective ranks for AdaLoRA)."""
    layers = lora_layers(peft_model)
    return sum(rank * rank_cost(layers[name], adapter) for name, rank in adapter_ranks(peft_model, adapter).items())


def allocated_adapter_params(peft_model: nn.Module, adapter: str = "default") -> int:
    """Adapter parameters that physically exist and train (AdaLoRA keeps ``init_r`` tensors throughout)."""
    total = 0
    for layer in lora_layers(peft_model).values():
        for attr in ("lora_A", "lora_B", "lora_E", "lora_embedding_A", "lora_embedding_B"):
            container = getattr(layer, attr, None)
            if container is not None and adapter in container:
                value = container[adapter]
                total += value.numel() if isinstance(value, torch.Tensor) else value.weight.numel()
    return total


def trainable_param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- Trainer callbacks ---------------------------------------------------------------------------


class AdaLoraAllocateCallback(TrainerCallback):
    """Call PEFT AdaLoRA's ``update_and_allocate`` once per optimizer step, where PEFT requires it.

    ``on_optimizer_step`` runs after ``optimizer.step()`` and before ``zero_grad()``, so the gradients the
    importance scores need are still there. ``state.global_step`` is the 0-based index of the step being
    taken (it is incremented after this event), which is what PEFT's own examples pass.
    """

    def __init__(self) -> None:
        self.calls = 0

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        model.base_model.update_and_allocate(state.global_step)
        self.calls += 1


class StepProgressCallback(TrainerCallback):
    """Report optimizer steps on stdout as ``@@progress <done> <total>`` for a parent process's progress bar."""

    def __init__(self, every: int = 1) -> None:
        self.every = max(1, every)
        self._reported = 0

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            print(f"@@progress {state.global_step - self._reported} {state.max_steps}", flush=True)
            self._reported = state.global_step


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step, from ``on_step_begin`` to ``on_step_end``.

    Register it before other callbacks whose ``on_step_end`` does work (e.g. a reallocation): callbacks
    run in registration order, so that work is then not counted in the step time.
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        synchronize()
        self.times.append(time.perf_counter() - self._start)


def run_worker_process(args: Sequence[str], log_path: Path, bar, expected_steps: int) -> int:
    """Run ``python *args``; ``@@progress`` lines on its stdout advance ``bar``, all other output goes to the log.

    Returns the exit code. The bar is advanced to ``expected_steps`` even if the worker stopped early.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    done = 0
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        for line in process.stdout:
            if line.startswith("@@progress"):
                steps = int(line.split()[1])
                bar.update(steps)
                done += steps
            else:
                log.write(line)
        process.wait()
    bar.update(max(0, expected_steps - done))
    return process.returncode
