"""``AdaptiveLoraModel``: PEFT's ``LoraModel`` plus warmup signals and in-place rank reallocation."""

from __future__ import annotations

import copy
import logging
import math
import warnings
from dataclasses import asdict, dataclass

import torch
from peft.tuners.lora import LoraLayer, LoraModel
from peft.tuners.tuners_utils import _get_submodules

from . import distributed as _distributed
from .allocation import predicted_gain
from .config import AdaptiveLoraConfig
from .fsdp import check_adapter_unsharded
from .naming import pattern_key
from .optim import replace_optimizer_params, rescale_state
from .resize import (
    ResizeKind,
    cost_per_rank,
    initialise_lora_layer,
    layer_adapter_parameters,
    lora_factors,
    lora_parameters,
    match_rank_scaling,
    resize_lora_layer,
)
from .scores import get_score
from .signals import SignalCollector
from .sketch import gradient_directions
from .variants import after_injection, before_injection

logger = logging.getLogger(__name__)


@dataclass
class AllocationReport:
    """What one reallocation did, module by module (names as in the base model)."""

    names: list[str]
    ranks_before: list[int]
    ranks_after: list[int]
    scores: list[float]
    grad_signal: list[float]
    delta_signal: list[float] | None  # None when the weight delta was not tracked (delta_weight == 0)
    signal_steps: int
    budget: int
    used: int
    step: int | None = None
    score: str = "norms"
    growth: str = "random"
    removed: list[str] | None = None  # modules whose rank went to 0 and that were unwrapped
    #: spectrum scores: the new ranks' value over the old ones' by the score's own spectra (about 1: the score saw
    #: nothing to gain from moving rank; allocation.predicted_gain); None for other scores and explicit ranks
    predicted_gain: float | None = None
    #: True when the predicted gain was below ``min_predicted_gain`` and the ranks stayed as they were
    kept_ranks: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """A readable per-module table for logs."""
        width = max([len(n) for n in self.names] + [6])
        lines = [f"{'module':<{width}}  {'rank':>9}  {'score':>8}  {'grad_rms':>10}  {'delta_rms':>10}"]
        deltas = self.delta_signal if self.delta_signal is not None else [None] * len(self.names)
        for n, r0, r1, s, g, d in zip(
            self.names, self.ranks_before, self.ranks_after, self.scores, self.grad_signal, deltas
        ):
            d_text = f"{d:>10.3e}" if d is not None else f"{'n/a':>10}"
            lines.append(f"{n:<{width}}  {r0:>3} -> {r1:<3}  {s:>8.4f}  {g:>10.3e}  {d_text}")
        lines.append(f"adapter parameters: {self.used} used of a budget of {self.budget}")
        if self.predicted_gain is not None:
            kept = " < min_predicted_gain: the ranks stay as they were" if self.kept_ranks else ""
            lines.append(
                f"predicted gain (the new ranks' value over the old ones', by the score): {self.predicted_gain:.4f}"
                + kept
            )
        return "\n".join(lines)


class AdaptiveLoraModel(LoraModel):
    """LoRA whose per-module ranks are reallocated, in place, from warmup training signals.

    Created by ``get_peft_model(model, AdaptiveLoraConfig(...))``. The layers are PEFT's own ``LoraLayer``s,
    so everything that works on LoRA (merging, multiple adapters, saving) works here. The extra API:

    * :meth:`update_and_allocate`: the one call per optimizer step for hand-written loops (what
      ``AdaptiveLoraCallback`` calls for a ``Trainer``): it collects the signals and reallocates at step
      ``signal_steps``. The collection itself starts at the first forward in training mode (a forward pre-hook
      on the base model, removed once it has fired);
    * :meth:`start_signal_collection` / :meth:`record_gradients`: collect the signals step by step;
    * :meth:`reallocate`: score, allocate and resize now, updating an optimizer if given;
    * :meth:`resize_adapter`: resize to explicit ranks.
    """

    prefix: str = "lora_"

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, **kwargs):
        self._signal_collectors: dict[str, SignalCollector] = {}
        self._signal_steps_seen: dict[str, int] = {}  # the last global_step update_and_allocate saw, per adapter
        self._waiting_for_forward: set[str] = set()  # adapters whose signals start at the first training forward
        self._started_by_forward: set[str] = set()  # ... started there, not yet seen by update_and_allocate
        self._forward_start_hook: torch.utils.hooks.RemovableHandle | None = None
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, **kwargs)

    def inject_adapter(self, model, adapter_name, *args, **kwargs) -> None:
        self._unshare_config(adapter_name)
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        config = self.peft_config[adapter_name]
        if isinstance(config, AdaptiveLoraConfig) and not config.inference_mode:
            self._check_budget(adapter_name)
            if config.reallocation_step is None:
                self._start_signals_at_first_forward(adapter_name)

    def _create_and_replace(self, lora_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        # KaSA truncates the base weight at injection; keep what a later shrink needs to undo part of it
        snapshot = before_injection(lora_config, target) if isinstance(lora_config, AdaptiveLoraConfig) else None
        super()._create_and_replace(lora_config, adapter_name, target, target_name, parent, current_key, **kwargs)
        after_injection(getattr(parent, target_name, None), adapter_name, snapshot)

    @classmethod
    def _convert_state_dict_for_initial_model(cls, peft_model, peft_config, path, output_state_dict, kwargs):
        if isinstance(peft_config, AdaptiveLoraConfig) and len(set((peft_config.rank_pattern or {}).values())) > 1:
            raise ValueError(
                "save_pretrained(path_initial_model_for_weight_conversion=...) cannot convert an adapter whose ranks "
                "were reallocated: PEFT's conversion concatenates the initial adapter and doubles every rank, which "
                "only holds when the ranks did not change. Save the residual base model with the adapter instead."
            )
        return super()._convert_state_dict_for_initial_model(peft_model, peft_config, path, output_state_dict, kwargs)

    def _unshare_config(self, adapter_name: str) -> None:
        """Give ``adapter_name`` its own config object if another adapter holds the same one.

        ``add_adapter("ref", model.peft_config["default"])`` (TRL's DPO does this for its reference adapter) would
        otherwise share one config, and the reallocation of one adapter rewrites the ``rank_pattern`` the other
        is saved and reloaded with.
        """
        config = self.peft_config.get(adapter_name)
        if any(other is config for name, other in self.peft_config.items() if name != adapter_name):
            self.peft_config[adapter_name] = copy.deepcopy(config)

    # --- introspection -----------------------------------------------------------------------------

    def adapted_modules(self, adapter_name: str | None = None) -> dict[str, LoraLayer]:
        """LoRA layers that carry ``adapter_name``, keyed by their name in the base model."""
        adapter_name = self._resolve_adapter(adapter_name)
        return {
            name: module
            for name, module in self.model.named_modules()
            if isinstance(module, LoraLayer) and adapter_name in module.r
        }

    def ranks(self, adapter_name: str | None = None) -> dict[str, int]:
        adapter_name = self._resolve_adapter(adapter_name)
        return {name: layer.r[adapter_name] for name, layer in self.adapted_modules(adapter_name).items()}

    def adapter_param_count(self, adapter_name: str | None = None) -> int:
        """Rank-dependent trainable parameters of the adapter: ``sum(rank_i * (fan_in_i + fan_out_i))``."""
        adapter_name = self._resolve_adapter(adapter_name)
        return sum(
            layer.r[adapter_name] * cost_per_rank(layer, adapter_name)
            for layer in self.adapted_modules(adapter_name).values()
        )

    def param_budget(self, adapter_name: str | None = None) -> int:
        """The budget the reallocation must meet (``param_budget``, default: plain LoRA at rank ``r``)."""
        adapter_name = self._resolve_adapter(adapter_name)
        config = self.peft_config[adapter_name]
        if getattr(config, "param_budget", None) is not None:
            return config.param_budget
        return config.r * sum(cost_per_rank(m, adapter_name) for m in self.adapted_modules(adapter_name).values())

    # --- the one call per optimizer step ----------------------------------------------------------

    def update_and_allocate(
        self,
        global_step: int,
        optimizer: torch.optim.Optimizer | None = None,
        adapter_name: str | None = None,
        *,
        loss_scale: float = 1.0,
        seed: int = 0,
        wrapper: torch.nn.Module | None = None,
    ) -> AllocationReport | None:
        """Run the adaptive schedule for optimizer step ``global_step``; call it once per optimizer step.

        Call it after ``optimizer.step()`` and before ``optimizer.zero_grad()`` (the gradients of the step must
        still be there), like AdaLoRA's ``update_and_allocate``::

            loss.backward()
            optimizer.step()
            model.base_model.update_and_allocate(global_step, optimizer)
            optimizer.zero_grad()

        It owns the whole schedule: the signal collection has started by itself at the first forward in
        training mode (``model.train()``, gradients enabled), before the first step's backward; the call
        records the step's gradients while ``global_step <= signal_steps``, and at ``global_step ==
        signal_steps`` reallocates the ranks in place (:meth:`reallocate`, updating ``optimizer``) and returns
        the :class:`AllocationReport`. Every other call returns None; after the reallocation, or when the
        adapter was already reallocated or calibrated (``config.reallocation_step`` is set), it does nothing.

        Args:
            global_step: optimizer steps done, counting this one (1 at the first call, like
                ``Trainer.state.global_step`` after the step). Under gradient accumulation, count optimizer
                steps, not micro-batches, and call this only on the steps where the optimizer stepped.
            optimizer: the optimizer that trains the adapter; updated in place at the reallocation.
            adapter_name: the adapter (default: the active one).
            loss_scale: the loss scale the step's backward ran with, if the loss was scaled (a ``GradScaler``:
                ``scaler.get_scale()`` read before ``scaler.update()``), else 1. Only the gradient sketch of
                ``growth="gradient"`` and the sketch scores needs it; the factor gradients must be unscaled.
            seed: seeds the random rows growing modules get (:meth:`reallocate`'s ``seed``), and the gradient
                sketch when the collection starts in this call; the same on every process. The collection started
                at the first training forward seeds its sketch with 0, as ``start_signal_collection()`` does.
            wrapper: the ``DistributedDataParallel`` wrapper around this model (or an accelerate-prepared /
                ``torch.compile``-d model): re-initialised in place after the reallocation so that the new
                parameters are synchronised (see :mod:`peft_adaptive.distributed`). Anything that is not DDP
                is ignored: under FSDP2 with :func:`peft_adaptive.fsdp.shard_base_model` the adapter is not
                sharded and its gradients are averaged by a hook that follows the new parameters by itself.

        The collection records what the configured score needs; the weight delta (``delta_weight > 0``) and the
        gradient sketch (``growth="gradient"``, the sketch scores) must see the first step, which is why it starts
        at the first training forward. If no forward ran in training mode (a model left in ``eval()``), it starts
        here, after the first step, and misses that step's snapshot and sketch (a warning says so). Call
        :meth:`start_signal_collection` yourself for another sketch seed or your own schedule.
        """
        adapter_name = self._resolve_adapter(adapter_name)
        if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 1:
            raise ValueError(
                f"global_step must be the number of optimizer steps done, counting this one (>= 1), got {global_step!r}"
            )
        config = self.peft_config[adapter_name]
        if config.reallocation_step is not None:
            return None
        if getattr(getattr(optimizer, "gradient_state", None), "sync_gradients", True) is False:
            raise RuntimeError(
                "update_and_allocate was called on a micro-batch where accelerate did not step the optimizer "
                "(gradient accumulation): call it once per optimizer step, inside `if accelerator.sync_gradients:` "
                "after optimizer.step()"
            )
        self._forget_forward_start(adapter_name)  # the schedule is under way: nothing left to start at a forward
        collecting = adapter_name in self._signal_collectors
        started_by_forward = adapter_name in self._started_by_forward
        self._started_by_forward.discard(adapter_name)
        if started_by_forward and global_step > config.signal_steps:
            self._close_collector(adapter_name)  # a loop resumed after the signal steps: nothing to collect
            collecting = False
        if not collecting:
            if global_step > config.signal_steps:
                return None
            _distributed.check_ddp(wrapper)
            check_adapter_unsharded(self.model)
            self._start_late(adapter_name, global_step, seed)
        elif started_by_forward:
            _distributed.check_ddp(wrapper)
            check_adapter_unsharded(self.model)
            if global_step > 1:
                _warn_missed_steps(adapter_name, global_step, [f"the gradients of steps 1..{global_step - 1}"], 3)
        last = self._signal_steps_seen.get(adapter_name)
        if last is not None and global_step <= last:
            raise ValueError(
                f"update_and_allocate got global_step={global_step} after {last}: call it once per optimizer step, "
                "with the count of optimizer steps (not micro-batches, not restarting each epoch)"
            )
        self._signal_steps_seen[adapter_name] = global_step
        if global_step <= config.signal_steps:
            self.record_gradients(adapter_name, scale=loss_scale)
        if global_step < config.signal_steps:
            return None
        _distributed.check_ddp(wrapper)  # refuse before anything is resized
        report = self._allocate(adapter_name, optimizer, global_step, seed, None, initialise=False)
        _distributed.rewrap_ddp(wrapper)
        return report

    def _start_late(self, adapter_name: str, global_step: int, seed: int) -> None:
        """Start the signals from :meth:`update_and_allocate`, i.e. after this step's backward and optimizer step."""
        collector = self.start_signal_collection(adapter_name, seed=seed)
        missed = []
        if global_step > 1:
            missed.append(f"the gradients of steps 1..{global_step - 1}")
        if collector.tracks_delta:
            missed.append(f"the weight change of step {global_step}")
        if collector.sketch is not None and collector.sketch.names:
            missed.append(f"the gradient sketch of step {global_step}")
        if missed:
            _warn_missed_steps(adapter_name, global_step, missed, 4)

    # --- starting the signals at the first training forward ---------------------------------------

    def _start_signals_at_first_forward(self, adapter_name: str) -> None:
        """Start ``adapter_name``'s signal collection at the next forward in training mode, before its backward."""
        self._waiting_for_forward.add(adapter_name)
        if self._forward_start_hook is None:
            self._forward_start_hook = self.model.register_forward_pre_hook(self._start_signals_on_forward)

    def _forget_forward_start(self, adapter_name: str | None = None) -> None:
        """Start nothing at a forward for ``adapter_name`` (every adapter if None); the hook goes with the last one."""
        if adapter_name is None:
            self._waiting_for_forward.clear()
        else:
            self._waiting_for_forward.discard(adapter_name)
        if not self._waiting_for_forward and self._forward_start_hook is not None:
            self._forward_start_hook.remove()
            self._forward_start_hook = None

    def _leave_signal_start_to_caller(self) -> None:
        """For ``AdaptiveLoraCallback``, which starts (or, on resume, restores) the signals itself: start nothing at a
        forward, and close a collection that a forward before training started."""
        self._forget_forward_start()
        for name in list(self._started_by_forward):
            self._close_collector(name)

    @torch.compiler.disable  # runs once, eagerly; under torch.compile a graph break there instead of a traced hook
    def _start_signals_on_forward(self, module: torch.nn.Module, args: tuple) -> None:
        """Forward pre-hook: at the first forward in training mode with gradients, start the signals of the active
        adapters that wait for it (what ``start_signal_collection()`` before the first step does), then remove
        itself. Adapters trained later, or an adapter sharded by FSDP (refused by ``update_and_allocate``), start
        in ``update_and_allocate`` instead."""
        if not (module.training and torch.is_grad_enabled()):
            return
        waiting = [name for name in self.active_adapters if name in self._waiting_for_forward]
        self._forget_forward_start()
        if not waiting or _adapter_sharded(self.model):
            return
        for name in waiting:
            if any(p.requires_grad for p in self._lora_parameters(name)):
                self.start_signal_collection(name)
                self._started_by_forward.add(name)

    def _lora_parameters(self, adapter_name: str) -> list[torch.nn.Parameter]:
        return [
            p for layer in self.adapted_modules(adapter_name).values() for p in lora_parameters(layer, adapter_name)
        ]

    # --- signals ------------------------------------------------------------------------------------

    def start_signal_collection(
        self, adapter_name: str | None = None, track_delta: bool | None = None, seed: int = 0
    ) -> SignalCollector:
        """Start accumulating the signals the configured ``score`` and ``growth`` need.

        ``track_delta`` defaults to what the score needs (:meth:`peft_adaptive.scores.Score.needs`): the weight
        delta of ``score="norms"`` when ``delta_weight > 0``, and for ``score="spectral"`` only when the adapter does
        not start at ``B = 0``. The snapshot is a float32 copy of the adapter, so it is only held when needed. ``seed`` seeds the
        gradient sketch's random projection (the same on every process).
        """
        adapter_name = self._resolve_adapter(adapter_name)
        config = self.peft_config[adapter_name]
        layers = self.adapted_modules(adapter_name)
        needs = get_score(config.score).needs(config, layers, adapter_name)
        self._close_collector(adapter_name)
        collector = SignalCollector(
            layers,
            adapter_name,
            track_delta=needs.delta if track_delta is None else track_delta,
            track_sensitivity=needs.sensitivity,
            track_grad_sum=needs.grad_sum,
            track_step_energy=needs.step_energy,
            # gradient growth takes its directions from the sketch, whatever the score
            sketch_size=config.sketch_size if needs.sketch or config.growth == "gradient" else 0,
            seed=seed,
        )
        self._signal_collectors[adapter_name] = collector
        return collector

    def record_gradients(self, adapter_name: str | None = None, scale: float = 1.0) -> None:
        """Add the current gradients to the signals; call once per optimizer step, before ``zero_grad``.

        The gradients of the adapter's factors must be complete for the step (accumulated, all-reduced) and
        unscaled (after ``scaler.unscale_`` or ``scaler.step``). ``scale``: the loss scale the backward ran
        with, if any; only the layer-output gradients the gradient sketch sees still contain it.
        """
        adapter_name = self._resolve_adapter(adapter_name)
        if adapter_name not in self._signal_collectors:
            raise RuntimeError("call start_signal_collection() before record_gradients()")
        self._signal_collectors[adapter_name].record_gradients(scale)

    def _close_collector(self, adapter_name: str) -> None:
        # called when a collection starts or ends: either way nothing is left to start at the first training forward
        self._forget_forward_start(adapter_name)
        self._started_by_forward.discard(adapter_name)
        self._signal_steps_seen.pop(adapter_name, None)
        collector = self._signal_collectors.pop(adapter_name, None)
        if collector is not None:
            collector.close()

    # --- reallocation -------------------------------------------------------------------------------

    def reallocate(
        self,
        optimizer: torch.optim.Optimizer | None = None,
        adapter_name: str | None = None,
        step: int | None = None,
        seed: int = 0,
        ranks: dict[str, int] | None = None,
    ) -> AllocationReport:
        """Score every module from the collected signals, allocate the budget and resize in place.

        Args:
            optimizer: if given, its parameter groups are updated to the new parameters (same slots, so
                learning rates and weight decay are kept). Optimizer state is migrated where the old factors
                survive verbatim (a grow) and reset where they are rotated (a shrink), see
                :mod:`peft_adaptive.optim`. Without an optimizer, create one after this call.
            adapter_name: the adapter to reallocate (default: the active one). Other adapters are untouched.
            step: recorded in the config as ``reallocation_step``.
            seed: seeds the random rows that growing layers get, so every process of a distributed run
                makes the same model.
            ranks: use these ranks (every adapted module, by name) instead of the score's allocation; the
                configured growth rule still applies. For your own allocation rules and for baselines.
        """
        adapter_name = self._resolve_adapter(adapter_name)
        return self._allocate(adapter_name, optimizer, step, seed, ranks, initialise=False)

    def _allocate(
        self,
        adapter_name: str,
        optimizer: torch.optim.Optimizer | None,
        step: int | None,
        seed: int,
        ranks: dict[str, int] | None,
        initialise: bool,
    ) -> AllocationReport:
        check_adapter_unsharded(self.model)  # before anything is resized
        collector = self._signal_collectors.get(adapter_name)
        if collector is None:
            raise RuntimeError(
                "no warmup signals were collected for adapter "
                f"{adapter_name!r}: call start_signal_collection() and record_gradients() first"
            )
        config = self.peft_config[adapter_name]
        signals = collector.signals()
        modules = self.adapted_modules(adapter_name)
        costs = [cost_per_rank(modules[n], adapter_name) for n in signals.names]
        budget = self.param_budget(adapter_name)
        if ranks is None and signals.steps == 0:
            # Every recorded step had non-finite gradients (e.g. fp16 overflow throughout): scores from them would
            # be garbage, so nothing is reallocated and the adapter stays plain LoRA at its current ranks.
            warnings.warn(
                f"adaptive LoRA: no finite gradient step was recorded for adapter {adapter_name!r} before the "
                "reallocation (every step overflowed or none was recorded); keeping the current ranks (plain LoRA). "
                "Check the loss scale / learning rate, or record more steps.",
                stacklevel=3,
            )
            ranks = {n: modules[n].r[adapter_name] for n in signals.names}
        scored = None
        if ranks is None:
            scored = get_score(config.score).allocate(collector, costs, budget, config)
            scores, ranks = scored.scores, dict(zip(signals.names, scored.allocation.ranks))
        else:
            _check_explicit_ranks(ranks, signals.names, costs, budget)
            scores = [float("nan")] * len(signals.names)
        ranks = _same_on_every_process(ranks, modules)
        ranks_before = [modules[n].r[adapter_name] for n in signals.names]
        gain = None
        if scored is not None and scored.values is not None:
            gain = predicted_gain(scored.values, ranks_before, [ranks[n] for n in signals.names])
        # below the threshold the resize is not worth its cost; nan (the old ranks valued at nothing) keeps them too
        kept = gain is not None and config.min_predicted_gain > 0 and not gain >= config.min_predicted_gain
        if kept:
            ranks = dict(zip(signals.names, ranks_before))
        directions = self._growth_directions(collector, modules, adapter_name, ranks, initialise)
        self._close_collector(adapter_name)
        if config.param_budget is None:
            config.param_budget = budget  # keep the budget once rank-0 modules are gone from the count
        removed = self.resize_adapter(
            ranks,
            adapter_name=adapter_name,
            optimizer=optimizer,
            seed=seed,
            directions=directions,
            initialise=initialise,
        )
        report = AllocationReport(
            names=signals.names,
            ranks_before=ranks_before,
            ranks_after=[ranks[n] for n in signals.names],
            scores=scores,
            grad_signal=signals.grad_rms,
            delta_signal=signals.delta_rms,
            signal_steps=signals.steps,
            budget=budget,
            used=self.adapter_param_count(adapter_name),
            step=step,
            score=config.score,
            growth=config.growth,
            removed=removed,
            predicted_gain=gain,
            kept_ranks=kept,
        )
        config.reallocation_step = step
        config.allocation = report.to_dict()
        if _is_main_process():
            logger.info("Adaptive LoRA reallocation of adapter %r at step %s:\n%s", adapter_name, step, report.table())
        return report

    def _growth_directions(
        self, collector: SignalCollector, modules: dict, adapter_name: str, ranks: dict[str, int], initialise: bool
    ) -> dict[str, torch.Tensor]:
        """Input directions from the gradient sketch for the rows each module gains (all rows when initialising)."""
        config = self.peft_config[adapter_name]
        if config.growth != "gradient" or collector.sketch is None:
            return {}
        totals = collector.sketch.totals()
        directions = {}
        for name, total in totals.items():
            current = modules[name].r[adapter_name]
            wanted = ranks[name] if initialise else ranks[name] - current
            if wanted <= 0:
                continue
            avoid = None if initialise else lora_factors(modules[name], adapter_name)[0].detach()
            directions[name] = gradient_directions(total, wanted, avoid=avoid)
        return directions

    def resize_adapter(
        self,
        ranks: dict[str, int],
        adapter_name: str | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        seed: int = 0,
        directions: dict[str, torch.Tensor] | None = None,
        initialise: bool = False,
    ) -> list[str]:
        """Resize the named modules of ``adapter_name`` to the given ranks, keeping what they learned.

        A rank of 0 removes the module's adapter (the layer is unwrapped to its base layer when no other
        adapter uses it) and drops it from ``target_modules``. ``directions`` (by module) are the input
        directions growing modules give their new rows of ``A`` (random otherwise). ``initialise=True``
        re-initialises untrained adapters (``B == 0``) instead, ``A`` from ``directions`` (calibration).
        Returns the names of the removed modules. Ranks set by hand replace the automatic start of the signals at
        the first training forward (:meth:`start_signal_collection` still starts them).
        """
        adapter_name = self._resolve_adapter(adapter_name)
        self._forget_forward_start(adapter_name)
        modules = self.adapted_modules(adapter_name)
        unknown = sorted(set(ranks) - set(modules))
        if unknown:
            raise KeyError(f"not adapted modules of adapter {adapter_name!r}: {unknown[:5]}")
        directions = directions or {}
        generator = torch.Generator().manual_seed(seed)
        replaced, kinds, removed = {}, {}, []
        config = self.peft_config[adapter_name]
        carriers: dict[torch.nn.Parameter, float] = {}  # resize_scaling="rank": what took the scaling, and by how much
        for name in sorted(ranks):
            layer = modules[name]
            if ranks[name] == 0:
                params = [p for p in layer_adapter_parameters(layer, adapter_name) if p.requires_grad]
                self._remove_module(name, layer, adapter_name)
                replaced.update(dict.fromkeys(params))
                kinds.update(dict.fromkeys(params, ResizeKind.SHRINK))
                removed.append(name)
                continue
            resize = initialise_lora_layer if initialise and _untrained(layer, adapter_name) else resize_lora_layer
            alpha = layer.lora_alpha[adapter_name]
            kind, swaps = resize(layer, adapter_name, ranks[name], generator, directions.get(name))
            replaced.update(swaps)
            kinds.update(dict.fromkeys(swaps, kind))
            if swaps and config.resize_scaling == "rank":
                moved, factor = match_rank_scaling(layer, adapter_name, alpha)
                carriers.update(dict.fromkeys(moved, factor))
        if optimizer is not None and replaced:
            if replace_optimizer_params(optimizer, replaced, kinds, config.optimizer_state == "migrate") == 0:
                raise ValueError("the optimizer holds none of the adapter's parameters: pass the one that trains it")
            for param, factor in carriers.items():  # migrated moments, in the units of the new scaling
                rescale_state(optimizer, param, 1.0 / factor)
        if removed:
            config.target_modules = sorted(self.adapted_modules(adapter_name))
        self._record_patterns(adapter_name)
        return removed

    def _remove_module(self, name: str, layer: LoraLayer, adapter_name: str) -> None:
        """Rank 0: take ``adapter_name`` out of this layer, and unwrap the layer if no adapter is left."""
        if set(layer.r) == {adapter_name}:
            parent, _, target_name = _get_submodules(self.model, name)
            setattr(parent, target_name, layer.get_base_layer())
        else:
            layer.delete_adapter(adapter_name)

    def _record_patterns(self, adapter_name: str) -> None:
        """Write one exact entry per module into ``rank_pattern``/``alpha_pattern`` so saves reload exactly."""
        config = self.peft_config[adapter_name]
        modules = self.adapted_modules(adapter_name)
        config.rank_pattern = {pattern_key(n): m.r[adapter_name] for n, m in modules.items()}
        config.alpha_pattern = {pattern_key(n): m.lora_alpha[adapter_name] for n, m in modules.items()}
        if isinstance(getattr(config, "allocation", None), dict) and "names" in config.allocation:
            # a later explicit resize: the saved allocation keeps saying what the weights hold
            config.allocation["ranks_after"] = [
                modules[n].r[adapter_name] if n in modules else 0 for n in config.allocation["names"]
            ]

    def _check_budget(self, adapter_name: str) -> None:
        config = self.peft_config[adapter_name]
        modules = self.adapted_modules(adapter_name)
        for layer in modules.values():
            lora_factors(layer, adapter_name)  # raises a clear error for layer types that cannot be resized
        total_cost = sum(cost_per_rank(m, adapter_name) for m in modules.values())
        budget = self.param_budget(adapter_name)
        if config.min_r * total_cost > budget:
            raise ValueError(
                f"AdaptiveLoraConfig.param_budget={budget} is too small: giving every one of the {len(modules)} "
                f"adapted modules min_r={config.min_r} already costs {config.min_r * total_cost} parameters "
                f"(allowed: param_budget >= {config.min_r * total_cost}, or a smaller min_r)"
            )

    def _resolve_adapter(self, adapter_name: str | None) -> str:
        if adapter_name is None:
            active = self.active_adapters
            if len(active) != 1:
                raise ValueError(f"several adapters are active ({active}); pass adapter_name")
            adapter_name = active[0]
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; known: {sorted(self.peft_config)}")
        return adapter_name

    # --- loading checkpoints whose ranks differ from the live model (Trainer resume) ----------------

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Resize live layers to the ranks found in ``state_dict`` before PEFT copies the weights in.

        ``Trainer(resume_from_checkpoint=...)`` loads a checkpoint into the *existing* adapter; after a
        reallocation the checkpoint's shapes differ from the freshly built model's.
        """
        tuner = model.base_model if hasattr(model, "base_model") else model
        if isinstance(tuner, AdaptiveLoraModel):
            live = tuner.adapted_modules(adapter_name)
            _check_same_modules(live, adapter_name, state_dict)  # a different base: name what differs
            saved = _saved_ranks(tuner, adapter_name, state_dict)
            changed = {n: r for n, r in saved.items() if live[n].r[adapter_name] != r}
            if saved:  # modules the checkpoint has no factors for were removed at rank 0
                changed.update(dict.fromkeys(set(live) - set(saved), 0))
            if changed:
                tuner.resize_adapter(changed, adapter_name=adapter_name)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)


def _check_same_modules(live: dict[str, LoraLayer], adapter_name: str, state_dict: dict) -> None:
    """Raise a ``ValueError`` naming the modules whose saved factors have no module, or another size, in the model."""
    from .adapter_files import lora_factor_keys

    saved = lora_factor_keys(state_dict)
    missing = sorted(n for n in saved if n not in live)
    sizes = []
    for name, keys in sorted(saved.items()):
        if name in live and "A" in keys and "B" in keys:
            A, B = lora_factors(live[name], adapter_name)
            want = (state_dict[keys["B"]].shape[0], math.prod(state_dict[keys["A"]].shape[1:]))
            have = (B.shape[0], A.shape[1])
            if want != have:
                sizes.append(f"{name} (saved {want[0]}x{want[1]}, model {have[0]}x{have[1]})")
    if missing or sizes:
        parts = []
        if missing:
            parts.append(
                f"{len(missing)} saved modules are not in the base model: {missing[:5]}{' ...' * (len(missing) > 5)}"
            )
        if sizes:
            parts.append(f"{len(sizes)} have other sizes (fan_out x fan_in): {sizes[:5]}{' ...' * (len(sizes) > 5)}")
        raise ValueError(f"the adapter {adapter_name!r} was saved for another base model: " + "; ".join(parts))


def _saved_ranks(tuner: AdaptiveLoraModel, adapter_name: str, state_dict: dict) -> dict[str, int]:
    ranks = {}
    for name in tuner.adapted_modules(adapter_name):
        for prefix in ("base_model.model.", ""):
            for key in (f"{prefix}{name}.lora_A.weight", f"{prefix}{name}.lora_embedding_A"):
                if key in state_dict:
                    ranks[name] = state_dict[key].shape[0]
    return ranks


def _warn_missed_steps(adapter_name: str, global_step: int, missed: list[str], stacklevel: int) -> None:
    """Warn (at the caller of ``update_and_allocate``, ``stacklevel`` frames up) what the signals missed."""
    warnings.warn(
        f"adaptive LoRA: update_and_allocate was first called for adapter {adapter_name!r} at step {global_step}, so "
        f"the signal collection misses {' and '.join(missed)}. Call it once per optimizer step from step 1; the "
        "collection starts by itself at the first forward in training mode (model.train()), or call "
        "model.base_model.start_signal_collection() before the first training step.",
        stacklevel=stacklevel,
    )


def _adapter_sharded(model: torch.nn.Module) -> bool:
    try:
        check_adapter_unsharded(model)
    except RuntimeError:
        return True
    return False


def _untrained(layer: LoraLayer, adapter_name: str) -> bool:
    return not bool(lora_factors(layer, adapter_name)[1].detach().abs().max() > 0)


def _check_explicit_ranks(ranks: dict[str, int], names: list[str], costs: list[int], budget: int) -> None:
    missing = sorted(set(names) - set(ranks))
    if missing or set(ranks) - set(names):
        raise ValueError(f"ranks must name every adapted module exactly; missing {missing[:5]}")
    used = sum(ranks[n] * c for n, c in zip(names, costs))
    if used > budget or any(r < 0 for r in ranks.values()):
        raise ValueError(f"ranks must be >= 0 and fit the budget: they cost {used} of {budget} parameters")


def _is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def _same_on_every_process(ranks: dict[str, int], modules: dict) -> dict[str, int]:
    """Under torch.distributed, take process 0's allocation so that every process resizes identically."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return ranks
    payload = [ranks]
    torch.distributed.broadcast_object_list(payload, src=0)
    return payload[0]
