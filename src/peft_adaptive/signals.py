"""Per-module warmup signals: gradient activity and weight change since initialisation.

Both signals are made comparable across modules of different shapes by measuring them *per entry*
(root mean square) instead of as raw Frobenius norms. A raw norm grows with the square root of the
number of entries, so a 4096x11008 MLP projection would outscore a 4096x1024 key projection just by
being bigger, and the allocation would reward size instead of need:

* gradient signal ``G_i``: RMS of the gradient over the module's LoRA factors ``A`` and ``B``,
  ``sqrt((|grad A|^2 + |grad B|^2) / (numel A + numel B))``, averaged over the optimizer steps of the
  warmup (steps whose gradients are not finite, i.e. skipped fp16 steps, are left out);
* delta signal ``W_i``: RMS of the change of the effective weight, ``|s B A - s0 B0 A0|_F / sqrt(fan_out * fan_in)``,
  with ``s`` the LoRA scaling and ``B0 A0`` the factors when collection started (so it is also right for
  non-zero initialisations such as PiSSA/OLoRA or ``init_lora_weights=False``). It is computed from the
  factors in ``O((fan_in + fan_out) r^2)``, never forming the full matrix.

Gradient norms are accumulated on the device with one fused ``_foreach_norm`` per step and no host
synchronisation; values are only read back when the scores are requested.

The delta signal needs a float32 copy of the adapter's factors from the start of the warmup. It is only
taken when the delta is tracked (by default when ``delta_weight > 0``), so with the default weights the
warmup holds no extra memory over plain LoRA.

Optional trackers, each held only when the chosen score needs it (:class:`peft_adaptive.scores.Needs`). This
module only accumulates; what a score makes of them is in that score's own file under :mod:`peft_adaptive.scores`:

* ``sensitivity``: AdaLoRA's importance ``|theta * grad|`` of every adapter entry, smoothed with an EMA
  (``beta1``) and weighted by an EMA of its own uncertainty ``|I - I_bar|`` (``beta2``); two float32 tensors
  per factor;
* ``grad_sum``: the sum over steps of ``dL/dB = s G A^T``, a random sketch of the module's summed
  full-weight gradient (one float32 tensor of ``B``'s shape), and with ``step_energy`` the sum of each step's
  ``|dL/dB|_F^2``;
* ``sketch``: the row-space sketch of the summed full-weight gradient (:class:`~peft_adaptive.sketch.GradientSketch`),
  which also gives the input directions a growing module takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer

from .resize import lora_factors, lora_parameters
from .sketch import GradientSketch

#: EMA factors of the sensitivity score (AdaLoRA's defaults).
SENSITIVITY_BETAS = (0.85, 0.85)


@dataclass
class ModuleSignals:
    """Raw (un-normalised) warmup signals of each module, in module order."""

    names: list[str]
    grad_rms: list[float]
    delta_rms: list[float] | None  # None when the delta was not tracked
    steps: int


class SignalCollector:
    """Accumulates the warmup signals of one adapter over a set of LoRA layers."""

    def __init__(
        self,
        layers: dict[str, LoraLayer],
        adapter: str,
        track_delta: bool = True,
        track_sensitivity: bool = False,
        track_grad_sum: bool = False,
        track_step_energy: bool = False,
        sketch_size: int = 0,
        seed: int = 0,
    ):
        self.names = list(layers)
        self.layers = [layers[name] for name in self.names]
        self.adapter = adapter
        self._snapshot = [self._scaled_factors(layer) for layer in self.layers] if track_delta else None
        device = lora_factors(self.layers[0], adapter)[0].device if self.layers else torch.device("cpu")
        self._grad_sum = torch.zeros(len(self.layers), dtype=torch.float32, device=device)
        self._steps = torch.zeros((), dtype=torch.float32, device=device)
        self._numel = torch.tensor(
            [sum(p.numel() for p in lora_parameters(layer, adapter)) for layer in self.layers],
            dtype=torch.float32,
            device=device,
        )
        factors = [lora_parameters(layer, adapter) for layer in self.layers]
        # per factor: [smoothed importance, smoothed uncertainty]
        self._sensitivity = (
            [[torch.zeros_like(p, dtype=torch.float32) for _ in range(2)] for pair in factors for p in pair]
            if track_sensitivity
            else None
        )
        self._b_grad_sum = (
            [torch.zeros_like(pair[1], dtype=torch.float32) for pair in factors] if track_grad_sum else None
        )
        track_square_sum = track_grad_sum and track_step_energy
        self._b_grad_square_sum = torch.zeros_like(self._grad_sum, dtype=torch.float64) if track_square_sum else None
        self.sketch = (
            GradientSketch(layers, adapter, sketch_size, seed, step_energy=track_step_energy)
            if sketch_size > 0
            else None
        )

    def _scaled_factors(self, layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor]:
        A, B = lora_factors(layer, self.adapter)
        return A.detach().float().clone(), B.detach().float().clone() * layer.scaling[self.adapter]

    @torch.no_grad()
    def record_gradients(self, scale: float = 1.0) -> None:
        """Add this step's signals of every module; call once per optimizer step, when gradients are complete.

        ``scale`` is a loss scale still contained in the gradients (only the sketch hooks see scaled
        gradients; ``Trainer`` unscales the parameters' gradients before this is called).
        """
        params = [p for layer in self.layers for p in lora_parameters(layer, self.adapter)]
        grads = [p.grad if p.grad is not None else torch.zeros((), device=self._grad_sum.device) for p in params]
        # .to(): a model split across devices (device_map) has its layers' gradients on several devices
        norms = torch.stack([n.to(self._grad_sum.device) for n in torch._foreach_norm(grads)])
        norms = norms.float().view(len(self.layers), 2)
        sq = norms.pow(2).sum(dim=1)
        rms = (sq / self._numel).sqrt()
        # one non-finite gradient means the step is skipped (fp16 overflow): add nothing for any module
        finite = torch.isfinite(rms).all()
        self._grad_sum += torch.where(finite, rms, torch.zeros_like(rms))
        self._steps += finite.float()
        sketch_finite = self.sketch.record_step(scale) if self.sketch is not None else True
        if (self._sensitivity is None and self._b_grad_sum is None) or not sketch_finite:
            return
        if not bool(finite):  # the optional trackers are host-synchronised anyway; skip a bad step
            return
        if self._b_grad_sum is not None:
            for total, grad in zip(self._b_grad_sum, grads[1::2]):
                if grad.dim():
                    total.add_(grad.float())
            if self._b_grad_square_sum is not None:
                self._b_grad_square_sum += norms[:, 1].double().pow(2)
        if self._sensitivity is not None:
            beta1, beta2 = SENSITIVITY_BETAS
            for (importance, uncertainty), p, grad in zip(self._sensitivity, params, grads):
                current = (p.detach().float() * grad.float()).abs() if grad.dim() else torch.zeros_like(importance)
                importance.mul_(beta1).add_(current, alpha=1 - beta1)
                uncertainty.mul_(beta2).add_((current - importance).abs(), alpha=1 - beta2)

    @property
    def sensitivity_state(self) -> list[list[torch.Tensor]] | None:
        """Per factor (``A``, ``B`` of each module in turn): ``[smoothed importance, smoothed uncertainty]``, or
        ``None`` when not tracked."""
        return self._sensitivity

    @property
    def b_grad_sum(self) -> list[torch.Tensor] | None:
        """Per module: the sum over the recorded steps of ``dL/dB``, or ``None`` when not tracked."""
        return self._b_grad_sum

    @property
    def b_grad_square_sum(self) -> list[float] | None:
        """Per module: the sum over the recorded steps of ``|dL/dB|_F^2``, or ``None`` when not tracked."""
        return None if self._b_grad_square_sum is None else self._b_grad_square_sum.tolist()

    @property
    def snapshot(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per module: the factors ``(A0, s0 B0)`` (float32) when the collection started, or ``None``."""
        return self._snapshot

    def finite_steps(self) -> float:
        """The number of recorded steps with finite gradients (the others added nothing)."""
        return float(self._steps.item())

    def adapter_numel(self) -> list[int]:
        """Per module: the number of entries of its two factors."""
        return [int(n) for n in self._numel.tolist()]

    @property
    def tracks_delta(self) -> bool:
        return self._snapshot is not None

    @torch.no_grad()
    def delta_rms(self) -> list[float] | None:
        """Per-module RMS weight change since collection started; ``None`` when the delta is not tracked."""
        if self._snapshot is None:
            return None
        values = []
        for layer, (A0, sB0) in zip(self.layers, self._snapshot):
            A, B = lora_factors(layer, self.adapter)
            sB = B.detach().float() * layer.scaling[self.adapter]
            values.append(
                _product_difference_norm(sB, A.detach().float(), sB0, A0) / math.sqrt(sB.shape[0] * A.shape[1])
            )
        return values

    def state_dict(self) -> dict:
        """Everything needed to continue collecting after a restart (saved in Trainer checkpoints)."""
        return {
            "names": list(self.names),
            "grad_sum": self._grad_sum.cpu(),
            "steps": self._steps.cpu(),
            "snapshot": None if self._snapshot is None else [(A0.cpu(), sB0.cpu()) for A0, sB0 in self._snapshot],
            "sensitivity": None
            if self._sensitivity is None
            else [[t.cpu() for t in pair] for pair in self._sensitivity],
            "b_grad_sum": None if self._b_grad_sum is None else [t.cpu() for t in self._b_grad_sum],
            "b_grad_square_sum": None if self._b_grad_square_sum is None else self._b_grad_square_sum.cpu(),
            "sketch": None if self.sketch is None else self.sketch.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names:
            raise ValueError("the saved warmup signals belong to a different set of adapted modules")
        device = self._grad_sum.device
        self._grad_sum = state["grad_sum"].to(device)
        self._steps = state["steps"].to(device)
        snapshot = state["snapshot"]
        self._snapshot = None if snapshot is None else [(A0.to(device), sB0.to(device)) for A0, sB0 in snapshot]
        # trackers this collector holds must have been saved too (a checkpoint from another score cannot resume it)
        for key, mine in (
            ("sensitivity", self._sensitivity),
            ("b_grad_sum", self._b_grad_sum),
            ("sketch", self.sketch),
        ):
            if mine is not None and state.get(key) is None:
                raise ValueError(f"the saved warmup signals have no {key!r}, which this score needs")
        if self._sensitivity is not None:
            self._sensitivity = [[t.to(device) for t in pair] for pair in state["sensitivity"]]
        if self._b_grad_sum is not None:
            self._b_grad_sum = [t.to(device) for t in state["b_grad_sum"]]
        if self._b_grad_square_sum is not None:
            # checkpoints from before the squares were kept have none: zeros read as "no noise measured"
            squares = state.get("b_grad_square_sum")
            self._b_grad_square_sum = (
                torch.zeros_like(self._b_grad_square_sum) if squares is None else squares.to(device)
            )
        if self.sketch is not None:
            self.sketch.load_state_dict(state["sketch"])

    def close(self) -> None:
        """Remove the sketch hooks (call when the signals are no longer collected)."""
        if self.sketch is not None:
            self.sketch.remove()

    def signals(self) -> ModuleSignals:
        steps = float(self._steps.item())
        grad = (self._grad_sum / max(steps, 1.0)).tolist()
        return ModuleSignals(names=list(self.names), grad_rms=grad, delta_rms=self.delta_rms(), steps=int(steps))


def _product_difference_norm(B: torch.Tensor, A: torch.Tensor, B0: torch.Tensor, A0: torch.Tensor) -> float:
    """``|B A - B0 A0|_F`` through the Gram matrices of the stacked factors (no ``fan_out x fan_in`` matrix)."""
    if A.shape[1] != A0.shape[1] or B.shape[0] != B0.shape[0]:
        raise ValueError("factor shapes do not describe the same weight")
    # float64: the Gram form subtracts nearly equal terms when the update is small next to B0 A0
    U = torch.cat([B, -B0.to(B.device)], dim=1).double()  # [out, r + r0]
    V = torch.cat([A, A0.to(A.device)], dim=0).double()  # [r + r0, in]
    squared = ((U.T @ U) * (V @ V.T)).sum().clamp_min(0)
    return float(squared.sqrt())
