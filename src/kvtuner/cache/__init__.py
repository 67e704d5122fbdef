"""The mixed-precision KV cache for Hugging Face transformers (the only user of its cache API)."""

from kvtuner.cache.compat import cache_kwargs
from kvtuner.cache.layer import MixedPrecisionLayer, MixedPrecisionSlidingLayer
from kvtuner.cache.mixed import MixedPrecisionCache, fingerprint, layer_methods

__all__ = ["cache_kwargs", "MixedPrecisionCache", "MixedPrecisionLayer", "MixedPrecisionSlidingLayer", "fingerprint",
           "layer_methods"]
