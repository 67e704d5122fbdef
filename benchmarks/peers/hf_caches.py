"""transformers' own quantized caches (``QuantizedCache`` with the quanto, HQQ or fp8 backend) as peers.

They run on the same model object, tokens and full-precision reference as kvtuner (one
``kvtuner.evaluate.Evaluator``), fed in chunks of ``residual_length`` tokens. That chunking is
decode-faithful for transformers' ``QuantizedLayer``: it quantizes the first chunk as a prompt,
then keeps new tokens in full precision until ``residual_length`` are waiting and re-quantizes
the whole history; token-by-token generation with chunk-aligned flushes therefore shows each
token the same K/V (history quantized, its own block in full precision) as one chunk does.

Settings (quanto and HQQ): ``q_group_size=32`` and ``residual_length=32`` (KIVI-like, as
kvtuner's KIVI layers), keys and values both grouped per token over contiguous runs of 32
channels of the head dimension: quanto's default ``axis=0`` does that; HQQ's default ``axis=0``
would reshape the flattened tensor to [32, numel / 32] and group its columns (elements far apart,
across tokens and heads), so HQQ runs with ``axis=1`` (the same per-token layout as quanto). transformers has no per-channel-key option for a
[B, H, T, D] cache with these backends, which is the main difference from KIVI.

Bytes are the backend's stored tensors (codes, scales, zero points/shifts) plus the residual;
floating-point tensors are counted at 2 bytes per element, as in the fp16 deployment the
bits axis assumes (this benchmark runs the model in fp32 on CPU, which would double the scales).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from kvtuner.cache import fingerprint
from kvtuner.evaluate import Evaluator
from kvtuner.evaluate.runner import chunked_logprobs
from peers.common import PeerUnavailable, Row, Scores

PACKAGES = {"quanto": ("optimum.quanto", "optimum-quanto"), "hqq": ("hqq", "hqq")}


@dataclass(frozen=True)
class HFCacheSpec:
    backend: str  # "quanto" | "hqq" | "fp8"
    nbits: int
    q_group_size: int = 32
    residual_length: int = 32

    @property
    def engine(self) -> str:
        return "transformers-fp8" if self.backend == "fp8" else self.backend

    @property
    def label(self) -> str:
        if self.backend == "fp8":
            return "fp8-e4m3 per-tensor"
        return f"KV{self.nbits} g{self.q_group_size} r{self.residual_length}"

    def make_cache(self, model_config):
        from transformers.cache_utils import QuantizedCache

        if self.backend == "fp8":
            return QuantizedCache("fp8", model_config)
        axis = 1 if self.backend == "hqq" else 0
        return QuantizedCache(self.backend, model_config, nbits=self.nbits, axis_key=axis, axis_value=axis,
                              q_group_size=self.q_group_size, residual_length=self.residual_length)


def check_available(backend: str) -> None:
    """Raise ``PeerUnavailable`` if ``backend`` cannot run in this environment."""
    if backend in PACKAGES:
        module, dist = PACKAGES[backend]
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise PeerUnavailable(f"{backend}: package {dist!r} is not installed (pip install -e '.[peers]' or pip install {dist})")
    if backend == "fp8":
        try:
            from transformers.cache_utils import Fp8QuantizedLayer  # noqa: F401
        except ImportError:
            raise PeerUnavailable("transformers-fp8: this transformers has no QuantizedCache('fp8') backend") from None


def stored_bytes(obj) -> int:
    """Bytes of every tensor reachable in a backend's stored state; float tensors at <= 2 bytes/element."""
    if obj is None or isinstance(obj, (int, float, str, bool, torch.dtype)):
        return 0
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):  # quanto's tensor subclasses
            names, _ = obj.__tensor_flatten__()
            return sum(stored_bytes(getattr(obj, n)) for n in names)
        size = min(obj.element_size(), 2) if obj.is_floating_point() else obj.element_size()
        return obj.numel() * size
    if isinstance(obj, dict):
        return sum(stored_bytes(v) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(stored_bytes(v) for v in obj)
    raise TypeError(f"cannot count bytes of {type(obj).__name__}")


def cache_bytes(cache, model_config, batch: int) -> tuple[int, int]:
    """(stored bytes, fp16 bytes of the same K/V elements) of a filled ``QuantizedCache`` of ``batch`` rows."""
    fp = fingerprint(model_config)
    stored = fp16 = 0
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        stored += stored_bytes([layer._quantized_keys, layer._quantized_values])
        if layer.keys is not None and layer.keys.dim() == 4:  # the full-precision residual (emptied to [0] on flush)
            stored += stored_bytes([layer.keys, layer.values])
        fp16 += 2 * batch * fp.num_kv_heads * layer.get_seq_length() * fp.head_dim * 2
    return stored, fp16


def evaluate(evaluator: Evaluator, spec: HFCacheSpec, progress: bool = False) -> Row:
    """Score one transformers cache on the evaluator's windows, decode-faithfully in residual-length chunks."""
    model, ids = evaluator.model, evaluator.input_ids
    cache = spec.make_cache(model.config)
    chunk = spec.residual_length
    scores = Scores()
    parts: list[torch.Tensor] = []
    desc = f"{spec.engine} {spec.label}" if progress else None
    for _, logprobs in chunked_logprobs(model, ids, cache, chunk, desc):
        parts.append(logprobs)
    logprobs = torch.cat(parts, dim=1)
    for b in range(ids.shape[0]):
        scores.add(evaluator.ref_logprobs[b], logprobs[b], ids[b])
    stored, fp16 = cache_bytes(cache, model.config, ids.shape[0])
    nominal = 8.0 if spec.backend == "fp8" else float(spec.nbits)
    return scores.row(spec.engine, spec.label, nominal, 16 * stored / fp16,
                      note=f"chunk {chunk}; bytes from stored tensors, floats at 2 B")


def specs(backends: list[str]) -> Iterator[HFCacheSpec]:
    for backend in backends:
        if backend == "fp8":
            yield HFCacheSpec("fp8", 8)
        else:
            for nbits in (2, 4):
                yield HFCacheSpec(backend, nbits)
