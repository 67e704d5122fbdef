"""Decode steps recorded as CUDA graphs: ``with GraphedDecoder(model, cache, max_length) as step: step(tokens)``.

Why: at small batches a decode step is bound by the host. Each layer's packed attention is a few
kernel launches plus Python, so a batch-1 step of an 8B-shaped model spends milliseconds launching what
the GPU runs in less; ``StaticCache`` users remove that with CUDA graphs (``torch.compile``'s
"reduce-overhead"), and a quantized cache that cannot would lose to them exactly where latency matters.

How: every layer enters static decoding (:meth:`~kvtuner.cache.layer.MixedPrecisionLayer.begin_static`):
fixed buffers reserved to ``max_length``, (history, residual) counts in a device tensor that the step
advances, the packed kernel reading them on the device. What still varies is which layers fill their
residual window (and quantize it) at a step; the host knows that from its own counts, so each such
pattern gets its own graph (with one residual length for all layers: a plain step and a flushing
step). A pattern's first step runs eagerly (it compiles the kernels, and a graph cannot), its second is
recorded, and later ones replay it; positions and tokens are copied into the graphs' input buffers
first, and each layer's host counts are advanced after (a replay runs no Python). Off CUDA the same
static steps run eagerly, which is how CPU tests check them against ``update``.

The cache must be a rectangular batch (no left padding) whose every layer the Triton kernel reads with
device lengths: KIVI codes without sinks, codebooks, outliers or pre-RoPE keys, not sliding, at least 128
tokens stored (a prompt of 128 tokens or more with key groups and residual of 32). Graphs need CUDA and the
Triton kernel (``backend`` ``"auto"`` or ``"triton"``). A step that raises leaves every layer's device counts
as the host's, so the decoder can go on; the cache's own operations (crop, beam reordering) wait until the
``with`` block ends, when the layers go back to ``update``'s storage holding the same tokens, so ``generate``
or ``nbytes()`` carry on from there. A decoder may be entered again (its graphs are recorded anew).
"""

from __future__ import annotations

from contextlib import ExitStack

import torch

from kvtuner.cache.attention import use_packed_attention
from kvtuner.cache.compat import Cache, cache_kwargs
from kvtuner.cache.layer import MixedPrecisionLayer
from kvtuner.kernels import Backend, use_triton

__all__ = ["GraphedDecoder"]


class GraphedDecoder:
    """One-token decode steps of ``model`` over ``cache`` (already prefilled), as CUDA graphs.

    ``step(tokens)`` takes the next tokens ``[B, 1]`` and returns the logits of the last position ``[B, V]``
    (the graph's output buffer: read it before the next step). ``max_length``: the most tokens the cache will
    hold, prompt included (its code buffers are reserved to that). ``graphs=False`` runs the same static
    steps eagerly (the default off CUDA).
    """

    def __init__(self, model, cache: Cache, max_length: int, backend: Backend = "auto", graphs: bool | None = None):
        refusals = []
        for i, layer in enumerate(cache.layers):
            why = layer.static_refusal() if isinstance(layer, MixedPrecisionLayer) else "a full-precision layer"
            if why:
                refusals.append(f"layer {i}: {why}")
        if refusals:
            raise ValueError("GraphedDecoder needs every layer in static decoding; " + "; ".join(refusals[:4])
                             + (f" (and {len(refusals) - 4} more)" if len(refusals) > 4 else ""))
        if cache.get_seq_length() >= max_length:
            raise ValueError(f"max_length {max_length} leaves no room after {cache.get_seq_length()} cached tokens")
        self.model, self.cache, self.max_length, self.backend = model, cache, max_length, backend
        self.layers: list[MixedPrecisionLayer] = list(cache.layers)
        device = self.layers[0].device
        self.graphs = device.type == "cuda" if graphs is None else graphs
        if self.graphs and (device.type != "cuda" or not use_triton(backend, device, True, "decode attention")):
            raise ValueError("CUDA graphs need a CUDA cache and the Triton kernel (backend 'auto' or 'triton', "
                             "triton installed); graphs=False runs the static steps eagerly")
        batch = self.layers[0].keys.shape[0]
        self.tokens = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self._recorded: dict[tuple[bool, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._seen: set[tuple[bool, ...]] = set()
        self._pool = None
        self._stack: ExitStack | None = None

    def __enter__(self) -> GraphedDecoder:
        if self._stack is not None:
            raise RuntimeError("this GraphedDecoder is already entered")
        with ExitStack() as stack:
            stack.enter_context(use_packed_attention(self.model, self.cache, self.backend))
            for layer in self.layers:
                layer.begin_static(self.max_length)
                stack.callback(layer.end_static)
            self._stack = stack.pop_all()  # entered whole, or undone
        return self

    def __exit__(self, *exc) -> None:
        stack, self._stack = self._stack, None
        self._recorded.clear()  # recorded against this entry's buffers
        self._seen.clear()
        self._pool = None
        stack.close()

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self._stack is None:
            raise RuntimeError("use GraphedDecoder as a context manager: with GraphedDecoder(...) as step: ...")
        length = self.cache.get_seq_length()
        if length >= self.max_length:
            raise ValueError(f"the cache is full: max_length {self.max_length} tokens")
        self.tokens.copy_(tokens.reshape(self.tokens.shape))
        self.positions.fill_(length)
        pattern = tuple(layer.static.flushes for layer in self.layers)
        try:
            if not self.graphs or pattern not in self._seen:
                logits = self._forward()
                self._seen.add(pattern)
            else:
                if pattern not in self._recorded:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self._pool):
                        out = self._forward()
                    self._pool = graph.pool()
                    self._recorded[pattern] = graph, out
                graph, logits = self._recorded[pattern]
                graph.replay()
        except BaseException:
            for layer in self.layers:  # some layers may have advanced their device counts
                layer.static.restore_device_counts()
            raise
        for layer in self.layers:
            layer.advance_static()
        return logits

    def _forward(self) -> torch.Tensor:
        for layer in self.layers:
            layer.static.in_step = True
        try:
            out = self.model(input_ids=self.tokens, position_ids=self.positions, logits_to_keep=1,
                             **cache_kwargs(self.model, self.cache))
        finally:
            for layer in self.layers:
                layer.static.in_step = False
        return out.logits[:, -1]
