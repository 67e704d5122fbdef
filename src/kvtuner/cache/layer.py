"""One decoder layer's quantized KV storage, KIVI-style, through the layer's :class:`~kvtuner.method.KVMethod`.

State, per layer (shapes ``[B, H_kv, T, D]``):

* ``history``: the quantized tokens (:class:`~kvtuner.method.StoredKV`: real packed bytes, plus
  whatever the method keeps beside them: outliers, sink tokens), grown by appending whole windows,
  whose codes are written in place into buffers that grow geometrically (``reserved_nbytes``);
* ``keys`` / ``values``: the full-precision residual window of the most recent tokens.

Rule: new tokens go into the residual; once it holds ``window`` tokens or more, the oldest
whole windows are stored by the method and appended to the history. ``window`` is
``residual_length`` (or, with no residual, one key group for per-channel keys, else one token).
Prefill follows the same rule, so only the tail of a prompt stays in full precision. Each
forward call attends to the read-back history, the residual and its own new tokens in full
precision, then flushes: exactly what a token sees during generation (``update`` is
decode-faithful for any chunking aligned to ``window``).

Positions: methods with pre-RoPE keys rotate by each token's position. Where transformers
passes ``position_ids`` to the cache (5.18 and later) a per-row offset is learned from the
first update and kept; otherwise a token's position is its index in the cache. Either way a
stored key is rotated back by the angle it was un-rotated with, so the round trip is exact; true
positions only make it more useful.

Left-padded batches (``generate`` on prompts of different lengths): a row alone groups its tokens from
its own first token, while in a batch the rows' newest tokens share a cache index, so no rectangular
layout can store every row as it would be stored alone; and pads inside a key group would enter its
per-channel statistics. So when the first update is padded, the layer becomes *ragged*: it keeps one
batch-1 layer per row (``rows``) that receives only that row's real tokens, flushes at its own times and
stores exactly the bytes the row alone would (its sink tokens are its first real ones, its pre-RoPE
positions its own). The pads are learned from ``position_ids`` (5.18 and later: ``generate`` numbers a
row's real tokens from 0 and gives its pads 0, :func:`~kvtuner.cache.compat.left_padding`) or declared
by :meth:`MixedPrecisionLayer.set_padding` (any version; ``MixedPrecisionCache.set_padding``). ``update``
still returns ``[B, H_kv, T, D]`` by cache index, each row's pads as zeros in front (the model's mask
hides them); lengths, mask sizes and batch operations are the batch's; pads cost no bytes. Without
either source (5.17 and no ``set_padding``) a padded batch is stored rectangular, pads included, as
before: it decodes, but its rows are not quantized as they would be alone. Unpadded batches always take
the rectangular path.

Flushes quantize with :func:`kvtuner.kernels.quantize` (Triton on CUDA under ``backend="auto"``,
bit-exact with the torch reference). With ``packed_decode`` set (by
:func:`kvtuner.cache.attention.use_packed_attention`), a one-token update skips reading the
history back: it returns only the residual and leaves the pre-flush history in
``pending_history`` for the packed decode kernel.

Static decoding (:meth:`MixedPrecisionLayer.begin_static`, what :class:`kvtuner.cache.graphs.GraphedDecoder`
records as CUDA graphs): one-token steps whose device work has fixed shapes and addresses. The residual is a
``window``-token buffer, the history the code buffers reserved to the final length, and the (history,
residual) token counts live in a device tensor that the step advances; a step that fills the window also
quantizes it and writes its codes after the history, at an offset read on the device. The host keeps the
same counts (it knows which steps flush) and advances them in :meth:`MixedPrecisionLayer.advance_static`,
since a replayed graph runs no Python. The tokens, codes and bytes are exactly those of ``update``.

Sliding-window layers (:class:`MixedPrecisionSlidingLayer`, Mistral, Gemma 2/3) follow the same rule
and then drop, from the front of the history, the whole stored groups (key groups, outlier blocks:
:attr:`~kvtuner.method.StoredKV.token_unit`) that no later query can see, so their memory stays
bounded by the window plus one group and the residual. What they return and the mask sizes they
report are transformers' ``DynamicSlidingWindowLayer``'s: the ``sliding_window - 1`` tokens before the
new ones, and the new ones.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from kvtuner.cache.compat import CacheLayerMixin, left_padding, position_ids_from, tokens_to_keep
from kvtuner.kernels import Backend, decode_supported, min_static_history
from kvtuner.method import KVMethod, StoredKV, StoredSide
from kvtuner.quant import QuantizedTensor, reserve_tokens, slice_tokens, write_tokens_at


@dataclass
class StaticDecode:
    """A layer's static-decoding state (see the module docstring): fixed buffers, device and host counts."""

    residual_keys: torch.Tensor  # [B, H, window, D]
    residual_values: torch.Tensor
    lengths: torch.Tensor  # int32 [2] on the device: (history tokens, residual tokens) before the next step
    history_tokens: int  # the same two counts on the host
    residual_tokens: int
    step: torch.Tensor  # int32 [2] on the device: what a step adds to ``lengths`` (0, 1), and a flushing one
    flush_step: torch.Tensor  # (window, 1 - window): made once, since a graph being recorded cannot copy from host
    attend: torch.Tensor | None = None  # the step's (history, residual) counts, for the attention kernel
    in_step: bool = False  # set by the decoder around a step: a static layer updated by anything else refuses

    @property
    def flushes(self) -> bool:
        """Whether the next step fills the residual window (and so quantizes it)."""
        return self.residual_tokens + 1 == self.residual_keys.shape[-2]

    def residual(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual tokens the host counts, as views of the buffers."""
        n = self.residual_tokens
        return self.residual_keys[..., :n, :], self.residual_values[..., :n, :]

    def restore_device_counts(self) -> None:
        """The device counts set back to the host's, after a step that failed part way (some layers updated)."""
        self.lengths.copy_(torch.tensor([self.history_tokens, self.residual_tokens], dtype=torch.int32))


class MixedPrecisionLayer(CacheLayerMixin):
    """A cache layer holding a method's stored history plus a full-precision residual window."""

    is_sliding = False
    is_compileable = False
    # A crop that reaches into the quantized history re-quantizes what it keeps: close, not exact.
    is_croppable = False
    GROWTH = 1.5  # capacity factor of the code buffers when a flush does not fit

    def __init__(self, method: KVMethod, keep_dequantized: bool = False, backend: Backend = "auto"):
        super().__init__()
        self.method = method
        self.spec = method.spec
        self.window = method.window
        self.keep_dequantized = keep_dequantized
        self.backend = backend
        self.packed_decode = False
        self.pending_history: StoredKV | None = None
        self.history: StoredKV | None = None
        self._buffers: tuple[QuantizedTensor, QuantizedTensor] | None = None  # code buffers the history views
        self._buffer_start = 0  # token of the code buffers where the history begins
        self.first_token = 0  # cache index of the history's first token (earlier ones were dropped: sliding layers)
        self.position_offset: torch.Tensor | None = None  # [B]: position of token t is t + offset
        self._memo: tuple[torch.Tensor, torch.Tensor] | None = None
        self.cumulative_length = 0
        self.declared_padding: torch.Tensor | None = None  # attention mask [B, T] of the first update (set_padding)
        self.pads: torch.Tensor | None = None  # [B]: pads in front of each row, once a padded first update was seen
        self.rows: list[MixedPrecisionLayer] | None = None  # a ragged layer's batch-1 layer per row
        self.pending_rows: list[tuple[StoredKV | None, torch.Tensor, torch.Tensor]] | None = None
        self.static: StaticDecode | None = None

    def __repr__(self) -> str:
        return f"MixedPrecisionLayer({self.spec.label}, g={self.spec.group_size}, r={self.spec.residual_length})"

    # --- transformers' layer API ---------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty((*key_states.shape[:-2], 0, key_states.shape[-1]))
        self.values = value_states.new_empty((*value_states.shape[:-2], 0, value_states.shape[-1]))
        self.position_offset = torch.zeros(key_states.shape[0], dtype=torch.long, device=key_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.static is not None:
            return self._update_static(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        position_ids = position_ids_from(args, kwargs)
        if self.cumulative_length == 0 and self.rows is None:
            pads = self._first_update_pads(key_states, position_ids)
            if pads is not None:
                self.pads = pads
                self.rows = [self._new_row() for _ in range(key_states.shape[0])]
        if self.rows is not None:
            return self._update_rows(key_states, value_states, position_ids)
        if position_ids is not None and self.spec.pre_rope and self.cumulative_length == 0:
            # learned once: stored keys must be rotated back by the angle they were stored with.
            # The last token of each row is never padding.
            last = key_states.shape[-2] - 1
            self.position_offset = (position_ids[:, -1].to(self.device) - last).expand(key_states.shape[0]).clone()
        self.cumulative_length += key_states.shape[-2]
        packed = self.packed_decode and key_states.shape[-2] <= self.window  # a decode step or a short chunk
        history = None if packed else self.dequantized_history()
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if packed:  # the packed attention reads the history itself (kvtuner.cache.attention)
            self.pending_history = self.history
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
        self.static = None
        self.keys = self.values = None
        self.history = None
        self.declared_padding = self.pads = self.rows = self.pending_rows = None
        self._buffers = None
        self._buffer_start = 0
        self.first_token = 0
        self._memo = None
        self.position_offset = None
        self.cumulative_length = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if not self.is_initialized:
            return
        self._refuse_while_static("crop")
        keep = tokens_to_keep(self.cumulative_length, tokens_to_remove)
        if self.rows is not None:  # every row loses the same newest tokens; a row cropped into its pads keeps none
            for row in self.rows:
                row.crop(-min(self.cumulative_length - keep, row.cumulative_length))
            self.pads = self.pads.clamp(max=keep)
            self.cumulative_length = keep
            return
        stored_end = self.first_token + self.quantized_length  # cache index of the residual's first token
        if keep >= stored_end:
            self.keys = self.keys[..., : keep - stored_end, :].clone()
            self.values = self.values[..., : keep - stored_end, :].clone()
        else:
            hist_k, hist_v = self.dequantized_history()
            self.keys, self.values = hist_k[..., : keep - self.first_token, :], hist_v[..., : keep - self.first_token, :]
            self.history = None
            self._buffers = None
            self._memo = None
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

    # --- static decoding (CUDA graphs) ---------------------------------------------------------
    def static_refusal(self) -> str | None:
        """Why this layer cannot decode statically (None if it can): plain KIVI codes (the Triton kernel reads
        them with device-side counts; a flush quantizes them without reading back), one rectangular batch, and
        the whole first step of history the kernel reads unmasked."""
        spec = self.spec
        if self.is_sliding or self.rows is not None:
            return "a sliding-window layer" if self.is_sliding else "a left-padded batch"
        if (not self.method.packed_decode_supported() or spec.sink or spec.codebook
                or not decode_supported(self.method.key_spec, self.method.value_spec, self.keys.shape[-1])):
            return f"{spec.label}: static decoding takes KIVI codes without sink tokens, codebooks, outliers or pre-RoPE keys"
        needed = min_static_history(self.method.key_spec.group_size)
        if self.quantized_length < needed:
            return f"{self.quantized_length} stored tokens (static decoding needs {needed})"
        return None

    def begin_static(self, max_length: int) -> None:
        """Move to static decoding for up to ``max_length`` tokens in all: code buffers reserved to that, the
        residual moved into a ``window``-token buffer (see the module docstring). The packed attention must read
        this layer (``use_packed_attention``): the model's own attention would see the buffer's unused slots."""
        if self.static is not None or not self.packed_decode:
            raise RuntimeError("begin_static: the layer is already static" if self.static is not None else
                               "begin_static runs inside use_packed_attention (GraphedDecoder enters it)")
        refusal = self.static_refusal()
        if refusal:
            raise ValueError(f"static decoding: {refusal}")
        n, window = self.quantized_length, self.window
        capacity = self._whole_windows(max(max_length, n))
        if self._buffers is None or self._buffers[0].num_tokens < capacity:
            self._buffers = (reserve_tokens(self.history.keys.codes, capacity),
                             reserve_tokens(self.history.values.codes, capacity))
            self.history = self._buffered_history(n)
        self._memo = None  # static flushes do not extend it
        residual = self.keys.shape[-2]
        res_k = self.keys.new_zeros((*self.keys.shape[:-2], window, self.keys.shape[-1]))
        res_v = self.values.new_zeros((*self.values.shape[:-2], window, self.values.shape[-1]))
        res_k[..., :residual, :] = self.keys
        res_v[..., :residual, :] = self.values
        counts = torch.tensor([[n, residual], [0, 1], [window, 1 - window]], dtype=torch.int32, device=self.device)
        self.static = StaticDecode(res_k, res_v, counts[0], n, residual, counts[1], counts[2])

    def _update_static(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token, device work only: into the residual buffer at the device's count; the window quantized and
        its codes written after the history when this step fills it (the host knows when); the counts advanced.
        Returns the residual buffer; the step's counts wait in ``static.attend`` for the attention kernel."""
        st = self.static
        if not st.in_step:
            raise RuntimeError("a static layer is stepped by its GraphedDecoder: call the decoder, not the model")
        if key_states.shape[-2] != 1:
            raise ValueError("static decoding takes one token a step")
        slot = st.lengths[1:].long()
        st.residual_keys.index_copy_(2, slot, key_states)
        st.residual_values.index_copy_(2, slot, value_states)
        st.attend = st.lengths + st.step
        if st.flushes:  # positions are unused: static layers have no pre-RoPE keys
            block = self.method.quantize(st.residual_keys, st.residual_values, st.history_tokens, None, self.backend)
            for buffer, side in zip(self._buffers, (block.keys, block.values)):
                write_tokens_at(buffer, st.lengths[:1], side.codes)
        st.lengths.add_(st.flush_step if st.flushes else st.step)
        return st.residual_keys, st.residual_values

    @property
    def code_buffers(self) -> tuple[QuantizedTensor, QuantizedTensor] | None:
        """The key and value code buffers the history views (their whole capacity), if any."""
        return self._buffers

    def advance_static(self) -> None:
        """The host's side of a static step (run after it, replayed or not): counts, and the history's view."""
        st = self.static
        self.cumulative_length += 1
        if st.flushes:
            st.history_tokens += self.window
            st.residual_tokens = 0
            self.history = self._buffered_history(st.history_tokens)
        else:
            st.residual_tokens += 1

    def end_static(self) -> None:
        """Back to ``update``'s storage: the residual buffer's tokens become the residual window again (nothing to do
        after a ``reset``)."""
        st, self.static = self.static, None
        if st is None:
            return
        self.keys, self.values = (t.clone() for t in st.residual())

    def _refuse_while_static(self, what: str) -> None:
        if self.static is not None:
            raise RuntimeError(f"{what} during static decoding: leave the GraphedDecoder first")

    def _buffered_history(self, tokens: int) -> StoredKV:
        """The first ``tokens`` of the code buffers, as the history (plain codes: static layers have no extras)."""
        return StoredKV(*(StoredSide(slice_tokens(b, 0, tokens)) for b in self._buffers))

    def _whole_windows(self, tokens: int) -> int:
        return -(-tokens // self.window) * self.window

    # --- padded batches -----------------------------------------------------------------------
    def set_padding(self, attention_mask: torch.Tensor) -> None:
        """Declare the left padding of the next first update: ``attention_mask`` ``[B, T]`` (0 at pads), as
        ``generate`` receives it. Needed where transformers passes the cache no ``position_ids`` (before 5.18);
        a batch expanded for beams or several return sequences (``repeat_interleave``) is matched row for row."""
        if self.cumulative_length:
            raise ValueError("set_padding describes the first forward pass: call it on a new (or reset) cache")
        if attention_mask.dim() != 2:
            raise ValueError(f"set_padding takes a [batch, tokens] attention mask, not shape {tuple(attention_mask.shape)}")
        real = attention_mask != 0
        pads = (~real).sum(-1)
        if not torch.equal(real, torch.arange(real.shape[-1], device=real.device)[None] >= pads[:, None]):
            raise ValueError("set_padding takes left padding (each row's pads before its tokens); "
                             "decoder-only generation continues from the right end of every row")
        if bool((pads == real.shape[-1]).any()):
            raise ValueError("set_padding: a row of the attention mask has no token")
        self.declared_padding = attention_mask

    def _first_update_pads(self, key_states: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor | None:
        """Pads ``[B]`` in front of each row of the first update, None for an unpadded batch (or one padded with
        nothing to tell: transformers before 5.18 without ``set_padding``)."""
        batch, length = key_states.shape[0], key_states.shape[-2]
        if self.declared_padding is not None:
            mask = self.declared_padding.to(key_states.device)
            if batch % mask.shape[0] == 0:  # generate expands the batch for beams with repeat_interleave
                mask = mask.repeat_interleave(batch // mask.shape[0], dim=0)
            if mask.shape != (batch, length):
                raise ValueError(f"the attention mask given to set_padding is {tuple(self.declared_padding.shape)}, "
                                 f"but the first forward pass has {batch} rows of {length} tokens")
            pads = (mask == 0).sum(-1)
        elif position_ids is not None:
            pads = left_padding(position_ids.to(key_states.device), batch)
        else:
            return None
        return pads if pads is not None and bool(pads.any()) else None

    def _new_row(self) -> MixedPrecisionLayer:
        return MixedPrecisionLayer(self.method, self.keep_dequantized, self.backend)

    def _returned_length(self, new_tokens: int) -> int:
        """Cache slots ``update`` returns for ``new_tokens`` more tokens (what the model's mask spans)."""
        return self.cumulative_length + new_tokens

    def _update_rows(self, key_states: torch.Tensor, value_states: torch.Tensor,
                     position_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A ragged layer's update: each row's layer gets that row's real tokens (the pads of the first update
        dropped, its position_ids with them); the rows' K/V come back right-aligned by cache index."""
        first = self.cumulative_length == 0
        new = key_states.shape[-2]
        length = self._returned_length(new)
        self.cumulative_length += new
        if first and position_ids is not None and position_ids.dim() == 2:  # a row learns its positions from them
            position_ids = position_ids.expand(key_states.shape[0], -1)
        else:
            position_ids = None
        outs = []
        for i, row in enumerate(self.rows):
            skip = int(self.pads[i]) if first else 0
            kwargs = {} if position_ids is None else {"position_ids": position_ids[i : i + 1, skip:]}
            row.packed_decode = self.packed_decode and new == 1
            outs.append(row.update(key_states[i : i + 1, :, skip:], value_states[i : i + 1, :, skip:], kwargs=kwargs))
        if self.packed_decode and new == 1:  # the packed attention reads each row itself (kvtuner.cache.attention)
            self.pending_rows = []
            for row, (keys, values) in zip(self.rows, outs):
                self.pending_rows.append((row.pending_history, keys, values))
                row.pending_history = None
            return key_states, value_states
        return self.right_aligned(outs, length)

    def right_aligned(self, rows: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row K/V ``[1, H, n_i, D]`` as one ``[B, H, length, D]`` by cache index: zeros where a row has pads
        (hidden by the model's mask), each row's last ``length`` tokens at most."""
        keys, values = rows[0][0], rows[0][1]
        out_k = keys.new_zeros((len(rows), keys.shape[1], length, keys.shape[-1]))
        out_v = values.new_zeros((len(rows), values.shape[1], length, values.shape[-1]))
        for i, (k, v) in enumerate(rows):
            n = min(k.shape[-2], length)
            out_k[i, :, length - n :] = k[0, :, k.shape[-2] - n :]
            out_v[i, :, length - n :] = v[0, :, v.shape[-2] - n :]
        return out_k, out_v

    def with_history(self, history: StoredKV | None, keys: torch.Tensor,
                     values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``history`` (this layer's, e.g. a packed step's ``pending_history``) read back, then ``keys`` / ``values``."""
        if history is None:
            return keys, values
        start, n = self.first_token, history.num_tokens
        if self.keep_dequantized:  # the memo of the history since flushed, of which ``history`` is the front
            hist_k, hist_v = (t[..., :n, :] for t in self.dequantized_history())
        else:
            hist_k, hist_v = self.method.dequantize(history, start, self.positions(start, start + n), keys.dtype)
        return torch.cat([hist_k, keys], dim=-2), torch.cat([hist_v, values], dim=-2)

    def _copy(self) -> MixedPrecisionLayer:
        """An independent copy: no tensor, code buffer included, is shared (a flush writes into its buffers)."""
        twin = copy.copy(self)
        twin._map_batch(torch.clone)
        return twin

    def _map_rows(self, order: list[int]) -> None:
        """Rows in ``order`` (beams reordered, repeated, selected): a row taken twice is copied."""
        taken: set[int] = set()
        rows = []
        for i in order:
            rows.append(self.rows[i]._copy() if i in taken else self.rows[i])
            taken.add(i)
        self.rows = rows

    # --- storage ------------------------------------------------------------------------------
    @property
    def quantized_length(self) -> int:
        return self.history.num_tokens if self.history is not None else 0

    def positions(self, start: int, end: int) -> torch.Tensor:
        """RoPE positions ``[B, end - start]`` of tokens ``start .. end - 1``."""
        return torch.arange(start, end, device=self.device)[None] + self.position_offset[:, None]

    def dequantized_history(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stored history read back in the model dtype (memoized when ``keep_dequantized``)."""
        if self.history is None:
            return None
        if self._memo is not None:
            return self._memo
        start = self.first_token
        history = self.method.dequantize(self.history, start, self.positions(start, start + self.quantized_length),
                                         self.dtype)
        if self.keep_dequantized:
            self._memo = history
        return history

    def _flush(self) -> None:
        n = self.keys.shape[-2]
        if n < self.window:
            return
        m = (n // self.window) * self.window
        start = self.first_token + self.quantized_length
        positions = self.positions(start, start + m)
        block = self.method.quantize(self.keys[..., :m, :], self.values[..., :m, :], start, positions, self.backend)
        self.history = self._append(block)
        if self._memo is not None:  # kept up to date once something has read the history back
            flushed = self.method.dequantize(block, start, positions, self.dtype)
            self._memo = tuple(torch.cat([h, f], dim=-2) for h, f in zip(self._memo, flushed))
        # clone: a view would keep the flushed full-precision tokens alive
        self.keys = self.keys[..., m:, :].clone()
        self.values = self.values[..., m:, :].clone()

    def _append(self, block: StoredKV) -> StoredKV:
        """The history followed by ``block``, its codes written in place into buffers that grow by half
        (``GROWTH``) when full: a flush copies its own tokens, and the history is copied O(log T) times in all,
        not at every flush. Outliers and sink tokens are still concatenated (both are small)."""
        if self.history is None:
            self._buffers = None
            return block
        n, m = self.quantized_length, block.num_tokens
        if self._buffers is None or self._buffer_start + n + m > self._buffers[0].num_tokens:
            # a sliding layer's history starts further into its buffers at every drop: the copy moves it back
            capacity = self._whole_windows(max(int(n * self.GROWTH), n + m))
            self._buffers = (reserve_tokens(self.history.keys.codes, capacity),
                             reserve_tokens(self.history.values.codes, capacity))
            self._buffer_start = 0
        return self.history.append(block, self._buffers, self._buffer_start)

    def reserved_nbytes(self) -> int:
        """Bytes of the stored history with its code buffers at full capacity, used or not: compare with
        ``history.nbytes()`` (``nbytes`` adds the residual and level tables to that)."""
        if self.rows is not None:
            return sum(row.reserved_nbytes() for row in self.rows)
        if self._buffers is None:
            return self.history.nbytes() if self.history is not None else 0
        unused = [t.numel() * t.element_size() for q in self._buffers for t in q.stored_tensors()]
        used = [t.numel() * t.element_size() for side in (self.history.keys, self.history.values)
                for t in side.codes.stored_tensors()]
        return self.history.nbytes() + sum(unused) - sum(used)

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self._refuse_while_static("reordering or selecting rows")
        if self.rows is not None:
            self._map_rows(fn(torch.arange(len(self.rows), device=self.pads.device)).tolist())
            self.pads = fn(self.pads)
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.position_offset = fn(self.position_offset)
        if self.history is not None:
            self.history = self.history.map(fn)  # compact: the next flush reserves again
        self._buffers = None
        self._buffer_start = 0
        if self._memo is not None:
            self._memo = (fn(self._memo[0]), fn(self._memo[1]))

    def nbytes(self) -> int:
        """Real storage: the stored history (codes, scales, zeros, outliers, sink), the method's
        level tables and the full-precision residual (never the memo)."""
        if not self.is_initialized:
            return 0
        return self._stored_nbytes() + self.method.table_bytes()

    def _stored_nbytes(self) -> int:
        """``nbytes`` without the level tables, which a ragged layer's rows share."""
        if self.rows is not None:
            return sum(row._stored_nbytes() for row in self.rows)
        keys, values = (self.keys, self.values) if self.static is None else self.static.residual()
        stored = keys.numel() * keys.element_size() + values.numel() * values.element_size()
        if self.history is not None:
            stored += self.history.nbytes()
        return stored


class MixedPrecisionSlidingLayer(MixedPrecisionLayer):
    """A sliding-window layer (``sliding_attention``): a query sees only the ``sliding_window`` most recent
    positions, itself included.

    Storage is the parent's, minus the whole stored groups that fell out of the window (see the module
    docstring). ``update`` returns and ``get_mask_sizes`` reports exactly what transformers'
    ``DynamicSlidingWindowLayer`` does, so sliding and full layers of one cache share its masks, and with
    16-bit sides the layer is bit for bit that layer. ``activate_past_recording`` (assisted decoding) keeps
    every token until the next ``crop``, as transformers' layer does; a crop that needs tokens already
    dropped is refused.
    """

    is_sliding = True

    def __init__(self, method: KVMethod, sliding_window: int, keep_dequantized: bool = False,
                 backend: Backend = "auto"):
        super().__init__(method, keep_dequantized, backend)
        self.sliding_window = sliding_window
        self.record_past = False

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, window={self.sliding_window})"

    def activate_past_recording(self, **kwargs) -> None:
        self.record_past = True
        for row in self.rows or ():
            row.activate_past_recording()

    def _new_row(self) -> MixedPrecisionSlidingLayer:
        row = MixedPrecisionSlidingLayer(self.method, self.sliding_window, self.keep_dequantized, self.backend)
        row.record_past = self.record_past
        return row

    def _returned_length(self, new_tokens: int) -> int:
        return min(self.cumulative_length, self.sliding_window - 1) + new_tokens

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        visible = min(self.cumulative_length, self.sliding_window - 1) + key_states.shape[-2]
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if not self.record_past:
            self._drop_unseen()
        return keys[..., -visible:, :], values[..., -visible:, :]

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        kv_offset = max(self.cumulative_length - self.sliding_window + 1, 0)
        return min(self.cumulative_length, self.sliding_window - 1) + query_length, kv_offset

    def get_max_length(self) -> int:
        return self.sliding_window

    def crop(self, tokens_to_remove: int) -> None:
        if not self.is_initialized:
            return
        keep = tokens_to_keep(self.cumulative_length, tokens_to_remove)
        if self.first_token > max(keep - self.sliding_window + 1, 0):
            raise RuntimeError(
                f"cannot crop this sliding-window layer to {keep} tokens: the window would reach back to tokens it "
                "dropped (call activate_past_recording before the forward passes that may be rolled back)")
        super().crop(tokens_to_remove)
        self._drop_unseen()

    def _drop_unseen(self) -> None:
        """Drop the whole stored groups before the first position the next query can see."""
        if self.history is None:
            return
        first_visible = self.cumulative_length - self.sliding_window + 1
        unit = self.history.token_unit
        drop = min((first_visible - self.first_token) // unit * unit, self.quantized_length)
        if drop <= 0:
            return
        self.history = self.history.drop_front(drop) if drop < self.quantized_length else None
        self.first_token += drop
        self._buffer_start += drop
        if self.history is None:
            self._buffers, self._buffer_start = None, 0
        if self._memo is not None:
            self._memo = tuple(t[..., drop:, :] for t in self._memo) if self.history is not None else None
