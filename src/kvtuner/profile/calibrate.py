"""``kvtuner calibrate``: fit NUQ levels and outlier thresholds on calibration activations.

KVQuant (Hooper et al., 2024) fits its non-uniform levels by k-means weighted with a
sensitivity proxy: the Fisher information's diagonal, i.e. the squared gradient of the language
model loss with respect to each cached key and value element on calibration text. We use the
same proxy, for the same reason: a quantization error ``e`` on element ``x`` changes the loss by
about ``g * e`` to first order, and since the errors of a fitted quantizer are unbiased the
expected loss increase is ``~ 1/2 * sum g^2 e^2``: squared gradients are exactly the weights of
the error that matters, and cost one backward pass per window. (Unweighted k-means minimizes
``sum e^2`` instead; KVQuant reports it worse, and the prototype in ``shared/kvquant`` saw the
same.) The levels live in the normalized group domain of :meth:`KVMethod.group_domain`, where
an error ``e`` in ``y`` is ``e * step`` in ``x``, so the weight of an element is ``g^2 * step^2``.

Thresholds: for ``outliers = p``, keys get a ``[p/2, 1 - p/2]`` quantile range per (head,
channel) (key outliers live in fixed channels), values one range per head. Fitted after the
method's own transformations (pre-RoPE keys are un-rotated first), so calibration sees what the
cache will quantize. The first token of every window (the attention sink, huge and atypical) is
left out of every statistic.

Calibration text: windows from several sources at once (e.g. encyclopedic text, a novel,
arithmetic word problems, the model's own generations), so that the fitted numbers describe the
model rather than one domain.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AttentionInterface, PreTrainedModel

from kvtuner.cache import fingerprint
from kvtuner.cache.attention import attention_extras
from kvtuner.cache.compat import rope_inv_freq
from kvtuner.config import KVConfigError, LayerSpec
from kvtuner.method import (
    Calibration,
    KVMethod,
    SideCalibration,
    calibrated_range,
    channel_rows,
    levels_key,
    needs_calibration,
    thresholds_key,
)
from kvtuner.profile.blockwise import UnsupportedModelError, decode_faithful_attention
from kvtuner.quant.codebook import fit_levels
from kvtuner.quant.rope import rotate

ATTENTION_NAME = "kvtuner_calibrate"
MAX_FIT_ELEMENTS = 1 << 18  # k-means sample per (layer, side): plenty for at most 16 levels, a second on a CPU


@dataclass
class Activations:
    """Per layer, over all calibration windows (stacked on the batch dim): post-RoPE keys,
    values and the gradients of the LM loss w.r.t. them, ``[W, H, T, D]`` each."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_grad: list[torch.Tensor]
    value_grad: list[torch.Tensor]

    @property
    def positions(self) -> torch.Tensor:
        return torch.arange(self.keys[0].shape[-2])[None]


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, kvtuner_probe=None,
               sliding_window: int | None = None, **kwargs):
    """Causal attention (within the layer's sliding window, if any) through zero-valued leaves added to K and V,
    whose gradients are dL/dK and dL/dV."""
    extras = attention_extras(dropout, kwargs)
    if extras:
        raise UnsupportedModelError(f"{type(module).__name__} calls attention with {', '.join(extras)}; calibration "
                                  "implements causal attention with an optional sliding window only")
    probe_k, probe_v, captured = kvtuner_probe
    idx = module.layer_idx
    captured[idx] = (key.detach(), value.detach())
    out = decode_faithful_attention(query, key + probe_k[idx], value + probe_v[idx], None,
                                    scaling or query.shape[-1] ** -0.5, sliding_window)
    return out.transpose(1, 2).contiguous(), None


@contextmanager
def _probing(model: PreTrainedModel) -> Iterator[None]:
    AttentionInterface.register(ATTENTION_NAME, _attention)
    previous = model.config._attn_implementation
    grads = [p.requires_grad for p in model.parameters()]
    model.config._attn_implementation = ATTENTION_NAME
    model.requires_grad_(False)
    try:
        yield
    finally:
        model.config._attn_implementation = previous
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)


def capture_activations(model: PreTrainedModel, windows: torch.Tensor, progress: bool = False) -> Activations:
    """Keys, values and their loss gradients on ``windows`` ``[W, T]`` (one forward and backward each)."""
    fp = fingerprint(model.config)
    layers = fp.num_layers
    per_window: list[tuple[list, list, list, list]] = []
    for w in tqdm(range(windows.shape[0]), desc="calibration activations", unit="window", disable=not progress):
        ids = windows[w : w + 1].to(model.device)
        t = ids.shape[1]
        shape = (1, fp.num_kv_heads, t, fp.head_dim)
        dtype = next(model.parameters()).dtype
        probe_k = [torch.zeros(shape, dtype=dtype, device=model.device, requires_grad=True) for _ in range(layers)]
        probe_v = [torch.zeros(shape, dtype=dtype, device=model.device, requires_grad=True) for _ in range(layers)]
        captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        with _probing(model), torch.enable_grad():
            logits = model(ids, use_cache=False, kvtuner_probe=(probe_k, probe_v, captured)).logits
            F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).backward()
        per_window.append(([captured[i][0].float().cpu() for i in range(layers)],
                           [captured[i][1].float().cpu() for i in range(layers)],
                           [p.grad.float().cpu() for p in probe_k],
                           [p.grad.float().cpu() for p in probe_v]))
    stacked = [[torch.cat([pw[part][i] for pw in per_window]) for i in range(layers)] for part in range(4)]
    return Activations(*stacked)


def _sample(y: torch.Tensor, w: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y, w = y.reshape(-1), w.reshape(-1)
    if y.numel() > MAX_FIT_ELEMENTS:
        pick = torch.randperm(y.numel(), generator=generator)[:MAX_FIT_ELEMENTS]
        y, w = y[pick], w[pick]
    return y, w


def _thresholds(x: torch.Tensor, fraction: float, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) leaving ``fraction`` of ``x`` ``[W, H, T, D]`` outside: per (head, channel) for keys, per head for values."""
    x = x[:, :, 1:]  # not the sink
    flat = channel_rows(x).flatten(0, 1) if side == "k" else x.transpose(0, 1).reshape(x.shape[1], -1)
    q = torch.tensor([fraction / 2, 1 - fraction / 2], dtype=flat.dtype)
    lo, hi = torch.quantile(flat, q, dim=1)
    if side == "k":
        lo, hi = lo.reshape(x.shape[1], x.shape[3]), hi.reshape(x.shape[1], x.shape[3])
    return lo, hi


def fit_calibration(
    model: PreTrainedModel,
    activations: Activations,
    specs: Sequence[LayerSpec],
    seed: int = 0,
    progress: bool = False,
    meta: dict | None = None,
) -> Calibration:
    """Levels and thresholds for every spec in ``specs`` that uses a codebook or outliers."""
    fp = fingerprint(model.config)
    calibration = Calibration(fp, meta=dict(meta or {}))
    generator = torch.Generator().manual_seed(seed)
    wanted = [s for s in dict.fromkeys(specs) if needs_calibration(s)]
    t0 = time.perf_counter()
    bar = tqdm(total=len(wanted) * fp.num_layers, desc="fit calibration", unit="layer", disable=not progress)
    for spec in wanted:
        sides = [side for side, bits in (("k", spec.k_bits), ("v", spec.v_bits)) if bits < 16]
        for layer in range(fp.num_layers):
            inv_freq = rope_inv_freq(model.config, layer) if spec.pre_rope and spec.k_bits < 16 else None
            whole = activations.keys[layer].shape[-2] // math.lcm(spec.window, spec.group_size) \
                * math.lcm(spec.window, spec.group_size)  # the cache stores whole windows of whole groups
            if whole == 0:
                raise KVConfigError(f"{spec.label}: calibration windows of {activations.keys[layer].shape[-2]} tokens "
                                    f"hold no whole window; give at least {math.lcm(spec.window, spec.group_size)}")
            positions = activations.positions[..., :whole]
            tensors = {"k": activations.keys[layer][..., :whole, :], "v": activations.values[layer][..., :whole, :]}
            grads = {"k": activations.key_grad[layer][..., :whole, :], "v": activations.value_grad[layer][..., :whole, :]}
            if inv_freq is not None:  # both into pre-RoPE coordinates: dL/dK_pre = R^T dL/dK_post
                tensors["k"] = rotate(tensors["k"], positions, inv_freq, inverse=True)
                grads["k"] = rotate(grads["k"], positions, inv_freq, inverse=True)
            cals = {"k": SideCalibration(), "v": SideCalibration()}
            for side in sides:
                if spec.outliers > 0 or calibrated_range(spec, side):  # kvquant keys: their range, min/max at 0
                    lo, hi = _thresholds(tensors[side], spec.outliers, side)
                    calibration.thresholds.setdefault(thresholds_key(spec, side), [None] * fp.num_layers)[layer] = (lo, hi)
                    shape = (1, -1, 1, lo.shape[-1]) if side == "k" else (1, -1, 1, 1)
                    cals[side] = SideCalibration(lo=lo.reshape(shape), hi=hi.reshape(shape))
            if spec.codebook:
                # the same method without levels normalizes exactly as the codebook method will
                uniform = KVMethod(replace(spec, codebook=False), cals["k"], cals["v"], inv_freq=inv_freq)
                for side in sides:
                    raw = (activations.keys if side == "k" else activations.values)[layer][..., :whole, :]
                    y, step, outlier = uniform.group_domain(side, raw, positions)
                    weight = grads[side].square() * step.square()
                    weight[:, :, 0] = 0  # token 0: the attention sink, atypical whether or not the spec keeps it
                    if outlier is not None:  # stored exactly: their error is none of the levels' business
                        weight[outlier] = 0
                    bits = spec.k_bits if side == "k" else spec.v_bits
                    if calibrated_range(spec, side):  # one table per (head, channel): [H, D, K]
                        rows = [channel_rows(t) for t in (y, weight)]
                        levels = fit_levels(*rows, bits, pin_ends=False).to(torch.float16)
                    else:
                        levels = fit_levels(*_sample(y, weight, generator), bits).to(torch.float16)
                    calibration.levels.setdefault(levels_key(spec, side), [None] * fp.num_layers)[layer] = levels
            bar.update()
    bar.close()
    calibration.meta.update({"specs": [s.label for s in wanted], "weights": "fisher (squared LM-loss gradients)",
                             "windows": activations.keys[0].shape[0], "tokens_per_window": activations.keys[0].shape[-2],
                             "fit_seconds": round(time.perf_counter() - t0, 2)})
    return calibration


def calibrate(
    model: PreTrainedModel,
    windows: torch.Tensor,
    specs: Sequence[LayerSpec],
    seed: int = 0,
    progress: bool = False,
    meta: dict | None = None,
) -> Calibration:
    """Capture activations on ``windows`` ``[W, T]`` and fit every spec's levels and thresholds."""
    return fit_calibration(model, capture_activations(model, windows, progress), specs, seed, progress, meta)
