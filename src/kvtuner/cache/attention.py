"""Decode attention that reads the packed cache: ``with use_packed_attention(model, cache): ...``.

Why: a decode step reads every cached key and value once, so it is memory-bandwidth bound, and
the reference path (dequantize the whole history, then attention) reads the packed bytes, writes a
full-precision copy and reads that again. Here one-token steps call
:func:`kvtuner.kernels.decode_attention` on the packed history and the residual instead, and short chunks
(up to a residual window: decode-faithful evaluation, a few tokens fed at once) attend causally over the packed
history tile by tile in float32 (:func:`~kvtuner.kernels.streaming.chunk_attention_streaming`, whatever the
backend). Static layers (:class:`~kvtuner.cache.graphs.GraphedDecoder`) take the kernel with device-side counts.

How it plugs into transformers: the model calls ``cache.update(k, v, layer_idx)`` and passes
what it returns to the function registered for ``config._attn_implementation``. Inside the
context, each :class:`~kvtuner.cache.layer.MixedPrecisionLayer` the kernel can read has
``packed_decode`` set: on an update of up to a window it returns only its residual (new tokens included) and
leaves the history those tokens attend to in ``pending_history``, taken before the flush so that the
step is exactly the reference's. The registered function finds the layer by ``module.layer_idx``,
takes that history and runs the kernel.

Left-padded batches: a ragged layer (one batch-1 layer per padded row, see :mod:`kvtuner.cache.layer`)
leaves each row's pre-flush history and residual in ``pending_rows``, and the kernel reads each row's tokens
alone, which hold no pads, so no mask is needed (:func:`~kvtuner.kernels.decode_attention_rows`: one Triton launch
for the batch, each program finding its row's tensors and lengths in a table on the device; a row at a time on
the other backends). The step's mask must hide exactly each row's pads, else the step takes the path below.

The kernel computes plain softmax attention of one query over every cached token (a chunk: causal over its
own tokens). Everything else goes to the model's own attention function (the one it had before the context,
with its own mask function), on full-precision K/V: prefill and chunks longer than a window, unquantized layers, a mask that hides something else (a padded batch the
cache was not told about, :meth:`~kvtuner.cache.MixedPrecisionCache.set_padding`), and
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
from kvtuner.kernels import Backend, decode_attention, decode_attention_rows
from kvtuner.kernels.streaming import chunk_attention_streaming
from kvtuner.method import StoredKV

__all__ = ["attention_extras", "packed_attention_forward", "use_packed_attention"]

# what models pass to their attention function that does not change what it computes
BOOKKEEPING_KWARGS = frozenset({"position_ids", "cache_position", "use_cache", "output_hidden_states"})


def attention_extras(dropout: float, kwargs: dict) -> list[str]:
    """The arguments of an attention call beyond query, keys, values, mask and scaling that change what it
    computes (softcap, sliding_window, s_aux, output_attentions, ..., and dropout): set ones only. The packed
    kernel implements none of them, the one-pass profile only a sliding window."""
    names = [k for k, v in kwargs.items() if k not in BOOKKEEPING_KWARGS and v is not None and v is not False]
    return names + ["dropout"] * bool(dropout)


def _visible(mask: torch.Tensor) -> torch.Tensor:
    """An attention mask (bool: True = visible; float: 0 = visible) as bool, True where visible."""
    return mask if mask.dtype == torch.bool else mask == 0


def _hides_nothing(mask: torch.Tensor | None) -> bool:
    """Whether an attention mask lets every query see every key."""
    return mask is None or bool(_visible(mask).all())


def _hides_only_later(mask: torch.Tensor | None, chunk: int) -> bool:
    """Whether a chunk's 4-d mask is plain causal: query ``c`` of the
    last ``chunk`` sees every cache slot up to its own."""
    if mask is None or mask.dim() != 4:
        return False
    visible = _visible(mask)[:, 0, -chunk:, :]
    slots = visible.shape[-1]
    expected = torch.arange(slots, device=visible.device)[None] <= torch.arange(slots - chunk, slots, device=visible.device)[:, None]
    return visible.shape[-2] == chunk and bool((visible == expected).all())


def _hides_only_pads(mask: torch.Tensor | None, pads: torch.Tensor) -> bool:
    """Whether a one-token step's 4-d mask hides exactly the first
    ``pads[i]`` cache slots of each row i."""
    if mask is None or mask.dim() != 4:
        return False
    visible = _visible(mask)[:, 0, -1, :]
    expected = torch.arange(visible.shape[-1], device=visible.device)[None] >= pads.to(visible.device)[:, None]
    return visible.shape == expected.shape and torch.equal(visible, expected)


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
    own = partial(model_attention(module, fallback), module, dropout=dropout, scaling=scaling, **kwargs)
    layer = cache.layers[module.layer_idx]
    if isinstance(layer, MixedPrecisionLayer) and layer.static is not None:  # no mask: a static batch has no pads
        return _static_decode(layer, query, dropout, scaling, backend, kwargs), None
    if isinstance(layer, MixedPrecisionLayer) and layer.pending_rows is not None:
        return _rows_attention(layer, query, attention_mask, own, dropout, scaling, backend, kwargs)
    if not isinstance(layer, MixedPrecisionLayer) or layer.pending_history is None:
        return own(query, key, value, attention_mask)
    history = layer.pending_history
    layer.pending_history = None
    chunk = query.shape[2]
    visible = _hides_nothing(attention_mask) if chunk == 1 else _hides_only_later(attention_mask, chunk)
    if not _kernel_reads(dropout, kwargs) or not visible:
        key, value = layer.with_history(history, key, value)
        return own(query, key, value, attention_mask)
    if chunk > 1:  # a short chunk (decode-faithful evaluation)
        return _decode(layer, query, history, key, value, scaling, backend).transpose(1, 2), None
    out = _decode(layer, query[:, :, 0], history, key, value, scaling, backend)
    return out.unsqueeze(1), None  # [B, 1, H_q, D], as the attention functions return it


def _kernel_reads(dropout: float, kwargs: dict) -> bool:
    """Whether the kernel computes what this call asks; a warning names what it does not implement."""
    unsupported = attention_extras(dropout, kwargs)
    if unsupported:
        warnings.warn(f"the packed decode kernel does not implement {', '.join(unsupported)}; "
                      "those steps run the model's own attention on the dequantized history", stacklevel=3)
    return not unsupported


def _scale(query: torch.Tensor, scaling: float | None) -> float:
    return query.shape[-1] ** -0.5 if scaling is None else scaling


def _decode(layer: MixedPrecisionLayer, query: torch.Tensor, history: StoredKV, keys: torch.Tensor,
            values: torch.Tensor, scaling: float | None, backend: Backend) -> torch.Tensor:
    """The kernel: ``query`` ``[B, H_q, D]`` over ``history`` (packed) then ``keys`` / ``values``; ``[B, H_q, D]``.
    A chunk, ``query`` ``[B, H_q, C, D]``, takes the torch path (float32, whatever ``backend``): ``[B, H_q, C, D]``."""
    scale = _scale(query, scaling)
    qkeys, qvalues, keys, values, sink = _kernel_inputs(history, keys, values)
    method = layer.method
    if query.dim() == 4:
        return chunk_attention_streaming(query, qkeys, qvalues, keys, values, scale, history_start=sink)
    return decode_attention(query, qkeys, qvalues, keys, values, scale, method.key_spec, method.value_spec, backend,
                            history_start=sink)


def _kernel_inputs(history: StoredKV | None, keys: torch.Tensor, values: torch.Tensor) -> tuple:
    """(key codes, value codes, keys, values, history_start) the kernels take for ``history`` (None: none yet) and
    the residual ``keys`` / ``values``: sink slots of the codes are skipped, the tokens attended in full precision
    with the residual."""
    if history is None:
        return None, None, keys, values, 0
    sink = 0
    if history.sink_keys is not None:
        sink = history.sink_keys.shape[-2]
        keys = torch.cat([history.sink_keys.to(keys.dtype), keys], dim=-2)
        values = torch.cat([history.sink_values.to(values.dtype), values], dim=-2)
    return history.keys.codes, history.values.codes, keys, values, sink


def _static_decode(layer: MixedPrecisionLayer, query: torch.Tensor, dropout: float, scaling: float | None,
                   backend: Backend, kwargs: dict) -> torch.Tensor:
    """A static step (:meth:`~kvtuner.cache.layer.MixedPrecisionLayer.begin_static`): the kernel over the layer's
    code and residual buffers up to the counts the step left on the device. Nothing here reads back to the host."""
    if not _kernel_reads(dropout, kwargs):
        raise ValueError("static decoding runs the packed kernel, which does not implement "
                         f"{', '.join(attention_extras(dropout, kwargs))}")
    st, method = layer.static, layer.method
    keys, values = layer.code_buffers
    out = decode_attention(query[:, :, 0], keys, values, st.residual_keys, st.residual_values, _scale(query, scaling),
                           method.key_spec, method.value_spec, backend, lengths=st.attend)
    return out.unsqueeze(1)


def _rows_attention(layer: MixedPrecisionLayer, query: torch.Tensor, attention_mask: torch.Tensor | None,
                    own: Callable, dropout: float, scaling: float | None, backend: Backend,
                    kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A ragged layer's one-token step: each row attends to its own tokens, the kernel reading its packed history
    and residual (a row with no history yet: its residual alone)."""
    rows = layer.pending_rows
    layer.pending_rows = None
    if not _kernel_reads(dropout, kwargs) or not _hides_only_pads(attention_mask, layer.pads):
        full = [row.with_history(*pending) for row, pending in zip(layer.rows, rows)]
        key, value = layer.right_aligned(full, layer.get_seq_length())
        return own(query, key, value, attention_mask)
    inputs = [_kernel_inputs(history, keys, values) for history, keys, values in rows]
    method = layer.method
    out = decode_attention_rows(query[:, :, 0], inputs, _scale(query, scaling), method.key_spec, method.value_spec,
                                backend)
    return out.unsqueeze(1), None


@contextmanager
def use_packed_attention(model, cache: Cache, backend: Backend = "auto") -> Iterator[None]:
    """Run ``model``'s one-token steps on ``cache``'s packed storage inside the ``with`` block.

    backend: ``"auto"`` (Gluon or Triton kernels on CUDA, the C++ kernel on CPU, the streaming torch path where
    neither reads the layout), ``"gluon"``, ``"triton"``, ``"native"`` or ``"torch"``; see :mod:`kvtuner.kernels`. A cache with no layer the packed path reads (fp16
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
            layer.pending_history = layer.pending_rows = None
        model.set_attn_implementation(previous)
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)
