"""Per-layer sensitivity: the loss when only one layer's KV is quantized, for every candidate.

``loss[l, c]`` is the decode-faithful mean KL per token (against full precision, on the
calibration tokens) when layer ``l`` alone stores its KV with candidate ``c``: the numbers the
pruning, the clustering and the additive model of :mod:`kvtuner.search` are built on. It is the
same number ``Evaluator.evaluate`` gives for that single-layer config, but each run starts from
the captured input of layer ``l`` and replays only layers ``l..L-1`` in one pass (see
:mod:`kvtuner.profile.blockwise`), about half the work of a full forward and a fraction of a
chunked one.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from kvtuner.cache import fingerprint
from kvtuner.config import SPEC_FIELDS, KVConfig, KVConfigError, LayerSpec, write_atomic
from kvtuner.cache.compat import rope_inv_freq
from kvtuner.method import Calibration, method_for
from kvtuner.profile.blockwise import BlockwiseEvaluator, decode_faithful_attention
from kvtuner.profile.candidates import DEFAULT_PAIRS, candidate_specs
from kvtuner.profile.stats import layer_statistics, output_error

PROFILE_VERSION = 1


@dataclass
class ProfileSettings:
    """What to profile. ``split_bits``: also measure K-only and V-only loss at that width (None: skip)."""

    pairs: tuple[str, ...] = DEFAULT_PAIRS
    methods: tuple[str, ...] = ("kivi",)
    group_size: int = 32
    residual_length: int = 32
    split_bits: int | None = 2

    def candidates(self) -> list[LayerSpec]:
        return candidate_specs(self.pairs, self.methods, self.group_size, self.residual_length)

    def split_specs(self) -> tuple[LayerSpec, LayerSpec] | None:
        """KIVI specs quantizing keys only and values only (per-channel keys, per-token values)."""
        if self.split_bits is None:
            return None
        b = self.split_bits
        return (
            LayerSpec("kivi", b, 16, self.group_size, self.residual_length),
            LayerSpec("kivi", 16, b, self.group_size, self.residual_length),
        )


@dataclass
class Profile:
    """Measured per-layer sensitivities. Arrays are ``[layers, candidates]`` unless noted."""

    candidates: list[LayerSpec]
    loss: np.ndarray  # mean KL per token with only that layer quantized
    output_error: np.ndarray  # KVTuner's e_o (relative attention-output error)
    layer_stats: list[dict[str, float]]
    tokens: int
    seconds: float
    split_bits: int | None = None
    k_only: np.ndarray | None = None  # [layers]: keys alone at split_bits
    v_only: np.ndarray | None = None  # [layers]: values alone at split_bits
    effective_bits: np.ndarray | None = None  # real stored bits per element on the calibration tokens
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return self.loss.shape[0]

    @property
    def labels(self) -> list[str]:
        return [spec.label for spec in self.candidates]

    def spearman(self) -> tuple[np.ndarray, float]:
        """Rank correlation of e_o with KL: per layer (over candidates) and over all (layer, candidate) cells."""
        per_layer = np.array([_spearman(e, k) for e, k in zip(self.output_error, self.loss)])
        return per_layer, _spearman(self.output_error.ravel(), self.loss.ravel())

    # --- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        per_layer, overall = self.spearman()
        return {
            "version": PROFILE_VERSION,
            "candidates": [asdict(spec) | {"label": spec.label} for spec in self.candidates],
            "loss": self.loss.tolist(),
            "output_error": self.output_error.tolist(),
            "layer_stats": self.layer_stats,
            "spearman_per_layer": [None if np.isnan(r) else r for r in per_layer.tolist()],
            "spearman_overall": None if np.isnan(overall) else overall,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "split_bits": self.split_bits,
            "k_only": None if self.k_only is None else self.k_only.tolist(),
            "v_only": None if self.v_only is None else self.v_only.tolist(),
            "effective_bits": None if self.effective_bits is None else self.effective_bits.tolist(),
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "profile") -> "Profile":
        if data.get("version") != PROFILE_VERSION:
            raise KVConfigError(f"{source}: not a version-{PROFILE_VERSION} kvtuner profile")
        split = {name: None if data.get(name) is None else np.array(data[name])
                 for name in ("k_only", "v_only", "effective_bits")}
        return cls(
            candidates=[LayerSpec(**{k: c[k] for k in SPEC_FIELDS if k in c}) for c in data["candidates"]],
            loss=np.array(data["loss"]),
            output_error=np.array(data["output_error"]),
            layer_stats=data["layer_stats"],
            tokens=data["tokens"],
            seconds=data["seconds"],
            split_bits=data["split_bits"],
            meta=data.get("meta") or {},
            **split,
        )

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        write_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()), str(path))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise KVConfigError(f"{path}: cannot read profile ({e})") from None


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


@dataclass(frozen=True)
class Unit:
    """One independent piece of a profile: a candidate alone at a layer, or a layer's own numbers.

    kind "candidate": ``loss``, ``output_error`` and ``effective_bits`` of candidate ``candidate``
    at ``layer``; kind "layer": its attention statistics and, with ``split_bits``, the K-only and
    V-only losses. Units share nothing but the captured inputs, so any process holding a
    ``BlockwiseEvaluator(capture=True)`` on the same tokens can measure any of them, in any order.
    """

    kind: str
    layer: int
    candidate: int = -1

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.layer}:{self.candidate}"

    @classmethod
    def from_key(cls, key: str) -> "Unit":
        kind, layer, candidate = key.split(":")
        return cls(kind, int(layer), int(candidate))


def profile_units(settings: ProfileSettings, num_layers: int) -> list[Unit]:
    """Every unit of a profile, layer by layer."""
    candidates = settings.candidates()
    return [unit for layer in range(num_layers)
            for unit in (Unit("layer", layer), *(Unit("candidate", layer, c) for c in range(len(candidates))))]


def check_profile(model: PreTrainedModel, settings: ProfileSettings, calibration: Calibration | None) -> None:
    """Refuse candidates the model cannot take (group size, missing calibration, RoPE) before any work."""
    model_fp = fingerprint(model.config)
    for spec in settings.candidates() + list(settings.split_specs() or ()):
        KVConfig([spec] * model_fp.num_layers).check_model(model_fp)
        for layer in range(model_fp.num_layers):
            method_for(spec, layer, calibration, lambda i: rope_inv_freq(model.config, i))


def measure_unit(evaluator: BlockwiseEvaluator, settings: ProfileSettings, unit: Unit) -> dict[str, Any]:
    """The numbers of one unit (see :class:`Unit`); ``evaluator`` must capture."""
    cap = evaluator.captured[unit.layer]
    window = cap.sliding_window
    if unit.kind == "layer":
        out: dict[str, Any] = {"stats": layer_statistics(cap.query, cap.key, cap.value, cap.scaling, window)}
        split = settings.split_specs()
        if split:
            out["k_only"] = evaluator.kl_single(unit.layer, split[0])
            out["v_only"] = evaluator.kl_single(unit.layer, split[1])
        return out
    spec = settings.candidates()[unit.candidate]
    method = evaluator.method(unit.layer, spec)
    reference = decode_faithful_attention(cap.query, cap.key, cap.value, None, cap.scaling, window)
    return {"loss": evaluator.kl_single(unit.layer, spec),
            "output_error": output_error(cap.query, cap.key, cap.value, method, cap.scaling, reference, window),
            "effective_bits": method.effective_bits(cap.key, cap.value)}


def assemble_profile(settings: ProfileSettings, num_layers: int, tokens: int, results: dict[Unit, dict[str, Any]],
                     seconds: float) -> Profile:
    """The profile from the results of all its units (wherever they were measured)."""
    candidates = settings.candidates()
    shape = (num_layers, len(candidates))
    loss, errors, effective = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    for unit, r in results.items():
        if unit.kind == "candidate":
            loss[unit.layer, unit.candidate] = r["loss"]
            errors[unit.layer, unit.candidate] = r["output_error"]
            effective[unit.layer, unit.candidate] = r["effective_bits"]
    layers = [results[Unit("layer", layer)] for layer in range(num_layers)]
    split = settings.split_specs() is not None
    return Profile(
        candidates=candidates,
        loss=loss,
        output_error=errors,
        layer_stats=[r["stats"] for r in layers],
        tokens=tokens,
        seconds=seconds,
        split_bits=settings.split_bits if split else None,
        k_only=np.array([r["k_only"] for r in layers]) if split else None,
        v_only=np.array([r["v_only"] for r in layers]) if split else None,
        effective_bits=effective,
    )


def profile_layers(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    settings: ProfileSettings | None = None,
    progress: bool = False,
    calibration: Calibration | None = None,
) -> Profile:
    """Measure ``loss`` and ``output_error`` for every layer and candidate, plus attention statistics,
    in this process (``kvtuner.search.units`` shares the same units out over a study's workers).

    ``input_ids`` ``[B, T]``: calibration tokens (no padding). ``calibration``: levels and
    thresholds for candidates with codebooks or outliers.
    """
    settings = settings or ProfileSettings()
    check_profile(model, settings, calibration)
    t0 = time.perf_counter()
    evaluator = BlockwiseEvaluator(model, input_ids, capture=True, calibration=calibration)
    units = profile_units(settings, evaluator.num_layers)
    results = {}
    for unit in tqdm(units, desc="profile", unit="run", disable=not progress):
        results[unit] = measure_unit(evaluator, settings, unit)
    return assemble_profile(settings, evaluator.num_layers, evaluator.tokens, results, time.perf_counter() - t0)
