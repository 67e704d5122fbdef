"""Group-wise quantization of KV tensors into real packed storage.

Tensors are ``[..., T, D]`` (batch, heads, tokens, head_dim). Two group axes:

* ``"token"``: each token's ``D`` channels split into groups of ``group_size`` with one scale
  (and zero) per group. Values in KIVI, and both K and V in llama.cpp's q4_0 / q8_0.
* ``"channel"``: each channel's tokens split into groups of ``group_size`` tokens. KIVI
  quantizes keys this way because key outliers sit in fixed channels; a per-channel scale
  absorbs them instead of smearing one outlier over the whole token.

Codes are packed along ``D`` by :mod:`kvtuner.quant.packing` for either axis, so a kernel
reads a tile of tokens as contiguous words. Scales and zeros are stored in ``scale_dtype``
(fp16 by default), with shape ``[..., T, D // G]`` for the token axis and ``[..., T // G, D]``
for the channel axis.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Literal

import torch

from kvtuner.quant.packing import PACKABLE_BITS, pack, unpack

Axis = Literal["token", "channel"]
FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is stored.

    bits: 1, 2, 3, 4 or 8 for integer codes; 8 with ``fp8`` set for float8; 16 keeps the
    tensor as it is (passthrough, in its own dtype).
    group_size: elements sharing one scale along the group axis; -1 means the whole axis.
    """

    bits: int
    group_size: int = 32
    axis: Axis = "token"
    symmetric: bool = False
    fp8: Literal["e4m3", "e5m2"] | None = None
    scale_dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        if self.fp8 is not None:
            if self.fp8 not in FP8_DTYPES:
                raise ValueError(f"unknown fp8 format {self.fp8!r}; use one of {sorted(FP8_DTYPES)}")
            if self.bits != 8:
                raise ValueError(f"fp8 storage has 8 bits, not {self.bits}")
        elif self.bits != 16 and self.bits not in PACKABLE_BITS:
            raise ValueError(f"unsupported bits {self.bits}; supported: {PACKABLE_BITS} and 16")
        if self.symmetric and self.bits < 2:
            raise ValueError("symmetric quantization needs at least 2 bits")
        if self.axis not in ("token", "channel"):
            raise ValueError(f"axis must be 'token' or 'channel', not {self.axis!r}")
        if self.group_size == 0 or self.group_size < -1:
            raise ValueError(f"group_size must be positive or -1, not {self.group_size}")

    @property
    def is_passthrough(self) -> bool:
        return self.bits == 16

    def group_len(self, shape: torch.Size) -> int:
        """The group length for a tensor of ``shape`` ([..., T, D])."""
        extent = shape[-1] if self.axis == "token" else shape[-2]
        return extent if self.group_size == -1 else self.group_size


@dataclass
class QuantizedTensor:
    """A packed tensor plus what it takes to read it back. Shapes are documented above."""

    payload: torch.Tensor  # int32 words, uint8 fp8 bytes, or the raw tensor for 16 bits
    scale: torch.Tensor | None
    zero: torch.Tensor | None
    spec: QuantSpec
    shape: torch.Size  # [..., T, D] of the original tensor

    @property
    def num_tokens(self) -> int:
        return self.shape[-2]

    def stored_tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.payload, self.scale, self.zero) if t is not None]

    def nbytes(self) -> int:
        """Real storage: the stored tensors' ``numel * element_size``."""
        return sum(t.numel() * t.element_size() for t in self.stored_tensors())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self, dtype)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "QuantizedTensor":
        """Apply a batch-dim operation (index_select, repeat_interleave, ...) to every stored tensor."""
        new = [fn(t) if t is not None else None for t in (self.payload, self.scale, self.zero)]
        shape = torch.Size((new[0].shape[0], *self.shape[1:]))
        return replace(self, payload=new[0], scale=new[1], zero=new[2], shape=shape)


def _group_view(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, int]:
    """View ``x`` [..., T, D] as [..., n_groups, G, D] (channel) or [..., T, n_groups, G] (token)."""
    g = spec.group_len(x.shape)
    extent = x.shape[-1] if spec.axis == "token" else x.shape[-2]
    if extent % g:
        what = "head_dim" if spec.axis == "token" else "token count"
        raise ValueError(f"{what} {extent} is not a multiple of group_size {g}")
    if spec.axis == "token":
        return x.reshape(*x.shape[:-1], extent // g, g), -1
    return x.reshape(*x.shape[:-2], extent // g, g, x.shape[-1]), -2


def quantize(x: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Quantize ``x`` ([..., T, D]) into packed storage according to ``spec``."""
    shape = x.shape
    if spec.is_passthrough:
        return QuantizedTensor(x.contiguous(), None, None, spec, shape)
    xf = x.float()
    grouped, red = _group_view(xf, spec)
    if spec.fp8 is not None:
        fp8 = FP8_DTYPES[spec.fp8]
        absmax = grouped.abs().amax(dim=red, keepdim=True)
        scale = (absmax / torch.finfo(fp8).max).to(spec.scale_dtype)
        safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
        payload = (grouped / safe).to(fp8).reshape(shape).view(torch.uint8)
        return QuantizedTensor(payload.contiguous(), scale.squeeze(red).contiguous(), None, spec, shape)
    if spec.symmetric:
        qmax = 2 ** (spec.bits - 1) - 1
        scale = (grouped.abs().amax(dim=red, keepdim=True) / qmax).to(spec.scale_dtype)
        safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
        codes = torch.clamp(torch.round(grouped / safe), -qmax, qmax) + 2 ** (spec.bits - 1)
        zero = None
    else:
        qmax = 2**spec.bits - 1
        lo = grouped.amin(dim=red, keepdim=True)
        hi = grouped.amax(dim=red, keepdim=True)
        zero = lo.to(spec.scale_dtype)
        scale = ((hi - zero.float()) / qmax).to(spec.scale_dtype)
        safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
        codes = torch.clamp(torch.round((grouped - zero.float()) / safe), 0, qmax)
        zero = zero.squeeze(red).contiguous()
    payload = pack(codes.to(torch.uint8).reshape(shape), spec.bits)
    return QuantizedTensor(payload, scale.squeeze(red).contiguous(), zero, spec, shape)


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    spec = q.spec
    if spec.is_passthrough:
        return q.payload.to(dtype)
    red = -1 if spec.axis == "token" else -2
    scale = q.scale.float().unsqueeze(red)
    if spec.fp8 is not None:
        values = q.payload.view(FP8_DTYPES[spec.fp8]).float()
    else:
        codes = unpack(q.payload, spec.bits, q.shape[-1]).float()
        values = codes - 2 ** (spec.bits - 1) if spec.symmetric else codes
    grouped, _ = _group_view(values, spec)
    out = grouped * scale
    if q.zero is not None:
        out = out + q.zero.float().unsqueeze(red)
    return out.reshape(q.shape).to(dtype)


def cat_tokens(parts: list[QuantizedTensor]) -> QuantizedTensor:
    """Concatenate along the token dim; every stored tensor keeps tokens (or token groups) at dim -2."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    stored = [torch.cat(ts, dim=-2) if ts[0] is not None else None
              for ts in zip(*[(p.payload, p.scale, p.zero) for p in parts])]
    tokens = sum(p.num_tokens for p in parts)
    return QuantizedTensor(stored[0], stored[1], stored[2], first.spec, torch.Size((*first.shape[:-2], tokens, first.shape[-1])))
