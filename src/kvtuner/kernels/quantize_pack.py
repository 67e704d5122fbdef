"""Quantize-and-pack on append: one pass from full-precision K/V to the packed cache layout.

Bit-exact with :func:`kvtuner.quant.quantize` (the reference) for asymmetric integer specs:
the zero is the group minimum rounded down to ``scale_dtype``, the scale ``(max - zero) / qmax``
rounded up (both by :func:`_round_directed`, the reference's bit steps), codes
``round_half_even((x - zero) / scale)`` clamped to ``[0, qmax]``, with IEEE divisions as torch
does them. One program quantizes a tile of tokens of one (batch, head) row:

* ``"channel"`` axis (KIVI keys): the tile is one group of ``G`` tokens; the min/max run over
  tokens, giving one scale and zero per channel.
* ``"token"`` axis (values): the tile is ``BLOCK_T`` tokens viewed as ``[BLOCK_T, D/G, G]``;
  the min/max run over each group of ``G`` channels.

Codes are packed little-end first into int32 words along ``D`` (3-bit: a 2-bit plane, then a
1-bit plane), the layout of :mod:`kvtuner.quant.packing`. The launcher raises as the reference
does for NaN/Inf input or a zero or scale that ``scale_dtype`` cannot hold.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtuner.quant import QuantizedTensor, QuantSpec, check_representable, packed_width

BLOCK_T_TOKEN_AXIS = 32


@triton.jit
def _store_plane(ptrs, codes, mask, ROWS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """Pack [ROWS, D] codes of ``BITS`` bits into [ROWS, D * BITS / 32] words at ``ptrs`` [ROWS, 1]."""
    CPW: tl.constexpr = 32 // BITS
    W: tl.constexpr = D // CPW
    fields = tl.reshape(codes, (ROWS, W, CPW)) << (tl.arange(0, CPW) * BITS)[None, None, :]
    tl.store(ptrs + tl.arange(0, W)[None, :], tl.sum(fields, 2), mask=mask)  # disjoint fields: sum == or


@triton.jit
def _round_half_even(y):
    fl = tl.floor(y)
    frac = y - fl  # exact for |y| < 2**23
    odd = (fl - 2.0 * tl.floor(fl * 0.5)) == 1.0
    return tl.where((frac > 0.5) | ((frac == 0.5) & odd), fl + 1.0, fl)


@triton.jit
def _round_directed(v, dtype: tl.constexpr, UP: tl.constexpr):
    """:func:`kvtuner.quant.tensor.round_directed`: fp32 ``v`` to ``dtype`` toward +inf (``UP``) or
    -inf, by rounding to nearest and stepping the 16-bit pattern one ulp where that landed on the
    wrong side; infinities stay, float32 passes through."""
    out = v
    if dtype != tl.float32:
        r = v.to(dtype)
        rf = r.to(tl.float32)
        if UP:
            wrong = rf < v
        else:
            wrong = rf > v
        wrong = wrong & (tl.abs(rf) != float("inf"))
        bits = r.to(tl.int16, bitcast=True).to(tl.int32)
        step = (bits >> 15) | 1  # one ulp up: +1, or -1 under a set sign bit
        if not UP:
            step = -step
        out = (bits + wrong.to(tl.int32) * step).to(tl.int16).to(dtype, bitcast=True)
    return out


@triton.jit
def _codes(x, lo, hi, scale_dtype: tl.constexpr, QMAX: tl.constexpr):
    """(codes, scale, zero) for values ``x`` whose groups reduce to ``lo``/``hi`` (broadcastable)."""
    zero = _round_directed(lo, scale_dtype, False)
    zf = zero.to(tl.float32)
    scale = _round_directed(tl.math.div_rn(hi - zf, tl.full(hi.shape, QMAX, tl.float32)), scale_dtype, True)
    safe = tl.where(scale == 0, 1.0, scale.to(tl.float32))
    y = tl.math.div_rn(x - zf, safe)
    codes = tl.minimum(tl.maximum(_round_half_even(y), 0.0), QMAX).to(tl.int32)
    return codes, scale, zero


@triton.jit(do_not_specialize=["n_tokens"])  # a flush and a prefill share one compiled kernel
def _quantize_kernel(
    X, P, S, Z, n_tokens,
    sx_r, sx_t, sp_r, sp_t, ss_r, ss_t,
    D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, CHANNEL: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row offsets of a long cache overflow int32
    blk = tl.program_id(1)
    offs_t = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, D)
    valid = offs_t < n_tokens
    x = tl.load(X + row * sx_r + offs_t[:, None] * sx_t + offs_d[None, :], mask=valid[:, None], other=0.0)
    x = x.to(tl.float32)
    QMAX: tl.constexpr = (1 << BITS) - 1
    if CHANNEL:  # one group of G = BLOCK_T tokens (the token count is a multiple of G)
        codes, scale, zero = _codes(x, tl.min(x, 0)[None, :], tl.max(x, 0)[None, :], S.dtype.element_ty, QMAX)
        sz_offs = row * ss_r + blk * ss_t + offs_d[None, :]
        tl.store(S + sz_offs, scale)
        tl.store(Z + sz_offs, zero)
    else:
        NG: tl.constexpr = D // G
        xg = tl.reshape(x, (BLOCK_T, NG, G))
        codes, scale, zero = _codes(xg, tl.min(xg, 2)[:, :, None], tl.max(xg, 2)[:, :, None],
                                    S.dtype.element_ty, QMAX)
        codes = tl.reshape(codes, (BLOCK_T, D))
        sz_offs = row * ss_r + offs_t[:, None] * ss_t + tl.arange(0, NG)[None, :]
        tl.store(S + sz_offs, tl.reshape(scale, (BLOCK_T, NG)), mask=valid[:, None])
        tl.store(Z + sz_offs, tl.reshape(zero, (BLOCK_T, NG)), mask=valid[:, None])
    p_ptrs = P + row * sp_r + offs_t[:, None] * sp_t
    if BITS == 3:
        _store_plane(p_ptrs, codes & 3, valid[:, None], BLOCK_T, D, 2)
        _store_plane(p_ptrs + D // 16, codes >> 2, valid[:, None], BLOCK_T, D, 1)
    else:
        _store_plane(p_ptrs, codes, valid[:, None], BLOCK_T, D, BITS)


def quantize_triton(x: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Launcher; same arguments and result as :func:`kvtuner.quant.quantize` (asymmetric integer specs)."""
    *lead, t, d = x.shape
    g = spec.group_len(x.shape)
    channel = spec.axis == "channel"
    if (t if channel else d) % g:
        raise ValueError(f"{'token count' if channel else 'head_dim'} {t if channel else d} is not a multiple of {g}")
    rows = x.reshape(-1, t, d)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    n = rows.shape[0]
    payload = torch.empty((n, t, packed_width(d, spec.bits)), device=x.device, dtype=torch.int32)
    sz_shape = (n, t // g, d) if channel else (n, t, d // g)
    scale = torch.empty(sz_shape, device=x.device, dtype=spec.scale_dtype)
    zero = torch.empty_like(scale)
    block_t = g if channel else BLOCK_T_TOKEN_AXIS
    if t:
        _quantize_kernel[(n, triton.cdiv(t, block_t))](
            rows, payload, scale, zero, t,
            rows.stride(0), rows.stride(1), payload.stride(0), payload.stride(1), scale.stride(0), scale.stride(1),
            D=d, BITS=spec.bits, G=g, CHANNEL=channel, BLOCK_T=block_t,
        )
    check_representable(x, spec, x, scale, zero)  # x too: the kernel's min/max may skip a NaN
    return QuantizedTensor(
        payload.reshape(*lead, t, -1),
        scale.reshape(*lead, *sz_shape[1:]),
        zero.reshape(*lead, *sz_shape[1:]),
        spec,
        x.shape,
    )
