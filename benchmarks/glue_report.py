"""The GLUE benchmark's report: the tables of ``results.md`` (results, verdicts, budgets) and all output files."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from bench import common
from glue_plots import plot_metrics, plot_rank_heatmaps
from glue_records import group_runs, method_order, ok_runs


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


def write_outputs(payload: dict, out_dir: Path) -> str:
    common.write_json(out_dir / "runs.json", payload)
    text = write_report(payload, out_dir)
    if ok_runs(payload["runs"]):
        plot_metrics(payload["runs"], out_dir / "metric.png")
        for task in dict.fromkeys(r["task"] for r in ok_runs(payload["runs"])):
            plot_rank_heatmaps(payload["runs"], task, out_dir / f"ranks_{task}.png")
    return text
