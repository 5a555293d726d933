"""Exploratory probe (issue 27): do scale-free statistics of a module's input and output gradient find the planted modules?

On the SmolLM2 members of the planted family the gradient's size follows depth, not the planted modules
(RESULTS.md). This probe asks whether normalising away the scale of what enters and leaves each module helps.
It trains uniform LoRA on a member (the harness's task, batches, optimizer and schedule, seed 0) and, over the
signal steps from ``--start`` on, accumulates for every target module its input ``x`` and the loss gradient at its
output ``d`` per token: ``C = sum d x^T / N`` (the full-weight gradient over N tokens), ``A = sum x x^T / N`` and
``S = sum d d^T / N``. Statistics (:func:`module_statistics`):

* ``fro``: ``||C||_F``, the gradient's size;
* ``consistency``: ``||sum_t G_t||^2 / (T sum_t ||G_t||^2)`` over the steps, as ``score="consistent_spectrum"``;
* ``token_consistency``: ``N ||C||^2 / sum_i ||d_i||^2 ||x_i||^2``, the same over tokens (about 1 for noise);
* ``canonical_top`` and ``canonical_energy``: the largest canonical correlation between ``x`` and ``d`` and the sum
  of their squares (the singular values of ``S^-1/2 C A^-1/2``: how much of the output gradient a linear map of the
  input can predict, whatever the scales);
* ``whitened_output``: ``||S^-1/2 C||_F``.

It prints each statistic's AUC of planted against unplanted modules (1: every planted module first). A lead, not a
result: it reads no held-out metric, trains nothing at the ranks it would give, and chooses nothing.

    python benchmarks/canonical_probe.py 0 1 4 5 9             # the choose members, signal steps 1-20
    python benchmarks/canonical_probe.py 1 9 --start 20 --steps 60   # a later window
"""

from __future__ import annotations

import argparse

STATISTICS = ("fro", "consistency", "token_consistency", "canonical_top", "canonical_energy", "whitened_output")
RIDGE = 1e-3  # added to A and S before inverting, relative to their mean diagonal


def inverse_sqrt(matrix, ridge: float = RIDGE):
    """``(M + ridge * mean(diag M) * I)^(-1/2)`` for a symmetric positive semi-definite ``M``."""
    import torch

    size = matrix.shape[0]
    matrix = matrix + ridge * matrix.diagonal().mean() * torch.eye(size, dtype=matrix.dtype)
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.clamp_min(1e-12).rsqrt()) @ vectors.T


def canonical_correlations(cross, input_covariance, output_covariance, ridge: float = RIDGE):
    """The canonical correlations of the output gradient and the input, largest first, from their second moments."""
    import torch

    return torch.linalg.svdvals(inverse_sqrt(output_covariance, ridge) @ cross @ inverse_sqrt(input_covariance, ridge))


def module_statistics(moments: dict) -> dict[str, float]:
    """The statistics above from one module's moments, as :func:`accumulate` sums them."""
    tokens = moments["tokens"]
    cross, inputs, outputs = moments["cross"] / tokens, moments["inputs"] / tokens, moments["outputs"] / tokens
    canonical = canonical_correlations(cross, inputs, outputs)
    summed_energy = float(moments["cross"].norm() ** 2)  # of the gradient summed over every step and token
    return {
        "fro": float(cross.norm()),
        "consistency": summed_energy / (moments["steps"] * moments["step_squares"]),
        "token_consistency": summed_energy / moments["token_squares"],
        "canonical_top": float(canonical[0]),
        "canonical_energy": float(canonical.pow(2).sum()),
        "whitened_output": float((inverse_sqrt(outputs) @ cross).norm()),
    }


def accumulate(moments: dict, inputs, output_grads) -> None:
    """Add one forward/backward's tokens (``inputs``: [N, fan_in], ``output_grads``: [N, fan_out], float64): one
    step, whose gradient ``step_cross`` also counts toward the step consistency (``cross`` is the steps' sum)."""
    step_cross = output_grads.T @ inputs
    moments["cross"] = moments.get("cross", 0.0) + step_cross
    moments["inputs"] = moments.get("inputs", 0.0) + inputs.T @ inputs
    moments["outputs"] = moments.get("outputs", 0.0) + output_grads.T @ output_grads
    moments["tokens"] = moments.get("tokens", 0) + inputs.shape[0]
    token_squares = output_grads.pow(2).sum(1) * inputs.pow(2).sum(1)
    moments["token_squares"] = moments.get("token_squares", 0.0) + float(token_squares.sum())
    moments["step_squares"] = moments.get("step_squares", 0.0) + float(step_cross.pow(2).sum())
    moments["steps"] = moments.get("steps", 0) + 1


def probe(member_index: int, start: int, steps: int | None) -> tuple[dict[str, dict[str, float]], set[str]]:
    from bench.family import member
    from gradient_consistency_probe import uniform_lora_on_member

    suite, task, model, layers, finish_step = uniform_lora_on_member(member_index)
    moments = {name: {} for name in layers}
    recording = {"on": False}

    def record(name):
        def forward_hook(module, args, output):
            if not recording["on"]:
                return
            inputs = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            output.register_hook(
                lambda grad: accumulate(moments[name], inputs, grad.detach().reshape(-1, grad.shape[-1]).double())
            )

        return forward_hook

    for name, layer in layers.items():
        layer.register_forward_hook(record(name))
    for step, batch in enumerate(task.batches(0, steps or suite.warmup)):
        recording["on"] = step >= start
        task.loss(model, batch).backward()
        finish_step()
    planted = {name for name in layers if any(name.endswith(c.module) for c in member(member_index).changes)}
    return {name: module_statistics(m) for name, m in moments.items()}, planted


def main() -> None:
    from gradient_consistency_probe import auc

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("members", type=int, nargs="+", help="family member indices")
    parser.add_argument("--start", type=int, default=0, help="first step recorded (0-based)")
    parser.add_argument("--steps", type=int, default=None, help="steps trained (default: the member's signal steps)")
    args = parser.parse_args()
    for index in args.members:
        stats, planted = probe(index, args.start, args.steps)
        aucs = "  ".join(f"{key} {auc(sorted(stats, key=lambda n: -stats[n][key]), planted):.2f}" for key in STATISTICS)
        print(f"family-{index:02d} ({len(planted)} planted of {len(stats)}): AUC {aucs}", flush=True)


if __name__ == "__main__":
    main()
