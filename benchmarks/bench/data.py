"""GLUE tasks and their data: the local GLUE files (``<task>/{train,dev}.tsv.gz``) or the hub (``nyu-mll/glue``).

Rows come back in nyu-mll/glue's column names and label coding, whichever the source.
"""

from __future__ import annotations

import csv
import gzip
import os
from dataclasses import dataclass
from pathlib import Path

from . import common


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


def read_hub_columns(task: str, split: str, columns: tuple[str, ...]) -> dict[str, list]:
    if common.hub_offline():  # before the import: the clear message, not an ImportError, where datasets is absent
        raise SystemExit("HF_HUB_OFFLINE is set and no GLUE directory was found: pass --glue-dir")
    from datasets import load_dataset

    data = load_dataset("nyu-mll/glue", task, split="validation" if split == "dev" else split)
    return {col: list(data[col]) for col in columns}


def load_split(task: str, split: str, glue_dir: Path | None) -> tuple[dict[str, list], str]:
    """Rows of ``split`` (``train``/``dev``) and where they came from."""
    if glue_dir is not None:
        return read_local_split(glue_dir, task, split), f"local:{glue_dir}"
    return read_hub_columns(task, split, (*TASKS[task].text_columns, "label")), "hub:nyu-mll/glue"


def load_texts(task: str, split: str, columns: tuple[str, ...], glue_dir: Path | None) -> dict[str, list[str]]:
    """Text columns of any split, ``test`` included (unlabelled text for language modelling)."""
    if glue_dir is not None:
        return _columns(_read_tsv(glue_dir / task / f"{split}.tsv.gz"), {c: c for c in columns})
    return read_hub_columns(task, split, columns)


def take_subset(rows: dict[str, list], limit: int | None, seed: int = 0) -> dict[str, list]:
    """A fixed random subset of ``limit`` rows (the same for every method and run seed)."""
    n = len(rows["label"])
    if limit is None or limit >= n:
        return rows
    return _pick(rows, sorted(_subset_indices(n, limit, seed)))


def rows_outside_subset(rows: dict[str, list], limit: int | None, count: int, seed: int = 0) -> dict[str, list]:
    """``count`` fixed random rows that ``take_subset(rows, limit, seed)`` leaves out (fewer where fewer are left):
    a validation set drawn from the training split, never trained on."""
    import random

    n = len(rows["label"])
    inside = set(range(n)) if limit is None or limit >= n else _subset_indices(n, limit, seed)
    outside = [i for i in range(n) if i not in inside]
    keep = sorted(random.Random(f"outside-{seed}").sample(outside, min(count, len(outside))))
    return _pick(rows, keep)


def _subset_indices(n: int, limit: int, seed: int) -> set[int]:
    import random

    return set(random.Random(seed).sample(range(n), limit))


def _pick(rows: dict[str, list], indices: list[int]) -> dict[str, list]:
    return {col: [values[i] for i in indices] for col, values in rows.items()}
