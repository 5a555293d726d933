"""Scores: how the signal steps become ranks, one registered strategy per file.

``AdaptiveLoraConfig.score`` names one (:data:`SCORES` lists them):

* ``"consistent_spectrum"`` (the default, :mod:`.consistent_spectrum`): ``gradient_spectrum`` weighted by how
  consistently each module's step gradients agree (a large but noisy gradient buys less).
* ``"gradient_spectrum"`` (:mod:`.gradient_spectrum`): singular values of each module's mean
  full-weight gradient, from a random sketch; one global threshold on ``sigma^2`` per parameter.
* ``"sensitivity"`` (:mod:`.sensitivity`): AdaLoRA's smoothed ``|theta * grad|`` x uncertainty.
* ``"norms"`` (:mod:`.norms`): per-entry RMS gradient (and weight change, ``delta_weight``).
* ``"sketch_energy"`` (:mod:`.sketch_energy`): per-entry RMS of the mean full-weight gradient.
* ``"spectral"`` (:mod:`.spectral`): singular values of the learned update ``s B A``.

Your own: subclass :class:`Score` (what it :meth:`~Score.needs` collected, how it :meth:`~Score.allocate`\\ s) and
pass an instance to :func:`register_score`; ``AdaptiveLoraConfig(score=<its name>)`` then uses it.
"""

from .base import SCORES, Needs, Score, ScoredAllocation, get_score, register_score
from .consistent_spectrum import ConsistentSpectrumScore
from .gradient_spectrum import GradientSpectrumScore
from .norms import NormsScore
from .sensitivity import SensitivityScore
from .sketch_energy import SketchEnergyScore
from .spectral import SpectralScore

register_score(NormsScore())
register_score(SensitivityScore())
register_score(SketchEnergyScore())
register_score(SpectralScore())
register_score(GradientSpectrumScore())
register_score(ConsistentSpectrumScore())

__all__ = ["SCORES", "Needs", "Score", "ScoredAllocation", "get_score", "register_score"]
