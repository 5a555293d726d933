"""What is each rank worth in units of the loss, at the reallocation? Keep values measured, growth values by line search.

Exploratory (no rule is chosen by it alone). Every score so far values a module's ranks by a gradient or update
*size*: in units the module's kind sets (on SmolLM2 every ``v_proj`` and ``o_proj`` reads largest), and, for the
ranks it already has, by what is still left to learn there instead of what was learned (a module that met its need
within ``r`` reads small and is cut: family-07). This probe values both in one unit, the training loss, on the four
training batches that follow the signal steps (the run would train on them next; no held-out sentence is read):

* **keep** value of rank ``j <= r``: the loss increase when the ``j``-th singular direction of the module's adapter
  ``s B A`` is removed (the in-place resize cuts the trailing ones first, so the values follow that order);
* **growth** value of rank ``r + j``: along the ``j``-th singular pair ``(u, v, sigma)`` of the loss gradient of the
  module's weight projected off the adapter's row and column spaces (what rank ``r`` cannot reach:
  ``(I - U Uᵀ) G (I - V Vᵀ)``), the loss's curvature ``h`` read by a central difference at the step that would cut the
  loss by 1% to first order, and the Newton decrease ``sigma^2 / 2h`` (``sigma * t_max`` where ``h <= 0`` or the
  Newton step is longer than ``t_max``, ten times that step);
* rule ``loss``: per module the keep values then the growth values, made non-increasing (each the least of it and
  those before it), split by the package's ``allocate_by_spectrum`` under the run's caps; ``loss-sorted``: the same
  values sorted instead (optimistic: a module's growth may be worth more than its weakest kept direction).

The proxy is ``resplit_probe.py``'s: the share of uniform LoRA's uncovered planted energy the split covers (where
uniform covers all, the energy it leaves), beside the shipped default's, on the cached or replayed signal steps.

    python benchmarks/loss_value_probe.py --members 1 9 13 17 7 0 4 8 12 16 --seeds 0 [--cache DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import predicted_gain_replay  # noqa: E402
import resplit_probe  # noqa: E402
from bench.family import member  # noqa: E402
from bench.kept_loss import (  # noqa: E402
    adapter_svd,
    added,
    batch_loss,
    concentration,
    keep_gate_ranks,
    keep_mix_values,
    keep_values,
    kept_loss,
    measuring_batches,
)
from peft_adaptive.allocation import allocate_by_spectrum  # noqa: E402

FIRST_ORDER_CUT = 0.01  # the probe step cuts the loss by this share to first order
LONGEST_STEP = 10.0  # a Newton step is taken at most this many probe steps long


def weight_gradients(model, task, batches, targets, layers) -> list[torch.Tensor]:
    """Per layer, the gradient of the mean loss over ``batches`` with respect to its weight, ``sum_t d_t x_tᵀ``."""
    inputs: dict[int, torch.Tensor] = {}
    grads = [None] * len(layers)

    def keep_input(i):
        def hook(_module, args, output):
            inputs[i] = args[0].detach()
            output.register_hook(lambda d: accumulate(i, d))

        return hook

    def accumulate(i, d):
        g = torch.einsum("...o,...i->oi", d.double(), inputs[i].double())
        grads[i] = g if grads[i] is None else grads[i] + g

    handles = [layer.register_forward_hook(keep_input(i)) for i, layer in enumerate(layers)]
    try:
        for batch, target in zip(batches, targets):
            (task.loss(model, batch, target) / len(batches)).backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    return grads


def loss_values(model, task, seed: int, step: int, layers, adapter: str, r: int, grow: int) -> list[dict]:
    """Per layer, its ``keep`` values (``r``, ``bench.kept_loss.keep_values``) and ``growth`` values (``grow``), in
    loss units (see the docstring)."""
    batches, targets = measuring_batches(task, seed, step)
    loss = batch_loss(model, task, batches, targets)
    was_training = model.training
    model.eval()
    base = loss()
    with torch.enable_grad():
        grads = weight_gradients(model, task, batches, targets, layers)
    keeps = keep_values(layers, adapter, loss)
    out = []
    for layer, grad, keep in zip(layers, grads, keeps):
        U, _, Vh = adapter_svd(layer, adapter)
        normal = grad - U @ (U.T @ grad)
        normal = normal - (normal @ Vh.T) @ Vh
        gu, gs, gvh = torch.linalg.svd(normal, full_matrices=False)
        growth = []
        for j in range(grow):
            sigma = float(gs[j])
            if sigma <= 0:
                growth.append(0.0)
                continue
            t = FIRST_ORDER_CUT * base / sigma  # moving by -t u vᵀ cuts the loss by sigma t to first order
            with added(layer, gu[:, j], gvh[j], -t):
                down = loss()
            with added(layer, gu[:, j], gvh[j], t):
                up = loss()
            h = (down + up - 2 * base) / t**2
            t_max = LONGEST_STEP * t
            newton = sigma / h if h > 0 else float("inf")
            step_len = min(newton, t_max)
            growth.append(sigma * step_len - 0.5 * max(h, 0.0) * step_len**2)
        out.append({"keep": keep, "growth": growth})
    model.train(was_training)
    return out


def read_with_loss_values(suite: str, seed: int) -> dict:
    """``resplit_probe.read_signals`` plus, at the same reallocation, every module's loss values."""
    captured: dict = {}
    make_task, seeded_model = predicted_gain_replay.make_task, predicted_gain_replay.seeded_model

    def capture_task(suite_def):
        captured["task"] = make_task(suite_def)
        return captured["task"]

    def capture_model(method, task, seed):
        built = seeded_model(method, task, seed)
        captured["model"] = built[0]
        return built

    from peft_adaptive.scores import consistent_spectrum

    allocate = consistent_spectrum.ConsistentSpectrumScore.allocate

    def measuring(self, collector, costs, budget, config):
        r = config.max_r // 2
        captured["values"] = loss_values(
            captured["model"],
            captured["task"],
            seed,
            resplit_probe.SIGNAL_STEPS[member(int(suite.split("-")[1])).teacher],
            collector.layers,
            collector.adapter,
            r,
            config.max_r - r,
        )
        return allocate(self, collector, costs, budget, config)

    predicted_gain_replay.make_task, predicted_gain_replay.seeded_model = capture_task, capture_model
    consistent_spectrum.ConsistentSpectrumScore.allocate = measuring
    try:
        seen = resplit_probe.read_signals(suite, seed)  # wraps `measuring` in its own reading hook
    finally:
        predicted_gain_replay.make_task, predicted_gain_replay.seeded_model = make_task, seeded_model
        consistent_spectrum.ConsistentSpectrumScore.allocate = allocate
    seen["loss_values"] = captured["values"]
    return seen


def running_min(values: list[float]) -> list[float]:
    """Each value the least of it and those before it."""
    return list(itertools.accumulate(values, min))


def kept(seen: dict) -> list[float]:
    """Each module's kept loss (``bench.kept_loss.kept_loss``)."""
    return [kept_loss(v["keep"]) for v in seen["loss_values"]]


def rule_values(seen: dict, rule: str) -> list[list[float]]:
    """Per module, what each rank is worth under ``rule`` (non-increasing, positive); see ``RULES``."""
    if rule in ("keep-mix", "keep-gate"):
        return keep_mix_values(seen["spectra"], kept(seen))
    tiny = 1e-30  # a vanishing ramp keeps ties and non-positive values in a module's own order
    out = []
    for v in seen["loss_values"]:
        values = [max(x, 0.0) for x in v["keep"] + v["growth"]]
        values = sorted(values, reverse=True) if rule == "loss-sorted" else running_min(values)
        out.append([x + tiny * (len(values) - j) for j, x in enumerate(values)])
    return out


def rule_ranks(seen: dict, rule: str) -> list[int]:
    """The ranks ``rule`` splits the run's budget into under its caps (the run's ``2r``, or ``<K>r`` after an ``@``);
    ``keep-gate``: ``bench.kept_loss.keep_gate_ranks`` (uniform where the kept loss is spread, else ``keep-mix``)."""
    rule, _, cap = rule.partition("@")
    r = seen["max_r"] // 2
    max_r = int(cap.removesuffix("r")) * r if cap else seen["max_r"]
    if rule == "keep-gate":
        return keep_gate_ranks(seen["spectra"], kept(seen), seen["costs"], seen["budget"], r, seen["min_r"], max_r)
    values = rule_values(seen, rule)
    return list(allocate_by_spectrum(values, seen["costs"], seen["budget"], seen["min_r"], max_r).ranks)


#: ``loss``, ``loss-sorted``: the registered rules (2026-12-08, 01:07 UTC); ``keep-mix`` (each module's gradient
#: spectrum's shape times its kept loss) and ``keep-gate`` (the same, or uniform where the kept loss is spread)
#: were found after their readings, on the same members, and read at looser caps (``@3r``, ``@4r``) after the
#: registered test at ``2r`` (RESULTS.md)
RULES = ("loss", "loss-sorted", "keep-mix", "keep-gate", "keep-gate@3r", "keep-gate@4r")


def probe(index: int, seed: int, cache: Path | None) -> str:
    suite = f"family-{index:02d}"
    path = cache / f"{suite}-s{seed}-loss.json" if cache else None
    if path and path.is_file():
        seen = json.loads(path.read_text())
    else:
        seen = read_with_loss_values(suite, seed)
        if path:
            path.write_text(json.dumps(seen))
    m = member(index)
    planted = resplit_probe.planted_energies(index, seen["names"])
    line = f"{suite} seed {seed} ({m.group}, {m.teacher}, r={m.r})"
    splits = {"default": seen["ranks"], **{rule: rule_ranks(seen, rule) for rule in RULES}}
    for rule, ranks in splits.items():
        line += f" | {rule} {resplit_probe.coverage_text(planted, ranks, m.r)}"
    return line + f" | spread of the kept loss {concentration(kept(seen)):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", nargs="+", type=int, required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--cache", type=Path, help="keep each replay's reading here and reuse it")
    args = parser.parse_args()
    if args.cache:
        args.cache.mkdir(parents=True, exist_ok=True)
    for index in args.members:
        for seed in args.seeds:
            print(probe(index, seed, args.cache), flush=True)


if __name__ == "__main__":
    main()
