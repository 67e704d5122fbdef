"""Pure tensor math for KV quantization: group-wise integer and FP8 quantizers with real bit packing.

Knows nothing of models or caches; see :mod:`kvtuner.quant.tensor` for the storage layout.
"""

from kvtuner.quant.packing import PACKABLE_BITS, pack, packed_width, unpack
from kvtuner.quant.tensor import (
    NonFiniteError,
    QuantizedTensor,
    QuantSpec,
    cat_tokens,
    check_representable,
    dequantize,
    group_view,
    quantize,
    reserve_tokens,
    slice_tokens,
    token_group,
    write_tokens,
    write_tokens_at,
)

__all__ = [
    "PACKABLE_BITS",
    "NonFiniteError",
    "QuantSpec",
    "QuantizedTensor",
    "cat_tokens",
    "check_representable",
    "dequantize",
    "group_view",
    "pack",
    "packed_width",
    "quantize",
    "reserve_tokens",
    "slice_tokens",
    "token_group",
    "unpack",
    "write_tokens",
    "write_tokens_at",
]
