"""Decode attention that reads the packed cache: ``with use_packed_attention(model, cache): ...``.

Why: a decode step reads every cached key and value once, so it is memory-bandwidth bound, and
the reference path (dequantize the whole history, then SDPA) reads the packed bytes, writes a
full-precision copy and reads that again. Here one-token steps call
:func:`kvtuner.kernels.decode_attention` on the packed history and the residual instead.

How it plugs into transformers: the model calls ``cache.update(k, v, layer_idx)`` and passes
what it returns to the function registered for ``config._attn_implementation``. Inside the
context, each :class:`~kvtuner.cache.layer.MixedPrecisionLayer` has ``packed_decode`` set: on a
one-token update it returns only its residual (new token included) and leaves the history that
token attends to in ``pending_history``, taken before the flush so that the step is exactly the
reference's. The registered function finds the layer by ``module.layer_idx``, takes that
history and runs the kernel. Prefill, unquantized layers and padded batches (an explicit mask)
go to SDPA on full-precision K/V, as before. Layers whose method the kernel cannot read
(:meth:`~kvtuner.method.KVMethod.packed_decode_supported`: outliers, pre-RoPE keys, kvquant's
ranges) stay on the torch path, and entering the context says so in one warning. Codebook codes
are looked up in the kernel; sink tokens are attended with the residual, their slots in the
codes skipped.

Registration is explicit and undone on exit: a function and a mask function (transformers'
``sdpa_mask``) under a name unique to this cache; the model's previous implementation comes back.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvtuner.cache.compat import Cache
from kvtuner.cache.layer import MixedPrecisionLayer
from kvtuner.kernels import Backend, decode_attention

__all__ = ["packed_attention_forward", "use_packed_attention"]


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    cache: Cache,
    backend: Backend = "auto",
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """An ``AttentionInterface`` function; ``cache`` and ``backend`` are bound by :func:`use_packed_attention`."""
    layer = cache.layers[module.layer_idx]
    if not isinstance(layer, MixedPrecisionLayer) or layer.pending_history is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    history = layer.pending_history
    layer.pending_history = None
    if attention_mask is not None:  # padded batch: full K/V on the torch path
        if history is not None:
            hist_k, hist_v = layer.method.dequantize(history, 0, layer.positions(0, history.num_tokens), key.dtype)
            key, value = torch.cat([hist_k, key], dim=-2), torch.cat([hist_v, value], dim=-2)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    qkeys, qvalues = (history.keys.codes, history.values.codes) if history is not None else (None, None)
    sink = 0
    if history is not None and history.sink_keys is not None:  # sink slots of the codes are skipped,
        sink = history.sink_keys.shape[-2]                      # the tokens attended in full precision
        key = torch.cat([history.sink_keys.to(key.dtype), key], dim=-2)
        value = torch.cat([history.sink_values.to(value.dtype), value], dim=-2)
    method = layer.method
    out = decode_attention(query[:, :, 0], qkeys, qvalues, key, value, scale, method.key_spec, method.value_spec,
                           backend, history_start=sink)
    return out.unsqueeze(1), None  # [B, 1, H_q, D], as sdpa_attention_forward returns it


@contextmanager
def use_packed_attention(model, cache: Cache, backend: Backend = "auto") -> Iterator[None]:
    """Run ``model``'s one-token steps on ``cache``'s packed storage inside the ``with`` block.

    backend: ``"auto"`` (Gluon or Triton kernels on CUDA, the streaming torch path elsewhere), ``"gluon"``,
    ``"triton"`` or ``"torch"``; see :mod:`kvtuner.kernels`. A cache with no layer the packed path reads (fp16 only, or
    only options it does not read) leaves the model's attention implementation as it is.
    """
    name = f"kvtuner_packed_{id(cache):x}"
    quantized = [layer for layer in cache.layers if isinstance(layer, MixedPrecisionLayer)]
    layers = [layer for layer in quantized if layer.method.packed_decode_supported()]
    if len(layers) < len(quantized):
        labels = sorted({layer.spec.label for layer in quantized if layer not in layers})
        warnings.warn(f"{len(quantized) - len(layers)} layer(s) ({', '.join(labels)}) use options the packed decode "
                      "kernel does not read; they decode on the torch path", stacklevel=3)
    if not layers:
        yield
        return
    previous = model.config._attn_implementation
    AttentionInterface.register(name, partial(packed_attention_forward, cache=cache, backend=backend))
    AttentionMaskInterface.register(name, sdpa_mask)
    try:
        model.set_attn_implementation(name)
        for layer in layers:
            layer.packed_decode = True
        yield
    finally:
        for layer in layers:
            layer.packed_decode = False
            layer.pending_history = None
        model.set_attn_implementation(previous)
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)
