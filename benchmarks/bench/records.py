"""The results tree: one JSON record per (suite, method, seed), where it lives and how to read it back.

``benchmarks/results/allocation/<suite>/<method>/seed<k>.json``, or under ``$PEFT_ADAPTIVE_ALLOCATION_RESULTS``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import common

RESULTS = common.RESULTS_DIR / "allocation"


def result_path(suite: str, method: str, seed: int) -> Path:
    """Where the run (suite, method, seed) writes its record; its log sits next to it (``.log``)."""
    return results_root() / suite / method / f"seed{seed}.json"


def results_root() -> Path:
    """``$PEFT_ADAPTIVE_ALLOCATION_RESULTS`` (e.g. for smoke tests), else ``benchmarks/results/allocation``."""
    return Path(os.environ.get("PEFT_ADAPTIVE_ALLOCATION_RESULTS", RESULTS))


def load_results(suite: str) -> dict[str, dict[int, dict]]:
    """Every record of ``suite``: ``{method: {seed: record}}``."""
    out: dict[str, dict[int, dict]] = {}
    for path in sorted((results_root() / suite).glob("*/seed*.json")):
        data = json.loads(path.read_text())
        out.setdefault(data["method"], {})[data["seed"]] = data
    return out


def source_run(suite: str, method: str, seed: int, user: str) -> dict:
    """The record of an earlier run that ``user`` builds on; that run must exist."""
    source = result_path(suite, method, seed)
    if not source.is_file():
        raise SystemExit(f"{user} builds on {source}, which does not exist: run {method} first")
    return json.loads(source.read_text())


def final_ranks(run: dict) -> dict[str, int]:
    """Every adapted module's final rank, the modules the reallocation removed (rank 0) included."""
    removed = (run["allocation"] or {}).get("removed") or []
    return {**run["ranks"], **{name: 0 for name in removed}}
