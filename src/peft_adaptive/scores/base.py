"""What a score is: the signals it needs collected, and how it turns them into ranks.

A score is a small strategy object registered by name (like PEFT's LoRA variants); ``AdaptiveLoraConfig.score``
names one. The collector (:class:`~peft_adaptive.signals.SignalCollector`) only accumulates raw signals during
the signal steps; the score reads them and calls one of the two allocation rules in
:mod:`peft_adaptive.allocation`. A new score is one file with a :class:`Score` subclass and one
:func:`register_score` call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..allocation import Allocation

if TYPE_CHECKING:
    from peft.tuners.lora import LoraLayer

    from ..config import AdaptiveLoraConfig
    from ..signals import SignalCollector


@dataclass(frozen=True)
class Needs:
    """The optional signals a score needs the collector to keep (each costs memory, so only what is needed)."""

    delta: bool = False  # a float32 snapshot of the factors, for the weight change since the start
    sensitivity: bool = False  # AdaLoRA's smoothed importance and uncertainty of every adapter entry
    grad_sum: bool = False  # the summed ``dL/dB``: a random sketch of the summed full-weight gradient
    sketch: bool = False  # the row-space sketch of the summed full-weight gradient (peft_adaptive.sketch)
    # each step's squared gradient norm beside the sums (of the dL/dB sketch, and of the row-space sketch, which under
    # torch.distributed is then summed across the processes every step: one all-reduce per signal step)
    step_energy: bool = False


@dataclass
class ScoredAllocation:
    scores: list[float]  # per module, normalised to sum to one (for the report and the logs)
    allocation: Allocation
    #: spectrum scores: what each module's ranks are worth, the values the allocation split (for predicted_gain)
    values: list[list[float]] | None = None


class Score:
    """One way to score modules from the signal steps and allocate the budget.

    Subclasses set ``name`` and ``gradient_only`` and implement :meth:`needs` and :meth:`allocate`.
    """

    name: ClassVar[str]
    #: True when the score needs only gradients, not optimizer steps, so a calibration phase can use it
    gradient_only: ClassVar[bool] = False
    #: True when :meth:`allocate` returns per-rank ``values`` (the spectrum scores), so a reallocation can say how
    #: much it gains (``AllocationReport.predicted_gain``) and ``min_predicted_gain`` can apply
    values_ranks: ClassVar[bool] = False

    def needs(self, config: AdaptiveLoraConfig, layers: dict[str, LoraLayer], adapter: str) -> Needs:
        """The signals to collect for ``config`` on ``layers`` (the gradient norms are always collected)."""
        return Needs()

    def allocate(
        self, collector: SignalCollector, costs: Sequence[int], budget: int, config: AdaptiveLoraConfig
    ) -> ScoredAllocation:
        """Per-module scores and integer ranks within ``budget`` (``costs``: parameters per rank, module order)."""
        raise NotImplementedError


#: The registered scores by name, in registration order.
SCORES: dict[str, Score] = {}


def register_score(score: Score) -> Score:
    """Make ``score`` available as ``AdaptiveLoraConfig(score=score.name)``."""
    if not getattr(score, "name", None):
        raise ValueError(f"{type(score).__name__} has no name")
    SCORES[score.name] = score
    return score


def get_score(name: str) -> Score:
    if name not in SCORES:
        raise ValueError(f"unknown score {name!r}; allowed: {', '.join(repr(n) for n in SCORES)}")
    return SCORES[name]


def require(value, tracker: str):
    """``value``, or a clear error when the collector was not asked to keep the signal a score needs."""
    if value is None:
        raise RuntimeError(f"the signal collector did not track {tracker!r}, which this score needs")
    return value
