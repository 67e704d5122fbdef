"""Decode attention that reads the packed cache: ``with use_packed_attention(model, cache): ...``.

Why: a decode step reads every cached key and value once, so it is memory-bandwidth bound, and
the reference path (dequantize the whole history, then attention) reads the packed bytes, writes a
full-precision copy and reads that again. Here one-token steps call
:func:`kvtuner.kernels.decode_attention` on the packed history and the residual instead.

How it plugs into transformers: the model calls ``cache.update(k, v, layer_idx)`` and passes
what it returns to the function registered for ``config._attn_implementation``. Inside the
context, each :class:`~kvtuner.cache.layer.MixedPrecisionLayer` the kernel can read has
``packed_decode`` set: on a one-token update it returns only its residual (new token included) and
leaves the history that token attends to in ``pending_history``, taken before the flush so that the
step is exactly the reference's. The registered function finds the layer by ``module.layer_idx``,
takes that history and runs the kernel.

The kernel computes plain softmax attention of one query over every cached token. Everything else goes
to the model's own attention function (the one it had before the context, with its own mask function),
on full-precision K/V: prefill, unquantized layers, padded batches (a mask that hides something), and
any call with an argument the kernel does not implement (a logit softcap, attention sinks, a sliding
window, dropout: :func:`attention_extras`), so no argument is ever dropped silently. Layers the kernel
never reads, said in one warning when the context is entered: methods it cannot read
(:meth:`~kvtuner.method.KVMethod.packed_decode_supported`: outliers, pre-RoPE keys, kvquant's ranges)
and sliding-window layers (their window is a mask over the history). Codebook codes are looked up in
the kernel; sink tokens are attended with the residual, their slots in the codes skipped.

Registration is explicit and undone on exit: a function and the model's mask function under a name
unique to this cache; the model's previous implementation comes back.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from kvtuner.cache.compat import Cache
from kvtuner.cache.layer import MixedPrecisionLayer
from kvtuner.kernels import Backend, decode_attention

__all__ = ["attention_extras", "packed_attention_forward", "use_packed_attention"]

# what models pass to their attention function that does not change what it computes
BOOKKEEPING_KWARGS = frozenset({"position_ids", "cache_position", "use_cache", "output_hidden_states"})


def attention_extras(dropout: float, kwargs: dict) -> list[str]:
    """The arguments of an attention call beyond query, keys, values, mask and scaling that change what it
    computes (softcap, sliding_window, s_aux, output_attentions, ..., and dropout): set ones only. The packed
    kernel implements none of them, the one-pass profile only a sliding window."""
    names = [k for k, v in kwargs.items() if k not in BOOKKEEPING_KWARGS and v is not None and v is not False]
    return names + ["dropout"] * bool(dropout)


def _hides_nothing(mask: torch.Tensor | None) -> bool:
    """Whether an attention mask (bool: True = visible; float: 0 = visible) lets every query see every key."""
    if mask is None:
        return True
    return bool(mask.all()) if mask.dtype == torch.bool else bool((mask == 0).all())


def model_attention(module: torch.nn.Module, implementation: str) -> Callable:
    """The attention function ``module`` runs under ``implementation``: a registered one, or its modeling file's
    ``eager_attention_forward`` (eager is not registered)."""
    if implementation in AttentionInterface._global_mapping:
        return AttentionInterface._global_mapping[implementation]
    return sys.modules[type(module).__module__].eager_attention_forward


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
    fallback: str,
    backend: Backend = "auto",
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An ``AttentionInterface`` function; ``cache``, ``fallback`` (the model's own implementation) and ``backend``
    are bound by :func:`use_packed_attention`."""
    own = model_attention(module, fallback)
    layer = cache.layers[module.layer_idx]
    if not isinstance(layer, MixedPrecisionLayer) or layer.pending_history is None:
        return own(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    history = layer.pending_history
    layer.pending_history = None
    unsupported = attention_extras(dropout, kwargs)
    if unsupported:
        warnings.warn(f"the packed decode kernel does not implement {', '.join(unsupported)}; "
                      "those steps run the model's own attention on the dequantized history", stacklevel=2)
    if unsupported or not _hides_nothing(attention_mask):  # e.g. a padded batch: full K/V on the model's path
        if history is not None:
            start = layer.first_token
            hist_k, hist_v = layer.method.dequantize(history, start, layer.positions(start, start + history.num_tokens),
                                                     key.dtype)
            key, value = torch.cat([hist_k, key], dim=-2), torch.cat([hist_v, value], dim=-2)
        return own(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
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
    return out.unsqueeze(1), None  # [B, 1, H_q, D], as the attention functions return it


@contextmanager
def use_packed_attention(model, cache: Cache, backend: Backend = "auto") -> Iterator[None]:
    """Run ``model``'s one-token steps on ``cache``'s packed storage inside the ``with`` block.

    backend: ``"auto"`` (Gluon or Triton kernels on CUDA, the streaming torch path elsewhere), ``"gluon"``,
    ``"triton"`` or ``"torch"``; see :mod:`kvtuner.kernels`. A cache with no layer the packed path reads (fp16
    only, sliding windows, or only options it does not read) leaves the model's attention implementation as it is.
    """
    name = f"kvtuner_packed_{id(cache):x}"
    quantized = [layer for layer in cache.layers if isinstance(layer, MixedPrecisionLayer)]
    sliding = [layer for layer in quantized if layer.is_sliding]
    unread = [layer for layer in quantized if not layer.is_sliding and not layer.method.packed_decode_supported()]
    layers = [layer for layer in quantized if layer not in sliding and layer not in unread]
    if sliding or unread:
        labels = sorted({layer.spec.label for layer in unread})
        why = [f"{len(sliding)} sliding-window layer(s)"] * bool(sliding)
        why += [f"{len(unread)} layer(s) with options the packed decode kernel does not read ({', '.join(labels)})"] * bool(unread)
        warnings.warn(f"{' and '.join(why)} decode on the torch path", stacklevel=3)
    if not layers:
        yield
        return
    previous = model.config._attn_implementation
    AttentionInterface.register(name, partial(packed_attention_forward, cache=cache, fallback=previous, backend=backend))
    if previous in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:  # the masks the model's own attention expects
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[previous])
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
