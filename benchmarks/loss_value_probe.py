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
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import predicted_gain_replay  # noqa: E402
import resplit_probe  # noqa: E402
from bench.family import member  # noqa: E402
from peft_adaptive.allocation import allocate_by_spectrum  # noqa: E402
from peft_adaptive.resize import lora_factors  # noqa: E402

MEASURE_BATCHES = 4  # the training batches after the signal steps the values are read on
FIRST_ORDER_CUT = 0.01  # the probe step cuts the loss by this share to first order
LONGEST_STEP = 10.0  # a Newton step is taken at most this many probe steps long


def adapter_svd(layer, adapter: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, S, Vh`` of the adapter's contribution ``s B A`` (rank ``r``, thin)."""
    A, B = lora_factors(layer, adapter)
    delta = (B.detach().double() * layer.scaling[adapter]) @ A.detach().double()
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    r = A.shape[0]
    return U[:, :r], S[:r], Vh[:r]


@contextmanager
def added(layer, u: torch.Tensor, v: torch.Tensor, scale: float):
    """The layer's output plus ``scale * (x · v) u``: its weight moved by ``scale * u vᵀ``, for the ``with`` block."""

    def hook(_module, args, output):
        x = args[0]
        return output + scale * (x @ v.to(x.dtype)).unsqueeze(-1) * u.to(x.dtype)

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


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
    """Per layer, its ``keep`` values (``r``) and ``growth`` values (``grow``), in loss units (see the docstring)."""
    batches = task.batches(seed, MEASURE_BATCHES, offset=step)
    with torch.no_grad():
        targets = [task.teacher(**b).last_hidden_state for b in batches]

    def loss() -> float:
        with torch.no_grad():
            return sum(float(task.loss(model, b, t)) for b, t in zip(batches, targets)) / len(batches)

    was_training = model.training
    model.eval()
    base = loss()
    with torch.enable_grad():
        grads = weight_gradients(model, task, batches, targets, layers)
    out = []
    for layer, grad in zip(layers, grads):
        U, S, Vh = adapter_svd(layer, adapter)
        keep = []
        for j in range(r):
            with added(layer, U[:, j], Vh[j], -float(S[j])):
                keep.append(loss() - base)
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
    if was_training:
        model.train()
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
    out, low = [], float("inf")
    for v in values:
        low = min(low, v)
        out.append(low)
    return out


def kept_loss(values: dict) -> float:
    """What the module's learned directions hold: the sum of its positive keep values."""
    return sum(max(x, 0.0) for x in values["keep"])


def concentration(seen: dict) -> float:
    """How few modules hold what the adapters learned, in loss units: the participation ratio of the modules' kept
    loss over the number of modules (``1/n``: one module holds all; 1: every module holds the same)."""
    kept = [kept_loss(v) for v in seen["loss_values"]]
    total, square = sum(kept), sum(k * k for k in kept)
    return total * total / (square * len(kept)) if square > 0 else 1.0


#: ``keep-gate`` keeps uniform LoRA where what was learned is spread at least this evenly (chosen on the choose
#: members and family-07 at seed 0: 0.04-0.12 on the first, 0.29 on family-07)
SPREAD_GATE = 0.2


def rule_values(seen: dict, rule: str) -> list[list[float]]:
    """Per module, what each rank is worth under ``rule`` (non-increasing, positive); see ``RULES``."""
    tiny = 1e-30  # a vanishing ramp keeps ties and non-positive values in a module's own order
    out = []
    for v, gradient in zip(seen["loss_values"], seen["spectra"]):
        if rule in ("keep-mix", "keep-gate"):
            energy = sum(s * s for s in gradient) or 1.0
            values = [s * s / energy * kept_loss(v) for s in gradient]
        else:
            values = [max(x, 0.0) for x in v["keep"] + v["growth"]]
            values = sorted(values, reverse=True) if rule == "loss-sorted" else running_min(values)
        out.append([x + tiny * (len(values) - j) for j, x in enumerate(values)])
    return out


def rule_ranks(seen: dict, rule: str) -> list[int]:
    """The ranks ``rule`` splits the run's budget into under its caps (the run's ``2r``, or ``<K>r`` after an ``@``);
    ``keep-gate``: uniform LoRA's rank ``r`` everywhere where ``concentration`` reaches ``SPREAD_GATE``, else
    ``keep-mix``'s split."""
    rule, _, cap = rule.partition("@")
    r = seen["max_r"] // 2
    if rule == "keep-gate" and concentration(seen) >= SPREAD_GATE:
        return [r] * len(seen["names"])
    max_r = int(cap.removesuffix("r")) * r if cap else seen["max_r"]
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
    return line + f" | spread of the kept loss {concentration(seen):.3f}"


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
