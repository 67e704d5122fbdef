"""The one place that touches transformers' cache API, whose names drift within 5.x.

Supported: transformers 5.17 (the GPU image) to the newest 5.x. Drift handled here:
``get_layer_types_and_kwargs`` returns one shared kwargs dict in 5.17 and a list of per-layer
dicts later; ``crop`` takes an absolute length (legacy, positive) or tokens to remove (negative);
``generate``/``forward`` take the cache as ``past_key_values`` (5.17) or ``cache`` (newer);
``cache.update`` gets no position information in 5.17 and the attention's kwargs (with
``position_ids``, from which :func:`left_padding` reads a left-padded batch) later.
"""

from __future__ import annotations

import functools
import importlib
import inspect

import torch

from transformers import PretrainedConfig
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    Cache,
    CacheLayerMixin,
    DynamicCache,
    DynamicLayer,
    get_layer_types_and_kwargs,
)

__all__ = [
    "Cache",
    "CacheLayerMixin",
    "DynamicCache",
    "DynamicLayer",
    "RecordingCache",
    "cache_kwargs",
    "dynamic_layer_for",
    "layer_types",
    "left_padding",
    "position_ids_from",
    "rope_inv_freq",
    "tokens_to_keep",
]

# Architectures whose RoPE is transformers' rotate_half rotation of the whole head (no partial
# rotary, no interleaving), computed by a ``<Name>RotaryEmbedding(config)`` with ``inv_freq`` (or, with
# one RoPE per layer type, ``<layer_type>_inv_freq``), mapped to their modeling module. Gemma 3 normalizes
# keys (k_norm) before RoPE, so its pre-RoPE keys are the normalized ones: the rotation is all that is undone.
PRE_ROPE_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
                          "gemma3_text": "gemma3"}


class RecordingCache(DynamicCache):
    """A ``DynamicCache`` that keeps the arguments of every ``update`` call, ``(layer_idx, key_states, value_states,
    args, kwargs)``, to make the same calls on another cache later (however the version passes positions). The
    model's K/V are never modified in place, so references are enough; argument dicts are copied, one level deep."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.updates = []

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        copied = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
        self.updates.append((layer_idx, key_states, value_states, args, copied))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def layer_types(model_config: PretrainedConfig) -> list[tuple[str, dict]]:
    """(layer type, init kwargs) for each decoder layer of ``model_config``."""
    text_config = model_config.get_text_config(decoder=True)
    types, kwargs = get_layer_types_and_kwargs(text_config)
    if isinstance(kwargs, dict):
        kwargs = [kwargs] * len(types)
    return list(zip(types, kwargs))


def dynamic_layer_for(layer_type: str, kwargs: dict) -> CacheLayerMixin:
    """transformers' own unquantized layer for ``layer_type`` (e.g. a sliding-window layer)."""
    return DYNAMIC_LAYER_TYPE_MAPPING[layer_type](**kwargs)


def tokens_to_keep(current_length: int, crop_arg: int) -> int:
    """Length after ``crop(crop_arg)``: negative removes that many tokens, positive is the legacy absolute length."""
    if crop_arg < 0:
        return max(current_length + crop_arg, 0)
    return min(crop_arg, current_length) if crop_arg > 0 else current_length


def cache_kwargs(model, cache: Cache) -> dict:
    """Keyword that passes ``cache`` to ``model`` / ``model.generate``: ``cache`` in newer 5.x, ``past_key_values`` before."""
    return {_cache_kwarg_name(type(model)): cache}


@functools.cache
def _cache_kwarg_name(model_class: type) -> str:
    # inspected once per model class: evaluation calls this for every chunk
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def position_ids_from(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``position_ids`` ``[B or 1, T]`` from what the model passed to ``cache.update``, if anything."""
    for source in (kwargs, kwargs.get("kwargs") or {}, *(a for a in args if isinstance(a, dict))):
        ids = source.get("position_ids")
        if isinstance(ids, torch.Tensor):
            return ids
    return None


def left_padding(position_ids: torch.Tensor, batch: int) -> torch.Tensor | None:
    """Pads ``[B]`` in front of each row, read from the ``position_ids`` of a first forward pass, or None.

    ``generate`` numbers a left-padded row's real tokens from 0 and gives its pads position 0
    (``attention_mask.cumsum(-1) - 1``, pads filled with 0), so a row with ``p`` pads reads ``0 * p, 0, 1, ...``
    and ``p`` is its length minus one minus its last position. Rows that do not all follow that pattern
    (offsets, right padding, packed sequences) give None: the batch is then stored as unpadded. A row of one
    real token after right padding reads like left padding (all zeros); transformers itself generates only
    from left-padded batches."""
    if position_ids.dim() != 2 or position_ids.shape[0] != batch:
        return None
    length = position_ids.shape[-1]
    pads = length - 1 - position_ids[:, -1]
    expected = (torch.arange(length, device=position_ids.device)[None] - pads[:, None]).clamp(min=0)
    if bool((pads < 0).any()) or not torch.equal(position_ids, expected):
        return None
    return pads


_INV_FREQ: dict[tuple[str, str, str], torch.Tensor] = {}


def _inv_freq(model_type: str, text_config, layer_type: str) -> torch.Tensor:
    key = (model_type, text_config.to_json_string(), layer_type)
    if key in _INV_FREQ:  # every layer asks, with the same config
        return _INV_FREQ[key]
    module_name = PRE_ROPE_ARCHITECTURES[model_type]
    module = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    rotary = [getattr(module, name) for name in dir(module) if name.endswith("RotaryEmbedding")]
    if len(rotary) != 1:
        raise NotImplementedError(f"{model_type}: cannot find its rotary embedding class")
    embedding = rotary[0](config=text_config)
    inv_freq = getattr(embedding, f"{layer_type}_inv_freq", None)
    scaling = getattr(embedding, f"{layer_type}_attention_scaling", getattr(embedding, "attention_scaling", 1.0))
    if scaling != 1.0:
        from kvtuner.config import KVConfigError

        raise KVConfigError(f"{model_type}: its RoPE scales cos/sin by {scaling} ({layer_type} layers), which is not a "
                            "rotation; drop the prerope option for this model")
    _INV_FREQ[key] = (embedding.inv_freq if inv_freq is None else inv_freq).detach().float().cpu()
    return _INV_FREQ[key]


def rope_inv_freq(model_config: PretrainedConfig, layer: int) -> torch.Tensor:
    """The RoPE frequencies ``[D/2]`` of ``layer`` (pre-RoPE keys); a clear refusal for other architectures.

    Per layer because hybrid models give sliding and full layers different RoPE bases (Gemma 3).
    """
    from kvtuner.config import KVConfigError

    text = model_config.get_text_config(decoder=True)
    model_type = text.model_type
    if model_type not in PRE_ROPE_ARCHITECTURES:
        raise KVConfigError(
            f"pre-RoPE keys support {', '.join(PRE_ROPE_ARCHITECTURES)} models, not {model_type!r} "
            "(drop the prerope option for this model)"
        )
    if getattr(text, "partial_rotary_factor", 1.0) != 1.0:
        raise KVConfigError(f"{model_type}: pre-RoPE keys need RoPE over the whole head (partial_rotary_factor is set)")
    return _inv_freq(model_type, text, layer_types(model_config)[layer][0])
