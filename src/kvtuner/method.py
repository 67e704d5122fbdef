"""A layer's KV storage method: the one object the cache, the profiler and the kernels' dispatch consult.

A :class:`~kvtuner.config.LayerSpec` names a method and its options; :class:`KVMethod` is what
they mean for storage. Every place that stores, reads back or costs a layer's KV goes through it:
:class:`~kvtuner.cache.MixedPrecisionLayer` flushes windows with :meth:`KVMethod.quantize` and
reads them with :meth:`KVMethod.dequantize`; the one-pass profiler
(:mod:`kvtuner.profile.blockwise`) quantizes a whole calibration sequence with
:meth:`KVMethod.roundtrip`, which is the same code on the same windows; the packed decode
kernel is used only where :meth:`KVMethod.packed_decode_supported` says so. Adding a method or
an option touches this module and ``LayerSpec``'s validation (and, for fitted tables,
:mod:`kvtuner.profile.calibrate`, which asks this module how a side is normalized).

What a method stores for a flushed block of tokens (:class:`StoredKV`):

* keys and values as grouped codes (:class:`~kvtuner.quant.QuantizedTensor`): ``kivi`` keys per
  channel (groups of ``group_size`` tokens) and values per token; ``per_token`` both per token
  (llama.cpp's layout); ``fp8`` e4m3 with a scale per group; ``kvquant`` keys as bare codes over
  a calibrated per-channel range (no scales or zeros stored: the range is the calibration's, the
  few values beyond it clamped, or kept as outliers) and values per token over the whole head;
* with ``codebook``: the codes index calibrated non-uniform levels inside each group
  (:mod:`kvtuner.quant.codebook`) instead of the uniform grid; where the packed decode kernel
  reads the layer, its tables are used on the kernel's level grid
  (:func:`~kvtuner.quant.codebook.snap_levels`) on every path, so all paths read the same levels;
* with ``outliers`` > 0: elements outside calibrated per-channel (keys) or per-head (values)
  thresholds, kept exactly in fp16 (:mod:`kvtuner.quant.outliers`); each group's range is then
  its inliers' range (the outliers' own codes are never read);
* with ``pre_rope``: keys are un-rotated to their pre-RoPE coordinates before quantization and
  rotated back on read (:mod:`kvtuner.quant.rope`);
* with ``sink`` = N: the first N tokens of the sequence in full precision; inside their block
  they are replaced by the block's first other token before quantizing, so they never widen a
  key group's range.

What stays full precision beyond that (the residual window of recent tokens) is the cache
layer's business; the method says how long it is (:attr:`KVMethod.window`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from kvtuner.config import KVConfigError, LayerSpec, ModelFingerprint, write_atomic
from kvtuner.quant import (QuantizedTensor, QuantSpec, cat_tokens, group_view, pack, slice_tokens, token_group,
                           unpack, write_tokens)
from kvtuner.quant import quantize as quantize_reference
from kvtuner.quant.codebook import nearest_level, snap_levels, uniform_levels
from kvtuner.quant.outliers import INDEX_LIMIT, SparseOutliers, cat_blocks, extract
from kvtuner.quant.rope import rotate

Side = str  # "k" or "v"
CALIBRATION_VERSION = 1


def quant_specs(spec: LayerSpec) -> tuple[QuantSpec, QuantSpec]:
    """The tensor-level specs for keys and values of a layer spec."""
    if spec.method == "kivi":
        return QuantSpec(spec.k_bits, spec.group_size, "channel"), QuantSpec(spec.v_bits, spec.group_size, "token")
    if spec.method == "per_token":
        return QuantSpec(spec.k_bits, spec.group_size, "token"), QuantSpec(spec.v_bits, spec.group_size, "token")
    if spec.method == "kvquant":  # keys: one calibrated range per channel; values: one group per token and head
        return QuantSpec(spec.k_bits, -1, "channel"), QuantSpec(spec.v_bits, -1, "token")
    if spec.method == "fp8":
        fp8 = {16: None, 8: "e4m3"}
        k = QuantSpec(spec.k_bits, spec.group_size, "token", fp8=fp8[spec.k_bits])
        v = QuantSpec(spec.v_bits, spec.group_size, "token", fp8=fp8[spec.v_bits])
        return k, v
    raise ValueError(f"layer spec {spec} is not quantized")


# --- calibration ---------------------------------------------------------------------------------
def levels_key(spec: LayerSpec, side: Side) -> str:
    """Which fitted levels a side of ``spec`` needs: they depend on the layout, bits, pre-RoPE keys and outliers."""
    bits = spec.k_bits if side == "k" else spec.v_bits
    domain = "pre" if side == "k" and spec.pre_rope else "post"
    return f"{side}:{spec.method}:g{spec.group_size}:b{bits}:{domain}:o{spec.outliers:g}"


def thresholds_key(spec: LayerSpec, side: Side) -> str:
    """Which outlier thresholds a side of ``spec`` needs."""
    domain = "pre" if side == "k" and spec.pre_rope else "post"
    return f"{side}:{domain}:o{spec.outliers:g}"


def needs_calibration(spec: LayerSpec) -> bool:
    return spec.is_quantized and (spec.codebook or spec.outliers > 0 or spec.method == "kvquant")


def calibrated_range(spec: LayerSpec, side: Side) -> bool:
    """Whether a side is normalized by a calibrated range instead of per-group statistics (kvquant keys)."""
    return spec.method == "kvquant" and side == "k"


@dataclass
class SideCalibration:
    """Fitted data one side of one layer uses: NUQ levels and/or outlier thresholds.

    levels: fp16 levels in the normalized domain ``[0, qmax]``: ``[2**bits]``, or ``[H, D, 2**bits]``
    (one table per channel) for a side normalized by a calibrated range.
    lo / hi: thresholds broadcastable to ``[B, H, T, D]`` (keys ``[1, H, 1, D]``, values ``[1, H, 1, 1]``):
    the dense-and-sparse cut, and for ``kvquant`` keys also the normalization range.
    """

    levels: torch.Tensor | None = None
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None


@dataclass
class Calibration:
    """Per-layer NUQ levels and outlier thresholds (kvquant: key ranges) for one model, as ``kvtuner calibrate``
    writes them.

    levels[key][layer]: ``[2**bits]`` (``[H, D, 2**bits]`` for kvquant keys); thresholds[key][layer]:
    ``(lo, hi)``, ``[H, D]`` each for keys, ``[H]`` for values. Keys come from :func:`levels_key` /
    :func:`thresholds_key`.
    """

    model: ModelFingerprint
    levels: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    thresholds: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def side(self, layer: int, spec: LayerSpec, side: Side, source: str = "calibration") -> SideCalibration:
        """What ``side`` of ``layer`` needs for ``spec``; a clear ``KVConfigError`` when it was not fitted."""
        bits = spec.k_bits if side == "k" else spec.v_bits
        if bits == 16:
            return SideCalibration()
        result = SideCalibration()
        shape = (self.model.num_kv_heads, self.model.head_dim) if side == "k" else (self.model.num_kv_heads,)
        if spec.outliers > 0 or calibrated_range(spec, side):
            key = thresholds_key(spec, side)
            if key not in self.thresholds:
                raise KVConfigError(f"{source} has no outlier thresholds {key!r} (layer {layer}, {spec.label}); "
                                    f"re-run kvtuner calibrate with --pairs {spec.label}")
            lo, hi = self.thresholds[key][layer]
            if lo.shape != shape or hi.shape != shape:
                raise KVConfigError(f"{source}: thresholds {key!r} of layer {layer} are {tuple(lo.shape)}, not {shape}")
            view = (1, -1, 1, lo.shape[-1]) if side == "k" else (1, -1, 1, 1)
            result.lo, result.hi = lo.reshape(view), hi.reshape(view)
        if spec.codebook:
            key = levels_key(spec, side)
            if key not in self.levels:
                raise KVConfigError(f"{source} has no codebook {key!r} (layer {layer}, {spec.label}); "
                                    f"re-run kvtuner calibrate with --pairs {spec.label}")
            levels = self.levels[key][layer]
            want = (*shape, 2**bits) if calibrated_range(spec, side) else (2**bits,)
            if tuple(levels.shape) != want:
                raise KVConfigError(f"{source}: codebook {key!r} of layer {layer} is {tuple(levels.shape)}, not {want}")
            result.levels = levels
        return result

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": CALIBRATION_VERSION,
            "model": vars(self.model),
            "levels": {k: [t.tolist() for t in v] for k, v in self.levels.items()},
            "thresholds": {k: [{"lo": lo.tolist(), "hi": hi.tolist()} for lo, hi in v] for k, v in self.thresholds.items()},
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "calibration") -> "Calibration":
        if not isinstance(data, dict) or data.get("version") != CALIBRATION_VERSION:
            raise KVConfigError(f"{source}: not a version-{CALIBRATION_VERSION} kvtuner calibration file")
        try:
            model = ModelFingerprint(**data["model"])
            levels = {k: [torch.tensor(t, dtype=torch.float16) for t in v] for k, v in data["levels"].items()}
            thresholds = {k: [(torch.tensor(e["lo"], dtype=torch.float32), torch.tensor(e["hi"], dtype=torch.float32))
                              for e in v] for k, v in data["thresholds"].items()}
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise KVConfigError(f"{source}: malformed calibration file ({e})") from None
        for key, per_layer in [*levels.items(), *thresholds.items()]:
            if len(per_layer) != model.num_layers:
                raise KVConfigError(f"{source}: entry {key!r} has {len(per_layer)} layers, the model {model.num_layers}")
        return cls(model, levels, thresholds, data.get("meta") or {})

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        write_atomic(path, json.dumps(self.to_dict()) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Calibration":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise KVConfigError(f"{path}: no such calibration file (make one with kvtuner calibrate)") from None
        except (OSError, json.JSONDecodeError) as e:
            raise KVConfigError(f"{path}: cannot read calibration file ({e})") from None
        return cls.from_dict(data, str(path))

    def check_model(self, fingerprint: ModelFingerprint, source: str = "calibration") -> None:
        if self.model != fingerprint:
            raise KVConfigError(f"{source} was fitted for {self.model} but the model is {fingerprint}")


# --- stored data ---------------------------------------------------------------------------------
@dataclass
class StoredSide:
    """One side (keys or values) of a stored block or history."""

    codes: QuantizedTensor
    outliers: SparseOutliers | None = None

    def stored_tensors(self) -> list[torch.Tensor]:
        return self.codes.stored_tensors() + (self.outliers.stored_tensors() if self.outliers else [])

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "StoredSide":
        return StoredSide(self.codes.map(fn), self.outliers.map(fn) if self.outliers else None)

    @property
    def token_unit(self) -> int:
        """Tokens stored together: a key group (per-channel scales), an outlier block, else one token."""
        return math.lcm(token_group(self.codes), self.outliers.block if self.outliers else 1)

    def drop_front(self, tokens: int) -> "StoredSide":
        outliers = self.outliers.drop_front(tokens // self.outliers.block) if self.outliers else None
        return StoredSide(slice_tokens(self.codes, tokens, self.codes.num_tokens), outliers)


@dataclass
class StoredKV:
    """What a layer keeps of its quantized tokens: both sides, plus the full-precision sink tokens."""

    keys: StoredSide
    values: StoredSide
    sink_keys: torch.Tensor | None = None  # [B, H, N, D] as the model produced them
    sink_values: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.keys.codes.num_tokens

    def stored_tensors(self) -> list[torch.Tensor]:
        sink = [t for t in (self.sink_keys, self.sink_values) if t is not None]
        return self.keys.stored_tensors() + self.values.stored_tensors() + sink

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.stored_tensors())

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "StoredKV":
        sink = [fn(t) if t is not None else None for t in (self.sink_keys, self.sink_values)]
        return StoredKV(self.keys.map(fn), self.values.map(fn), *sink)

    @property
    def token_unit(self) -> int:
        """The granularity at which the front of this history can be dropped (:meth:`drop_front`): whole key
        groups and outlier blocks, so that what is kept reads back exactly as it was stored."""
        return math.lcm(self.keys.token_unit, self.values.token_unit)

    def drop_front(self, tokens: int) -> "StoredKV":
        """This history without its first ``tokens`` tokens (a multiple of :attr:`token_unit`), sharing storage:
        what a sliding-window layer does with the groups its window has left behind."""
        if tokens % self.token_unit:
            raise ValueError(f"dropping {tokens} tokens cuts a stored group of {self.token_unit}")
        sink = [None if t is None or t.shape[-2] <= tokens else t[..., tokens:, :]
                for t in (self.sink_keys, self.sink_values)]
        return StoredKV(self.keys.drop_front(tokens), self.values.drop_front(tokens), *sink)

    def append(self, block: "StoredKV", buffers: "tuple[QuantizedTensor, QuantizedTensor] | None" = None,
               at: int = 0) -> "StoredKV":
        """This history followed by ``block`` (sink tokens only ever come in the first blocks).

        buffers: key and value code buffers (:func:`~kvtuner.quant.reserve_tokens`) that hold this history's
        codes from token ``at`` on and have room for ``block`` after them: its codes are written in place and
        the result views the buffers; without them the codes are concatenated (a copy of the whole history)."""
        n = self.num_tokens
        sides = []
        for i, (mine, theirs) in enumerate(((self.keys, block.keys), (self.values, block.values))):
            outliers = None if mine.outliers is None else cat_blocks([mine.outliers, theirs.outliers])
            if buffers is None:
                codes = cat_tokens([mine.codes, theirs.codes])
            else:
                write_tokens(buffers[i], at + n, theirs.codes)
                codes = slice_tokens(buffers[i], at, at + n + block.num_tokens)
            sides.append(StoredSide(codes, outliers))
        sink = [_cat_optional(a, b) for a, b in ((self.sink_keys, block.sink_keys), (self.sink_values, block.sink_values))]
        return StoredKV(*sides, *sink)


def _cat_optional(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None or b is None:
        return a if b is None else b
    return torch.cat([a, b], dim=-2)


# --- the method ------------------------------------------------------------------------------------
class KVMethod:
    """What one layer's spec means for storage; see the module docstring.

    key_calibration / value_calibration: fitted levels and thresholds (required when the spec
    uses ``codebook`` or ``outliers``, and kvquant's key range). inv_freq: the model's RoPE
    frequencies ``[D/2]`` (required with ``pre_rope``).
    """

    def __init__(
        self,
        spec: LayerSpec,
        key_calibration: SideCalibration | None = None,
        value_calibration: SideCalibration | None = None,
        inv_freq: torch.Tensor | None = None,
    ):
        if spec.method == "fp16":
            # A 16/16 spec of a quantizing method is accepted: it keeps its tokens as they are through the same
            # windows, which the cache never builds (transformers' layers do that cheaper) but the tests use to
            # check a layer's bookkeeping bit for bit against transformers' own layers.
            raise ValueError("KVMethod needs a quantizing method; fp16 layers are stored as they are")
        self.spec = spec
        self.key_spec, self.value_spec = quant_specs(spec)
        self.key_calibration = replace(key_calibration) if key_calibration else SideCalibration()
        self.value_calibration = replace(value_calibration) if value_calibration else SideCalibration()
        for side, cal, bits in (("key", self.key_calibration, spec.k_bits), ("value", self.value_calibration, spec.v_bits)):
            if bits == 16:
                continue
            if spec.codebook and cal.levels is None:
                raise KVConfigError(f"{spec.label}: {side} codebook levels are missing (needs a calibration file)")
            if (spec.outliers > 0 or calibrated_range(spec, side[0])) and cal.lo is None:
                what = "range" if calibrated_range(spec, side[0]) and not spec.outliers else "outlier thresholds"
                raise KVConfigError(f"{spec.label}: {side} {what} missing (needs a calibration file)")
        if spec.pre_rope and spec.k_bits < 16 and inv_freq is None:
            raise KVConfigError(f"{spec.label}: pre-RoPE keys need the model's rotary frequencies")
        self.inv_freq = inv_freq if spec.pre_rope else None
        if self.packed_decode_supported():  # the kernel reads these codes: their tables on its grid, on every path
            for cal, bits in ((self.key_calibration, spec.k_bits), (self.value_calibration, spec.v_bits)):
                if cal.levels is not None:
                    cal.levels = snap_levels(cal.levels, bits)

    def __repr__(self) -> str:
        return f"KVMethod({self.spec.label})"

    @property
    def window(self) -> int:
        """Tokens quantized together when the residual fills."""
        return self.spec.window

    @property
    def sink(self) -> int:
        return self.spec.sink

    def packed_decode_supported(self) -> bool:
        """Whether the packed decode kernel can read this storage as it is: grouped integer codes, uniform
        or indexing one level table a side, and sink tokens (attended beside the residual). Outliers,
        pre-RoPE keys and kvquant's per-channel ranges stay on the torch path: the first would need a
        scatter per step, the second a rotation per token, the third a table per channel."""
        s = self.spec
        return s.method != "kvquant" and not (s.outliers > 0 or (s.pre_rope and s.k_bits < 16))

    def table_bytes(self) -> int:
        """Bytes of the per-layer calibration tables the stored codes need (levels, ranges, thresholds):
        stored once per layer, whatever the batch and length."""
        tables = [t for c in (self.key_calibration, self.value_calibration) for t in (c.levels, c.lo, c.hi)
                  if t is not None]
        return sum(t.numel() * t.element_size() for t in tables)

    # --- store and read ---------------------------------------------------------------------------
    def quantize(self, keys: torch.Tensor, values: torch.Tensor, start: int, positions: torch.Tensor,
                 backend: str = "auto") -> StoredKV:
        """Store tokens ``start .. start + n - 1`` (whole windows): keys / values ``[B, H, n, D]``
        as the model produced them (post-RoPE); ``positions`` ``[B or 1, n]`` their RoPE positions."""
        n = keys.shape[-2]
        in_sink = min(max(self.sink - start, 0), n)
        sink_keys = keys[..., :in_sink, :].clone() if in_sink else None
        sink_values = values[..., :in_sink, :].clone() if in_sink else None
        if self.inv_freq is not None:
            keys = rotate(keys, positions, self.inv_freq, inverse=True)
        keys, values = _without_sink(keys, in_sink), _without_sink(values, in_sink)
        return StoredKV(
            self._quantize_side("k", keys, backend),
            self._quantize_side("v", values, backend),
            sink_keys, sink_values,
        )

    def dequantize(self, stored: StoredKV, start: int, positions: torch.Tensor,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, H, n, D]`` of a stored segment that begins at token ``start``."""
        keys = self._dequantize_side("k", stored.keys, dtype)
        values = self._dequantize_side("v", stored.values, dtype)
        if self.inv_freq is not None:
            keys = rotate(keys, positions, self.inv_freq)
        if stored.sink_keys is not None and start < self.sink:
            count = min(self.sink, start + keys.shape[-2]) - start  # the sink tensors begin at token ``start``
            keys, values = keys.clone(), values.clone()
            keys[..., :count, :] = stored.sink_keys[..., :count, :].to(dtype)
            values[..., :count, :] = stored.sink_values[..., :count, :].to(dtype)
        return keys, values

    def roundtrip(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor | None = None,
                  backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """The whole windows of a sequence from token 0 as the cache's history holds them, read back.

        Tokens of a partial last window are never flushed, so they are left out.
        """
        n = self.window * (keys.shape[-2] // self.window)
        if n == 0:
            return keys[..., :0, :], values[..., :0, :]
        if positions is None:
            positions = torch.arange(n, device=keys.device)[None]
        positions = positions[..., :n]
        stored = self.quantize(keys[..., :n, :], values[..., :n, :], 0, positions, backend)
        return self.dequantize(stored, 0, positions, keys.dtype)

    def group_domain(self, side: Side, x: torch.Tensor,
                     positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(y, step, outliers)`` for one side ``[B, H, T, D]`` from token 0 (whole windows): each element
        normalized into its group's ``[0, qmax]`` exactly as :meth:`quantize` does it (pre-RoPE rotation,
        sink, outliers taken out, grouping), the stored step (scale) it is multiplied by on read, and the
        mask of the elements stored exactly as outliers (or None). Calibration fits codebook levels on
        ``y`` (an error ``e`` in ``y`` is an error ``e * step`` in ``x``)."""
        spec = self.key_spec if side == "k" else self.value_spec
        if side == "k" and self.inv_freq is not None:
            x = rotate(x, positions, self.inv_freq, inverse=True)
        x, outliers = self._dense_part(side, _without_sink(x, min(self.sink, x.shape[-2])))
        if calibrated_range(self.spec, side):
            lo, step = self._range(side, x)
            return (x.float() - lo) / step, step.expand_as(x), outliers
        q = quantize_reference(x, spec)
        red = -1 if spec.axis == "token" else -2
        g = spec.group_len(x.shape)

        def per_element(t: torch.Tensor) -> torch.Tensor:
            return t.float().repeat_interleave(g, dim=red)

        step = per_element(q.scale)
        safe = torch.where(step == 0, torch.ones_like(step), step)
        return (x.float() - per_element(q.zero)) / safe, step, outliers

    def effective_bits(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor | None = None) -> float:
        """Bits per element this method really stores for ``keys`` / ``values`` ``[B, H, T, D]`` (their whole
        windows): ``16 * bytes / fp16 bytes``, codes, scales, zeros, outliers, sink and level tables included."""
        n = self.window * (keys.shape[-2] // self.window)
        if n == 0:
            raise ValueError(f"{keys.shape[-2]} tokens hold no whole window of {self.window}")
        if positions is None:
            positions = torch.arange(n, device=keys.device)[None]
        stored = self.quantize(keys[..., :n, :], values[..., :n, :], 0, positions[..., :n])
        sink_fp16 = sum(t.numel() * (2 - t.element_size()) for t in (stored.sink_keys, stored.sink_values)
                        if t is not None)  # the sink counts as the fp16 it would be stored as
        fp16 = 2 * 2 * keys[..., :n, :].numel()
        return 16 * (stored.nbytes() + sink_fp16 + self.table_bytes()) / fp16

    def _range(self, side: Side, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(offset, step) of a side normalized by its calibrated range: ``y = (x - offset) / step`` in ``[0, qmax]``."""
        cal = self.key_calibration if side == "k" else self.value_calibration
        qmax = 2 ** (self.key_spec if side == "k" else self.value_spec).bits - 1
        lo, hi = cal.lo.to(x.device, torch.float32), cal.hi.to(x.device, torch.float32)
        return lo, ((hi - lo) / qmax).clamp_min(torch.finfo(torch.float32).tiny)

    def _dense_part(self, side: Side, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(what the codes quantize, the outlier mask or None). Outliers are replaced by their group's inlier
        mean, so each group's min/max is its inliers'; a calibrated range simply clamps them."""
        cal = self.key_calibration if side == "k" else self.value_calibration
        if cal.lo is None:
            return x, None
        lo, hi = cal.lo.to(x.device, x.dtype), cal.hi.to(x.device, x.dtype)
        clamped = torch.clamp(x, lo, hi)
        if self.spec.outliers == 0:  # a calibrated range without outliers: the rare values beyond it are clamped
            return clamped, None
        mask = (x < lo) | (x > hi)  # not clamped != x: NaN must reach the quantizer, which refuses it
        if calibrated_range(self.spec, side):
            return clamped, mask
        return _inlier_fill(x, mask, self.key_spec if side == "k" else self.value_spec), mask

    def _quantize_side(self, side: Side, x: torch.Tensor, backend: str) -> StoredSide:
        from kvtuner.kernels import quantize  # the Triton quantizer where it applies

        spec, cal = (self.key_spec, self.key_calibration) if side == "k" else (self.value_spec, self.value_calibration)
        if spec.is_passthrough:
            return StoredSide(quantize_reference(x, spec))
        dense, mask = self._dense_part(side, x)
        outliers = None if mask is None else extract(x, mask, outlier_block(x.shape[-2], x.shape[-1], self.window))
        x = dense
        if calibrated_range(self.spec, side):  # bare codes: the range is the calibration's
            lo, step = self._range(side, x)
            qmax = 2**spec.bits - 1
            y = ((x.float() - lo) / step).clamp(0, qmax)
            levels = cal.levels if cal.levels is not None else uniform_levels(spec.bits).to(torch.float16)
            codes = _nearest_per_channel(y, levels)
            return StoredSide(QuantizedTensor(pack(codes, spec.bits), None, None, spec, x.shape, levels), outliers)
        if cal.levels is not None:
            return StoredSide(quantize_reference(x, spec, levels=cal.levels), outliers)
        return StoredSide(quantize(x, spec, backend), outliers)

    def _dequantize_side(self, side: Side, stored: StoredSide, dtype: torch.dtype) -> torch.Tensor:
        if calibrated_range(self.spec, side):
            codes = unpack(stored.codes.payload, stored.codes.spec.bits, stored.codes.shape[-1]).long()
            y = _gather_per_channel(codes, stored.codes.levels)
            lo, step = self._range(side, y)
            x = lo + y * step
        else:
            x = stored.codes.dequantize(dtype if stored.outliers is None else torch.float32)
        if stored.outliers is not None:
            x = stored.outliers.scatter_into(x)
        return x.to(dtype)


def outlier_block(tokens: int, head_dim: int, window: int) -> int:
    """Tokens per outlier block: the window, halved until int16 in-block indices fit."""
    block = window
    while block * head_dim >= INDEX_LIMIT and block % 2 == 0:
        block //= 2
    if tokens % block or block * head_dim >= INDEX_LIMIT:
        raise KVConfigError(f"cannot index outliers of {tokens} tokens x {head_dim} channels in int16 blocks")
    return block


def _without_sink(x: torch.Tensor, count: int) -> torch.Tensor:
    """``x`` [B, H, n, D] with its first ``count`` tokens (sink tokens, kept in full precision elsewhere) replaced
    by the next token, so that they never widen a group's range; a block made only of sink tokens is left as is."""
    if not 0 < count < x.shape[-2]:
        return x
    x = x.clone()
    x[..., :count, :] = x[..., count : count + 1, :]
    return x


def _inlier_fill(x: torch.Tensor, mask: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``x`` with the ``mask``ed elements replaced by the mean of their quantization group's other elements."""
    view, dim = group_view(x, spec)
    outlier = mask.reshape(view.shape)
    inlier = (~outlier).to(x.dtype)
    mean = (view * inlier).sum(dim, keepdim=True) / inlier.sum(dim, keepdim=True).clamp_min(1)
    return torch.where(outlier, mean, view).reshape(x.shape)


def channel_rows(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, D]`` -> ``[H, D, B * T]``: one row per (head, channel), the layout of per-channel tables."""
    return x.permute(1, 3, 0, 2).flatten(2)


def _from_channel_rows(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`channel_rows` for a tensor of ``shape`` ``[B, H, T, D]``."""
    b, h, t, d = shape
    return rows.reshape(h, d, b, t).permute(2, 0, 3, 1)


def _nearest_per_channel(y: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Codes of ``y`` ``[B, H, T, D]`` against one level table per (head, channel) ``[H, D, K]`` (or one ``[K]``)."""
    if levels.dim() == 1:
        return nearest_level(y, levels)
    return _from_channel_rows(nearest_level(channel_rows(y), levels), y.shape)


def _gather_per_channel(codes: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The levels ``codes`` ``[B, H, T, D]`` index, per (head, channel) when ``levels`` is ``[H, D, K]``."""
    levels = levels.to(codes.device, torch.float32)
    if levels.dim() == 1:
        return levels[codes]
    return _from_channel_rows(levels.gather(-1, channel_rows(codes)), codes.shape)


def method_for(
    spec: LayerSpec,
    layer: int,
    calibration: Calibration | None = None,
    inv_freq: Callable[[int], torch.Tensor] | None = None,
    source: str = "calibration",
) -> KVMethod | None:
    """The :class:`KVMethod` of ``spec`` at ``layer`` (None for fp16).

    inv_freq: layer index -> the model's RoPE frequencies (called only for pre-RoPE keys).
    """
    if not spec.is_quantized:
        return None
    cals = (None, None)
    if needs_calibration(spec):
        if calibration is None:
            raise KVConfigError(f"layer {layer} ({spec.label}) needs a calibration file (kvtuner calibrate writes "
                                "one): a config names it as 'calibration', the CLI takes --calibration")
        cals = (calibration.side(layer, spec, "k", source), calibration.side(layer, spec, "v", source))
    freq = None
    if spec.pre_rope and spec.k_bits < 16:
        if inv_freq is None:
            raise KVConfigError(f"layer {layer} ({spec.label}): pre-RoPE keys need the model's RoPE")
        freq = inv_freq(layer)
    return KVMethod(spec, *cals, inv_freq=freq)


def build_methods(
    specs: list[LayerSpec],
    calibration: Calibration | None = None,
    inv_freq: Callable[[int], torch.Tensor] | None = None,
    source: str = "calibration",
) -> list[KVMethod | None]:
    """One :class:`KVMethod` per layer (None for fp16 layers); see :func:`method_for`."""
    return [method_for(spec, layer, calibration, inv_freq, source) for layer, spec in enumerate(specs)]


__all__ = [
    "Calibration",
    "KVMethod",
    "SideCalibration",
    "StoredKV",
    "StoredSide",
    "build_methods",
    "channel_rows",
    "levels_key",
    "method_for",
    "needs_calibration",
    "quant_specs",
    "thresholds_key",
]
