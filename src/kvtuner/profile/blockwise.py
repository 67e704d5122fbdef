"""Decode-faithful KL of a KV config in one forward pass instead of one forward per chunk.

Why it is exact. :class:`~kvtuner.evaluate.Evaluator` feeds text in chunks that divide every
layer's window ``w`` and flushes whole windows into the quantized history, so a query at
position ``t`` of a layer with window ``w`` attends to

* every key of an earlier ``w``-block (positions ``< w * (t // w)``), quantized, and
* the keys of its own block up to ``t``, in full precision.

Blocks are quantized independently (KIVI key groups run along tokens inside a block, the other
layouts group per token; sinks, outliers, codebooks and pre-RoPE rotations are per block or per
token too), so quantizing the whole sequence at once with the layer's
:class:`~kvtuner.method.KVMethod`, the object the cache flushes with, yields the same codes. One
causal pass whose attention sees ``[K_quantized ; K]`` under that block mask therefore computes
what the chunked evaluation computes, up to float rounding, for any chunk size. A sliding-window
layer (the ``sliding_window`` the model passes to its attention) also hides keys more than
``sliding_window - 1`` positions back, as its mask does in the cache; which of the keys it sees are
quantized follows the same rule, because the cache drops only groups no query sees any more.

The pass runs through a custom attention function registered with transformers'
``AttentionInterface``; the per-layer methods travel in the forward kwargs (``kvtuner_plan``), so
nothing is stored on the model. Because quantizing only layer ``l`` leaves layers ``< l``
untouched, the hidden states entering each layer are captured once and a single-layer
profile runs only layers ``l..L-1``: the model's own forward from ``inputs_embeds``, with layers
``0..l-1`` replaced by pass-throughs (so masks, per-layer-type RoPE and final norms are the model's).
An architecture where that does not reproduce its logits, whose attention takes arguments this pass
does not implement (a logit softcap, attention sinks), or with layer types other than full and
sliding attention is refused with a clear message.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel

from kvtuner.cache import layer_methods
from kvtuner.cache.attention import attention_extras
from kvtuner.cache.compat import layer_types, rope_inv_freq
from kvtuner.config import KVConfig, LayerSpec
from kvtuner.method import Calibration, KVMethod, method_for

ATTENTION_NAME = "kvtuner_blockwise"


class UnsupportedModelError(NotImplementedError):
    """The model does something the one-pass passes (profile, calibration) do not model: an attention argument
    such as a logit softcap or sinks, a layer type beyond full and sliding attention, a decoder whose layers a
    suffix run cannot replay. Refused rather than measured wrong; the CLI prints it as one line."""

QUERY_SLICE = 256  # queries per masked attention call (see decode_faithful_attention)
KL_ROWS = 512  # positions per KL step: bounds the [rows, vocab] temporaries
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


def block_mask(start: int, end: int, history: int, window: int, device: torch.device | str = "cpu",
               sliding_window: int | None = None, first: int = 0) -> torch.Tensor:
    """Bool mask for queries ``start..end-1`` over ``[quantized keys first..history-1 ; keys start..end-1]``.

    A query ``t`` sees quantized keys before its block start ``window * (t // window)`` and
    full-precision keys from its block start to ``t``; with a ``sliding_window``, only keys after
    ``t - sliding_window``. ``start`` must be a block start.
    """
    pos = torch.arange(start, end, device=device)
    block_start = (pos // window) * window
    history_pos = torch.arange(first, history, device=device)
    sees_history = history_pos[None, :] < block_start[:, None]
    sees_own_block = (pos[None, :] >= block_start[:, None]) & (pos[None, :] <= pos[:, None])
    if sliding_window is not None:
        sees_history &= history_pos[None, :] > pos[:, None] - sliding_window
        sees_own_block &= pos[None, :] > pos[:, None] - sliding_window
    return torch.cat([sees_history, sees_own_block], dim=1)


def decode_faithful_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, method: KVMethod | None, scaling: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention output ``[B, H, T, D]`` of one layer as decoding with ``method`` computes it.

    query ``[B, H, T, D]``, key / value ``[B, H_kv, T, D]`` (post-RoPE at positions 0..T-1,
    before GQA repeat). ``method`` None: plain causal attention (within ``sliding_window``, if given).
    Queries go in slices of ``QUERY_SLICE`` tokens, each against only the history it can see: a masked
    attention cannot skip work the way a causal one does, and one dense ``[T, 2T]`` pass cost 6x the
    causal pass at 2048 tokens on CPU; the slices cost 1.6x.
    """
    gqa = query.shape[1] != key.shape[1]
    length = query.shape[-2]
    if method is None and sliding_window is None:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa)
    if method is None:  # full precision: every earlier key is "history", read back as it is
        kq, vq, window = key, value, 1
    else:
        kq, vq = method.roundtrip(key, value)
        window = method.window
    step = window * max(1, QUERY_SLICE // window)
    out = torch.empty_like(query)
    for start in range(0, length, step):
        end = min(start + step, length)
        history = min(window * ((end - 1) // window), kq.shape[-2])
        first = 0 if sliding_window is None else min(max(start - sliding_window + 1, 0), history)
        keys = torch.cat([kq[..., first:history, :], key[..., start:end, :]], dim=-2)
        values = torch.cat([vq[..., first:history, :], value[..., start:end, :]], dim=-2)
        mask = block_mask(start, end, history, window, query.device, sliding_window, first)
        out[..., start:end, :] = F.scaled_dot_product_attention(
            query[..., start:end, :], keys, values, attn_mask=mask, scale=scaling, enable_gqa=gqa
        )
    return out


@dataclass
class Plan:
    """What the attention function does in one pass: a method per layer (None: full precision), and optionally record q/k/v."""

    methods: Sequence[KVMethod | None]
    capture: dict[int, Captured] | None = None


@dataclass
class Captured:
    """One layer's full-precision attention inputs: query ``[B, H, T, D]``, key / value ``[B, H_kv, T, D]``,
    and its sliding window (None: full attention)."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scaling: float
    sliding_window: int | None = None


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, kvtuner_plan: Plan | None = None,
               sliding_window: int | None = None, **kwargs):
    """transformers attention-interface function: ignores ``attention_mask`` (inputs carry no padding; the causal
    and sliding-window masks are rebuilt here) and refuses any argument it does not implement."""
    if kvtuner_plan is None:
        raise RuntimeError("kvtuner's blockwise attention needs a kvtuner_plan; use BlockwiseEvaluator")
    extras = attention_extras(dropout, kwargs)
    if extras:
        raise UnsupportedModelError(f"{type(module).__name__} calls attention with {', '.join(extras)}; the one-pass "
                                  "profile implements causal attention with an optional sliding window only")
    idx = module.layer_idx
    scaling = scaling or query.shape[-1] ** -0.5
    if kvtuner_plan.capture is not None:
        kvtuner_plan.capture[idx] = Captured(query, key, value, scaling, sliding_window)
    out = decode_faithful_attention(query, key, value, kvtuner_plan.methods[idx], scaling, sliding_window)
    return out.transpose(1, 2).contiguous(), None


@contextmanager
def blockwise_attention(model: PreTrainedModel) -> Iterator[None]:
    """Route ``model``'s attention through :func:`_attention` for the duration of the block."""
    AttentionInterface.register(ATTENTION_NAME, _attention)
    previous = model.config._attn_implementation
    model.config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        model.config._attn_implementation = previous


class BlockwiseEvaluator:
    """Decode-faithful KL of configs on fixed tokens, one pass per config (see the module docstring).

    capture: also keep each layer's input hidden states and full-precision q/k/v, which the
    single-layer profile (``kl_single``) and the attention statistics need (memory: about
    ``L * T * (hidden + 2 * heads * head_dim) * 4`` bytes).
    calibration: NUQ levels and outlier thresholds for specs that need them (a config's own
    ``calibration`` file is used when this is None).
    """

    def __init__(self, model: PreTrainedModel, input_ids: torch.Tensor, capture: bool = False,
                 calibration: Calibration | None = None):
        kinds = {kind for kind, _ in layer_types(model.config)} - set(SUPPORTED_LAYER_TYPES)
        if kinds:
            raise UnsupportedModelError(
                f"{type(model).__name__} has {', '.join(sorted(kinds))} layers; the one-pass evaluator models "
                "full and sliding-window causal attention only"
            )
        self.model = model
        self.calibration = calibration
        self.input_ids = input_ids.to(model.device)
        self.num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        plan = Plan([None] * self.num_layers, {} if capture else None)
        with torch.no_grad(), blockwise_attention(model):
            out = model(self.input_ids, use_cache=False, output_hidden_states=capture, kvtuner_plan=plan)
        self.ref_logprobs = torch.log_softmax(out.logits.float(), dim=-1)  # [B, T, V]
        self.ref_probs = self.ref_logprobs.exp()
        self.hidden: list[torch.Tensor] = list(out.hidden_states[: self.num_layers]) if capture else []
        self.captured: dict[int, Captured] = plan.capture or {}
        if capture:
            self._check_suffix()

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()

    def kl_logits(self, logits: torch.Tensor) -> float:
        """Mean KL(full precision || logits) per token.

        Rows are summed in float32 (the log-prob differences are exact, the sums lose ~1e-7
        relative) and accumulated in float64; ``Evaluator`` sums in float64 throughout, which
        costs a float64 copy of every [rows, vocab] block for no visible difference.
        """
        vocab = logits.shape[-1]
        ref_logp, ref_p = self.ref_logprobs.reshape(-1, vocab), self.ref_probs.reshape(-1, vocab)
        flat = logits.reshape(-1, vocab)
        total = 0.0
        for start in range(0, flat.shape[0], KL_ROWS):
            rows = slice(start, start + KL_ROWS)
            logp = torch.log_softmax(flat[rows].float(), dim=-1)
            total += float((ref_p[rows] * (ref_logp[rows] - logp)).sum(-1).double().sum())
        return total / flat.shape[0]

    def method(self, layer: int, spec: LayerSpec | None) -> KVMethod | None:
        """What ``spec`` stores at ``layer`` (None for none or fp16)."""
        if spec is None:
            return None
        return method_for(spec, layer, self.calibration, lambda i: rope_inv_freq(self.model.config, i))

    def methods(self, config: KVConfig) -> list[KVMethod | None]:
        return layer_methods(config, self.model.config, self.calibration)

    @torch.no_grad()
    def logits(self, methods: Sequence[KVMethod | None]) -> torch.Tensor:
        with blockwise_attention(self.model):
            return self.model(self.input_ids, use_cache=False, kvtuner_plan=Plan(list(methods))).logits

    def kl(self, config: KVConfig) -> float:
        """Decode-faithful KL of a whole config (equal to ``Evaluator.evaluate(config).kl`` to float tolerance)."""
        return self.kl_logits(self.logits(self.methods(config)))

    @torch.no_grad()
    def suffix_logits(self, start: int, methods: Sequence[KVMethod | None]) -> torch.Tensor:
        """Logits from the captured input of layer ``start`` through layers ``start..L-1``: the model's own forward
        from ``inputs_embeds`` with the layers before ``start`` passed through."""
        if not self.hidden:
            raise RuntimeError("suffix runs need BlockwiseEvaluator(..., capture=True)")
        layers = self.model.get_decoder().layers
        skipped = [layers[i] for i in range(start)]
        try:
            for i, layer in enumerate(skipped):
                layers[i] = _PassThrough(layer)
            with blockwise_attention(self.model):
                return self.model(inputs_embeds=self.hidden[start], use_cache=False, kvtuner_plan=Plan(list(methods))).logits
        finally:
            for i, layer in enumerate(skipped):
                layers[i] = layer

    def kl_single(self, layer: int, spec: LayerSpec) -> float:
        """KL when only ``layer`` stores its KV with ``spec`` (runs layers ``layer..L-1`` only)."""
        methods: list[KVMethod | None] = [None] * self.num_layers
        methods[layer] = self.method(layer, spec)
        return self.kl_logits(self.suffix_logits(layer, methods))

    def _check_suffix(self) -> None:
        """Refuse architectures whose forward a suffix run does not reproduce (e.g. layers that take more than the
        previous layer's hidden states)."""
        logits = self.suffix_logits(self.num_layers - 1, [None] * self.num_layers)
        if not torch.allclose(torch.log_softmax(logits.float(), -1), self.ref_logprobs, atol=1e-3):
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: replaying its last decoder layer does not reproduce its logits; "
                "the layer-suffix profile needs decoders whose layers pass hidden states from one to the next"
            )


class _PassThrough(torch.nn.Module):
    """Stands in for a decoder layer whose output a suffix run already has: returns the hidden states it is given.
    Keeps the layer's ``attention_type``, which some decoders read to pick the layer's mask."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.attention_type = getattr(layer, "attention_type", None)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states
