"""Decode attention over packed KV on the CPU in C++ (``csrc/decode_cpu.cpp``), built on first use.

Why native code: on a CPU the cost of a quantized cache's decode step is the unpack. In torch a 4-bit
code costs about ten times a float copy, so even the tiled torch path (:mod:`.streaming`) is slower
than ``DynamicCache``'s SDPA over fp32 keys. The C++ loop unpacks each token's codes once into a row
that stays in L1, folds the key scales into the query once per key group, and reads each code once
per step: the step costs what it reads. See the source's header for the arithmetic.

The extension is compiled by ``torch.utils.cpp_extension`` (g++, ``-O3 -march=native -fopenmp``)
the first time it is needed (15-20 s on two cores; GCC 12 or newer, or clang, for ``__builtin_shufflevector``; under ``$TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``) and reused from there; it registers ``torch.ops.kvtuner_cpu``. Where it
cannot be built (no compiler), :func:`native_available` says why once and the torch path runs.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import warnings
from pathlib import Path

import torch

from kvtuner.quant import QuantizedTensor
from kvtuner.quant.tensor import FP8_DTYPES

SOURCE = Path(__file__).parent / "csrc" / "decode_cpu.cpp"

__all__ = ["decode_attention_native", "native_available", "native_supported"]


def _extension_name() -> str:
    """One build per CPU feature set: ``-march=native`` code from one machine may not run on another that
    shares the build folder (a network home directory)."""
    flags = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith(("flags", "Features"))), "")
    return f"kvtuner_decode_cpu_{hashlib.sha1((platform.machine() + flags).encode()).hexdigest()[:10]}"


@functools.cache
def _build_error() -> str | None:
    """Build (or load the cached build of) the extension; the reason it failed, or None."""
    from torch.utils import cpp_extension

    try:
        cpp_extension.load(name=_extension_name(), sources=[str(SOURCE)], is_python_module=False,
                           extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as error:  # a missing compiler or ninja shows as several exception types
        lines = str(error).strip().splitlines() or [""]
        cause = [line for line in lines if "error:" in line or "not found" in line or "No such file" in line]
        return f"{type(error).__name__}: {(cause or lines)[0][:300]}"
    return None


def native_available(warn: bool = True) -> bool:
    """Whether the C++ kernel runs here (built now if needed); with ``warn``, a failed build is reported once."""
    error = _build_error()
    if error is not None and warn:
        _warn_once(error)
    return error is None


@functools.cache
def _warn_once(error: str) -> None:
    warnings.warn(f"kvtuner's C++ CPU decode kernel could not be built ({error}); decoding on the torch path "
                  "(g++ 12 or newer, or clang, and ninja build the faster one)", stacklevel=3)


@functools.cache
def _fp8_values(fp8: str) -> torch.Tensor:
    return torch.arange(256, dtype=torch.uint8).view(FP8_DTYPES[fp8]).float()


def _levels(q: QuantizedTensor) -> torch.Tensor | None:
    """The float32 table a code indexes: a codebook, or every fp8 byte's value; None for uniform codes."""
    if q.spec.fp8 is not None:
        return _fp8_values(q.spec.fp8)
    return None if q.levels is None else q.levels.to(torch.float32).contiguous()


def native_supported(qkeys: QuantizedTensor, qvalues: QuantizedTensor, head_dim: int) -> bool:
    """Whether the C++ kernel reads this layout: scaled integer codes (2, 3, 4 or 8 bits, uniform or one level
    table a side) or fp8; keys per channel or per token, values per token; channel groups that tile the head."""
    def readable(q: QuantizedTensor) -> bool:
        spec = q.spec
        return (not spec.is_passthrough and q.scale is not None and spec.bits in (2, 3, 4, 8)
                and (q.levels is None or q.levels.dim() == 1)
                and (spec.axis == "channel" or head_dim % spec.group_len(q.shape) == 0))

    return readable(qkeys) and readable(qvalues) and qvalues.spec.axis == "token"


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] else t.contiguous()


def decode_attention_native(
    query: torch.Tensor,
    qkeys: QuantizedTensor,
    qvalues: QuantizedTensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    history_start: int = 0,
) -> torch.Tensor:
    """:func:`kvtuner.kernels.decode_attention` in C++ for CPU tensors (layouts :func:`native_supported` reads);
    float32 arithmetic, the result in the query's dtype."""
    error = _build_error()
    if error is not None:
        raise RuntimeError(f"kvtuner's C++ CPU decode kernel could not be built: {error}")

    def side(q: QuantizedTensor) -> list:
        return [_rows_contiguous(q.payload), _rows_contiguous(q.scale),
                None if q.zero is None else _rows_contiguous(q.zero), _levels(q), q.spec.bits, q.spec.symmetric]

    # scales and zeros share a layout (quant's slices and buffers treat them alike); the op checks it
    k_codes, k_scale, k_zero, k_levels, k_bits, k_sym = side(qkeys)
    v_codes, v_scale, v_zero, v_levels, v_bits, v_sym = side(qvalues)
    out = torch.ops.kvtuner_cpu.decode_attention(
        query.float().contiguous(), k_codes, k_scale, k_zero, k_levels, k_bits, k_sym, qkeys.spec.axis == "channel",
        qkeys.spec.group_len(qkeys.shape), v_codes, v_scale, v_zero, v_levels, v_bits, v_sym,
        qvalues.spec.group_len(qvalues.shape), keys.float().contiguous(), values.float().contiguous(), scale,
        history_start)
    return out.to(query.dtype)
