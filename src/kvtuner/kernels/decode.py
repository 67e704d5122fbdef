"""Split-K decode attention that reads the packed KV cache directly (flash-decoding on KIVI storage).

One query token per sequence attends to the quantized history plus the full-precision residual.
The kernel reads the packed words, scales and zeros once and never writes dequantized K/V to
memory. Decoding moves few bytes a token, so what limits it is the instructions spent per packed
code; the layout below keeps every code in the thread that loaded it and leaves the scales to
the tensor cores, at about one integer instruction per two codes:

* grid ``(B * H_kv, num_splits + 1)``: each program owns one KV head and all ``R = H_q / H_kv``
  query heads that share it (GQA: the packed bytes are read once for the group). Programs
  ``0 .. num_splits-1`` cover slices of the history, the last one the residual; a small reduce
  kernel merges the partial softmaxes by their log-sum-exp.
* a step covers ``NG`` key groups of ``G_K`` tokens, dealt to ``W`` (= ``num_warps``) slices:
  slice w takes tokens ``w * TPG .. w * TPG + TPG - 1`` of every group (``TPG = G_K / W``). The
  dots are batched over the slices, one warp each, so every softmax reduction stays in a warp and
  each slice keeps its own running max, merged once at the end.
* keys (grouped per channel, a scale and zero per ``G_K`` tokens): ``q . k = (q * s_g) . c + q . z_g``.
  The ``R`` query rows are stacked once per group, row ``(g, r)`` holding ``q_r * s_g`` in fp16;
  one dot against the raw codes scores every row against a step's tokens, and row ``(g, r)``
  keeps the tokens of group g (MixPE: the scale is applied to the query once per group). The
  zero term per row comes from two small dots.
* values (grouped per token, a scale and zero per ``G_V`` channels): the rows are stacked the
  other way, row ``(v, r)`` holding ``p_r(t) * s_v(t)`` in fp16, and multiply the raw codes; row
  ``(v, r)`` keeps the output channels of value group v. The zero terms ``sum_t p_r(t) z_v(t)``
  and the softmax sum come from small dots (8 columns each), so that no code is ever
  dequantized and no row sum is reduced across threads.

Codes that index a level table (NUQ) take one more step: a byte permute (``prmt``) looks four codes up
in the table's 7-bit bytes ``level * S`` at once, and the same magic number makes them fp16
(:func:`_pair_levels`; ``S`` takes the place of the multiplier ``m`` below). History slots before
``history_start`` (a method's sink tokens, attended from the full-precision part) are masked.

Codes become fp16 without an int-to-float conversion: for ``b``-bit codes, one ``lop3`` per
32-bit register computes ``(x & mask) | 0x64006400``, two fp16 numbers ``1024 + m * c`` (one per
16-bit half, ``m = 2^(b * j)`` for the code at bit ``b * j`` of its byte; codes < 1024 / m stay
exact). Both halves of a register then feed the tensor cores as one operand pair: two channels
of one token for keys (whose dot runs over channels), two tokens of one channel for values
(whose dot runs over tokens; a ``prmt`` first pairs the half-words of two tokens). The channels
therefore enter the dots in a permuted order (:func:`_key_order`, :func:`_value_order`), chosen
so that each thread's codes land in its own mma operand registers; the query rows, scales and
the output follow the same permutation. The multiplier ``m`` is divided out of the query (keys)
or the output columns (values). For keys the ``1024`` offsets cancel exactly against an fp32 dot of
the same fp16 operands within each step. Value codes are centred first (one ``sub.f16x2``:
``m * (c - 2^(b-1))``, exact, the zeros moved by ``2^(b-1) * s``): their dot accumulates across the
whole history in the tensor cores' fp32 accumulator, which truncates, and a ``1024 * sum p s`` riding
along (about 100x the output) made diffuse attention over 32k tokens in one split 30-90% wrong on an
H100. 3-bit codes (a 2-bit plane and a 1-bit plane) are first rebuilt as 4-bit
words. With ``inline_asm`` the ``lop3``/``prmt`` are PTX; otherwise the same integer arithmetic
in Triton (Triton's interpreter cannot run PTX; results are bit-identical).

Dot operands are fp16 whatever the model dtype: fp16 keeps 3 more mantissa bits than bf16, and
scaled queries, probabilities and codes stay far inside its range. Accumulation is fp32 and the
softmax runs in base 2 with ``log2(e)`` folded into the query scale.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import torch
import triton
import triton.language as tl

from kvtuner.kernels import STEP_TOKENS, DecodeRow
from kvtuner.quant import QuantizedTensor, packed_width
from kvtuner.quant.codebook import level_grid

LOG2E = 1.4426950408889634


@triton.jit
def _merge_halves(a, b, half, ASM: tl.constexpr):
    """Half-word ``half`` (0: bits 0-15, 1: bits 16-31) of ``a`` in bits 0-15 and of ``b`` in 16-31: one ``prmt``."""
    if ASM:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, 0x5410 + half * 0x2222],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        return ((a >> (16 * half)) & 0xFFFF) | ((b >> (16 * half)) << 16)


@triton.jit
def _lop3_magic(x, mask, ASM: tl.constexpr):
    """``(x & mask) | 0x64006400`` on int32: one ``lop3`` with ``ASM``."""
    if ASM:
        return tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, 0x64006400, 0xea;", "=r,r,r", [x, mask],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        return (x & mask) | 0x64006400


@triton.jit
def _sub_halves(y, k, ASM: tl.constexpr):
    """Both fp16 halves of int32 ``y`` less those of ``k``: one ``sub.f16x2`` with ``ASM``."""
    if ASM:
        return tl.inline_asm_elementwise("sub.f16x2 $0, $1, $2;", "=r,r,r", [y, k], dtype=tl.int32, is_pure=True, pack=1)
    else:
        lo = y.to(tl.int16).to(tl.float16, bitcast=True) - k.to(tl.int16).to(tl.float16, bitcast=True)
        hi = (y >> 16).to(tl.int16).to(tl.float16, bitcast=True) - (k >> 16).to(tl.int16).to(tl.float16, bitcast=True)
        return (lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)


@triton.jit
def _permute_bytes(a, b, sel, ASM: tl.constexpr):
    """PTX ``prmt.b32`` (default mode): byte i of the result is byte ``n & 7`` of the 8 bytes (a, b), or with
    ``n & 8`` that byte's sign replicated, for ``n`` the i-th nibble of ``sel``. Without ``ASM`` the same
    in integer arithmetic (bit-identical)."""
    if ASM:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, sel],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        out = sel * 0
        for i in tl.static_range(4):
            n = (sel >> (4 * i)) & 0xF
            byte = (tl.where((n & 4) == 0, a, b) >> (8 * (n & 3))) & 0xFF
            byte = tl.where((n & 8) == 0, byte, tl.where(byte >= 0x80, 0xFF, 0))
            out = out | (byte << (8 * i))
        return out


@triton.jit
def _pair_levels(x, BITS: tl.constexpr, ASM: tl.constexpr, CENTER: tl.constexpr, LUT, NUQ: tl.constexpr):
    """:func:`_pair_codes` for codes that index the ``NUQ``-entry table at ``LUT``: element ``[a, b, p, h] =
    1024 + t[code] - S * CENTER``, ``t = S * level`` one 7-bit byte a level (``S = 128 // NUQ``, the level grid;
    ``LUT``: the bytes as 4 int32 words).

    One ``prmt`` reorders a word's bytes so that code p of both halves sits 8 bits apart; per pair, a shift
    and a ``lop3`` make the selector (the codes in nibbles 0 and 2, 8 in nibbles 1 and 3: a sign-replicated
    byte of a table whose bytes are < 128 is 0) and one ``prmt`` looks both up in entries 0-7 (16 entries:
    a second ``prmt`` over entries 8-15 with the codes' top bit flipped, so that exactly one of the two
    finds each code, and an OR); the ``0x64006400`` magic number makes them fp16."""
    CPB: tl.constexpr = 8 // BITS
    S: tl.constexpr = 128 // NUQ  # the level grid (kvtuner.quant.codebook.level_grid) of NUQ entries
    w = _permute_bytes(x, x, tl.full(x.shape, 0x3120, tl.int32), ASM)  # bytes x0, x2, x1, x3
    p = tl.arange(0, 16 // BITS)[None, None, :]
    y = w[:, :, None] >> (BITS * (p % CPB) + 16 * (p // CPB))
    codes = y & (((1 << BITS) - 1) * 0x0101)
    t = _permute_bytes(tl.load(LUT), tl.load(LUT + 1), codes | 0x8080, ASM)
    if NUQ == 16:
        t = t | _permute_bytes(tl.load(LUT + 2), tl.load(LUT + 3), codes ^ 0x8888, ASM)
    y = t | 0x64006400
    if CENTER:
        y = _sub_halves(y, tl.full(y.shape, (0x6400 + S * CENTER) * 0x10001, tl.int32), ASM)
    lo = y.to(tl.int16).to(tl.float16, bitcast=True)
    hi = (y >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    return tl.join(lo, hi)


@triton.jit
def _pair_codes(x, BITS: tl.constexpr, ASM: tl.constexpr, CENTER: tl.constexpr, LUT, NUQ: tl.constexpr):
    """x [A, B] int32 whose 16-bit halves hold ``P = 16 // BITS`` codes each -> [A, B, P, 2] fp16:
    element ``[a, b, p, h] = O + m_p * (code p of half h)``, ``m_p = 2^(BITS * (p % (8 // BITS)))``,
    with offset ``O = 1024``, or ``O = -m_p * CENTER`` (codes centred, exact).

    The halves of ``((x >> shift_p) & mask_p) | 0x64006400`` are the pair; they stay in one
    register (the compiler folds the split and re-join). ``NUQ`` > 0: the codes index a level table,
    :func:`_pair_levels`."""
    if NUQ:
        return _pair_levels(x, BITS, ASM, CENTER, LUT, NUQ)
    CPB: tl.constexpr = 8 // BITS
    p = tl.arange(0, 16 // BITS)[None, None, :]
    mask = tl.full([1, 1, 16 // BITS], ((1 << BITS) - 1) * 0x10001, tl.int32) << (BITS * (p % CPB))
    y = _lop3_magic(x[:, :, None] >> ((p // CPB) * 8), mask, ASM)
    if CENTER:  # less fp16 1024 + m_p * CENTER from both halves (0x6400 + m_p * CENTER: integers below 2048)
        y = _sub_halves(y, (0x6400 + (CENTER << (BITS * (p % CPB)))) * 0x10001, ASM)
    lo = y.to(tl.int16).to(tl.float16, bitcast=True)
    hi = (y >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    return tl.join(lo, hi)


@triton.jit
def _multiplier(d, BITS: tl.constexpr, NUQ: tl.constexpr):
    """The ``m`` of :func:`_pair_codes` for channel index tensor ``d`` (fp32)."""
    P: tl.constexpr = 16 // BITS
    if NUQ:
        return (d * 0 + 128 // NUQ).to(tl.float32)  # the level grid
    return ((d * 0 + 1) << (BITS * ((d % P) % (8 // BITS)))).to(tl.float32)


@triton.jit
def _spread(x, FROM: tl.constexpr):
    """Fields of ``FROM`` (1 or 2) bits in the low bits of x (8 fields) moved to bit 4i each."""
    if FROM == 2:
        x = (x | (x << 8)) & 0x00FF00FF
        x = (x | (x << 4)) & 0x0F0F0F0F
        x = (x | (x << 2)) & 0x33333333
    else:
        x = (x | (x << 12)) & 0x000F000F
        x = (x | (x << 6)) & 0x03030303
        x = (x | (x << 3)) & 0x11111111
    return x


@triton.jit
def _load_words(row_ptrs, valid, N: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, MASKED: tl.constexpr):
    """[N, D * b // 32] int32 packed words of N token rows (``row_ptrs`` [N] point at word 0), b = BITS,
    except that 3-bit codes come back as 4-bit words rebuilt from their 2-bit and 1-bit planes.
    Rows where ``valid`` is false read as 0 when ``MASKED`` (otherwise every row is read).

    Words are loaded as [runs, N, 4, words a lane]: 4 lanes share a token, each loading up to 16
    contiguous bytes, the arrangement the key dot consumes without moving data between threads."""
    if BITS == 3:
        v = tl.arange(0, D // 8)[None, :]
        if MASKED:
            w2 = tl.load(row_ptrs[:, None] + v // 2, mask=valid[:, None], other=0)
            w1 = tl.load(row_ptrs[:, None] + D // 16 + v // 4, mask=valid[:, None], other=0)
        else:
            w2 = tl.load(row_ptrs[:, None] + v // 2)
            w1 = tl.load(row_ptrs[:, None] + D // 16 + v // 4)
        return _spread((w2 >> (16 * (v % 2))) & 0xFFFF, 2) | (_spread((w1 >> (8 * (v % 4))) & 0xFF, 1) << 2)
    else:
        NW: tl.constexpr = D * BITS // 32
        QUAD: tl.constexpr = 4 if NW >= 4 else NW
        WPL: tl.constexpr = 4 if NW >= 16 else NW // QUAD
        RUNS: tl.constexpr = NW // (QUAD * WPL)
        run = tl.arange(0, RUNS)[:, None, None]
        quad = tl.arange(0, QUAD)[None, :, None]
        lane_word = tl.arange(0, WPL)[None, None, :]
        word = (run * QUAD + quad) * WPL + lane_word
        if MASKED:
            x = tl.load(row_ptrs[None, :, None, None] + word[:, None, :, :], mask=valid[None, :, None, None], other=0)
        else:
            x = tl.load(row_ptrs[None, :, None, None] + word[:, None, :, :])
        return tl.reshape(tl.permute(x, (1, 0, 2, 3)), (N, NW))


@triton.jit
def _key_order(x, A: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """Permute the channels (last axis) of x [A, D] into the order key codes enter the dot.

    Channel ``d = word * 2P + h * P + p`` (P codes a 16-bit half); with ``word = (run * QUAD + quad)
    * WPL + wl`` as loaded by :func:`_load_words`, the order is (run, wl, p // 2, quad, p % 2, h):
    each mma operand register holds a (h = 0, 1) pair, the 4 lanes sharing a token own the quads."""
    NW: tl.constexpr = D * BITS // 32
    P: tl.constexpr = 16 // BITS
    QUAD: tl.constexpr = 4 if NW >= 4 else NW
    WPL: tl.constexpr = 4 if NW >= 16 else NW // QUAD
    RUNS: tl.constexpr = NW // (QUAD * WPL)
    x = tl.reshape(x, (A, RUNS, QUAD, WPL, 2, P // 2, 2))
    return tl.reshape(tl.permute(x, (0, 1, 3, 5, 2, 6, 4)), (A, D))


@triton.jit
def _value_order(x, A: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """Permute the channels of x [A, D] into the order value codes enter the dot: channel
    ``d = (w_hi * W_LO + w_lo) * 2P + half * P + p`` goes to ``((w_hi * 2 + half) * P + p) * W_LO + w_lo``,
    so that the 8 lane groups of an mma operand each own whole words."""
    NW: tl.constexpr = D * BITS // 32
    P: tl.constexpr = 16 // BITS
    W_LO: tl.constexpr = 8 if NW >= 8 else NW
    x = tl.reshape(x, (A, NW // W_LO, W_LO, 2, P))
    return tl.reshape(tl.permute(x, (0, 1, 3, 4, 2)), (A, D))


@triton.jit
def _key_codes(words, A: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr,
               LUT, NUQ: tl.constexpr):
    """[A, D] fp16 codes in key order from their words [A, D * BITS // 32]."""
    c = tl.permute(_pair_codes(words, BITS, ASM, 0, LUT, NUQ), (0, 1, 3, 2))  # (word, h, p): channel order
    return _key_order(tl.reshape(c, (A, D)), A, D, BITS)


@triton.jit
def _value_codes(a, b, A: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr,
                 CENTER: tl.constexpr, LUT, NUQ: tl.constexpr):
    """[D, 2A] fp16 codes, channels in value order (rows) by token rows (columns), from the words
    [A, D * BITS // 32] of token rows ``a`` and ``b`` interleaved (a0, b0, a1, b1, ...): rows 2i
    and 2i + 1 share each operand register, so their half-words are paired before decoding.
    Channel-major, so that the caller's transpose is the last step before the dot."""
    NW: tl.constexpr = D * BITS // 32
    P: tl.constexpr = 16 // BITS
    W_LO: tl.constexpr = 8 if NW >= 8 else NW
    half = tl.arange(0, 2)[None, None, :]
    halves = _merge_halves(a[:, :, None], b[:, :, None], half, ASM)  # [A, NW, 2]
    c = _pair_codes(tl.reshape(halves, (A, 2 * NW)), BITS, ASM, CENTER, LUT, NUQ)  # [A, (word, half), p, row a/b]
    c = tl.reshape(c, (A, NW // W_LO, W_LO, 2, P, 2))
    return tl.reshape(tl.permute(c, (1, 3, 4, 2, 0, 5)), (D, 2 * A))  # see _value_order


@triton.jit
def _across_groups(x, W: tl.constexpr, NG_M: tl.constexpr, R_P: tl.constexpr):
    """Max of stacked rows x [W, NG_M * R_P] over their NG_M copies, broadcast back to every copy."""
    y = tl.max(tl.reshape(x, (W, NG_M, R_P)), 1)
    return tl.reshape(tl.broadcast_to(y[:, None, :], (W, NG_M, R_P)), (W, NG_M * R_P))


@triton.jit
def _slice_tokens(n, W: tl.constexpr, TPG: tl.constexpr, G_K: tl.constexpr):
    """[W, len(n)]: step-relative token of position n in slice w (slice w holds tokens w * TPG .. of every group)."""
    return (n // TPG)[None, :] * G_K + tl.arange(0, W)[:, None] * TPG + (n % TPG)[None, :]


@triton.jit
def _value_scales(VS, VZ, b, h, t0, n_hist, svs_b, svs_h, svs_t, NG_M: tl.constexpr, NGV: tl.constexpr,
                  N: tl.constexpr, W: tl.constexpr, G_K: tl.constexpr, CENTER: tl.constexpr, SHORT: tl.constexpr):
    """Value scales [W, NG_M, NS] (row copy v: s_v(t), 0 past the value groups) and zeros of the centred
    codes ``z + CENTER * s`` [W, NS, NGV] of the step at ``t0``, tokens in slice order. Loaded a step ahead
    by the caller: they are few small loads that otherwise stall the step on their latency."""
    NS: tl.constexpr = N // W
    TPG: tl.constexpr = G_K // W
    tok_s = _slice_tokens(tl.arange(0, NS), W, TPG, G_K)  # [W, NS]
    g_copy = tl.arange(0, NG_M)
    cols_v = tl.arange(0, NGV)
    tv = b * svs_b + h * svs_h + (t0 + tok_s) * svs_t
    in_hist = t0 + tok_s < n_hist
    if SHORT:
        vz = tl.load(VZ + tv[:, :, None] + cols_v[None, None, :], mask=in_hist[:, :, None], other=0.0)
        vs_t = tl.load(VS + tv[:, :, None] + cols_v[None, None, :], mask=in_hist[:, :, None], other=0.0)
    else:  # token-major: vector loads
        vz = tl.load(VZ + tv[:, :, None] + cols_v[None, None, :])
        vs_t = tl.load(VS + tv[:, :, None] + cols_v[None, None, :])
    if NG_M == NGV:  # transposed in registers
        vs = tl.permute(vs_t, (0, 2, 1))
    else:
        ok = (g_copy < NGV)[None, :, None]
        if SHORT:
            ok = ok & in_hist[:, None, :]
        vs = tl.load(VS + tv[:, None, :] + g_copy[None, :, None], mask=ok, other=0.0)
    vz = vz.to(tl.float32) + CENTER * vs_t.to(tl.float32)
    return vs.to(tl.float16), vz.to(tl.float16)


@triton.jit
def _history_step(
    acc, ez, es, m_i, t0, t_lo, qk, m_key, vs, vz, KW, KS, KZ, VW, KL, VL, b, h,
    skw_b, skw_h, skw_t, sks_b, sks_h, sks_g, svw_b, svw_h, svw_t, n_hist, n_skip,
    R_P: tl.constexpr, M: tl.constexpr, NG: tl.constexpr, D: tl.constexpr, G_K: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, W: tl.constexpr, ASM: tl.constexpr, SHORT: tl.constexpr,
    K_NUQ: tl.constexpr, V_NUQ: tl.constexpr,
):
    """The softmax state (acc, ez, es, m_i) updated with the ``NG * G_K`` tokens from ``t0`` (a multiple of
    ``G_K``), of which those before ``t_lo`` were seen by the step before (the history's partial last step
    is moved back to end at ``n_hist``) and those before ``n_skip`` are not attended (sink tokens, read
    from the residual). Loads are not masked, which keeps predicates and the index
    registers they need out of the loop, except with ``SHORT``: a history shorter than one step."""
    NG_M: tl.constexpr = M // R_P  # row copies: key group g (scores) or value group v (output)
    KB: tl.constexpr = 4 if K_BITS == 3 else K_BITS  # 3-bit codes are decoded as 4-bit words
    VB: tl.constexpr = 4 if V_BITS == 3 else V_BITS
    N: tl.constexpr = NG * G_K  # tokens a step
    NS: tl.constexpr = N // W  # tokens a slice
    TPG: tl.constexpr = G_K // W  # tokens of each group in a slice
    offs_d = tl.arange(0, D)
    rows = tl.arange(0, M)
    g_row = rows // R_P
    g_copy = tl.arange(0, NG_M)
    cols_s = tl.arange(0, 8)
    # token of slice w, position n. Keys are scored in row order (n // 8, w, n % 8): coalesced
    # loads and the score tile's columns then sit one slice per warp
    rho = tl.arange(0, N)
    n_rho = (rho // (8 * W)) * 8 + rho % 8
    tok_rho = (n_rho // TPG) * G_K + ((rho // 8) % W) * TPG + n_rho % TPG
    n_s = tl.arange(0, NS)
    tok_s = _slice_tokens(n_s, W, TPG, G_K)  # [W, NS]
    # values: rows (2i, 2i + 1) of a slice share operand registers
    tok_a = tl.reshape(_slice_tokens(2 * tl.arange(0, NS // 2), W, TPG, G_K), (N // 2,))
    own = (g_row[:, None] == (n_s // TPG)[None, :])[None, :, :]  # [1, M, NS]: row (g, r) scores group g's tokens

    # keys: row (g, r) = q_r * s_g / m (fp16, key order) against codes 1024 + m c. The zero term
    # q_r . z_g - 1024 * sum(q_r * s_g / m) comes from two small fp32 dots of the same fp16 values
    group0 = t0 // G_K
    k_off = b * sks_b + h * sks_h + offs_d[None, :]
    group_ok = g_copy < NG
    row_ok = g_row < NG
    if SHORT:
        group_ok = group_ok & ((group0 + g_copy) * G_K < n_hist)
        row_ok = row_ok & ((group0 + g_row) * G_K < n_hist)
    kz = tl.load(KZ + k_off + (group0 + g_copy)[:, None] * sks_g, mask=group_ok[:, None], other=0.0)
    kz = _key_order(kz.to(tl.float16), NG_M, D, KB) * m_key
    ks = tl.load(KS + k_off + (group0 + g_row)[:, None] * sks_g, mask=row_ok[:, None], other=0.0)
    qs = qk * _key_order(ks.to(tl.float16), M, D, KB)
    zero = tl.dot(qk, tl.trans(kz))  # [M, NG_M]: q_r . z_g' for every group g'; row (g, r) keeps g' = g
    zero = tl.sum(tl.where(g_copy[None, :] == g_row[:, None], zero, 0.0), 1)
    zero -= 1024.0 * tl.max(tl.dot(qs, tl.full([D, 8], 1.0, tl.float16)), 1)
    k_rows = KW + b * skw_b + h * skw_h + (t0 + tok_rho) * skw_t
    kw = _load_words(k_rows, t0 + tok_rho < n_hist, N, D, K_BITS, SHORT)
    s = tl.dot(qs, tl.trans(_key_codes(kw, N, D, KB, ASM, KL, K_NUQ))) + zero[:, None]
    s = tl.reshape(tl.permute(tl.reshape(s, (M, N // (8 * W), W, 8)), (2, 0, 1, 3)), (W, M, NS))
    s = tl.where(own, s, float("-inf"))
    if SHORT:
        s = tl.where((t0 + tok_s < n_hist)[:, None, :], s, float("-inf"))
    if t_lo > t0:  # a moved last step: once per history, so a branch, not a mask in every step
        s = tl.where((t0 + tok_s >= t_lo)[:, None, :], s, float("-inf"))
    if t0 < n_skip:  # the step holding the sink tokens' slots
        s = tl.where((t0 + tok_s >= n_skip)[:, None, :], s, float("-inf"))

    m_new = tl.maximum(m_i, _across_groups(tl.max(s, 2), W, NG_M, R_P))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row may have no valid token yet
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, :, None])
    # values: rows (v, r) = p_r(t) * s_v(t), the p_r(t) gathered from the row of t's key group
    p = tl.sum(tl.reshape(p, (W, NG_M, R_P, NS)), 1)
    p = tl.reshape(tl.broadcast_to(p[:, None, :, :], (W, NG_M, R_P, NS)), (W, M, NS)).to(tl.float16)
    pv = p * tl.reshape(tl.broadcast_to(vs[:, :, None, :], (W, NG_M, R_P, NS)), (W, M, NS))
    v_rows = VW + b * svw_b + h * svw_h + (t0 + tok_a) * svw_t
    va = _load_words(v_rows, t0 + tok_a < n_hist, N // 2, D, V_BITS, SHORT)
    vb = _load_words(v_rows + svw_t, t0 + tok_a + 1 < n_hist, N // 2, D, V_BITS, SHORT)
    vc = _value_codes(va, vb, N // 2, D, VB, ASM, 1 << (V_BITS - 1), VL, V_NUQ)
    vc = tl.permute(tl.reshape(vc, (D, W, NS)), (1, 2, 0))
    acc = tl.dot(pv, vc, acc * alpha[:, :, None])
    ez = tl.dot(p, vz, ez * alpha[:, :, None])
    ones_p = tl.broadcast_to(tl.where(cols_s == 0, 1.0, 0.0).to(tl.float16)[None, None, :], (W, NS, 8))
    es = tl.dot(p, ones_p, es * alpha[:, :, None])  # column 0: sum p
    return acc, ez, es, m_new


@triton.jit
def _history(
    Q, KW, KS, KZ, VW, VS, VZ, KL, VL, b, h, offs_r, qk_scale,
    sq_b, sq_h, skw_b, skw_h, skw_t, sks_b, sks_h, sks_g, svw_b, svw_h, svw_t, svs_b, svs_h, svs_t,
    n_hist, n_skip, step_lo, step_hi,
    R: tl.constexpr, R_P: tl.constexpr, M: tl.constexpr, NG: tl.constexpr, NGV: tl.constexpr,
    D: tl.constexpr, G_K: tl.constexpr, G_V: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
    W: tl.constexpr, ASM: tl.constexpr, SHORT: tl.constexpr, K_NUQ: tl.constexpr, V_NUQ: tl.constexpr,
):
    """Softmax state of one program's history steps: unnormalized output [R_P, D] with its columns in
    value order, softmax sum [R_P] and max [R_P] (base 2), and the channel of each output column.
    ``SHORT``: the history is shorter than one step (a single masked step)."""
    NG_M: tl.constexpr = M // R_P
    KB: tl.constexpr = 4 if K_BITS == 3 else K_BITS
    VB: tl.constexpr = 4 if V_BITS == 3 else V_BITS
    N: tl.constexpr = NG * G_K
    CENTER: tl.constexpr = 1 << (V_BITS - 1)  # value codes enter their dot as c - CENTER
    offs_d = tl.arange(0, D)
    # query rows (g, r) = q_r * log2(e) / sqrt(D) in fp16 and key order, divided by the code multipliers
    q = tl.load(Q + b * sq_b + (h * R + offs_r)[:, None] * sq_h + offs_d[None, :],
                mask=(offs_r < R)[:, None], other=0.0).to(tl.float32) * qk_scale
    q = _key_order((q / _multiplier(offs_d, KB, K_NUQ)[None, :]).to(tl.float16), R_P, D, KB)
    q = tl.reshape(tl.broadcast_to(q[None, :, :], (NG_M, R_P, D)), (M, D))
    m_key = _key_order(_multiplier(offs_d, KB, K_NUQ)[None, :], 1, D, KB).to(tl.float16)  # [1, D]

    m_i = tl.full([W, M], float("-inf"), tl.float32)
    acc = tl.zeros([W, M, D], tl.float32)
    ez = tl.zeros([W, M, NGV], tl.float32)  # row (v, r), column c: sum_t p_r(t) z_c(t)
    es = tl.zeros([W, M, 8], tl.float32)  # column 0: sum_t p_r(t)
    # a partial last step is read as the history's last N tokens (SHORT: the one step, masked, from 0)
    last = tl.maximum(n_hist - N, 0)
    vs, vz = _value_scales(VS, VZ, b, h, tl.minimum(step_lo * N, last), n_hist, svs_b, svs_h, svs_t,
                           NG_M, NGV, N, W, G_K, CENTER, SHORT)
    for step in range(step_lo, step_hi):
        vs_next, vz_next = _value_scales(VS, VZ, b, h, tl.minimum((step + 1) * N, last), n_hist,
                                         svs_b, svs_h, svs_t, NG_M, NGV, N, W, G_K, CENTER, SHORT)
        acc, ez, es, m_i = _history_step(
            acc, ez, es, m_i, tl.minimum(step * N, last), step * N, q, m_key, vs, vz, KW, KS, KZ, VW, KL, VL, b, h,
            skw_b, skw_h, skw_t, sks_b, sks_h, sks_g, svw_b, svw_h, svw_t, n_hist, n_skip,
            R_P, M, NG, D, G_K, K_BITS, V_BITS, W, ASM, SHORT, K_NUQ, V_NUQ,
        )
        vs, vz = vs_next, vz_next

    # merge the slices, then read each output column from the rows of its value group:
    # out = acc / m + sum p (z + CENTER s), normalized by the softmax sum
    rows = tl.arange(0, M)
    g_row = rows // R_P
    cols_v = tl.arange(0, NGV)
    cols_s = tl.arange(0, 8)
    m = tl.max(m_i, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    wgt = tl.exp2(m_i - m_use[None, :])
    acc = tl.sum(acc * wgt[:, :, None], 0)
    ez = tl.sum(ez * wgt[:, :, None], 0)
    es = tl.sum(es * wgt[:, :, None], 0)
    d_of_col = tl.reshape(_value_order(offs_d[None, :], 1, D, VB), (D,))
    g_col = d_of_col // G_V
    e_zero = tl.sum(tl.where(cols_v[None, :] == g_row[:, None], ez, 0.0), 1)
    e_sum = tl.sum(tl.where(cols_s[None, :] == 0, es, 0.0), 1)
    out = acc / _multiplier(d_of_col, VB, V_NUQ)[None, :] + e_zero[:, None]
    out = tl.where(g_row[:, None] == g_col[None, :], out, 0.0)
    out = tl.sum(tl.reshape(out, (NG_M, R_P, D)), 0)
    l = tl.max(tl.reshape(e_sum, (NG_M, R_P)), 0)
    m = tl.max(tl.reshape(m, (NG_M, R_P)), 0)
    return out, l, m, d_of_col


@triton.jit
def _residual(
    Q, KR, VR, b, h, offs_r, qk_scale, sq_b, sq_h, skr_b, skr_h, skr_t, svr_b, svr_h, svr_t, n_res,
    R: tl.constexpr, R_P: tl.constexpr, D: tl.constexpr, NR: tl.constexpr,
):
    """Softmax state over the full-precision residual: (out [R_P, D], sum [R_P], max [R_P])."""
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * sq_b + (h * R + offs_r)[:, None] * sq_h + offs_d[None, :],
                mask=(offs_r < R)[:, None], other=0.0).to(tl.float32) * qk_scale
    q = q.to(tl.float16)
    m_i = tl.full([R_P], float("-inf"), tl.float32)
    l_i = tl.zeros([R_P], tl.float32)
    acc = tl.zeros([R_P, D], tl.float32)
    for t0 in range(0, n_res, NR):
        offs_t = t0 + tl.arange(0, NR)
        valid = offs_t < n_res
        k = tl.load(KR + b * skr_b + h * skr_h + offs_t[:, None] * skr_t + offs_d[None, :],
                    mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k.to(tl.float16)))
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        v = tl.load(VR + b * svr_b + h * svr_h + offs_t[:, None] * svr_t + offs_d[None, :],
                    mask=valid[:, None], other=0.0)
        acc = tl.dot(p.to(tl.float16), v.to(tl.float16), acc * alpha[:, None])
    return acc, l_i, m_i


# A ragged batch's table (:func:`_row_table`): a row of ROW_FIELDS int64 a sequence.
ROW_FIELDS = tl.constexpr(19)


@triton.jit
def _table_entry(row, i, ALIGNED: tl.constexpr):
    """Entry ``i`` of a ragged batch's table row (a stride); ``ALIGNED``: known to the compiler as a multiple of 16
    (the host checked), as Triton assumes of stride arguments, so that loads through it stay vectorized."""
    x = tl.load(row + i)
    if ALIGNED:
        x = tl.multiple_of(x, 16)
    return x


@triton.jit
def _table_pointer(row, i, like, ALIGNED: tl.constexpr):
    """Entry ``i`` of a ragged batch's table row as a pointer of ``like``'s type; ``ALIGNED``: 16-byte aligned, as
    Triton assumes of pointer arguments."""
    x = tl.load(row + i).to(like.dtype)
    if ALIGNED:
        x = tl.multiple_of(x, 16)
    return x


# Lengths change every step: specializing on them (== 1, % 16) would recompile mid-generation.
@triton.jit(do_not_specialize=["n_hist", "n_skip", "n_res", "steps_per_split", "num_splits"])
def _decode_split_kernel(
    Q, KW, KS, KZ, VW, VS, VZ, KL, VL, KR, VR, O_part, LSE_part, LENGTHS, ROWS,
    sq_b, sq_h,
    skw_b, skw_h, skw_t: tl.constexpr,  # token strides are compile-time: a stride of 8 or 4 elements
    sks_b, sks_h, sks_g: tl.constexpr,  # not known to divide 16 would stop vector loads
    svw_b, svw_h, svw_t: tl.constexpr,
    svs_b, svs_h, svs_t: tl.constexpr,
    skr_b, skr_h, skr_t,
    svr_b, svr_h, svr_t,
    n_hist, n_skip, n_res, steps_per_split, num_splits, qk_scale,
    H_KV: tl.constexpr, R: tl.constexpr, R_P: tl.constexpr, M: tl.constexpr, NG: tl.constexpr,
    NGV: tl.constexpr, D: tl.constexpr, G_K: tl.constexpr, G_V: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, W: tl.constexpr, NR: tl.constexpr, ASM: tl.constexpr,
    SHORT: tl.constexpr, K_NUQ: tl.constexpr, V_NUQ: tl.constexpr, DEVICE_LENGTHS: tl.constexpr,
    PER_ROW: tl.constexpr, ALIGNED: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)  # batch offsets of a long cache overflow int32
    if DEVICE_LENGTHS:  # (history, residual) tokens read from memory: one launch serves every step of a CUDA graph
        n_hist = tl.load(LENGTHS)
        n_res = tl.load(LENGTHS + 1)
        steps_per_split = tl.cdiv(tl.cdiv(n_hist, NG * G_K), num_splits)
    if PER_ROW:  # a ragged batch, each row stored apart: its tensors, head strides and counts from its table row
        row = ROWS + b * ROW_FIELDS  # (the batch strides of the cache tensors are 0)
        KW = _table_pointer(row, 0, KW, ALIGNED)
        KS = _table_pointer(row, 1, KS, ALIGNED)
        KZ = _table_pointer(row, 2, KZ, ALIGNED)
        VW = _table_pointer(row, 3, VW, ALIGNED)
        VS = _table_pointer(row, 4, VS, ALIGNED)
        VZ = _table_pointer(row, 5, VZ, ALIGNED)
        KR = _table_pointer(row, 6, KR, ALIGNED)
        VR = _table_pointer(row, 7, VR, ALIGNED)
        skw_h = _table_entry(row, 8, ALIGNED)
        sks_h = _table_entry(row, 9, ALIGNED)
        svw_h = _table_entry(row, 10, ALIGNED)
        svs_h = _table_entry(row, 11, ALIGNED)
        skr_h = _table_entry(row, 12, ALIGNED)
        skr_t = _table_entry(row, 13, ALIGNED)
        svr_h = _table_entry(row, 14, ALIGNED)
        svr_t = _table_entry(row, 15, ALIGNED)
        n_hist = tl.load(row + 16)
        n_skip = tl.load(row + 17)
        n_res = tl.load(row + 18)
        steps_per_split = tl.cdiv(tl.cdiv(n_hist, NG * G_K), tl.maximum(num_splits, 1))  # (0: no row has a history)
    h = pid_bh % H_KV
    offs_r = tl.arange(0, R_P)
    part = ((b * H_KV + h) * R + offs_r) * (num_splits + 1) + split
    if split < num_splits:
        step_lo = split * steps_per_split
        step_hi = tl.minimum(step_lo + steps_per_split, tl.cdiv(n_hist, NG * G_K))
        out, l, m, col = _history(
            Q, KW, KS, KZ, VW, VS, VZ, KL, VL, b, h, offs_r, qk_scale,
            sq_b, sq_h, skw_b, skw_h, skw_t, sks_b, sks_h, sks_g, svw_b, svw_h, svw_t, svs_b, svs_h, svs_t,
            n_hist, n_skip, step_lo, step_hi, R, R_P, M, NG, NGV, D, G_K, G_V, K_BITS, V_BITS, W, ASM, SHORT,
            K_NUQ, V_NUQ,
        )
    else:
        out, l, m = _residual(Q, KR, VR, b, h, offs_r, qk_scale, sq_b, sq_h, skr_b, skr_h, skr_t,
                              svr_b, svr_h, svr_t, n_res, R, R_P, D, NR)
        col = tl.arange(0, D)
    has = l > 0
    lse = tl.where(has, m + tl.log2(tl.where(has, l, 1.0)), float("-inf"))
    out = out / tl.where(has, l, 1.0)[:, None]
    tl.store(LSE_part + part, lse, mask=offs_r < R)
    tl.store(O_part + part[:, None] * D + col[None, :], out, mask=(offs_r < R)[:, None])


@triton.jit
def _merge_parts(acc, l, m, O_part, LSE_part, row, n_parts, D: tl.constexpr, PARTS: tl.constexpr):
    """The softmax state (unnormalized acc [D], sum l, max m; base 2) merged with one query head's partial
    outputs, each weighted by exp2(its lse - max lse), PARTS at a time."""
    offs_d = tl.arange(0, D)
    for p0 in range(0, n_parts, PARTS):
        offs_p = p0 + tl.arange(0, PARTS)
        valid = offs_p < n_parts
        lse = tl.load(LSE_part + row * n_parts + offs_p, mask=valid, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # every part so far empty
        w = tl.exp2(lse - m_use)
        o = tl.load(O_part + (row * n_parts + offs_p)[:, None] * D + offs_d[None, :], mask=valid[:, None], other=0.0)
        alpha = tl.exp2(m - m_use)
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)
        l = l * alpha + tl.sum(w, 0)
        m = m_new
    return acc, l


@triton.jit(do_not_specialize=["n_parts"])
def _decode_reduce_kernel(O_part, LSE_part, Out, n_parts, D: tl.constexpr, PARTS: tl.constexpr):
    """Merge one query head's partial outputs."""
    row = tl.program_id(0)
    # the empty state as tensors: triton 3.6 refuses a loop-carried value whose first value is a constant argument
    acc, l = _merge_parts(tl.zeros([D], tl.float32), tl.full((), 0.0, tl.float32), tl.full((), float("-inf"), tl.float32),
                          O_part, LSE_part, row, n_parts, D, PARTS)
    tl.store(Out + row * D + tl.arange(0, D), (acc / l).to(Out.dtype.element_ty))


@triton.jit(do_not_specialize=["n_res", "n_parts"])
def _residual_merge_kernel(
    Q, KR, VR, O_part, LSE_part, Out, sq_b, sq_h, skr_b, skr_h, skr_t, svr_b, svr_h, svr_t, n_res, n_parts, qk_scale,
    H_Q: tl.constexpr, R: tl.constexpr, D: tl.constexpr, NR: tl.constexpr, PARTS: tl.constexpr,
    DEPENDENT: tl.constexpr,
):
    """One query head: attention over its full-precision residual (fp32, NR tokens at a time), merged with the
    history's partial outputs. One launch where another history kernel would need two (the residual program
    of :func:`_decode_split_kernel`, then :func:`_decode_reduce_kernel`): at batch 1 the host's launch cost is
    most of a step. ``DEPENDENT``: launched as a programmatic dependent of the history kernel (sm_90), which may
    still run: the residual, written before it, is read at once, the partial outputs after ``griddepcontrol.wait``."""
    row = tl.program_id(0)
    b = (row // H_Q).to(tl.int64)
    h = (row % H_Q) // R
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * sq_b + (row % H_Q) * sq_h + offs_d).to(tl.float32) * qk_scale
    m = float("-inf")
    l = 0.0
    acc = tl.zeros([D], tl.float32)
    for t0 in range(0, n_res, NR):
        offs_t = t0 + tl.arange(0, NR)
        valid = offs_t < n_res
        k = tl.load(KR + b * skr_b + h * skr_h + offs_t[:, None] * skr_t + offs_d[None, :], mask=valid[:, None], other=0.0)
        s = tl.where(valid, tl.sum(q[None, :] * k.to(tl.float32), 1), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 0))
        p = tl.exp2(s - m_new)
        v = tl.load(VR + b * svr_b + h * svr_h + offs_t[:, None] * svr_t + offs_d[None, :], mask=valid[:, None], other=0.0)
        alpha = tl.exp2(m - m_new)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        l = l * alpha + tl.sum(p, 0)
        m = m_new
    if DEPENDENT:  # the history kernel done, its partial outputs visible (as triton's gdc_wait, from 3.4)
        tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
    acc, l = _merge_parts(acc, l, m, O_part, LSE_part, row, n_parts, D, PARTS)
    tl.store(Out + row * D + offs_d, (acc / l).to(Out.dtype.element_ty))


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def default_num_splits(n_steps: int, programs: int, device: torch.device, ctas_per_sm: int = 3) -> int:
    """History splits per KV head: the fewest that fill whole waves of resident programs to >= 90%
    (``ctas_per_sm`` at a time on each SM), keeping at least 4 steps a split.

    Few programs (small batch): many short splits fill the GPU. Many programs: 1-3 long splits,
    each costing a partial result and its merge, just enough that the last wave is not mostly idle."""
    slots = ctas_per_sm * _sm_count(device)
    most = max(1, n_steps // 4)
    for splits in range(1, most + 1):
        if 10 * programs * splits >= 9 * -(-programs * splits // slots) * slots:
            return splits
    return most


def default_num_warps(k_bits: int, v_bits: int) -> int:
    """Warps a program (token slices a step) for a bit pair: 4 for 4-bit keys (3-bit ones decode as 4)
    with values of 3 bits or more, else 2.

    Two slices of 64 tokens spend ~20% fewer instructions a token than four of 32 (the step's fixed
    work, scaling the query and rescaling the accumulators, is shared by twice the tokens) but need
    255 registers, so 8 warps fit an SM instead of 12. On an H100 at batch 16 and 64 and 32k tokens
    (``benchmarks/results/attention_h100_sweep.json``) that trade wins by 5-25% for every pair of 2, 4
    and 8 bits except K4V4 and K4V8, where 4 warps are 2-18% faster; on an H200
    (``attention_h200_sweep.json``) 2 warps win by 6-28% for the same pairs, and 4 stay ahead for K4V8
    (5-9%) and, at batch 16, K4V4 (9%; at batch 64 the two are within run-to-run noise)."""
    return 4 if k_bits in (3, 4) and v_bits >= 3 else 2


def default_maxnreg(num_warps: int) -> int | None:
    """Register cap a thread: 168 for 4 warps (3 programs an SM instead of 2, measured 12-14% faster), else none."""
    return 168 if num_warps == 4 else None


def stacking(r_p: int, head_dim: int, key_group: int, value_group: int) -> tuple[int, int, int]:
    """(value groups a token, stacked rows M, key groups a step NG): the rows stack ``r_p`` query heads once
    per key (or value) group, at least the 16 rows an mma tile has; a step covers up to STEP_TOKENS tokens."""
    ngv = head_dim // value_group
    m = max(16, r_p * ngv)
    return ngv, m, min(m // r_p, max(1, STEP_TOKENS // key_group))


@functools.lru_cache(maxsize=256)
def _level_table(levels: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor, int]:
    """(the table the kernel looks codes up in: bytes ``level * grid`` as 4 int32 words, its entries; 0: uniform
    codes). Built and checked once a table (a layer's codes share one tensor): no host sync in a decode step.
    The levels must lie on :func:`~kvtuner.quant.codebook.level_grid` (``KVMethod`` puts them there)."""
    if levels is None:
        return torch.zeros(4, device=device, dtype=torch.int32), 0
    if levels.dim() != 1 or levels.numel() not in (4, 8, 16):
        raise ValueError("the decode kernel reads one level table of 4, 8 or 16 entries a side")
    scaled = levels.to(device, torch.float32) * level_grid(levels.numel().bit_length() - 1)
    table = torch.round(scaled)
    if not torch.equal(table, scaled) or table.min() < 0 or table.max() > 127:
        raise ValueError("levels off the kernel's grid: snap them with kvtuner.quant.codebook.snap_levels")
    table = torch.nn.functional.pad(table.to(torch.uint8), (0, 16 - table.numel()))
    return table.view(torch.int32).contiguous(), levels.numel()


def decode_attention_triton(
    query: torch.Tensor,
    qkeys: QuantizedTensor | None,
    qvalues: QuantizedTensor | None,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    history_start: int = 0,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
    maxnreg: int | None | Literal["auto"] = "auto",
    inline_asm: bool | None = None,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launcher; same arguments and result as :func:`~kvtuner.kernels.reference.decode_attention_reference`.

    Codes with non-uniform ``levels`` (one ``[2**bits]`` table a side) are looked up in the kernel.

    lengths: int32 ``[2]`` on the device, (history tokens, residual tokens) to attend: then ``qkeys`` / ``qvalues``
    and ``keys`` / ``values`` are buffers of that capacity or more, the launch (grid, splits for the whole
    capacity, specializations) does not depend on the lengths and reads nothing back to the host, so a CUDA graph
    can record it once for every step. The history must hold at least one kernel step (128 tokens or fewer).

    num_splits: history slices per KV head (default :func:`default_num_splits`); num_warps (also
    the token slices of a step; default :func:`default_num_warps`), num_stages and maxnreg
    (registers a thread, None for no cap; "auto": 168 for 4 warps, which fits 3 programs an SM,
    else no cap) are launch tunables; inline_asm: decode codes with PTX ``lop3``/``prmt``
    (default on CUDA tensors; Triton's interpreter cannot run PTX).
    """
    if lengths is not None and (qkeys is None or history_start or lengths.dtype != torch.int32 or lengths.numel() != 2):
        raise ValueError("lengths (int32 [history, residual] on the device) needs a history buffer and no sink tokens")
    n_hist = qkeys.num_tokens if qkeys is not None else 0
    return _launch(query, qkeys, qvalues, keys, values, scale, n_hist, history_start,
                   shortest=None if lengths is not None else n_hist, lengths=lengths, num_splits=num_splits,
                   num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg, inline_asm=inline_asm)


def decode_attention_triton_rows(query: torch.Tensor, rows: list[DecodeRow], scale: float, num_splits: int | None = None,
                                 num_warps: int | None = None, num_stages: int = 2,
                                 maxnreg: int | None | Literal["auto"] = "auto",
                                 inline_asm: bool | None = None) -> torch.Tensor:
    """One launch for a ragged batch: row ``i`` of ``query`` ``[B, H_q, D]`` attends to ``rows[i]`` = (qkeys, qvalues,
    keys, values, history_start), a sequence of batch 1 stored apart from the others (a left-padded batch's rows,
    :mod:`kvtuner.cache.layer`), its own lengths and buffers. Each program reads its row's addresses, head strides
    and counts from a table on the device (:func:`_row_table`); splits are planned for the longest history. The
    rows share the layout (bits, groups, level tables, dtypes, token strides); qkeys None: no history yet.
    Returns ``[B, H_q, D]``, row i what :func:`decode_attention_triton` gives for row i alone up to rounding (the
    split plan is the batch's). A history shorter than a kernel step (128 tokens or fewer) in any row makes every
    row's loads masked; rows without a history do not."""
    if len(rows) != query.shape[0]:
        raise ValueError(f"{query.shape[0]} query rows for {len(rows)} cache rows")
    with_history = [row for row in rows if row[0] is not None]
    template = with_history[0] if with_history else None  # a row with a history, whose layout every other shares
    qkeys, qvalues, keys, values, _ = template or rows[0]
    layout = (_layout(qkeys), _layout(qvalues)) if with_history else None  # (_launch checks the first row's own)
    for qk, qv, k, v, _ in rows:
        same = (k.shape[0] == 1 and k.shape[1:2] + k.shape[3:] == keys.shape[1:2] + keys.shape[3:]
                and v.shape == k.shape and k.dtype == keys.dtype and v.dtype == values.dtype)
        if not same or k.stride(-1) != 1 or v.stride(-1) != 1:
            raise ValueError("each row's keys and values are one sequence [1, H_kv, T, D], contiguous in D, with the "
                             "others' heads, head dim and dtypes")
        if qk is not None and ((_layout(qk), _layout(qv)) != layout or not (
                _same_levels(qk, qkeys) and _same_levels(qv, qvalues))):
            raise ValueError("the rows' packed histories must share shapes but length, bits, groups, level tables, "
                             "dtypes and token strides, contiguous in their last dimension")
    table = _row_table(rows, template)
    # what Triton assumes of pointer and stride arguments, told to the compiler where true (vector loads)
    aligned = all(entry % 16 == 0 for row in table for entry in row[:16])
    return _launch(query, qkeys, qvalues, keys, values, scale, max((row[0].num_tokens for row in with_history), default=0),
                   0, shortest=min((row[0].num_tokens for row in with_history), default=0),
                   rows=_to_device(table, query.device), aligned=aligned, num_splits=num_splits,
                   num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg, inline_asm=inline_asm)


def _layout(q: QuantizedTensor) -> tuple:
    """What a compiled kernel fixes of one side of a history: spec, shape but its length, dtypes, the token strides it
    takes as constants, and whether each stored tensor is contiguous in its last dimension with scale and zero
    sharing strides. Computed once a row (a ragged step is host-bound: NOTES)."""
    payload, scale, zero = q.payload, q.scale, q.zero
    return (q.spec, q.shape[:2] + q.shape[3:], payload.dtype, scale.dtype, zero.dtype, payload.stride(2),
            scale.stride(2), payload.shape[-1], scale.shape[-1],
            payload.stride(-1) == scale.stride(-1) == 1 and zero.stride() == scale.stride())


def _same_levels(a: QuantizedTensor, b: QuantizedTensor) -> bool:
    return a.levels is b.levels or (a.levels is not None and b.levels is not None and torch.equal(a.levels, b.levels))


def _to_device(table: list[list[int]], device: torch.device) -> torch.Tensor:
    """The table as int64 on ``device``; on CUDA through pinned memory, whose copy does not wait for the stream (one
    from pageable memory does, which would serialize the host's next step with the GPU's work)."""
    pinned = device.type == "cuda"
    return torch.tensor(table, dtype=torch.int64, pin_memory=pinned).to(device, non_blocking=pinned)


def _row_table(rows: list[DecodeRow], template: DecodeRow | None) -> list[list[int]]:
    """``[B, ROW_FIELDS]`` int64 for :func:`_decode_split_kernel`'s ``PER_ROW``: the addresses of a row's key words,
    scales, zeros, value words, scales, zeros, residual keys and values; the head strides of the first six (scales
    and zeros share theirs), the residual's head and token strides; history tokens, sink tokens, residual tokens.
    A row without history borrows ``template``'s history tensors (a row with one): it has no history step, but the
    unmasked kernel reads one step of value scales before its loop, which must be memory it may read."""
    def history(qkeys: QuantizedTensor, qvalues: QuantizedTensor) -> list[int]:
        return ([t.data_ptr() for t in (qkeys.payload, qkeys.scale, qkeys.zero, qvalues.payload, qvalues.scale,
                                        qvalues.zero)]
                + [qkeys.payload.stride(1), qkeys.scale.stride(1), qvalues.payload.stride(1), qvalues.scale.stride(1)])

    borrowed = history(*template[:2]) if template is not None else None
    table = []
    for qkeys, qvalues, keys, values, history_start in rows:
        if qkeys is not None:
            fields = history(qkeys, qvalues)
        elif borrowed is not None:
            fields = borrowed
        else:  # no row has a history: no history program runs
            fields = [keys.data_ptr()] * 6 + [0] * 4
        table.append(fields[:6] + [keys.data_ptr(), values.data_ptr()] + fields[6:]
                     + [keys.stride(1), keys.stride(2), values.stride(1), values.stride(2),
                        0 if qkeys is None else qkeys.num_tokens, history_start, keys.shape[2]])
    return table


def _split_constexprs(h_kv: int, r: int, d: int, g_k: int, g_v: int, k_bits: int, v_bits: int, num_warps: int,
                      shortest: int | None, k_nuq: int, v_nuq: int, *, asm: bool, device_lengths: bool, per_row: bool,
                      aligned: bool) -> dict:
    """The compile-time constants of :func:`_decode_split_kernel` for a launch (:func:`_launch`) and for its
    ahead-of-time compile (:func:`compile_sm90`) alike, so that CI compiles what a launch runs. shortest: the fewest
    history tokens a program may find (fewer than a step: masked loads), None for at least one step; aligned: a
    ragged batch's table checked 16-aligned (only a table's rows ever are)."""
    r_p = triton.next_power_of_2(r)
    ngv, m, ng = stacking(r_p, d, g_k, g_v)
    return dict(H_KV=h_kv, R=r, R_P=r_p, M=m, NG=ng, NGV=ngv, D=d, G_K=g_k, G_V=g_v, K_BITS=k_bits, V_BITS=v_bits,
                W=num_warps, NR=32, ASM=asm, SHORT=shortest is not None and shortest < ng * g_k, K_NUQ=k_nuq,
                V_NUQ=v_nuq, DEVICE_LENGTHS=device_lengths, PER_ROW=per_row, ALIGNED=per_row and aligned)


def _launch(query: torch.Tensor, qkeys: QuantizedTensor | None, qvalues: QuantizedTensor | None, keys: torch.Tensor,
            values: torch.Tensor, scale: float, n_hist: int, history_start: int, shortest: int | None, *,
            lengths: torch.Tensor | None = None, rows: torch.Tensor | None = None, aligned: bool = False,
            num_splits: int | None, num_warps: int | None, num_stages: int, maxnreg: int | None | Literal["auto"],
            inline_asm: bool | None) -> torch.Tensor:
    """The split and reduce launches over the tensors given (for a ragged batch: the first row with a history, which
    sets the layout the kernel is compiled for). n_hist: the history tokens the splits are planned for; shortest:
    the fewest a program may find (fewer than a step: masked loads), None for at least one step. Read on the
    device: lengths, int32 ``[2]`` (history, residual), or rows, a ragged batch's int64 table (:func:`_row_table`;
    aligned: its addresses and strides are multiples of 16). The rest: :func:`decode_attention_triton`'s tunables."""
    per_row = rows is not None
    b, h_q, d = query.shape
    h_kv, n_res = keys.shape[1], keys.shape[2]
    r = h_q // h_kv
    tensors = [query, keys, values]
    kl, k_nuq = _level_table(qkeys.levels if qkeys is not None else None, query.device)
    vl, v_nuq = _level_table(qvalues.levels if qvalues is not None else None, query.device)
    if qkeys is None:  # no history programs run; typed placeholders still have to compile
        g_k, g_v, k_bits, v_bits = 16 * (num_warps or 4), d, 4, 4
        kw = vw = torch.empty(1, device=query.device, dtype=torch.int32)
        ks = kz = vs = vz = torch.empty(1, device=query.device, dtype=torch.float16)
        hist_strides = (0,) * 12
    else:
        g_k = qkeys.spec.group_len(qkeys.shape)
        g_v = qvalues.spec.group_len(qvalues.shape)
        k_bits, v_bits = qkeys.spec.bits, qvalues.spec.bits
        kw, ks, kz = qkeys.payload, qkeys.scale, qkeys.zero
        vw, vs, vz = qvalues.payload, qvalues.scale, qvalues.zero
        tensors += [kw, ks, kz, vw, vs, vz]
        if kz.stride() != ks.stride() or vz.stride() != vs.stride():
            raise ValueError("scale and zero must share strides")
        hist_strides = (*kw.stride()[:3], *ks.stride()[:3], *vw.stride()[:3], *vs.stride()[:3])
    res_strides = (*keys.stride()[:3], *values.stride()[:3])
    if per_row:  # each row's own tensors come from the table: no batch offsets into the first row's
        hist_strides = tuple(0 if i % 3 == 0 else s for i, s in enumerate(hist_strides))
        res_strides = (0, *res_strides[1:3], 0, *res_strides[4:])
    num_warps = num_warps or default_num_warps(k_bits, v_bits)
    if maxnreg == "auto":
        maxnreg = default_maxnreg(num_warps)
    if any(t.stride(-1) != 1 for t in tensors):
        raise ValueError("every input must be contiguous in its last dimension")
    on_gpu = query.is_cuda
    consts = _split_constexprs(h_kv, r, d, g_k, g_v, k_bits, v_bits, num_warps, shortest, k_nuq, v_nuq,
                               asm=on_gpu if inline_asm is None else inline_asm, device_lengths=lengths is not None,
                               per_row=per_row, aligned=aligned)
    m, ng = consts["M"], consts["NG"]
    if g_k < 2 * num_warps or ng * g_k < 16 * num_warps:
        raise ValueError(f"key groups of {g_k} tokens are too short for {num_warps} warps")
    n_steps = -(-n_hist // (ng * g_k))
    ctas = 65536 // (32 * num_warps * (maxnreg or 255)) if on_gpu else 3
    splits = min(num_splits or default_num_splits(n_steps, b * h_kv, query.device, max(1, ctas)), n_steps)
    if m > 16:  # more than 16 stacked rows: one step a program (their multi-step loop failed on an H100)
        splits = n_steps
    steps_per_split = -(-n_steps // splits) if splits else 0
    n_parts = splits + 1
    o_part = torch.empty((b * h_q, n_parts, d), device=query.device, dtype=torch.float32)
    lse_part = torch.empty((b * h_q, n_parts), device=query.device, dtype=torch.float32)
    _decode_split_kernel[(b * h_kv, n_parts)](
        query, kw, ks, kz, vw, vs, vz, kl, vl, keys, values, o_part, lse_part,
        kl if lengths is None else lengths, rows if per_row else kl,
        query.stride(0), query.stride(1), *hist_strides, *res_strides,
        n_hist, history_start, n_res, steps_per_split, splits, scale * LOG2E, **consts,
        num_warps=num_warps, num_stages=num_stages, **({"maxnreg": maxnreg} if on_gpu and maxnreg else {}),
    )
    out = torch.empty((b, h_q, d), device=query.device, dtype=query.dtype)
    parts = min(64, triton.next_power_of_2(n_parts))
    _decode_reduce_kernel[(b * h_q,)](o_part, lse_part, out, n_parts, D=d, PARTS=parts)
    return out


_POINTER_TYPES = {"Q": "*bf16", "KW": "*i32", "KS": "*fp16", "KZ": "*fp16", "VW": "*i32", "VS": "*fp16",
                  "VZ": "*fp16", "KL": "*i32", "VL": "*i32", "KR": "*bf16", "VR": "*bf16", "O_part": "*fp32",
                  "LSE_part": "*fp32", "LENGTHS": "*i32", "ROWS": "*i64", "Out": "*bf16"}


def _compile_sm90(fn, constexprs: dict, num_warps: int, maxnreg: int | None = None):
    """``fn`` compiled ahead of time for sm_90a with the specializations of a launch over bf16 tensors: 16-byte
    aligned pointers and integer arguments divisible by 16 (except those never specialized)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {n: "constexpr" if n in constexprs else _POINTER_TYPES.get(n, "fp32" if n == "qk_scale" else "i32")
           for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n] != "constexpr" and sig[n] != "fp32" and n not in fn.do_not_specialize}
    src = ASTSource(fn, sig, {(fn.arg_names.index(k),): v for k, v in constexprs.items()}, attrs)
    options = dict(num_warps=num_warps, num_stages=2, **({"maxnreg": maxnreg} if maxnreg else {}))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def compile_sm90(k_bits: int, v_bits: int, head_dim: int = 128, gqa: int = 4, group: int = 32,
                 num_warps: int | None = None, maxnreg: int | None | Literal["auto"] = "auto", short: bool = False,
                 device_lengths: bool = False, per_row: bool = False, aligned: bool = True, codebook: bool = False):
    """The split kernel compiled ahead of time for sm_90a (no GPU needed), as :func:`decode_attention_triton` would
    launch it on bf16 activations for keys and values grouped by ``group`` (``aligned``: a ragged batch's table hinted
    16-aligned): CI compiles the variants with the triton of the GPU image (whose compiler accepts less than a newer
    triton's interpreter), ``benchmarks/sass_decode.py`` counts its SASS. Returns (kernel, tokens a step)."""
    warps = num_warps or default_num_warps(k_bits, v_bits)
    consts = _split_constexprs(8, gqa, head_dim, group, group, k_bits, v_bits, warps, 0 if short else None,
                               2**k_bits if codebook else 0, 2**v_bits if codebook else 0, asm=True,
                               device_lengths=device_lengths, per_row=per_row, aligned=aligned)
    consts.update(skw_t=packed_width(head_dim, k_bits), sks_g=head_dim, svw_t=packed_width(head_dim, v_bits),
                  svs_t=consts["NGV"])  # a contiguous cache's token strides, constants
    return _compile_sm90(_decode_split_kernel, consts, warps,
                         default_maxnreg(warps) if maxnreg == "auto" else maxnreg), consts["NG"] * group


def compile_merges_sm90(head_dim: int = 128, gqa: int = 4, parts: int = 64) -> list:
    """The reduce and the residual-merge kernels (launched alone and as a programmatic dependent) compiled ahead of
    time for sm_90a (see :func:`compile_sm90`)."""
    def merge(launch: MergeLaunch, dependent: bool):
        consts = _merge_constexprs(8 * gqa, gqa, head_dim, parts, launch, dependent)
        return _compile_sm90(_residual_merge_kernel, consts, launch.warps, launch.maxnreg)

    return [_compile_sm90(_decode_reduce_kernel, dict(D=head_dim, PARTS=parts), 4),
            merge(MERGE_LAUNCH, False), merge(DEPENDENT_MERGE_LAUNCH, True)]


@dataclasses.dataclass(frozen=True)
class MergeLaunch:
    """How :func:`merge_with_residual` launches: warps a program, residual tokens and partial results a loop step,
    a register cap."""

    warps: int = 4
    tokens: int = 32
    parts: int = 64
    maxnreg: int | None = None


# After the history kernel: 4 warps, up to 64 parts a loop step (timed on the H100 as gluon_sweep's "merge after").
MERGE_LAUNCH = MergeLaunch()
# As a programmatic dependent (sm_90): one warp of at most 64 registers, faster than MERGE_LAUNCH's shape launched the
# same way at batch 4 / 32k (H100, ``gluon_sweep.py --variants default "wide dependent merge"``), though it merges 8
# parts a loop step. Why is not settled: both shapes start before the history kernel ends (NOTES, round 12).
DEPENDENT_MERGE_LAUNCH = MergeLaunch(warps=1, tokens=8, parts=8, maxnreg=64)


def _merge_constexprs(h_q: int, r: int, d: int, n_parts: int, launch: MergeLaunch, dependent: bool) -> dict:
    """:func:`_residual_merge_kernel`'s compile-time constants, for the launch and the ahead-of-time compile alike."""
    return dict(H_Q=h_q, R=r, D=d, NR=launch.tokens, PARTS=min(launch.parts, triton.next_power_of_2(n_parts)),
                DEPENDENT=dependent)


def merge_with_residual(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                        o_part: torch.Tensor, lse_part: torch.Tensor, dependent: bool = False) -> torch.Tensor:
    """Attention output from a history kernel's partial results (``o_part`` ``[B * H_q, parts, D]``, normalized;
    ``lse_part`` ``[B * H_q, parts]``, base-2 log-sum-exp) and the full-precision residual ``keys`` / ``values``
    ``[B, H_kv, T_r, D]``, in one launch (:func:`_residual_merge_kernel`). How :mod:`.gluon_decode` shares
    this module's partial-result format.

    ``dependent`` (sm_90, right after the launch of a history kernel that triggers its dependents): a programmatic
    dependent launch (:data:`DEPENDENT_MERGE_LAUNCH`): its programs may start while the history kernel runs (as
    resources allow), attend to the residual meanwhile and wait for the whole history kernel only to merge, so the
    gap between two launches and the residual's time are hidden. Compiled code only (triton's interpreter does not
    run ``griddepcontrol``)."""
    b, h_q, d = query.shape
    h_kv, n_res = keys.shape[1], keys.shape[2]
    n_parts = o_part.shape[1]
    if any(t.stride(-1) != 1 for t in (query, keys, values)) or not (o_part.is_contiguous() and lse_part.is_contiguous()):
        raise ValueError("query, keys and values must be contiguous in their last dimension, the parts contiguous")
    out = torch.empty((b, h_q, d), device=query.device, dtype=query.dtype)
    launch = DEPENDENT_MERGE_LAUNCH if dependent else MERGE_LAUNCH
    _residual_merge_kernel[(b * h_q,)](
        query, keys, values, o_part, lse_part, out, query.stride(0), query.stride(1), *keys.stride()[:3],
        *values.stride()[:3], n_res, n_parts, scale * LOG2E,
        **_merge_constexprs(h_q, h_q // h_kv, d, n_parts, launch, dependent), num_warps=launch.warps,
        **({"maxnreg": launch.maxnreg} if launch.maxnreg else {}),
        **({"launch_pdl": True} if dependent else {}),  # a launch option triton has from 3.4 (Gluon's needs 3.5)
    )
    return out
