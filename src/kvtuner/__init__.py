"""kvtuner: layer-wise mixed-precision KV cache quantization for Hugging Face transformers."""

from kvtuner.cache import MixedPrecisionCache
from kvtuner.config import KVConfig, KVConfigError, LayerSpec, ModelFingerprint

__all__ = ["KVConfig", "KVConfigError", "LayerSpec", "MixedPrecisionCache", "ModelFingerprint"]
__version__ = "0.1.0"
