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

Stored zeros and scales are rounded in the safe direction, not to nearest: the zero down (the
largest ``scale_dtype`` value <= the group minimum), every scale up. The grid ``zero + k * scale``
then covers the whole group, so each element dequantizes within half a stored step of itself
(up to float32 rounding). Rounding to nearest broke that for a group far from zero with a narrow
range: the zero could land above the group minimum, leaving ``max - zero`` tiny or negative.
NaN/Inf input raises :class:`NonFiniteError`; a zero or scale beyond ``scale_dtype``'s range
(fp16 tops out at 65504) raises ``ValueError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Literal

import torch

from kvtuner.quant.codebook import nearest_level
from kvtuner.quant.packing import PACKABLE_BITS, pack, unpack

Axis = Literal["token", "channel"]
FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


class NonFiniteError(ValueError):
    """The tensor to quantize holds NaN or Inf. No finite scale covers it, so it is refused rather
    than stored as garbage codes that would poison every later attention read."""


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
    levels: torch.Tensor | None = None  # non-uniform levels the codes index: [2**bits], or [H, D, 2**bits] per channel

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


def group_view(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, int]:
    """View ``x`` [..., T, D] as [..., n_groups, G, D] (channel) or [..., T, n_groups, G] (token)."""
    g = spec.group_len(x.shape)
    extent = x.shape[-1] if spec.axis == "token" else x.shape[-2]
    if extent % g:
        what = "head_dim" if spec.axis == "token" else "token count"
        raise ValueError(f"{what} {extent} is not a multiple of group_size {g}")
    if spec.axis == "token":
        return x.reshape(*x.shape[:-1], extent // g, g), -1
    return x.reshape(*x.shape[:-2], extent // g, g, x.shape[-1]), -2


def _true_div(v: torch.Tensor, divisor: float) -> torch.Tensor:
    """``v / divisor`` rounded once, on every device. Why: CUDA torch divides by a Python number as a
    multiplication by its reciprocal (off by an ulp, e.g. for 1/15), which would make a CUDA cache's
    scales differ from a CPU cache's and from the Triton quantizer's IEEE division."""
    return v / torch.full((), divisor, dtype=v.dtype, device=v.device)


def round_directed(v: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """Float32 ``v`` rounded to ``dtype`` toward +inf (``up``) or toward -inf, not to nearest.

    Rounds to nearest, then steps one ulp on the int16 bit pattern where that landed on the wrong
    side of ``v``. fp16 and bf16 are sign-magnitude, so ``bits + 1`` moves a positive value up and
    a negative one down: the step up is ``(bits >> 15) | 1`` (+1, or -1 for a set sign bit). The
    Triton quantizer takes the same steps, so the two agree bit for bit. A result that overflowed
    to infinity stays infinite, for :func:`check_representable` to report; float32 is returned as
    it is.
    """
    if dtype == torch.float32:
        return v
    r = v.to(dtype)
    rf = r.float()
    wrong = ((rf < v) if up else (rf > v)) & (rf.abs() != math.inf)
    bits = r.view(torch.int16)
    step_up = (bits >> 15) | 1
    return (bits + wrong.to(torch.int16) * (step_up if up else -step_up)).view(dtype)


def check_representable(x: torch.Tensor, spec: QuantSpec, *stored: torch.Tensor) -> None:
    """Raise unless every element of ``stored`` (the scales and zeros quantizing ``x``) is finite.

    A non-finite one comes from NaN/Inf in ``x`` (:class:`NonFiniteError`), or from finite values
    whose zero or scale ``spec.scale_dtype`` cannot hold (``ValueError``). ``sum(t * 0)`` is 0
    unless ``t`` holds NaN or Inf, and costs a fraction of ``isfinite(t).all()`` on the CPU.
    """
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # a CUDA graph being recorded cannot read back to raise: its replays leave non-finite scales as they are
    if bool(torch.isfinite(sum((t * 0).sum(dtype=torch.float32) for t in stored))):
        return
    nan, inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
    if nan or inf:
        raise NonFiniteError(f"cannot quantize a tensor holding {nan} NaN and {inf} Inf of {x.numel()} elements")
    wider = "torch.float32" if spec.scale_dtype == torch.bfloat16 else "torch.bfloat16 or torch.float32"
    raise ValueError(
        f"values up to |x| = {x.abs().max().item():.6g} need a zero or scale beyond the largest "
        f"{spec.scale_dtype} ({torch.finfo(spec.scale_dtype).max:.6g}); quantize with scale_dtype={wider}"
    )


def quantize(x: torch.Tensor, spec: QuantSpec, levels: torch.Tensor | None = None) -> QuantizedTensor:
    """Quantize ``x`` ([..., T, D]) into packed storage according to ``spec``.

    levels: for asymmetric integer specs, ``2**bits`` sorted levels in ``[0, qmax]`` with the ends
    at 0 and qmax: each element is stored as the index of the level nearest to its normalized
    value instead of the rounded value itself (NUQ; see :mod:`kvtuner.quant.codebook`).

    Raises :class:`NonFiniteError` for NaN/Inf in ``x`` and ``ValueError`` when a zero or scale
    does not fit ``spec.scale_dtype``. Checking the stored scales and zeros suffices, at a ``G``-th
    of the cost of checking ``x``: the min/max reductions that make them propagate NaN and Inf.
    """
    shape = x.shape
    if spec.is_passthrough:
        return QuantizedTensor(x.contiguous(), None, None, spec, shape)
    xf = x.float()
    grouped, red = group_view(xf, spec)
    if spec.fp8 is not None:
        fp8 = FP8_DTYPES[spec.fp8]
        fmax = torch.finfo(fp8).max
        scale = round_directed(_true_div(grouped.abs().amax(dim=red, keepdim=True), fmax), spec.scale_dtype, up=True)
        check_representable(x, spec, scale)
        safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
        # with the scale rounded up only float32 rounding can carry x / scale past fmax, where the
        # cast would give NaN (e4m3 has no inf)
        payload = (grouped / safe).clamp_(-fmax, fmax).to(fp8).reshape(shape).view(torch.uint8)
        return QuantizedTensor(payload.contiguous(), scale.squeeze(red).contiguous(), None, spec, shape)
    if spec.symmetric:
        qmax = 2 ** (spec.bits - 1) - 1
        scale = round_directed(_true_div(grouped.abs().amax(dim=red, keepdim=True), qmax), spec.scale_dtype, up=True)
        check_representable(x, spec, scale)
        safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
        codes = torch.clamp(torch.round(grouped / safe), -qmax, qmax) + 2 ** (spec.bits - 1)
        zero = None
    else:
        qmax = 2**spec.bits - 1
        lo = grouped.amin(dim=red, keepdim=True)
        hi = grouped.amax(dim=red, keepdim=True)
        zero = round_directed(lo, spec.scale_dtype, up=False)
        scale = round_directed(_true_div(hi - zero.float(), qmax), spec.scale_dtype, up=True)
        check_representable(x, spec, zero, scale)
        safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
        normalized = (grouped - zero.float()) / safe
        if levels is None:
            codes = torch.clamp(torch.round(normalized), 0, qmax)
        else:
            codes = nearest_level(normalized.clamp(0, qmax), levels)
        zero = zero.squeeze(red).contiguous()
    if levels is not None and (spec.symmetric or levels.numel() != 2**spec.bits):
        raise ValueError(f"levels need an asymmetric integer spec and {2**spec.bits} entries, not {levels.numel()}")
    payload = pack(codes.to(torch.uint8).reshape(shape), spec.bits)
    return QuantizedTensor(payload, scale.squeeze(red).contiguous(), zero, spec, shape, levels)


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    spec = q.spec
    if spec.is_passthrough:
        return q.payload.to(dtype)
    if q.scale is None:
        raise ValueError("these codes carry no scale: their range is a calibration's (kvquant keys); "
                         "read them through kvtuner.method.KVMethod.dequantize")
    red = -1 if spec.axis == "token" else -2
    scale = q.scale.float().unsqueeze(red)
    if spec.fp8 is not None:
        values = q.payload.view(FP8_DTYPES[spec.fp8]).float()
    else:
        if q.levels is not None:
            codes = unpack(q.payload, spec.bits, q.shape[-1], torch.int64)
            values = q.levels.to(codes.device, torch.float32)[codes]
        else:
            values = unpack(q.payload, spec.bits, q.shape[-1], torch.float32)
            if spec.symmetric:
                values = values - 2 ** (spec.bits - 1)
    grouped, _ = group_view(values, spec)
    out = grouped * scale
    if q.zero is not None:  # in place, but a multiply and an add, not a fused addcmul: the same roundings as ever
        out += q.zero.float().unsqueeze(red)
    return out.reshape(q.shape).to(dtype)


def token_group(q: QuantizedTensor) -> int:
    """Tokens that share a row of ``q``'s scales and zeros: the group with per-channel groups, else 1
    (token slices must start, and buffers hold, whole such groups)."""
    if q.scale is None or q.spec.axis != "channel":
        return 1
    return q.spec.group_len(q.shape)


def slice_tokens(q: QuantizedTensor, start: int, end: int) -> QuantizedTensor:
    """Tokens ``start .. end - 1`` of ``q``, sharing its storage. With per-channel groups (scales per
    ``G`` tokens) both ends must be multiples of ``G`` (or ``end`` the token count)."""
    tokens = q.num_tokens
    if not 0 <= start <= end <= tokens:
        raise ValueError(f"token slice {start}:{end} of {tokens} tokens")
    g = token_group(q)
    if start % g or (end % g and end != tokens):
        raise ValueError(f"token slice {start}:{end} cuts a key group of {g} tokens")
    lo, hi = start // g, -(-end // g)
    sliced = [t[..., lo:hi, :] if t is not None else None for t in (q.scale, q.zero)]
    return replace(q, payload=q.payload[..., start:end, :], scale=sliced[0], zero=sliced[1],
                   shape=torch.Size((*q.shape[:-2], end - start, q.shape[-1])))


def _token_rows(q: QuantizedTensor, tokens: int) -> list[int]:
    """Rows of payload, scale and zero (dim -2) that ``tokens`` tokens take in ``q``'s layout."""
    return [tokens, *[-(-tokens // token_group(q))] * 2]


def reserve_tokens(q: QuantizedTensor, capacity: int) -> QuantizedTensor:
    """A buffer with room for ``capacity`` tokens holding ``q`` in its first ones, for :func:`write_tokens`.

    Why: a cache that appends a block by concatenation copies its whole history at every flush; a
    buffer that grows geometrically copies it a bounded number of times. Read the filled part with
    :func:`slice_tokens`. With per-channel groups, ``capacity`` must be a whole number of groups."""
    if capacity % token_group(q):
        raise ValueError(f"a capacity of {capacity} tokens cuts a key group")
    stored = []
    for t, rows in zip((q.payload, q.scale, q.zero), _token_rows(q, capacity)):
        stored.append(None if t is None else t.new_empty((*t.shape[:-2], rows, t.shape[-1])))
    buffer = replace(q, payload=stored[0], scale=stored[1], zero=stored[2],
                     shape=torch.Size((*q.shape[:-2], capacity, q.shape[-1])))
    write_tokens(buffer, 0, q)
    return buffer


def write_tokens(buffer: QuantizedTensor, start: int, block: QuantizedTensor) -> None:
    """Write ``block``'s tokens into ``buffer`` from token ``start`` (a whole number of groups with per-channel
    groups), in place."""
    if start + block.num_tokens > buffer.num_tokens:
        raise ValueError(f"{block.num_tokens} tokens from {start} do not fit a buffer of {buffer.num_tokens}")
    if start % token_group(block):
        raise ValueError(f"writing from token {start} cuts a key group")
    begin = _token_rows(block, start)
    for dst, src, row in zip((buffer.payload, buffer.scale, buffer.zero), (block.payload, block.scale, block.zero), begin):
        if dst is not None:
            dst[..., row : row + src.shape[-2], :].copy_(src)


def write_tokens_at(buffer: QuantizedTensor, start: torch.Tensor, block: QuantizedTensor) -> None:
    """:func:`write_tokens` from a token held in a one-element tensor on the buffer's device (a whole number of
    groups, unchecked): nothing is read back to the host, so a CUDA graph records one write for every offset."""
    start = start.reshape(1).long()
    for dst, src, per_row in zip((buffer.payload, buffer.scale, buffer.zero), (block.payload, block.scale, block.zero),
                                 (1, token_group(block), token_group(block))):
        if dst is not None:
            dst.index_copy_(dst.dim() - 2, start // per_row + torch.arange(src.shape[-2], device=dst.device), src)


def cat_tokens(parts: list[QuantizedTensor]) -> QuantizedTensor:
    """Concatenate along the token dim; every stored tensor keeps tokens (or token groups) at dim -2."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    stored = [torch.cat(ts, dim=-2) if ts[0] is not None else None
              for ts in zip(*[(p.payload, p.scale, p.zero) for p in parts])]
    tokens = sum(p.num_tokens for p in parts)
    return QuantizedTensor(stored[0], stored[1], stored[2], first.spec,
                           torch.Size((*first.shape[:-2], tokens, first.shape[-1])), first.levels)
