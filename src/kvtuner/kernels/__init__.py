"""Kernels for the packed KV cache (Triton and Gluon on GPUs, C++ on CPUs), each beside a torch reference,
behind one backend switch.

Decoding reads every cached key and value once per generated token, so it is memory-bandwidth
bound: a low-bit cache speeds it up only when attention reads the packed bytes directly, never
a dequantized copy. Two kernels serve :class:`~kvtuner.cache.layer.MixedPrecisionLayer`:

* :func:`quantize`: quantize-and-pack when the residual window flushes (:mod:`.quantize_pack`);
* :func:`decode_attention`: split-K decode attention over packed history plus residual,
  specialized per layer on its (K bits, V bits) (:mod:`.decode`).

``backend``: ``"auto"`` runs, on CUDA tensors, the Gluon tensor-core decode kernel (:mod:`.gluon_decode`)
where it reads the layout, triton is the version it is written for and the history is long enough for it
to be the faster (``gluon_preferred``), else Triton's when triton is
installed and the specs are supported (KIVI layout: asymmetric integer codes, keys per channel, values
per token, uniform or indexing one non-uniform level table a side), and torch otherwise; on CPU tensors
it runs the C++ decode kernel (:mod:`.native`, built on first use) where it reads the layout and builds.
``"gluon"``, ``"triton"``, ``"native"`` or ``"torch"`` forces one, and forcing a kernel on a layout it does
not read raises (``"gluon"`` means Triton's quantizer: there is no Gluon one; quantizing on CPU is always
torch's). The torch decode path streams the packed history tile by tile (:mod:`.streaming`); the
float64-capable :mod:`.reference` is what tests hold them all to. Forcing Triton on CPU tensors works
under ``TRITON_INTERPRET=1`` (how CI tests the kernels); triton is imported only when used.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Literal

import torch

from kvtuner.kernels.native import decode_attention_native, native_available, native_supported
from kvtuner.kernels.streaming import decode_attention_streaming
from kvtuner.quant import QuantizedTensor, QuantSpec, slice_tokens
from kvtuner.quant import quantize as quantize_reference

Backend = Literal["auto", "gluon", "triton", "native", "torch"]
BACKENDS = ("auto", "gluon", "triton", "native", "torch")
GLUON_TRITON = "3.6."  # the triton the Gluon kernel is written against (the GPU image's); its API moves

__all__ = [
    "BACKENDS",
    "Backend",
    "decode_attention",
    "decode_attention_rows",
    "decode_supported",
    "min_static_history",
    "quantize",
    "quantize_supported",
    "use_triton",
]


STEP_TOKENS = 128  # history tokens one step of the Triton decode kernel covers (one key group, if longer)
# a ragged batch's row for decode_attention_rows: key codes, value codes (None: no history yet), the residual
# keys and values, the history's first attended token
DecodeRow = tuple[QuantizedTensor | None, QuantizedTensor | None, torch.Tensor, torch.Tensor, int]


def min_static_history(key_group: int) -> int:
    """History tokens the Triton kernel needs before it reads its counts from the device: its first step whole
    (with counts on the device it reads whole steps unmasked)."""
    return max(STEP_TOKENS, key_group)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _packed_int(spec: QuantSpec) -> bool:
    return not spec.is_passthrough and spec.fp8 is None and not spec.symmetric


def quantize_supported(spec: QuantSpec, shape: torch.Size) -> bool:
    """Whether the Triton quantizer handles ``spec`` for a tensor of ``shape`` ([..., T, D])."""
    d, g = shape[-1], spec.group_len(shape)
    return _packed_int(spec) and _pow2(d) and d >= 32 and _pow2(g) and (spec.axis == "channel" or g <= d)


def decode_supported(key_spec: QuantSpec, value_spec: QuantSpec, head_dim: int) -> bool:
    """Whether the Triton decode kernel reads this layout: power-of-two key groups of >= 16 tokens,
    and value groups that hold whole packed words (3-bit: words of its 2-bit plane)."""
    value_group = value_spec.group_size if value_spec.group_size != -1 else head_dim
    plane_bits = 2 if value_spec.bits == 3 else value_spec.bits
    return (
        _packed_int(key_spec) and key_spec.axis == "channel"
        and _packed_int(value_spec) and value_spec.axis == "token"
        and _pow2(head_dim) and head_dim >= 32
        and _pow2(key_spec.group_size) and key_spec.group_size >= 16
        and _pow2(value_group) and 32 // plane_bits <= value_group <= head_dim
    )


@functools.cache
def gluon_available(device: torch.device, measured_only: bool = True) -> bool:
    """Whether the Gluon kernel runs on ``device``: a CUDA GPU with ``mma.sync`` m16n8k16 (sm_80 on; with
    ``measured_only``, sm_90 on, the GPUs it was measured on) and triton with ``triton.experimental.gluon`` at
    the version the kernel is written for."""
    if device.type != "cuda" or importlib.util.find_spec("triton") is None:
        return False
    import triton

    if not triton.__version__.startswith(GLUON_TRITON) or importlib.util.find_spec("triton.experimental.gluon") is None:
        return False
    return torch.cuda.get_device_capability(device) >= ((9, 0) if measured_only else (8, 0))


def use_triton(backend: Backend, device: torch.device, supported: bool, what: str) -> bool:
    """Resolve ``backend`` for one call; raise if Triton is forced where it cannot run (``"gluon"`` asks for
    Triton where only a Triton kernel exists)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    if backend in ("torch", "native"):
        return False
    if backend == "gluon":
        backend = "triton"
    if backend == "triton":
        if not supported:
            raise ValueError(f"the Triton {what} kernel does not support this layout; use backend='torch'")
        if importlib.util.find_spec("triton") is None:
            raise ImportError("backend='triton' needs triton: pip install 'kvtuner[triton]'")
        return True
    return supported and device.type == "cuda" and importlib.util.find_spec("triton") is not None


def quantize(x: torch.Tensor, spec: QuantSpec, backend: Backend = "auto") -> QuantizedTensor:
    """:func:`kvtuner.quant.quantize`, run by the Triton kernel where ``backend`` selects it (bit-exact)."""
    if use_triton(backend, x.device, quantize_supported(spec, x.shape), "quantize"):
        from kvtuner.kernels.quantize_pack import quantize_triton

        return quantize_triton(x, spec)
    return quantize_reference(x, spec)


def _triton_decodes(key_spec: QuantSpec, value_spec: QuantSpec, head_dim: int,
                    *codes: QuantizedTensor | None) -> bool:
    """Whether the Triton decode kernel reads these codes: its layout, and level tables of one row of 4-16."""
    return decode_supported(key_spec, value_spec, head_dim) and all(
        q is None or q.levels is None or (q.levels.dim() == 1 and q.spec.bits in (2, 3, 4)) for q in codes)


def decode_attention(
    query: torch.Tensor,
    qkeys: QuantizedTensor | None,
    qvalues: QuantizedTensor | None,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    key_spec: QuantSpec,
    value_spec: QuantSpec,
    backend: Backend = "auto",
    history_start: int = 0,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence over packed history plus full-precision residual.

    query [B, H_q, D]; qkeys / qvalues [B, H_kv, T_q, D] packed with ``key_spec`` /
    ``value_spec`` (None before the first flush), their codes indexing one ``levels`` table a side
    or none; keys / values the full-precision tokens [B, H_kv, T_r, D]; history tokens before
    ``history_start`` are not attended. Returns [B, H_q, D]. See
    :func:`~kvtuner.kernels.reference.decode_attention_reference`.

    lengths: int32 ``[2]`` on the query's device, the (history, residual) tokens to attend of the buffers
    given (static decoding): read on the device by the Triton kernel (CUDA graphs record it once), read back
    and sliced by every other backend.
    """
    if lengths is not None:
        if use_triton(backend, query.device, _triton_decodes(key_spec, value_spec, query.shape[-1], qkeys, qvalues),
                      "decode attention"):
            from kvtuner.kernels.decode import decode_attention_triton

            return decode_attention_triton(query, qkeys, qvalues, keys, values, scale, history_start, lengths=lengths)
        n_hist, n_res = lengths.tolist()
        qkeys, qvalues = (None if q is None else slice_tokens(q, 0, n_hist) for q in (qkeys, qvalues))
        keys, values = keys[..., :n_res, :], values[..., :n_res, :]
    if backend == "gluon":
        if not gluon_available(query.device, measured_only=False):
            raise ValueError(f"backend='gluon' needs CUDA tensors on sm_80 or newer and triton {GLUON_TRITON}x "
                             "(Gluon has no interpreter)")
        if qkeys is None or history_start:
            raise ValueError("the Gluon decode kernel reads a packed history without sink tokens; "
                             f"this call has {'no history' if qkeys is None else 'sink tokens'}: use backend='triton'")
    if backend == "gluon" or (backend == "auto" and qkeys is not None and gluon_available(query.device)):
        from kvtuner.kernels.gluon_decode import decode_attention_gluon, gluon_preferred, gluon_supported

        if gluon_supported(qkeys, qvalues, query, history_start) and (backend == "gluon" or gluon_preferred(qkeys)):
            return decode_attention_gluon(query, qkeys, qvalues, keys, values, scale)
        if backend == "gluon":
            raise ValueError("the Gluon decode kernel does not read this layout (2, 4 or 8 uniform bits a side, head "
                             "dim 64 or 128, key groups of 32-128 tokens: kvtuner.kernels.gluon_decode); "
                             "use backend='triton'")
    if use_triton(backend, query.device, _triton_decodes(key_spec, value_spec, query.shape[-1], qkeys, qvalues),
                  "decode attention"):
        from kvtuner.kernels.decode import decode_attention_triton

        return decode_attention_triton(query, qkeys, qvalues, keys, values, scale, history_start)
    if qkeys is not None and (backend == "native" or (backend == "auto" and query.device.type == "cpu")):
        readable = native_supported(qkeys, qvalues, query.shape[-1])
        if backend == "native" and (query.device.type != "cpu" or not readable):
            raise ValueError("the C++ decode kernel reads CPU tensors with a packed history of scaled integer or fp8 "
                             "codes, keys per channel or per token and values per token; use backend='torch'")
        if readable and (backend == "native" or native_available()):  # a forced kernel that cannot build raises
            return decode_attention_native(query, qkeys, qvalues, keys, values, scale, history_start)
    return decode_attention_streaming(query, qkeys, qvalues, keys, values, scale, history_start)


def decode_attention_rows(
    query: torch.Tensor,
    rows: list[DecodeRow],
    scale: float,
    key_spec: QuantSpec,
    value_spec: QuantSpec,
    backend: Backend = "auto",
) -> torch.Tensor:
    """A ragged batch's step: row ``i`` of ``query`` ``[B, H_q, D]`` over ``rows[i]`` = (qkeys, qvalues, keys,
    values, history_start), a sequence of batch 1 stored apart with its own lengths (a left-padded batch,
    :mod:`kvtuner.cache.layer`). Where Triton decodes (``"auto"`` on CUDA, or forced), one launch for the whole
    batch reads each row's tensors and counts from a table on the device
    (:func:`~kvtuner.kernels.decode.decode_attention_triton_rows`): the per-row start offsets of a padded batch,
    with no pad ever stored or read; on an H200 at batch 16 (rows of 1k-4k and 8k-32k tokens, K4V4,
    ``benchmarks/bench_ragged.py``) 3.2-3.6x faster than a launch a row, the Gluon kernel's included. Elsewhere
    (CPU, ``"gluon"``, ``"native"``, ``"torch"``): :func:`decode_attention` a row at a time. Returns ``[B, H_q, D]``."""
    readable = _triton_decodes(key_spec, value_spec, query.shape[-1], *(q for row in rows for q in row[:2]))
    if backend != "gluon" and use_triton(backend, query.device, readable, "decode attention"):
        from kvtuner.kernels.decode import decode_attention_triton_rows

        return decode_attention_triton_rows(query, rows, scale)
    return torch.cat([decode_attention(query[i : i + 1], qk, qv, k, v, scale, key_spec, value_spec,
                                       "triton" if backend == "gluon" and qk is None else backend, start)
                      for i, (qk, qv, k, v, start) in enumerate(rows)])  # (Gluon reads no residual alone)

