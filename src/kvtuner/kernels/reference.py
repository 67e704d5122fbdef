"""Torch references for the Triton kernels: the CPU path, and the oracle the kernels are tested against.

The quantize-on-append reference is :func:`kvtuner.quant.quantize` itself; the kernel must
reproduce it bit for bit. Decode attention has no exact twin (the kernel reorders sums and rounds
its dot operands to the query dtype), so its reference computes in ``compute_dtype`` and tests
compare by relative error.
"""

from __future__ import annotations

import torch

from kvtuner.quant import QuantizedTensor, dequantize


def decode_attention_reference(
    query: torch.Tensor,
    qkeys: QuantizedTensor | None,
    qvalues: QuantizedTensor | None,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    history_start: int = 0,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Attention of one query token per sequence over dequantized history plus residual.

    query [B, H_q, D]; qkeys / qvalues hold [B, H_kv, T_q, D] (or None before the first flush);
    keys / values are the full-precision residual [B, H_kv, T_r, D]. History tokens before
    ``history_start`` are not attended (a method's sink slots: the sink tokens themselves come with
    the full-precision keys and values). Query head i reads KV
    head i // (H_q // H_kv), as transformers' ``repeat_kv`` does. Returns [B, H_q, D] in the
    query dtype.
    """
    k, v = keys.to(compute_dtype), values.to(compute_dtype)
    if qkeys is not None:
        k = torch.cat([dequantize(qkeys, compute_dtype)[..., history_start:, :], k], dim=-2)
        v = torch.cat([dequantize(qvalues, compute_dtype)[..., history_start:, :], v], dim=-2)
    b, h_q, d = query.shape
    h_kv = k.shape[1]
    q = query.to(compute_dtype).reshape(b, h_kv, h_q // h_kv, d)
    p = torch.softmax(torch.einsum("bhrd,bhtd->bhrt", q, k) * scale, dim=-1)
    return torch.einsum("bhrt,bhtd->bhrd", p, v).reshape(b, h_q, d).to(query.dtype)
