"""The one place that touches transformers' cache API, whose names drift within 5.x.

Supported: transformers 5.17 (the GPU image) to the newest 5.x. Drift handled here:
``get_layer_types_and_kwargs`` returns one shared kwargs dict in 5.17 and a list of per-layer
dicts later; ``crop`` takes an absolute length (legacy, positive) or tokens to remove (negative);
``generate``/``forward`` take the cache as ``past_key_values`` (5.17) or ``cache`` (newer).
"""

from __future__ import annotations

import functools
import inspect

from transformers import PretrainedConfig
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    Cache,
    CacheLayerMixin,
    DynamicLayer,
    get_layer_types_and_kwargs,
)

__all__ = [
    "Cache",
    "CacheLayerMixin",
    "DynamicLayer",
    "cache_kwargs",
    "dynamic_layer_for",
    "layer_types",
    "tokens_to_keep",
]


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
