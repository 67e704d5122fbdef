"""``MixedPrecisionCache``: a transformers ``Cache`` whose layers each have their own KV precision.

Use it as any cache::

    cache = MixedPrecisionCache(KVConfig.uniform("K4V2", 30), model.config)
    cache.set_padding(inputs.attention_mask)  # a left-padded batch on transformers < 5.18 (later ones tell the cache)
    model.generate(**inputs, past_key_values=cache)
    cache.nbytes(), cache.nbytes_fp16()

Layers with a quantized spec get a :class:`~kvtuner.cache.layer.MixedPrecisionLayer`, or for a
``sliding_attention`` layer a :class:`~kvtuner.cache.layer.MixedPrecisionSlidingLayer` (bounded: it drops
the stored groups its window left behind); fp16 layers get transformers' own unquantized layer for their
type (so 16-bit specs behave exactly like ``DynamicCache``, sliding windows included). Quantizing a layer
of any other type (chunked, linear attention, ...) is refused with a clear error rather than done wrong.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from kvtuner.cache.compat import Cache, DynamicLayer, dynamic_layer_for, layer_types, rope_inv_freq
from kvtuner.cache.layer import MixedPrecisionLayer, MixedPrecisionSlidingLayer
from kvtuner.config import KVConfig, KVConfigError, ModelFingerprint
from kvtuner.kernels import Backend
from kvtuner.method import Calibration, KVMethod, build_methods, needs_calibration

SUPPORTED_QUANTIZED_TYPES = ("full_attention", "sliding_attention")


def fingerprint(model_config: PretrainedConfig) -> ModelFingerprint:
    """The attention shape of a transformers model config."""
    cfg = model_config.get_text_config(decoder=True)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return ModelFingerprint(
        architecture=model_config.model_type,
        num_layers=cfg.num_hidden_layers,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
    )


def layer_methods(
    config: KVConfig, model_config: PretrainedConfig | None = None, calibration: Calibration | None = None
) -> list[KVMethod | None]:
    """The :class:`~kvtuner.method.KVMethod` of every layer (None for fp16 layers).

    calibration: the fitted levels and thresholds; by default read from ``config.calibration``
    when a layer needs them. Checked against the model's fingerprint.
    """
    source = str(config.calibration_path() or "calibration")
    if calibration is None and any(needs_calibration(s) for s in config.layers):
        path = config.calibration_path()
        if path is None:
            raise KVConfigError("this config uses codebooks, outliers or kvquant layers but names no calibration "
                                "file (set 'calibration', or --calibration; kvtuner calibrate writes one)")
        calibration = Calibration.load(path)
    if calibration is not None and model_config is not None:
        calibration.check_model(fingerprint(model_config), source)
    inv_freq = None if model_config is None else (lambda layer: rope_inv_freq(model_config, layer))
    return build_methods(config.layers, calibration, inv_freq, source)


def check_layer_types(config: KVConfig, model_config: PretrainedConfig) -> list[tuple[str, dict]]:
    """The model's (layer type, kwargs) per layer, after checking that ``config`` quantizes only layer types
    kvtuner stores correctly: a clear ``KVConfigError`` otherwise, before any weights load."""
    types = layer_types(model_config)
    if len(types) != config.num_layers:
        raise KVConfigError(f"config has {config.num_layers} layers but the model has {len(types)} layers with a KV cache")
    for i, (spec, (layer_type, _)) in enumerate(zip(config.layers, types)):
        if spec.is_quantized and layer_type not in SUPPORTED_QUANTIZED_TYPES:
            raise KVConfigError(
                f"layer {i} is a {layer_type!r} layer; kvtuner quantizes only full-attention and sliding-window layers "
                f"(give layer {i} an fp16 spec to keep it unquantized; the CLI's --layers full does that for a --kv shorthand)"
            )
    return types


class MixedPrecisionCache(Cache):
    """Per-layer mixed-precision KV cache (KIVI-style layers, packed storage).

    keep_dequantized: once a layer's history is read back whole (the reference path: layers the packed
    attention does not read, or calls outside it), keep that copy and extend it at each flush, trading memory
    for speed (evaluation uses it); ``nbytes`` never counts it.
    backend: kernels that quantize on flush (``"auto"``: Triton on CUDA; see :mod:`kvtuner.kernels`).
    calibration: NUQ levels and outlier thresholds (default: the file ``config.calibration`` names).
    """

    def __init__(
        self,
        config: KVConfig,
        model_config: PretrainedConfig | None = None,
        keep_dequantized: bool = False,
        backend: Backend = "auto",
        calibration: Calibration | None = None,
    ):
        self.kv_config = config
        if model_config is None:
            types = [("full_attention", {})] * config.num_layers
        else:
            config.check_model(fingerprint(model_config))
            types = check_layer_types(config, model_config)
        methods = layer_methods(config, model_config, calibration)
        layers = []
        for method, (layer_type, kwargs) in zip(methods, types):
            if method is None:
                layers.append(dynamic_layer_for(layer_type, kwargs) if layer_type != "full_attention" else DynamicLayer())
            elif layer_type == "sliding_attention":
                layers.append(MixedPrecisionSlidingLayer(method, kwargs["sliding_window"], keep_dequantized, backend))
            else:
                layers.append(MixedPrecisionLayer(method, keep_dequantized=keep_dequantized, backend=backend))
        super().__init__(layers=layers)

    def set_padding(self, attention_mask: torch.Tensor) -> None:
        """Declare the left padding of the prompt about to be prefilled (``attention_mask`` ``[B, T]``, 0 at pads,
        as given to ``generate``), so that each padded row is stored as that row alone would be (see
        :mod:`kvtuner.cache.layer`). transformers 5.18 and later tell the cache through ``position_ids``; before
        that, without this call, a padded batch is stored with its pads. 16-bit layers store pads as they are,
        as transformers' own layers do (nothing is quantized there)."""
        if any(layer.get_seq_length() for layer in self.layers):
            raise ValueError("set_padding describes the first forward pass: call it on a new (or reset) cache")
        for layer in self.layers:
            if isinstance(layer, MixedPrecisionLayer):
                layer.set_padding(attention_mask)

    def nbytes(self) -> int:
        """Bytes actually stored: packed codes, scales, zeros and full-precision residuals (a padded row's pads
        are not stored)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, MixedPrecisionLayer):
                total += layer.nbytes()
            elif layer.is_initialized:
                total += layer.keys.numel() * layer.keys.element_size()
                total += layer.values.numel() * layer.values.element_size()
        return total

    def nbytes_fp16(self) -> int:
        """Bytes an fp16 ``DynamicCache`` would store for the same tokens: every token of a full-attention layer,
        the last ``sliding_window - 1`` of a sliding one (the baseline that ``nbytes`` is compared with)."""
        total = 0
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            b, h, _, d = layer.keys.shape
            if isinstance(layer, MixedPrecisionSlidingLayer):
                tokens = min(layer.get_seq_length(), layer.sliding_window - 1)
            elif isinstance(layer, MixedPrecisionLayer):
                tokens = layer.get_seq_length()
            else:
                tokens = layer.keys.shape[-2]
            total += 2 * b * h * tokens * d * 2
        return total
