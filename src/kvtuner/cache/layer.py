"""One decoder layer's quantized KV storage, KIVI-style.

State, per layer (shapes ``[B, H_kv, T, D]``):

* ``qkeys`` / ``qvalues``: the quantized history (:class:`~kvtuner.quant.QuantizedTensor`,
  real packed bytes), grown by appending whole windows;
* ``keys`` / ``values``: the full-precision residual window of the most recent tokens.

Rule: new tokens go into the residual; once it holds ``window`` tokens or more, the oldest
whole windows are quantized and appended to the history. ``window`` is ``residual_length``
(or, with no residual, one key group for per-channel keys, else one token). Prefill follows the
same rule, so only the tail of a prompt stays in full precision. Each forward call attends to
the dequantized history, the residual and its own new tokens in full precision, then flushes:
exactly what a token sees during generation (``update`` is decode-faithful for any chunking
aligned to ``window``).

Flushes quantize with :func:`kvtuner.kernels.quantize` (Triton on CUDA under ``backend="auto"``,
bit-exact with the torch reference). With ``packed_decode`` set (by
:func:`kvtuner.cache.attention.use_packed_attention`), a one-token update skips dequantizing:
it returns only the residual and leaves the pre-flush history in ``pending_history`` for the
packed decode kernel.
"""

from __future__ import annotations

import torch

from kvtuner.cache.compat import CacheLayerMixin, tokens_to_keep
from kvtuner.config import LayerSpec
from kvtuner.kernels import Backend, quantize
from kvtuner.quant import QuantizedTensor, QuantSpec, cat_tokens


def quant_specs(spec: LayerSpec) -> tuple[QuantSpec, QuantSpec]:
    """The tensor-level specs for keys and values of a layer spec."""
    if spec.method == "kivi":
        return QuantSpec(spec.k_bits, spec.group_size, "channel"), QuantSpec(spec.v_bits, spec.group_size, "token")
    if spec.method == "per_token":
        return QuantSpec(spec.k_bits, spec.group_size, "token"), QuantSpec(spec.v_bits, spec.group_size, "token")
    if spec.method == "fp8":
        fp8 = {16: None, 8: "e4m3"}
        k = QuantSpec(spec.k_bits, spec.group_size, "token", fp8=fp8[spec.k_bits])
        v = QuantSpec(spec.v_bits, spec.group_size, "token", fp8=fp8[spec.v_bits])
        return k, v
    raise ValueError(f"layer spec {spec} is not quantized")


class MixedPrecisionLayer(CacheLayerMixin):
    """A cache layer holding packed low-bit history plus a full-precision residual window."""

    is_sliding = False
    is_compileable = False
    # A crop that reaches into the quantized history re-quantizes what it keeps: close, not exact.
    is_croppable = False

    def __init__(self, spec: LayerSpec, keep_dequantized: bool = False, backend: Backend = "auto"):
        super().__init__()
        if not spec.is_quantized:
            raise ValueError("MixedPrecisionLayer needs a quantized spec; use transformers' DynamicLayer for fp16")
        self.spec = spec
        self.key_spec, self.value_spec = quant_specs(spec)
        self.window = spec.window
        self.keep_dequantized = keep_dequantized
        self.backend = backend
        self.packed_decode = False
        self.pending_history: tuple[QuantizedTensor | None, QuantizedTensor | None] | None = None
        self.qkeys: QuantizedTensor | None = None
        self.qvalues: QuantizedTensor | None = None
        self._history: tuple[torch.Tensor, torch.Tensor] | None = None
        self.cumulative_length = 0

    def __repr__(self) -> str:
        return f"MixedPrecisionLayer({self.spec.label}, g={self.spec.group_size}, r={self.spec.residual_length})"

    # --- transformers' layer API ---------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty((*key_states.shape[:-2], 0, key_states.shape[-1]))
        self.values = value_states.new_empty((*value_states.shape[:-2], 0, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        packed = self.packed_decode and key_states.shape[-2] == 1
        history = None if packed else self.dequantized_history()
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if packed:  # the packed attention reads the history itself (kvtuner.cache.attention)
            self.pending_history = (self.qkeys, self.qvalues)
            keys, values = self.keys, self.values
        elif history is None:
            keys, values = self.keys, self.values
        else:
            keys = torch.cat([history[0], self.keys], dim=-2)
            values = torch.cat([history[1], self.values], dim=-2)
        self._flush()
        return keys, values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.qkeys = self.qvalues = None
        self._history = None
        self.cumulative_length = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if not self.is_initialized:
            return
        keep = tokens_to_keep(self.cumulative_length, tokens_to_remove)
        quantized = self.quantized_length
        if keep >= quantized:
            self.keys = self.keys[..., : keep - quantized, :].clone()
            self.values = self.values[..., : keep - quantized, :].clone()
        else:
            hist_k, hist_v = self.dequantized_history()
            self.keys, self.values = hist_k[..., :keep, :], hist_v[..., :keep, :]
            self.qkeys = self.qvalues = None
            self._history = None
            self._flush()
        self.cumulative_length = keep

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def offload(self) -> None:  # offloading a packed cache to CPU is not supported; keep it where it is
        pass

    def prefetch(self) -> None:
        pass

    # --- storage ------------------------------------------------------------------------------
    @property
    def quantized_length(self) -> int:
        return self.qkeys.num_tokens if self.qkeys is not None else 0

    def dequantized_history(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The quantized history read back in the model dtype (memoized when ``keep_dequantized``)."""
        if self.qkeys is None:
            return None
        if self._history is not None:
            return self._history
        history = (self.qkeys.dequantize(self.dtype), self.qvalues.dequantize(self.dtype))
        if self.keep_dequantized:
            self._history = history
        return history

    def _flush(self) -> None:
        n = self.keys.shape[-2]
        if n < self.window:
            return
        m = (n // self.window) * self.window
        new_k = quantize(self.keys[..., :m, :], self.key_spec, self.backend)
        new_v = quantize(self.values[..., :m, :], self.value_spec, self.backend)
        self.qkeys = new_k if self.qkeys is None else cat_tokens([self.qkeys, new_k])
        self.qvalues = new_v if self.qvalues is None else cat_tokens([self.qvalues, new_v])
        if self.keep_dequantized:
            flushed = (new_k.dequantize(self.dtype), new_v.dequantize(self.dtype))
            if self._history is None:
                self._history = flushed
            else:
                self._history = tuple(torch.cat([h, f], dim=-2) for h, f in zip(self._history, flushed))
        # clone: a view would keep the flushed full-precision tokens alive
        self.keys = self.keys[..., m:, :].clone()
        self.values = self.values[..., m:, :].clone()

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        if self.qkeys is not None:
            self.qkeys, self.qvalues = self.qkeys.map(fn), self.qvalues.map(fn)
        if self._history is not None:
            self._history = (fn(self._history[0]), fn(self._history[1]))

    def nbytes(self) -> int:
        """Real storage: packed history plus the full-precision residual (never the memo)."""
        if not self.is_initialized:
            return 0
        stored = [self.keys, self.values]
        if self.qkeys is not None:
            stored += self.qkeys.stored_tensors() + self.qvalues.stored_tensors()
        return sum(t.numel() * t.element_size() for t in stored)
