"""Profile -> prune -> cluster -> additive solve -> measured search -> held-out validation.

``run_search`` takes a :class:`~kvtuner.profile.Profile` and the calibration / held-out tokens
and returns every measured config, the Pareto front, the best config per budget (written as
``OUT/config_<budget>.json``) beside the exact additive optimum and the best uniform config
of no more bits, and the wall time of each stage.

What a config costs. Budgets are nominal average bits over layers (KVTuner's figure), and every
layer's KV bytes are priced at the calibration length. Average bits are the wrong cost for a hybrid
model: at a context of 8k tokens a sliding-window layer (window 512) stores a sixteenth of what a full
layer stores. With ``context`` set, every layer is priced by the bytes it stores at that many tokens
(:func:`stored_bytes`: all of them for full attention, what the window still sees for a sliding layer),
and budgets are the total KV bytes as a fraction of fp16 ``DynamicCache``'s at that context. Without
sliding layers that is a budget on effective bits (16 times the fraction), priced as always.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
import transformers
from scipy.stats import pearsonr, spearmanr
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from kvtuner.cache import MixedPrecisionLayer, MixedPrecisionSlidingLayer, fingerprint
from kvtuner.cache.compat import layer_types
from kvtuner.method import Calibration, method_for, needs_calibration
from kvtuner.config import KVConfig, LayerSpec, ModelFingerprint, parse_shorthand, write_atomic
from kvtuner.evaluate import Evaluator
from kvtuner.profile import DEFAULT_PAIRS, BlockwiseEvaluator, Profile
from kvtuner.search.additive import predicted_loss, solve_knapsack
from kvtuner.search.plots import front_figure
from kvtuner.search.space import SearchSpace, SpaceReport, build_space, dominates, group_cost, layer_costs
from kvtuner.search.batches import Coordinator
from kvtuner.search.storage import Liveness, connect, shown
from kvtuner.search.study import (
    Objective,
    SearchError,
    is_feasible,
    measured_trials,
    open_study,
    param_name,
)

PLAN_ATTR = "kvtuner_plan"
SIZES = ("avg_bits", "kv_bytes")
OBJECTIVES = ("kl", "gsm8k", "longctx")
SAMPLERS = ("nsga2", "tpe")


@dataclass
class SearchSettings:
    """How to search. Budgets are in nominal average bits; hard limits are Optuna constraints.

    context: price every layer by the bytes it stores at this many tokens; budgets are then fractions of the
    fp16 KV bytes at that context and the size objective is those bytes (see the module docstring).
    storage: an Optuna storage URL; None means ``sqlite:///OUT/study.db``.
    workers: 1: this process measures trials too; 0: it only proposes and queues them, and
    ``kvtuner worker`` processes on the same storage and study measure them.
    liveness: heartbeat, grace period and polling of the shared queue (see ``kvtuner.search.storage``).
    seed_step: the additive solve also seeds a config every ``seed_step`` bits.
    reference_check: re-measure each budget's pick and its uniform baseline with the chunked
    ``Evaluator`` on the held-out tokens (independent of the one-pass evaluator).
    """

    trials: int = 60
    sampler: str = "nsga2"
    population: int = 16
    groups: int | None = 8
    budgets: tuple[float, ...] = (3.0, 3.25, 4.0, 5.0, 6.0)
    max_avg_bits: float | None = None
    max_kv_bytes: int | None = None
    max_effective_bits: float | None = None  # hard limit on real stored bits per element (a byte limit at the tokens)
    # a budget's pick (and its additive solve) stores at most budget + this many effective bits; trials are
    # not constrained by it, they fill the front between budgets
    max_overhead_bits: float | None = None
    size: str = "avg_bits"
    objective: str = "kl"
    storage: str | None = None
    workers: int = 1
    liveness: Liveness = field(default_factory=Liveness)
    study_name: str = "kvtuner"
    resume: bool = False
    seed: int = 0
    seed_step: float = 0.25
    reference_check: bool = True
    context: int | None = None

    def check(self, candidates: list[LayerSpec]) -> None:
        """Raise ``SearchError`` for settings that cannot work with these candidates."""
        if self.size not in SIZES:
            raise SearchError(f"unknown size objective {self.size!r}; use {' or '.join(SIZES)}")
        if self.sampler not in SAMPLERS:
            raise SearchError(f"unknown sampler {self.sampler!r}; use {' or '.join(SAMPLERS)}")
        if self.objective not in OBJECTIVES:
            raise SearchError(f"unknown objective {self.objective!r}; use {' or '.join(OBJECTIVES)}")
        if self.workers < 0:
            raise SearchError(f"--workers must not be negative, not {self.workers}")
        if self.trials < 1:
            raise SearchError(f"--trials must be at least 1, not {self.trials}")
        if self.groups is not None and self.groups < 1:
            raise SearchError(f"--groups must be at least 1, not {self.groups}")
        if self.context is not None:
            if self.context < 1:
                raise SearchError(f"--context must be a positive number of tokens, not {self.context}")
            if any(not 0 < b <= 2 for b in self.budgets):
                raise SearchError("with --context, budgets are fractions of the fp16 KV bytes at that context, "
                                  f"in (0, 2]; not {', '.join(f'{b:g}' for b in self.budgets)}")
            if self.max_overhead_bits is not None:
                raise SearchError("--max-overhead-bits limits bits beyond an average-bit budget; with --context the "
                                  "budgets are bytes already")
        smallest = min(candidates, key=lambda s: s.avg_bits)
        bit_budgets = [] if self.context is not None else [("budget", b) for b in self.budgets]
        for name, bits in bit_budgets + [("--max-avg-bits", self.max_avg_bits)]:
            if bits is not None and bits < smallest.avg_bits:
                raise SearchError(
                    f"{name} {bits:g} bits is below the smallest pair {smallest.label} ({smallest.avg_bits:g} bits)"
                )
        if self.max_kv_bytes is not None and self.max_kv_bytes <= 0:
            raise SearchError(f"--max-kv-bytes must be positive, not {self.max_kv_bytes}")
        if self.max_effective_bits is not None and not 0 < self.max_effective_bits <= 16:
            raise SearchError(f"--max-effective-bits must be in (0, 16], not {self.max_effective_bits}")
        if self.max_overhead_bits is not None and self.max_overhead_bits < 0:
            raise SearchError(f"--max-overhead-bits must not be negative, not {self.max_overhead_bits}")


@dataclass
class Point:
    """One measured config. ``loss``: the objective on the calibration tokens (KL, GSM8K or passkey error)."""

    name: str
    source: str  # trial | additive | uniform
    config: KVConfig
    avg_bits: float
    kv_bytes: int
    loss: float
    predicted: float | None = None
    effective_bits: float | None = None  # 16 * kv_bytes / fp16 bytes: real stored bits per element
    heldout: float | None = None  # KL on the held-out tokens (one-pass evaluator)
    heldout_reference: float | None = None  # the same by the chunked Evaluator

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "source": self.source, "avg_bits": self.avg_bits, "kv_bytes": self.kv_bytes,
            "effective_bits": self.effective_bits,
            "loss": self.loss, "predicted": self.predicted, "heldout": self.heldout,
            "heldout_reference": self.heldout_reference, "layers": [s.label for s in self.config.layers],
        }


@dataclass
class BudgetPick:
    """For one budget: the best measured config, the exact additive optimum, the best uniform config."""

    budget: float
    best: Point | None
    additive: Point | None
    uniform: Point | None
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget, "path": self.path,
            **{k: (getattr(self, k).to_dict() if getattr(self, k) else None) for k in ("best", "additive", "uniform")},
        }


@dataclass
class SearchResult:
    space: SearchSpace
    sizes: SpaceReport
    points: list[Point]
    front: list[Point]
    uniform: list[Point]
    budgets: list[BudgetPick]
    correlation: dict[str, float]
    timings: dict[str, float]
    study: dict[str, Any]
    cost: dict[str, Any] = field(default_factory=dict)  # what sizes count: the context, fp16 bytes there, budget unit
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "space": self.space.describe(),
            "space_sizes": self.sizes.to_dict(),
            "front": [p.to_dict() for p in self.front],
            "uniform": [p.to_dict() for p in self.uniform],
            "budgets": [b.to_dict() for b in self.budgets],
            "points": [p.to_dict() for p in self.points],
            "correlation": self.correlation,
            "timings": self.timings,
            "study": self.study,
            "cost": self.cost,
            "files": self.files,
        }


def candidate_bytes(spec: LayerSpec, model: ModelFingerprint, tokens: int, dtype: torch.dtype,
                    calibration: Calibration | None = None) -> int:
    """KV bytes one layer stores for ``tokens`` tokens of one sequence with ``spec``, as
    ``MixedPrecisionCache.nbytes`` counts them (residual and sink in the model's dtype).

    The search costs profile candidates by the bytes the profile measured on the calibration
    tokens instead (outliers depend on the data; zeros have none); this prices the uniform
    baselines that are not candidates.
    """
    if not spec.is_quantized:
        return 2 * model.num_kv_heads * tokens * model.head_dim * torch.finfo(dtype).bits // 8
    # bytes do not depend on the RoPE angles: zero frequencies (no rotation) serve any model
    method = method_for(spec, 0, calibration, lambda _: torch.zeros(model.head_dim // 2))
    layer = MixedPrecisionLayer(method)
    x = torch.zeros(1, model.num_kv_heads, tokens, model.head_dim, dtype=dtype)
    layer.update(x, x)
    return layer.nbytes()


def kept_tokens(spec: LayerSpec, model: ModelFingerprint, context: int, sliding_window: int | None,
                calibration: Calibration | None = None) -> int:
    """Tokens a cache layer holds after ``context`` tokens: all of them in a full-attention layer; in a sliding one,
    what transformers' layer keeps (``sliding_window - 1``) or, quantized, what :class:`MixedPrecisionSlidingLayer`
    keeps (the window, the rest of a stored group it reaches into, the residual), counted by running one."""
    if sliding_window is None:
        return context
    if not spec.is_quantized:
        return min(context, sliding_window - 1)
    method = method_for(spec, 0, calibration, lambda _: torch.zeros(model.head_dim // 2))
    layer = MixedPrecisionSlidingLayer(method, sliding_window)
    x = torch.zeros(1, model.num_kv_heads, context, model.head_dim)
    layer.update(x, x)
    return context - layer.first_token


def stored_bytes(specs: list[LayerSpec], nbytes: np.ndarray, model_config, tokens: int, context: int | None,
                 calibration: Calibration | None = None) -> np.ndarray:
    """``[L, S]``: the KV bytes each layer stores with each spec at ``context`` tokens, from ``nbytes`` ``[S]``, a
    layer's bytes for ``tokens`` tokens, scaled by the tokens it keeps (:func:`kept_tokens`). Without a context:
    ``nbytes`` in every layer, as the search always priced them."""
    types = layer_types(model_config)
    if context is None:
        return np.broadcast_to(np.asarray(nbytes, dtype=np.int64), (len(types), len(specs))).copy()
    model = fingerprint(model_config)
    kept = {(spec, kw.get("sliding_window") if kind == "sliding_attention" else None): None
            for spec in specs for kind, kw in types}
    kept = {key: kept_tokens(key[0], model, context, key[1], calibration) for key in kept}
    windows = [kw.get("sliding_window") if kind == "sliding_attention" else None for kind, kw in types]
    return np.array([[round(nbytes[c] * kept[(spec, w)] / tokens) for c, spec in enumerate(specs)] for w in windows],
                    dtype=np.int64)


def fp16_bytes_at(model_config, context: int) -> int:
    """KV bytes of an fp16 ``DynamicCache`` after ``context`` tokens (sliding layers keep ``sliding_window - 1``)."""
    model = fingerprint(model_config)
    per_token = 2 * model.num_kv_heads * model.head_dim * 2
    return sum(per_token * (min(context, kw["sliding_window"] - 1) if kind == "sliding_attention" else context)
               for kind, kw in layer_types(model_config))


def _sha256(path: str | Path | None) -> str | None:
    """Of a calibration file: a study measured with other levels or thresholds must not be resumed."""
    import hashlib

    return None if path is None else hashlib.sha256(Path(path).read_bytes()).hexdigest()


def pareto_front(points: list[Point], size: str) -> list[Point]:
    """Points no other point beats in both size and loss, smallest first."""
    key = (lambda p: p.avg_bits) if size == "avg_bits" else (lambda p: p.kv_bytes)
    front, best = [], math.inf
    for p in sorted(points, key=lambda p: (key(p), p.loss)):
        if p.loss < best:
            front.append(p)
            best = p.loss
    return front


def budget_file(out_dir: Path, budget: float) -> Path:
    return out_dir / f"config_{float(budget)}.json"


def _limits(settings: SearchSettings, bits: np.ndarray, nbytes: np.ndarray, fp16_total: int, budget: float | None):
    """Knapsack constraints ``(cost [L, C] of each layer, capacity)`` for one budget and the hard limits."""
    layers = nbytes.shape[0]
    bits = np.broadcast_to(bits, nbytes.shape)
    limits = []
    for cap in (None if settings.context is not None else budget, settings.max_avg_bits):
        if cap is not None:
            limits.append((bits, cap * layers + 1e-9))
    if settings.max_kv_bytes is not None:
        limits.append((nbytes, float(settings.max_kv_bytes)))
    if budget is not None and settings.context is not None:
        limits.append((nbytes, budget * fp16_total + 1e-6))
    if budget is not None and settings.max_overhead_bits is not None:  # effective bits: 16 * bytes / fp16 bytes
        limits.append((nbytes, (budget + settings.max_overhead_bits) / 16 * fp16_total + 1e-6))
    return limits


def _seeds(space: SearchSpace, loss: np.ndarray, cost: np.ndarray, group_solutions: list[tuple[list[int], str]]):
    """Seed params: additive solutions in group space, then each candidate used uniformly.

    A uniform choice that pruning removed from a group is replaced there by the group's best
    option of no higher cost in any of the group's costs (one that dominates it; ``cost`` ``[L, costs, C]``),
    so every seed lies in the space.
    """
    seeds = [({param_name(i): space.labels[c] for i, c in enumerate(choice)}, source) for choice, source in group_solutions]
    for c, label in enumerate(space.labels):
        params = {}
        for i, g in enumerate(space.groups):
            if c in g.options:
                params[param_name(i)] = label
            else:
                group_loss = loss[g.layers].sum(axis=0)
                cheaper = [o for o in g.options if dominates(group_cost(cost, g.layers), o, c)] or g.options
                params[param_name(i)] = space.labels[min(cheaper, key=lambda o: group_loss[o])]
        seeds.append((params, f"uniform {label}"))
    return seeds


def _correlation(points: list[Point]) -> dict[str, float]:
    pairs = [(p.predicted, p.loss) for p in points if p.predicted is not None and p.loss > 0 and p.predicted > 0]
    if len(pairs) < 3:
        return {"n": len(pairs)}
    pred, meas = np.array(pairs).T
    return {
        "n": len(pairs),
        "spearman": float(spearmanr(pred, meas).statistic),
        "pearson_log10": float(pearsonr(np.log10(pred), np.log10(meas)).statistic),
        "median_ratio_measured_over_predicted": float(np.median(meas / pred)),
    }


def _additive(profile: Profile, space: SearchSpace, sizes: SpaceReport, settings: SearchSettings,
              bits: np.ndarray, nbytes: np.ndarray, fp16_total: int,
              ) -> tuple[dict[float, list[int] | None], list[tuple[list[int], str]]]:
    """Exact additive optima: per layer for each budget (reported), per group on a grid of budgets (seeds): every
    ``seed_step`` bits, or with a context the same share of the bytes (``seed_step / 16``)."""
    layers = profile.num_layers
    per_layer = {
        b: solve_knapsack(profile.loss, sizes.pruned_options, [1] * layers, _limits(settings, bits, nbytes, fp16_total, b))
        for b in settings.budgets
    }
    group_loss = np.stack([profile.loss[g.layers].sum(axis=0) for g in space.groups])
    weight = [len(g.layers) for g in space.groups]
    if settings.context is None:
        grid = np.arange(bits.min(), bits.max() + 1e-9, settings.seed_step)
    else:
        shares = nbytes.sum(axis=0) / fp16_total
        grid = np.arange(shares.min(), shares.max() + 1e-9, settings.seed_step / 16)
    group_solutions = []
    for b in [*settings.budgets, *grid]:
        limits = [(np.stack([group_cost(cost, g.layers) for g in space.groups]), cap)
                  for cost, cap in _limits(settings, bits, nbytes, fp16_total, b)]
        choice = solve_knapsack(group_loss, [g.options for g in space.groups], weight, limits)
        if choice is not None:
            group_solutions.append((choice, f"additive {b:g}"))
    return per_layer, group_solutions


def _uniform_points(profile: Profile, model_config, tokens: int, dtype: torch.dtype,
                    measure: Callable[[KVConfig], float], nbytes: np.ndarray, context: int | None) -> list[Point]:
    """The KIVI baselines: every default pair and every KIVI candidate, used in all layers.

    nbytes: ``[L, C]`` each layer's bytes for each candidate (what the search costs them by)."""
    candidates, layers = profile.candidates, profile.num_layers
    model_fp = fingerprint(model_config)
    g, r = candidates[0].group_size, candidates[0].residual_length
    kivi = [LayerSpec("kivi", *parse_shorthand(p), g, r) for p in DEFAULT_PAIRS]
    points = []
    for spec in dict.fromkeys([*kivi, *(s for s in candidates if s.method == "kivi")]):
        config = KVConfig([spec] * layers, model=model_fp, name=spec.label)
        predicted = predicted_loss(profile.loss, [candidates.index(spec)] * layers) if spec in candidates else None
        if spec in candidates:
            total = nbytes[:, candidates.index(spec)].sum()
        else:
            total = stored_bytes([spec], np.array([candidate_bytes(spec, model_fp, tokens, dtype)]), model_config,
                                 tokens, context).sum()
        points.append(Point(f"uniform {spec.label}", "uniform", config, spec.avg_bits, int(total),
                            measure(config), predicted))
    return points


def _pick(budget: float, points: list[Point], uniform: list[Point], additive: Point | None,
          settings: SearchSettings, fp16_total: int) -> BudgetPick:
    """The lowest-loss measured config within the budget (and the hard limits), beside the baselines."""
    effective_cap = math.inf if settings.max_overhead_bits is None else budget + settings.max_overhead_bits + 1e-9

    def fits(p: Point) -> bool:
        if settings.context is not None:
            return p.kv_bytes <= budget * fp16_total + 1e-6
        return p.avg_bits <= budget + 1e-9 and p.effective_bits <= effective_cap

    within = [p for p in points if fits(p)
              and (settings.max_avg_bits is None or p.avg_bits <= settings.max_avg_bits + 1e-9)
              and (settings.max_kv_bytes is None or p.kv_bytes <= settings.max_kv_bytes)]
    uniform_within = [p for p in uniform if fits(p)]
    return BudgetPick(budget, min(within, key=lambda p: p.loss, default=None), additive,
                      min(uniform_within, key=lambda p: p.loss, default=None))


def _validate(model: PreTrainedModel, validation_ids: torch.Tensor, front: list[Point], uniform: list[Point],
              picks: list[BudgetPick], reference_check: bool, calibration: Calibration | None,
              progress: bool = False) -> None:
    """Held-out KL of the front, the baselines and the picks; the chunked ``Evaluator`` re-checks picks."""
    held = BlockwiseEvaluator(model, validation_ids, calibration=calibration)
    chosen = [x for pick in picks for x in (pick.best, pick.additive) if x is not None]
    for p in tqdm(list({id(p): p for p in [*front, *uniform, *chosen]}.values()), desc="held-out KL", unit="config",
                  disable=not progress):
        p.heldout = held.kl(p.config)
    if reference_check:
        reference = Evaluator(model, validation_ids, calibration=calibration)
        checked = {id(p): p for pick in picks for p in (pick.best, pick.uniform) if p is not None}.values()
        for p in tqdm(list(checked), desc="held-out KL, chunked Evaluator", unit="config", disable=not progress):
            p.heldout_reference = reference.evaluate(p.config).kl


def run_search(
    model: PreTrainedModel,
    profile: Profile,
    calibration_ids: torch.Tensor,
    validation_ids: torch.Tensor | None = None,
    settings: SearchSettings | None = None,
    out_dir: str | Path = "runs/search",
    measure: Callable[[KVConfig], float] | None = None,
    meta: dict[str, Any] | None = None,
    progress: bool = False,
    calibration: Calibration | None = None,
    calibration_path: str | Path | None = None,
) -> SearchResult:
    """Search mixed-precision configs for ``model`` from its ``profile``; see the module docstring.

    measure: the objective's quality measurement of a config; default: decode-faithful KL on
    ``calibration_ids`` (the CLI passes a GSM8K error rate for ``--objective gsm8k``, a passkey error rate on
    calibration-split prompts for ``--objective longctx``).
    meta: provenance recorded with the study, the result and every written config; its ``data``,
    ``gsm8k`` and ``longctx`` (the settings ``measure`` scores with) are part of the study identity, so
    ``--resume`` refuses a study measured on other data or other GSM8K or passkey settings.
    calibration: levels and thresholds for candidates with codebooks, outliers or kvquant; the
    written configs reference ``calibration_path``, relative to ``out_dir``.
    """
    settings = settings or SearchSettings()
    settings.check(profile.candidates)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_fp = fingerprint(model.config)
    if profile.num_layers != model_fp.num_layers:
        raise SearchError(f"the profile has {profile.num_layers} layers but the model has {model_fp.num_layers}")
    tokens = calibration_ids.shape[1]
    dtype = next(model.parameters()).dtype
    bits = np.array([s.avg_bits for s in profile.candidates])
    fp16_layer = 2 * model_fp.num_kv_heads * tokens * model_fp.head_dim * 2
    if profile.effective_bits is not None:  # real bytes on the calibration tokens, outliers included
        layer_bytes = np.rint(profile.effective_bits.mean(axis=0) / 16 * fp16_layer).astype(np.int64)
    else:
        layer_bytes = np.array([candidate_bytes(s, model_fp, tokens, dtype, calibration) for s in profile.candidates])
    nbytes = stored_bytes(profile.candidates, layer_bytes, model.config, tokens, settings.context, calibration)  # [L, C]
    fp16_total = fp16_layer * model_fp.num_layers if settings.context is None else fp16_bytes_at(model.config, settings.context)
    size = "kv_bytes" if settings.context is not None else settings.size
    if settings.context is not None:  # a budget no config fits is refused before any measurement
        cheapest = nbytes.min(axis=1).sum() / fp16_total
        if min(settings.budgets) < cheapest:
            raise SearchError(f"budget {min(settings.budgets):g} is below the cheapest config, {cheapest:.4f} of the "
                              f"fp16 KV bytes at {settings.context} tokens")
    if settings.max_effective_bits is not None:
        cap = int(settings.max_effective_bits / 16 * fp16_total)
        settings = replace(settings, max_kv_bytes=min(cap, settings.max_kv_bytes or cap))
    # prune by nominal bits and real bytes at once: a budget limits the one, --max-overhead-bits the other
    cost = np.stack([layer_costs(bits, model_fp.num_layers)[:, 0], nbytes.astype(float)], axis=1)  # [L, 2, C]
    timings: dict[str, float] = {}

    t = time.perf_counter()
    space, sizes = build_space(profile.candidates, profile.loss, cost, settings.groups)
    timings["prune_cluster"] = time.perf_counter() - t

    t = time.perf_counter()
    per_layer_additive, group_solutions = _additive(profile, space, sizes, settings, bits, nbytes, fp16_total)
    timings["additive_solve"] = time.perf_counter() - t

    t = time.perf_counter()
    measure = measure or BlockwiseEvaluator(model, calibration_ids, calibration=calibration).kl
    url = settings.storage or f"sqlite:///{(out_dir / 'study.db').resolve()}"
    storage = shown(url)
    identity = {
        "space": space.describe(), "model": asdict(model_fp), "tokens": tokens, "objective": settings.objective,
        "size": size, "max_avg_bits": settings.max_avg_bits, "max_kv_bytes": settings.max_kv_bytes,
        "context": settings.context,
        "max_overhead_bits": settings.max_overhead_bits, "calibration": _sha256(calibration_path),
        "data": (meta or {}).get("data"),
        # the sampler's trials depend on these; a resumed study drawn by another sampler would mix two searches
        "sampler": settings.sampler, "seed": settings.seed, "population": settings.population,
        # what the caller's measure depends on (the CLI's GSM8K problems and max new tokens)
        "gsm8k": (meta or {}).get("gsm8k"),
    }
    if (meta or {}).get("longctx") is not None:  # only when set, so studies made before it resume as they were
        identity["longctx"] = meta["longctx"]
    study = open_study(connect(url, settings.liveness), settings.study_name, settings.resume, identity, storage)
    objective = Objective(space, profile.loss, bits, nbytes, measure, size, settings.max_avg_bits, settings.max_kv_bytes)
    study.set_user_attr(PLAN_ATTR, objective.to_plan())  # what a worker needs to measure trials
    coordinator = Coordinator(study, objective, _seeds(space, profile.loss, cost, group_solutions), settings.sampler,
                              settings.seed, settings.population, settings.trials, settings.liveness)
    coordinator.run(work=settings.workers > 0, progress=progress)
    timings["search"] = time.perf_counter() - t

    t = time.perf_counter()
    points = [
        Point(f"trial {tr.number}", "trial", space.config(tr.user_attrs["layer_choice"], model_fp),
              tr.user_attrs["avg_bits"], tr.user_attrs["kv_bytes"], tr.values[0], tr.user_attrs["predicted"])
        for tr in measured_trials(study)
    ]
    known = {tuple(p.config.layers): p for p in points}
    additive_points: dict[float, Point | None] = {}
    for b, choice in per_layer_additive.items():
        if choice is not None and tuple(space.config(choice).layers) not in known:
            config = space.config(choice, model_fp)
            avg_bits, kv_bytes = objective.sizes(choice)
            point = Point(f"additive {b:g}", "additive", config, avg_bits, kv_bytes, measure(config),
                          predicted_loss(profile.loss, choice))
            known[tuple(config.layers)] = point
            points.append(point)
        additive_points[b] = None if choice is None else known[tuple(space.config(choice).layers)]
    def known_or_measured(config: KVConfig) -> float:  # a uniform config the search measured costs nothing more
        point = known.get(tuple(config.layers))
        return point.loss if point is not None else measure(config)

    uniform = _uniform_points(profile, model.config, tokens, dtype, known_or_measured, nbytes, settings.context)
    for p in [*points, *uniform]:
        p.effective_bits = 16 * p.kv_bytes / fp16_total
    timings["measure_additive_uniform"] = time.perf_counter() - t

    front = pareto_front(points, size)
    picks = [_pick(b, points, uniform, additive_points[b], settings, fp16_total) for b in settings.budgets]
    t = time.perf_counter()
    if validation_ids is not None:
        _validate(model, validation_ids, front, uniform, picks, settings.reference_check, calibration, progress)
    timings["validation"] = time.perf_counter() - t

    provenance = {
        **(meta or {}), "study": settings.study_name, "storage": storage, "seed": settings.seed,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "optuna": optuna.__version__, "python": platform.python_version()},
    }
    files = {}
    reference = None
    if calibration_path is not None and any(needs_calibration(s) for p in picks if p.best for s in p.best.config.layers):
        reference = os.path.relpath(Path(calibration_path).resolve(), out_dir.resolve())
    for pick in picks:
        if pick.best is None:
            continue
        p = pick.best
        if settings.context is None:
            name, budget = f"kvtuner-{pick.budget:g}bits", {"budget_avg_bits": pick.budget}
        else:
            name = f"kvtuner-{pick.budget:g}xfp16-at-{settings.context}"
            budget = {"budget_kv_fraction": pick.budget, "context": settings.context, "kv_bytes_fp16": fp16_total}
        config = KVConfig(p.config.layers, model=model_fp, name=name, calibration=reference, meta={
            **provenance, **budget, "avg_bits": p.avg_bits, "kv_bytes": p.kv_bytes,
            "source": p.name, "objective": settings.objective, "loss_calibration": p.loss,
            "kl_heldout": p.heldout, "kl_heldout_reference": p.heldout_reference, "predicted_kl": p.predicted,
        })
        pick.path = str(config.save(budget_file(out_dir, pick.budget)))
        files[f"config_{float(pick.budget)}"] = pick.path
    length = "calibration length" if settings.context is None else f"at {settings.context} tokens"
    files["front_png"] = str(front_figure(points, front, uniform, picks, size, out_dir / "front.png", length))
    files["search_json"] = str(out_dir / "search.json")
    all_trials = study.get_trials(deepcopy=False)
    result = SearchResult(
        space=space, sizes=sizes, points=points, front=front, uniform=uniform, budgets=picks,
        correlation=_correlation(points), timings=timings,
        cost={"context": settings.context, "tokens": tokens if settings.context is None else settings.context,
              "kv_bytes_fp16": fp16_total, "budgets": "avg_bits" if settings.context is None else "kv_fraction"},
        study={"name": settings.study_name, "storage": storage, "trials": len(all_trials), "seeded": coordinator.queued_seeds,
               "complete": sum(t.state == optuna.trial.TrialState.COMPLETE for t in all_trials),
               "feasible": sum(t.state == optuna.trial.TrialState.COMPLETE and is_feasible(t) for t in all_trials),
               "measured": len(points), "sampler": settings.sampler, "meta": provenance},
        files=files,
    )
    write_atomic(out_dir / "search.json", json.dumps(result.to_dict(), indent=1) + "\n")
    return result
