"""A random sketch of each adapted module's full-weight gradient, accumulated without ever forming it.

For a linear layer ``y = W x`` the gradient of the (frozen) base weight over a batch is
``G = sum_tokens dy x^T`` (``fan_out x fan_in``). The LoRA factors only ever see projections of it
(``dL/dB = s G A^T``), so a module that needs directions its ``A`` does not have cannot show it through
the adapter's own gradients. This module keeps, per layer, the *row-space sketch*

    X = Psi * sum_steps G          (``k x fan_in``, ``Psi`` a fixed ``k x fan_out`` Gaussian / sqrt(k))

from a forward hook (the layer input ``x``) and a hook on the layer output's gradient (``dy``):
``Psi G = sum_tokens (Psi dy) x^T`` costs ``2 k (fan_in + fan_out)`` multiply-adds per token, about a rank-``k``
LoRA's, and ``k * fan_in`` floats of memory. Since ``E[Psi^T Psi] = I``, ``|X v| ~ |G v|`` for every ``v``: the
singular values of ``X`` estimate the leading singular values of the summed gradient, and its leading right
singular vectors the input directions in which the weight most wants to move (a randomized range finder
of ``G^T``). Those directions are what :func:`gradient_directions` hands to growing modules, and the
spectrum is what the ``gradient_spectrum`` score allocates ranks from.

Steps are kept apart: the hooks add into a per-step buffer that :meth:`GradientSketch.record_step` folds
into the total once per optimizer step (after gradient accumulation, so micro-batches are summed), and
only when it is finite (a skipped fp16 step adds nothing). Under ``torch.distributed`` the totals are
summed across processes when read. With ``step_energy`` the sketch also adds each step's squared norm
``|Psi G_t|_F^2 ~ |G_t|_F^2`` to a per-layer sum, so a score can tell how much of the summed gradient is what the
steps agree on and how much is noise (:mod:`peft_adaptive.scores.consistent_spectrum`); under
``torch.distributed`` each step's sketch is then summed across the processes before its norm is taken (one
all-reduce per step), so ``G_t`` is the whole batch's gradient and the result does not depend on how many processes
share the batch. Layers whose input is not a dense feature vector (Embedding, convolutions) are not sketched;
they grow with random directions.
"""

from __future__ import annotations

import math

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora import layer as lora_layers

from .resize import autocast_disabled, lora_factors


def sketchable(layer: LoraLayer, adapter: str) -> bool:
    """Whether the layer's gradient can be sketched from its input and output (linear layers)."""
    return not isinstance(layer, (lora_layers.Embedding, lora_layers._ConvNd)) and adapter in layer.lora_A


class GradientSketch:
    """Hooks that accumulate the row-space sketch ``Psi * sum G`` of every sketchable layer.

    Args:
        layers: LoRA layers by name.
        adapter: the adapter whose layers are sketched (only used for shapes).
        size: rows ``k`` of each sketch; the spectrum and the growth directions are known up to rank ``k``.
        seed: seeds ``Psi`` (the same on every process of a distributed run).
        step_energy: also sum each step's squared sketch norm (one all-reduce of the step's sketch per step under
            ``torch.distributed``).
    """

    def __init__(self, layers: dict[str, LoraLayer], adapter: str, size: int, seed: int = 0, step_energy: bool = False):
        if size < 1:
            raise ValueError(f"sketch size must be >= 1, got {size}")
        self.names = [name for name, layer in layers.items() if sketchable(layer, adapter)]
        self.size = size
        generator = torch.Generator().manual_seed(seed)
        self._psi: list[torch.Tensor] = []
        self._total: list[torch.Tensor] = []
        self._step: list[torch.Tensor] = []
        self._energy: list[torch.Tensor] = []  # per layer: sum over steps of |Psi G_t|_F^2
        self.step_energy = step_energy
        self._handles = []
        for index, name in enumerate(self.names):
            layer = layers[name]
            A, B = lora_factors(layer, adapter)
            fan_out, fan_in = B.shape[0], A.shape[1]
            # drawn on the CPU (the generator's device) so that a seed gives the same sketch on every device
            psi = torch.randn(size, fan_out, generator=generator, dtype=torch.float32).to(A.device)
            self._psi.append(psi / math.sqrt(size))
            self._total.append(torch.zeros(size, fan_in, device=A.device, dtype=torch.float32))
            self._step.append(torch.zeros(size, fan_in, device=A.device, dtype=torch.float32))
            self._energy.append(torch.zeros((), device=A.device, dtype=torch.float64))
            self._handles.append(layer.register_forward_hook(self._make_hook(index)))
        self.steps = 0

    def _make_hook(self, index: int):
        def forward_hook(module, args, output):
            if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            x = args[0].detach() if args else None
            if x is None:
                return
            output.register_hook(lambda grad: self._accumulate(index, x, grad))

        return forward_hook

    @torch.no_grad()
    def _accumulate(self, index: int, x: torch.Tensor, grad: torch.Tensor) -> None:
        psi = self._psi[index]
        d = grad.reshape(-1, grad.shape[-1]).to(psi.dtype)
        inputs = x.reshape(-1, x.shape[-1]).to(psi.dtype)
        with autocast_disabled(psi.device):  # a backward run inside torch.autocast runs this hook under it
            self._step[index].addmm_((d @ psi.T).T, inputs)

    @torch.no_grad()
    def record_step(self, scale: float = 1.0) -> bool:
        """Fold this optimizer step's sketch into the total; ``scale`` divides out a loss scale.

        Returns False (and adds nothing) when the step's gradients were not finite.
        """
        if not self._step:
            return True
        device = self._step[0].device  # layers of a model split across devices keep their sketches on theirs
        if self.step_energy and _distributed():  # the whole batch's step, the same on every process
            self._step = _summed_over_processes(self._step)
        finite = bool(torch.stack([s.isfinite().all().to(device) for s in self._step]).all())
        if finite:
            for total, step, energy in zip(self._total, self._step, self._energy):
                total.add_(step, alpha=1.0 / scale)
                if self.step_energy:
                    energy.add_(step.double().pow(2).sum() / scale**2)
            self.steps += 1
        for step in self._step:
            step.zero_()
        return finite

    def remove(self) -> None:
        """Remove the hooks (the totals stay readable)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def totals(self) -> dict[str, torch.Tensor]:
        """The summed sketches by layer name, summed over processes under ``torch.distributed``."""
        if self.step_energy:  # each step was already summed over the processes
            return {name: t.clone() for name, t in zip(self.names, self._total)}
        return dict(zip(self.names, _summed_over_processes(self._total)))

    def step_energies(self) -> dict[str, float]:
        """Per layer name: the sum over steps of each step's squared sketch norm ``|Psi G_t|_F^2`` (zeros unless
        ``step_energy``)."""
        return {name: float(e) for name, e in zip(self.names, self._energy)}

    def state_dict(self) -> dict:
        return {
            "names": list(self.names),
            "size": self.size,
            "steps": self.steps,
            "total": [t.cpu() for t in self._total],
            "energy": [e.cpu() for e in self._energy],
        }

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names or state["size"] != self.size:
            raise ValueError("the saved gradient sketch belongs to a different set of layers or sketch size")
        self.steps = int(state["steps"])
        self._total = [t.to(old.device) for t, old in zip(state["total"], self._total)]
        # checkpoints from before the energies were kept have none: zero reads as "no noise measured"
        energies = state.get("energy") or [torch.zeros((), dtype=torch.float64)] * len(self._total)
        self._energy = [e.to(old.device) for e, old in zip(energies, self._total)]


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _summed_over_processes(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of ``tensors``, summed over processes under ``torch.distributed`` (one all-reduce)."""
    tensors = [t.clone() for t in tensors]
    if not _distributed() or not tensors:
        return tensors
    dtype = tensors[0].dtype
    flat = torch.cat([t.flatten().to(dtype) for t in tensors])
    torch.distributed.all_reduce(flat)
    return [f.view_as(t).to(t.dtype) for f, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def sketch_spectrum(sketch: torch.Tensor, steps: int = 1) -> torch.Tensor:
    """Estimated leading singular values of the *mean* gradient (``sketch / steps``), largest first."""
    return torch.linalg.svdvals(sketch.double() / max(steps, 1)).float()


def gradient_directions(sketch: torch.Tensor, count: int, avoid: torch.Tensor | None = None) -> torch.Tensor:
    """``count`` orthonormal input directions (rows, ``count x fan_in``) the gradient most wants.

    They are the leading right singular vectors of the sketch after removing the span of ``avoid``'s rows
    (the rows ``A`` already has), so a growing module gets directions it does not have yet. Returns fewer
    rows when the sketch has fewer non-zero directions left.
    """
    work = sketch.double()
    if avoid is not None and avoid.shape[0] > 0:
        q, _ = torch.linalg.qr(avoid.double().T)  # [fan_in, r]
        work = work - (work @ q) @ q.T
    _, s, vh = torch.linalg.svd(work, full_matrices=False)
    keep = int((s > s.max().clamp_min(1e-300) * 1e-6).sum()) if s.numel() else 0
    return vh[: min(count, keep)].to(sketch.dtype)
