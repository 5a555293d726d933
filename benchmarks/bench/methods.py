"""The compared methods: their names (``parse_method``) and how each wraps a model (``build``).

Methods (``--methods``): ``lora``, ``lora-4x`` (PEFT's own LoraConfig), ``warm-<alloc>-<growth>`` (train at
rank r for ``warmup`` steps while collecting signals, then reallocate in place with ``AdaptiveLoraModel``),
``calib-<alloc>-<init>`` (``calibrate_adaptive_lora`` on ``--calib-batches`` batches before training), and
``oracle`` (planted only; ``oracle+max<K>r``: the planted ranks cut to ``K * r``, the oracle held to a cap).
``<alloc>`` is a score of ``AdaptiveLoraConfig.score`` (``norms``, ``sensitivity``,
``sketch_energy``, ``spectral``, ``gradient_spectrum``; ``consistent_spectrum`` at ``consistency_power=1`` and
``consistent_spectrum2`` at 2, ``consistent_spectrum4`` at the package default 4), ``uniform`` (no reallocation, calibration only), or a
benchmark-only baseline: ``random`` (random scores), ``ramp`` (rank growing linearly with depth) or ``shuffled``
(the final ranks of the default's run of the same seed, permuted at random among modules of equal cost per rank:
the same rank distribution in other places; ``shuffled_default`` the same with the shipped default's run,
``SHIPPED_DEFAULT``, as source: run as ``warm-shuffled_default-random+max2r+reset`` it is that run with only the
places of its ranks changed), or ``keepgate`` (warm only: the shipped default's signal steps, then ranks from each
module's kept loss, ``bench.kept_loss``), all at the same budget through
``AdaptiveLoraModel.reallocate(ranks=...)``. ``<growth>``/``<init>`` is ``gradient`` or
``random``. ``adaptive`` is the package default (``AdaptiveLoraConfig()`` with only the budget-related fields set),
``adaptive-<score>`` the same with another ``score``.
``grow-<alloc>-<growth>`` warms up at rank r/2 and only adds ranks; ``prune-<alloc>-<growth>`` warms up at 2r
(AdaLoRA's ``init_r > target_r``) and cuts to the budget, keeping each module's leading learned directions.
``warm-...+s<N>`` reallocates after ``N`` signal steps instead of the suite's ``warmup``; ``...+max<K>r`` caps
every rank at ``K * r`` instead of the suite's ``max_r`` (a candidate for a more conservative default);
``...+reset`` restarts the optimizer state of every resized module (``optimizer_state="reset"``) instead of
migrating a grown module's moments; ``...+rankscale`` gives every resized module the scaling of its new rank
(``resize_scaling="rank"``) instead of keeping the one it trained with; ``...+gate<g>`` keeps the uniform ranks
where the score's predicted gain is below ``g`` (``min_predicted_gain``); ``...+eva`` starts every ``lora_A`` from
EVA's initialisation at ``rho=1`` (uniform ranks; ``init_lora_weights="eva"``), on the batches the ``eva`` peers use.
``fixed-<alloc>-<growth>`` is a diagnostic: plain LoRA trained from step 0 at the ranks the ``warm-<alloc>-<growth>`` run (or its ``+reset``
run) of the same seed ended with (run that first), which separates the allocation's quality from the cost of changing ranks mid-run.
``fixed-hindsight-random`` is another: plain LoRA from step 0 at the ranks the same seed's ``lora-4x`` run shows
it needed, from the singular values of its learned updates at the end (run that first). It is what a score could
get by knowing in advance where a 4x adapter ends up using its extra rank. Every run records those singular values
(``update_spectra``), so the report can also say how well a score's allocation agrees with them.
``fixed-embedmin-random`` is the hand rule for a budget that holds embeddings (``embedding_min_ranks``): plain LoRA
from step 0 with every embedding at ``min_r`` and the parameters that frees spread over the other modules, one rank
each in a seeded random order, on the modules of the same seed's ``lora`` run (run that first).
``fixed-embedmin_hindsight-random`` is check 2 for such a budget: every embedding at ``min_r`` as in the hand rule,
the rest of the budget split over the other modules by the hindsight rule (the same seed's ``lora-4x``), since
that rule prices an embedding's large update as if it were a loss decrease and gives it ``max_r``.

Peers, at the same final budget (their wiring: ``bench/peers.py``): ``adalora`` (PEFT's AdaLoRA, ``init_r`` =
ceil(1.5 r) pruned to ``target_r`` = r by its own schedule), ``eva`` (PEFT's EVA, ``rho=2``: ranks redistributed up
to 2r, same sum, initialised on the batches the signal steps see) and ``eva-rho1`` (``rho=1``: EVA's initialisation
with uniform ranks), and ``full`` (every weight trained, at its own learning rate ``FULL_LR``; MiniLM suites only).
``SHIPPED_DEFAULT`` is the run name of the shipped default's configuration.

Any method takes ``+lr<k>x`` (e.g. ``lora+lr0.5x``, ``adalora+lr2x``): the suite's learning rate (``full``: its own)
times ``k``, for the per-method learning-rate grid. ``+lr1x`` trains exactly as the plain name does, under its own
name (a grid point at x1 with validation metrics, where the plain run predates them).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .records import final_ranks, result_path, source_run
from .suites import Suite

if TYPE_CHECKING:
    from .tasks import Task


SCORE_NAMES = (
    "norms",
    "sensitivity",
    "sketch_energy",
    "spectral",
    "gradient_spectrum",
    "consistent_spectrum",  # run at consistency_power=1 (the first candidate's runs)
    "consistent_spectrum2",  # consistent_spectrum at consistency_power=2 (the package default for the day of 2026-12-05)
    "consistent_spectrum4",  # at consistency_power=4 (the package default since the evening of 2026-12-05)
)
#: harness score names that are the package's ``consistent_spectrum`` at a given ``consistency_power``
CONSISTENCY_POWERS = {"consistent_spectrum": 1.0, "consistent_spectrum2": 2.0, "consistent_spectrum4": 4.0}
#: the run of the package default's configuration in every suite (``shuffled`` permutes its final ranks), with the
#: suites' ``max_r = 4r``, the package default until the capped candidate ``DEFAULT_RUN + "+max2r"`` replaced it
DEFAULT_RUN = "warm-gradient_spectrum-random"
#: the default until 2026-12-05 (``optimizer_state="migrate"``): most suites' default runs are of this configuration
MIGRATE_DEFAULT = DEFAULT_RUN + "+max2r"
#: the default after it, until ``consistent_spectrum`` replaced its score the same day (``score="gradient_spectrum"``)
EARLIER_DEFAULT = MIGRATE_DEFAULT + "+reset"
#: the default after that, until ``consistency_power=4`` replaced its power 2 the same evening
PREVIOUS_DEFAULT = "warm-consistent_spectrum2-random+max2r+reset"
#: the run name of the shipped default (``score="consistent_spectrum"`` at ``consistency_power=4``, random growth,
#: ``max_r = 2r``, ``optimizer_state="reset"``): the method every other is compared with, besides uniform LoRA
SHIPPED_DEFAULT = "warm-consistent_spectrum4-random+max2r+reset"
SHIPPED_SCORE = SHIPPED_DEFAULT.split("-")[1]  # its harness score name
#: plain LoRA from step 0 at the ranks the same seed's shipped-default run ended with (``fixed_ranks`` finds that
#: run, ``+reset`` included): whether the default's ranks alone pay, without its two-phase run
SHIPPED_DEFAULT_RANKS_FROM_START = "fixed-" + SHIPPED_DEFAULT.removeprefix("warm-").removesuffix("+reset")
#: the run whose final ranks each ``shuffled*`` baseline permutes (the first ``shuffled`` runs predate the shipped
#: default and permute the first default's ranks)
SHUFFLED_SOURCES = {"shuffled": DEFAULT_RUN, "shuffled_default": SHIPPED_DEFAULT}
#: the benchmark-only allocations: random scores, a depth ramp, and the shuffled ranks of a default's run
BASELINE_ALLOCATIONS = ("random", "ramp", *SHUFFLED_SOURCES)
#: the allocations the harness reads off the model itself at the reallocation (``bench.kept_loss``), from the
#: shipped default's signal steps: ``keepgate``, warm runs only (and ``fixed-keepgate-*`` at a warm run's ranks)
KEPT_LOSS_ALLOCATIONS = ("keepgate",)
#: the shipped default's run with its final ranks permuted among modules of equal cost per rank (same seed, same
#: signal steps and resize step): whether the default's placement pays inside its two-phase run
SHIPPED_DEFAULT_SHUFFLED = "warm-shuffled_default-" + SHIPPED_DEFAULT.split("-", 2)[2]  # its growth and suffixes
#: every default's run name, newest first (the report shows each, so no committed default run drops out of view)
DEFAULT_RUNS = (SHIPPED_DEFAULT, PREVIOUS_DEFAULT, EARLIER_DEFAULT, MIGRATE_DEFAULT)
#: PEFT's methods and full fine-tuning, by name (see the module docstring)
PEER_KINDS = ("adalora", "eva", "full")
#: full fine-tuning's learning rate (the one glue.py used); ``+lr<k>x`` multiplies it
FULL_LR = 5e-5


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # lora | warm | grow | prune | calib | fixed | oracle | default | adalora | eva | full
    allocation: str = "uniform"  # a score, "uniform", or one of BASELINE_ALLOCATIONS; or, fixed only, FIXED_RULES
    growth: str = "random"  # gradient | random (growth after a warmup; initialisation for calibration)
    rank_factor: int = 1  # lora only: multiple of the budget
    exponent: float = 1.0  # AdaptiveLoraConfig.score_exponent
    signal_steps: int | None = None  # warm/grow: overrides the suite's warmup (``...+s<N>``)
    max_r_factor: int | None = None  # overrides the suite's max_r = max_r_factor * r (``...+max<K>r``)
    lr_factor: float = 1.0  # multiplies the suite's learning rate (``...+lr<k>x``)
    eva_rho: float | None = None  # EvaConfig.rho of EVA's initialisation: the eva peers, warm/grow/prune with +eva
    optimizer_state: str = "migrate"  # AdaptiveLoraConfig.optimizer_state (``...+reset``: "reset")
    resize_scaling: str = "keep"  # AdaptiveLoraConfig.resize_scaling (``...+rankscale``: "rank")
    min_predicted_gain: float = 0.0  # AdaptiveLoraConfig.min_predicted_gain (``...+gate<g>``, e.g. +gate1.02)


# the fixed-* allocations that read another run's record instead of a score's run: hindsight (lora-4x's update
# spectra), the embedding hand rule (lora's modules and costs), and the two combined
FIXED_RULES = ("hindsight", "embedmin", "embedmin_hindsight")

# kinds that train signal steps and reallocate in place (``+s<N>`` sets their number of signal steps)
SIGNAL_STEP_KINDS = ("warm", "grow", "prune")


def parse_method(name: str) -> Method:
    """The method a ``--methods`` name stands for (grammar: this module's docstring); SystemExit on an unknown name."""
    spec, *suffixes = name.split("+")
    method = _parse_spec(name, spec)
    for suffix in suffixes:
        method = _with_suffix(name, method, suffix)
    return method


SUFFIX_GRAMMAR = (
    "the suffixes are +s<signal steps> (e.g. +s5) and +max<K>r (max_r = K * r, K >= 1, e.g. +max2r) for "
    "warm/grow/prune/calib/fixed methods (on oracle: the planted ranks cut to K * r), +reset "
    "(optimizer_state='reset'), +rankscale (resize_scaling='rank'), "
    "+gate<g> (min_predicted_gain=g, e.g. +gate1.02) and +eva (EVA's initialisation at rho=1) for warm/grow/prune "
    "methods, and +lr<k>x (the learning rate times k, e.g. +lr0.5x) for any method"
)


def _parse_spec(name: str, spec: str) -> Method:
    """The method of a name without its ``+`` suffixes (``name`` is the full name the method keeps)."""
    if spec == "lora":
        return Method(name, "lora")
    if spec.startswith("lora-") and spec.endswith("x"):
        return Method(name, "lora", rank_factor=int(spec[5:-1]))
    if spec == "oracle":
        return Method(name, "oracle")
    if spec == "adaptive":
        return Method(name, "default")
    if spec.startswith("adaptive-") and spec.removeprefix("adaptive-") in SCORE_NAMES:
        # the package default with another score (e.g. an earlier default, kept comparable)
        return Method(name, "default", allocation=spec.removeprefix("adaptive-"))
    if spec in ("adalora", "full"):
        return Method(name, spec)
    if spec in ("eva", "eva-rho1"):
        return Method(name, "eva", eva_rho=1.0 if spec == "eva-rho1" else 2.0)
    return _parse_adaptive(name, spec)


def _with_suffix(name: str, method: Method, suffix: str) -> Method:
    """``method`` changed by one ``+`` suffix: ``lr<k>x`` on any method, ``s<N>`` and ``max<K>r`` on the adaptive
    kinds that take them."""
    if factor := re.fullmatch(r"lr(\d+(?:\.\d+)?)x", suffix):
        if float(factor[1]) <= 0:
            raise SystemExit(f"unknown method {name!r}: +lr<k>x needs k > 0")
        return replace(method, lr_factor=float(factor[1]))
    adaptive = method.kind in (*SIGNAL_STEP_KINDS, "calib", "fixed")
    if adaptive and (steps := re.fullmatch(r"s(\d+)", suffix)):
        return replace(method, signal_steps=int(steps[1]))
    if (adaptive or method.kind == "oracle") and (factor := re.fullmatch(r"max([1-9]\d*)r", suffix)):
        return replace(method, max_r_factor=int(factor[1]))
    if suffix == "reset" and method.kind in SIGNAL_STEP_KINDS:
        return replace(method, optimizer_state="reset")
    if suffix == "rankscale" and method.kind in SIGNAL_STEP_KINDS:
        return replace(method, resize_scaling="rank")
    if method.kind in SIGNAL_STEP_KINDS and (gain := re.fullmatch(r"gate(\d+(?:\.\d+)?)", suffix)):
        return replace(method, min_predicted_gain=float(gain[1]))
    if suffix == "eva" and method.kind in SIGNAL_STEP_KINDS:
        return replace(method, eva_rho=1.0)
    raise SystemExit(f"unknown method {name!r}: {SUFFIX_GRAMMAR}")


def base_name(name: str) -> str:
    """The method name without its ``+lr<k>x`` suffix (``adalora+lr2x`` -> ``adalora``)."""
    return "+".join(part for part in name.split("+") if not re.fullmatch(r"lr\d+(?:\.\d+)?x", part))


def with_lr_factor(name: str, factor: float) -> str:
    """``name`` at ``factor`` times its learning rate (``lora``, 2 -> ``lora+lr2x``); ``factor`` 1 is ``name``."""
    return name if factor == 1 else f"{name}+lr{factor:g}x"


def method_lr(method: Method, suite: Suite) -> float:
    """The learning rate a method trains at: the suite's (full fine-tuning: ``FULL_LR``) times its ``+lr`` factor."""
    return (FULL_LR if method.kind == "full" else suite.lr) * method.lr_factor


def _parse_adaptive(name: str, spec: str) -> Method:
    kind, _, rest = spec.partition("-")
    allocation, _, growth = rest.rpartition("-")
    allocation, _, exponent = allocation.partition("@")  # e.g. warm-gradient_spectrum@0.5-gradient
    allowed = (*SCORE_NAMES, *BASELINE_ALLOCATIONS, *KEPT_LOSS_ALLOCATIONS, "uniform")
    kinds = (*SIGNAL_STEP_KINDS, "calib", "fixed")
    if allocation in KEPT_LOSS_ALLOCATIONS and kind not in ("warm", "fixed"):
        raise SystemExit(
            f"unknown method {name!r}: {allocation} is read at a warm run's reallocation (warm- or fixed-)"
        )
    if kind == "fixed" and allocation in FIXED_RULES and growth == "random":
        return Method(name, kind, allocation, growth)
    if kind not in kinds or allocation not in allowed or growth not in ("gradient", "random"):
        raise SystemExit(
            f"unknown method {name!r}: lora, lora-<k>x, adaptive, adaptive-<score>, oracle, adalora, eva, eva-rho1, "
            "full, warm-<alloc>-<growth>, grow-<alloc>-<growth>, prune-<alloc>-<growth>, "
            f"fixed-<alloc>-<growth> or calib-<alloc>-<init> with <alloc> in {allowed} and <growth>/<init> in "
            f"('gradient', 'random'), fixed-hindsight-random, fixed-embedmin-random or fixed-embedmin_hindsight-random; "
            f"{SUFFIX_GRAMMAR}"
        )
    if kind in (*SIGNAL_STEP_KINDS, "fixed") and allocation == "uniform":
        raise SystemExit(f"{kind}-uniform-* would be plain LoRA: use lora")
    return Method(name, kind, allocation, growth, exponent=float(exponent) if exponent else 1.0)


def module_layer(name: str) -> int:
    """The block index in a module name (``encoder.layer.3.…``, ``model.layers.3.…``); 0 outside the blocks."""
    for part_a, part_b in zip(name.split("."), name.split(".")[1:]):
        if part_a in ("layer", "layers") and part_b.isdigit():
            return int(part_b)
    return 0


def baseline_ranks(kind: str, tuner, seed: int, suite: Suite) -> dict[str, int]:
    """Random, depth-ramp or shuffled ranks at the same budget (the first two through the package's allocation
    rule)."""
    from peft_adaptive import allocate_ranks
    from peft_adaptive.resize import cost_per_rank

    modules = tuner.adapted_modules()
    names = list(modules)
    costs = [cost_per_rank(modules[n], "default") for n in names]
    if kind in SHUFFLED_SOURCES:
        source = SHUFFLED_SOURCES[kind]
        ranks = source_ranks(suite.name, source, seed, user=repr(kind))
        if sorted(ranks) != sorted(names):
            raise SystemExit(f"{source} seed {seed} adapts other modules than this run: cannot permute its ranks")
        return shuffled_ranks(ranks, dict(zip(names, costs)), seed)
    if kind == "random":
        rng = random.Random(seed)
        scores = [rng.random() for _ in names]
    else:
        scores = [module_layer(n) + 1.0 for n in names]
    config = tuner.peft_config["default"]
    allocation = allocate_ranks(scores, costs, tuner.param_budget(), config.min_r, config.max_r, 1.0)
    return dict(zip(names, allocation.ranks))


def shuffled_ranks(ranks: dict[str, int], costs: dict[str, int], seed: int) -> dict[str, int]:
    """``ranks`` permuted at random among the modules of equal cost per rank, so the budget used is unchanged:
    the same distribution of ranks, given to other modules (a control for *where* a score puts rank)."""
    rng = random.Random(seed)
    groups: dict[int, list[str]] = {}
    for name in sorted(ranks):
        groups.setdefault(costs[name], []).append(name)
    shuffled = {}
    for cost in sorted(groups):
        values = [ranks[name] for name in groups[cost]]
        rng.shuffle(values)
        shuffled.update(zip(groups[cost], values))
    return shuffled


def source_ranks(suite: str, method: str, seed: int, user: str) -> dict[str, int]:
    """The final ranks (removed modules at 0) of an earlier run that ``user`` builds on."""
    return final_ranks(source_run(suite, method, seed, user))


def fixed_ranks(suite: str, method: Method, seed: int) -> dict[str, int]:
    """The final ranks of the in-place run a ``fixed-*`` method copies (its removed modules stay unadapted).

    That run is ``warm-<alloc>-<growth>`` with the same suffixes or, where it was not run, the same with ``+reset``:
    the optimizer-state option acts only after the one reallocation, so both end with the same ranks."""
    source = "warm-" + method.name.split("-", 1)[1]
    if not result_path(suite, source, seed).is_file() and result_path(suite, source + "+reset", seed).is_file():
        source += "+reset"
    return source_ranks(suite, source, seed, user=method.name)


def hindsight_ranks(suite: Suite, source: dict, held: dict[str, int] | None = None) -> dict[str, int]:
    """Ranks at uniform LoRA's budget at ``r`` from what a ``lora-4x`` run learned (``source``, its JSON): the
    package's rule for spectra (one global threshold on ``sigma^2`` per parameter, ``min_r``..``max_r``) applied to
    the singular values of each module's final update ``s B A``. Where a 4x adapter puts energy beyond rank ``r``
    is where it used the extra rank, so these are the ranks a score would pick if it could see the end of training.
    ``held``: modules kept at the given ranks, outside the rule; the rest of the budget goes to the others."""
    from peft_adaptive.allocation import allocate_by_spectrum

    spectra, costs = source.get("update_spectra"), source.get("rank_costs")
    if not spectra or not costs:
        raise SystemExit(f"{source['suite']} lora-4x seed {source['seed']} ran before runs recorded update spectra")
    held = held or {}
    budget = suite.r * sum(costs[n] for n in spectra) - sum(costs[n] * rank for n, rank in held.items())
    names = [n for n in spectra if n not in held]  # module order, as the run recorded them
    cost_list = [costs[n] for n in names]
    energies = [[v * v for v in spectra[n]] for n in names]
    allocation = allocate_by_spectrum(energies, cost_list, budget, suite.min_r, suite.max_r)
    return {**dict(zip(names, allocation.ranks)), **held}


def embedding_names(model, names, user: str) -> set[str]:
    """The ``nn.Embedding`` modules among ``names`` (module paths in ``model``); none: ``user`` would be plain LoRA."""
    from torch import nn

    embeddings = {name for name in names if isinstance(model.get_submodule(name), nn.Embedding)}
    if not embeddings:
        raise SystemExit(f"{user}: the suite adapts no embedding, so its embedding rule has nothing to hold")
    return embeddings


def embedding_min_ranks(costs: dict[str, int], embeddings: set[str], r: int, min_r: int, seed: int) -> dict[str, int]:
    """The hand rule for a budget that holds embeddings: each embedding at ``min_r``, every other module at ``r``,
    and the parameters the embeddings free (``costs``: per rank) given back one rank at a time to the other modules
    in a seeded random order, round after round, until no module's rank fits: as uniform as integer ranks allow,
    within one module's cost of uniform LoRA's budget at ``r``."""
    ranks = {name: min_r if name in embeddings else r for name in costs}
    freed = sum(costs[name] * (r - min_r) for name in embeddings)
    others = sorted(name for name in costs if name not in embeddings)
    random.Random(seed).shuffle(others)
    while any(costs[name] <= freed for name in others):
        for name in others:
            if costs[name] <= freed:
                ranks[name] += 1
                freed -= costs[name]
    return ranks


def capped_ranks(ranks: dict[str, int], cap: int) -> dict[str, int]:
    """``ranks`` with every rank above ``cap`` cut to it."""
    return {name: min(rank, cap) for name, rank in ranks.items()}


def lora_at_ranks(model, suite: Suite, ranks: dict[str, int]):
    """PEFT's LoraConfig adapting exactly the named modules at the given ranks (rank 0: not adapted)."""
    from peft import LoraConfig, get_peft_model

    ranks = {name: r for name, r in ranks.items() if r > 0}
    config = LoraConfig(
        r=1,
        lora_alpha=suite.lora_alpha,
        target_modules=sorted(ranks),
        rank_pattern={f"^{re.escape(name)}$": r for name, r in ranks.items()},
        lora_dropout=0.0,
        use_rslora=suite.use_rslora,
    )
    return get_peft_model(model, config)


def build(method: Method, task: Task, model, seed: int = 0):
    """Wrap ``model`` with the method's adapter; returns the PeftModel (``full``: the model itself, all trainable)."""
    from peft import LoraConfig, get_peft_model

    import peft_adaptive  # noqa: F401  (registers the method)
    from peft_adaptive import AdaptiveLoraConfig

    from . import peers

    suite = task.suite
    common_kwargs = dict(target_modules=task.targets(), lora_dropout=0.0, use_rslora=suite.use_rslora)
    if method.kind in PEER_KINDS:
        return peers.build(method, task, model)
    if method.kind == "lora":
        return get_peft_model(
            model, LoraConfig(r=suite.r * method.rank_factor, lora_alpha=suite.lora_alpha, **common_kwargs)
        )
    if method.kind == "fixed" and method.allocation in ("hindsight", "embedmin_hindsight"):
        source = source_run(suite.name, "lora-4x", seed, user=method.name)
        held = {}
        if method.allocation == "embedmin_hindsight":
            held = dict.fromkeys(embedding_names(model, source["rank_costs"], method.name), suite.min_r)
        return lora_at_ranks(model, suite, hindsight_ranks(suite, source, held))
    if method.kind == "fixed" and method.allocation == "embedmin":
        costs = source_run(suite.name, "lora", seed, user=method.name)["rank_costs"]
        embeddings = embedding_names(model, costs, method.name)
        return lora_at_ranks(model, suite, embedding_min_ranks(costs, embeddings, suite.r, suite.min_r, seed))
    if method.kind == "fixed":
        # diagnostic: plain LoRA trained from step 0 at the ranks the warm-<alloc>-<growth> run of this seed ended
        # with, to separate the allocation's quality from the cost of changing ranks mid-training
        return lora_at_ranks(model, suite, fixed_ranks(suite.name, method, seed))
    if method.kind == "oracle":  # +max<K>r: the planted ranks held to the cap (the default's is 2r)
        ranks = task.planted if method.max_r_factor is None else capped_ranks(task.planted, max_rank(method, suite))
        return lora_at_ranks(model, suite, ranks)
    # grow-only: the warmup runs at half the rank and the reallocation only adds ranks (min_r = the warmup rank), so
    # nothing learned is cut. prune: the warmup runs at twice the rank (AdaLoRA's init_r > target_r) and the
    # reallocation cuts to the budget, keeping each module's leading learned directions. Either way the budget is
    # uniform LoRA's at r (set on the config below, after injection)
    warm_r = {"grow": max(1, suite.r // 2), "prune": 2 * suite.r}.get(method.kind, suite.r)
    adaptive_kwargs: dict[str, Any] = dict(
        r=warm_r, lora_alpha=suite.lora_alpha, signal_steps=signal_steps(method, suite), **common_kwargs
    )
    if method.kind == "default" and method.allocation in SCORE_NAMES:
        adaptive_kwargs.update(score_kwargs(method.allocation))
    if method.kind != "default":
        # what the run collects: its score's signals; the shipped default's for the kept-loss allocations, which
        # read its gradient spectra; "norms" (cheap) for the baselines, which read none
        collected = SHIPPED_SCORE if method.allocation in KEPT_LOSS_ALLOCATIONS else method.allocation
        adaptive_kwargs.update(score_kwargs(collected if collected in SCORE_NAMES else "norms"))
        adaptive_kwargs.update(
            min_r=warm_r if method.kind == "grow" else suite.min_r,
            max_r=max_rank(method, suite),
            growth=method.growth,
            score_exponent=method.exponent,
            optimizer_state=method.optimizer_state,
            resize_scaling=method.resize_scaling,
            min_predicted_gain=method.min_predicted_gain,
        )
    if method.eva_rho is not None:  # EVA's initialisation, as the eva peers get it (peers.build_eva, init_eva)
        from peft import EvaConfig

        adaptive_kwargs.update(init_lora_weights="eva", eva_config=EvaConfig(rho=method.eva_rho))
    peft_model = get_peft_model(
        model, AdaptiveLoraConfig(**adaptive_kwargs), low_cpu_mem_usage=method.eva_rho is not None
    )
    if method.kind in ("grow", "prune"):
        # the package's default budget is uniform LoRA at the warmup rank; rescale it to rank r
        tuner = peft_model.base_model
        tuner.peft_config["default"].param_budget = tuner.param_budget() * suite.r // warm_r
    return peft_model


def score_kwargs(name: str) -> dict[str, Any]:
    """The ``AdaptiveLoraConfig`` fields a harness score name stands for (``consistent_spectrum4``: the package's
    ``consistent_spectrum`` at ``consistency_power=4``; ``consistent_spectrum2`` at 2; plain ``consistent_spectrum`` runs
    keep the power 1 they ran at)."""
    if name in CONSISTENCY_POWERS:
        return {"score": "consistent_spectrum", "consistency_power": CONSISTENCY_POWERS[name]}
    return {"score": name}


def signal_steps(method: Method, suite: Suite) -> int:
    return suite.warmup if method.signal_steps is None else method.signal_steps


def max_rank(method: Method, suite: Suite) -> int:
    return suite.max_r if method.max_r_factor is None else method.max_r_factor * suite.r
