"""The records of GLUE runs (``runs.json``): which succeeded, grouped by (task, method) in first-run order, and
pooled across invocations made with the same settings.
"""

from __future__ import annotations

from collections import defaultdict


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
    "signal_steps",
    "grad_weight",
    "delta_weight",
)


def _setting(payload: dict, key: str):
    """A pooled setting of a payload; runs recorded before the rename call ``signal_steps`` ``warmup_steps``."""
    config = payload["config"]
    if key == "signal_steps" and key not in config:
        return config.get("warmup_steps")
    return config.get(key)


def merge_payloads(payloads: list[dict]) -> dict:
    """Pool the runs of several invocations made with the same settings (e.g. extra seeds)."""
    first = payloads[0]
    for other in payloads[1:]:
        differing = [k for k in POOLED_SETTINGS if _setting(first, k) != _setting(other, k)]
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
