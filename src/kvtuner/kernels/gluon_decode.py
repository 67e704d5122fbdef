"""Decode attention on tensor cores straight from packed KIVI codes, written in Gluon.

Triton's decode kernel (:mod:`.decode`) spends about 28 warp instructions per cached token and KV head
on K4V4, most of them operand moves and layout conversions that Triton inserts between the unpacking
and the dot. Gluon (``triton.experimental.gluon``) lets the layout be stated, so that each thread's
unpacked registers *are* its ``mma.sync.m16n8k16`` operand fragments and nothing moves between threads
(every ``convert_layout`` below is asserted trivial at compile time); shared memory only stages the packed
bytes on their way in.

One warp a program, FlashAttention-2's arrangement: the GQA group's query heads on the mma's M side
(16 rows, ``R <= 16`` used), cached tokens on N for the scores ``S = Q' K^T`` and on K for ``O += P V``,
so that the scores' accumulator fragment is, converted to fp16, the A fragment of ``P`` as it stands.

* **Codes to fp16 without conversions.** One ``lop3`` per register computes ``(x & mask) | 0x54005400``:
  two fp16 numbers ``64 + m' c`` (``m' = 2^(b * i) / 16`` for the code in field i of its byte), exact.
  A key word decodes into the B fragment of its token (two channels a register); the channel order
  the fragments imply is undone on the query side (:func:`key_channels`), so the stored layout is
  the one every CPU path reads.
* **Keys: scales folded into the query (MixPE).** ``q . k = (q * s_g / m') . (64 + m' c) - 64 * sum(q * s_g / m')
  + q . z_g``: the query rows are scaled once per key group of ``G_K`` tokens; the offset term comes
  from two small mmas of the same fp16 operands (their 64s cancel in fp32 exactly as they enter).
* **Values: dequantized in the operand, by token pairs.** A B-fragment register holds one channel of
  two consecutive tokens, so one ``prmt`` pairs the half-words of two tokens' words and one
  ``fma.rn.f16x2`` per register makes ``m' c s`` from ``64 + m' c`` (``y * s - 64 s``, one rounding);
  the zeros and the softmax sum come from two small mmas a group (zeros: column g those of lane g's
  value group, which every column lane g holds shares).
* **Stages.** With ``stages`` > 0 (the default for 2- and 4-bit sides) each program keeps a ring of
  shared-memory buffers: while it computes block i, ``cp.async`` brings block ``i + stages - 1`` in (six
  contiguous ranges, 16 bytes a lane, holding no registers), and the block is then read from shared memory
  into exactly the registers a global load would fill. One warp of 249 registers cannot keep its own loads in
  flight otherwise (NOTES, rounds 8 and 10).
* **Split-K.** Programs ``(B * H_kv, splits)`` each reduce a run of 64-token blocks to a partial
  output and log-sum-exp, in :mod:`.decode`'s partial-result format; one more launch attends to the
  full-precision residual and merges (:func:`~kvtuner.kernels.decode.merge_with_residual`).

What it takes (:func:`gluon_supported`): uniform integer KIVI codes of 2, 4 or 8 bits a side, head dim
64 or 128 with at least 256 value bits a token, key groups of 32, 64 or 128 tokens holding whole
blocks, value groups of at least ``D / 8`` channels, no sink tokens. 3-bit
codes, codebooks and sinks stay on :mod:`.decode`.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

from kvtuner.kernels.gluon_layout import (BLOCK, LOG2E, MAGIC, MAGIC_BITS, groups_per_block, split_plan,
                                          stage_bytes, stages_can_copy)
from kvtuner.quant import QuantizedTensor

MAGIC_C = gl.constexpr(MAGIC)
RESCALE = 8.0  # log2 units the running max may lag a row's scores before the accumulators are rescaled
RESCALE_C = gl.constexpr(RESCALE)
BLOCK_C = gl.constexpr(BLOCK)
GLUON_BITS = (2, 4, 8)


def _field_masks(bits: int) -> list[int]:
    """lop3 masks of the ``8 // bits`` code fields of the low byte of both 16-bit halves."""
    return [((1 << bits) - 1) * 0x10001 << (bits * i) for i in range(8 // bits)]


MAGIC_PAIR = f"{MAGIC_BITS * 0x10001:#010x}"


def _key_asm(bits: int) -> str:
    """PTX: one int32 word -> ``16 // bits`` registers of fp16 pairs ``64 + m' c`` (r = byte * fields + field).
    Operands: outputs $0.., the word $n (pack=2 passes it twice)."""
    n = 16 // bits
    lines = [f"shr.u32 hi, ${n}, 8;"]
    for r in range(n):
        src = f"${n}" if r < n // 2 else "hi"
        lines.append(f"lop3.b32 ${r}, {src}, {_field_masks(bits)[r % (n // 2)]:#010x}, " + MAGIC_PAIR + ", 0xea;")
    return "{ .reg .b32 hi; " + " ".join(lines) + " }"


def _value_asm(bits: int) -> str:
    """PTX: the words of tokens a and b and their scales (s_a, s_b) as one f16x2 -> ``2 * 16 // bits`` registers
    (half-word h, r), each the fp16 pair ``m' c s`` of one channel for tokens (a, b): ``prmt`` pairs the
    half-words, ``lop3`` decodes, ``fma.rn.f16x2`` scales (``y * s - 64 s``, one rounding).
    Operands: outputs $0..$(2n-1), then word a, a, word b, b, scales, scales (pack=2 passes each twice)."""
    n = 16 // bits
    wa, wb, s = f"${2 * n}", f"${2 * n + 2}", f"${2 * n + 4}"
    lines = [
        f"prmt.b32 m0, {wa}, {wb}, 0x5410;", f"prmt.b32 m1, {wa}, {wb}, 0x7632;",
        "shr.u32 h0, m0, 8;", "shr.u32 h1, m1, 8;",
        "mov.b32 k, 0xD400D400;", f"mul.rn.f16x2 c, {s}, k;",  # -64 * s, exact
    ]
    for half in range(2):
        for r in range(n):
            src = (f"m{half}" if r < n // 2 else f"h{half}")
            lines.append(f"lop3.b32 t, {src}, {_field_masks(bits)[r % (n // 2)]:#010x}, " + MAGIC_PAIR + ", 0xea;")
            lines.append(f"fma.rn.f16x2 ${half * n + r}, t, {s}, c;")
    return "{ .reg .b32 m0, m1, h0, h1, k, c, t; " + " ".join(lines) + " }"


KEY_ASM_2, KEY_ASM_4, KEY_ASM_8 = (gl.constexpr(_key_asm(b)) for b in GLUON_BITS)
VALUE_ASM_2, VALUE_ASM_4, VALUE_ASM_8 = (gl.constexpr(_value_asm(b)) for b in GLUON_BITS)
VALUE_OUT_2, VALUE_OUT_4, VALUE_OUT_8 = (gl.constexpr("=r," * (32 // b) + "r,r,r,r,r,r") for b in GLUON_BITS)


@gluon.jit
def _key_channel(k, BITS: gl.constexpr, D: gl.constexpr):
    """:func:`key_channels` on device: (stored channel, multiplier m') of reduction index k."""
    RPW: gl.constexpr = 16 // BITS
    CPW: gl.constexpr = 32 // BITS
    WPT: gl.constexpr = D * BITS // 128
    HR: gl.constexpr = RPW // 2
    jj = k // 16
    r = (jj % HR) * 2 + (k // 8) % 2
    ch = (((k // 2) % 4) * WPT + jj // HR) * CPW + (k % 2) * (CPW // 2) + r
    return ch, (1 << (BITS * (r % (8 // BITS)))).to(gl.float32) * (1.0 / 16.0)


@gluon.jit
def _value_channel(n, BITS: gl.constexpr, D: gl.constexpr):
    """:func:`value_channels` on device: (stored channel, multiplier m') of output column n."""
    RPW: gl.constexpr = 16 // BITS
    HW: gl.constexpr = D * BITS // 128
    i = n // 8
    r = i % RPW
    ch = ((n % 8) * HW + i // RPW) * RPW + r
    return ch, (1 << (BITS * (r % (8 // BITS)))).to(gl.float32) * (1.0 / 16.0)


@gluon.jit
def _decode_keys(w, BITS: gl.constexpr):
    x = gl.join(w, w)  # pack=2 hands each asm instance two elements: the same word twice
    if BITS == 2:
        return gl.inline_asm_elementwise(KEY_ASM_2, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [x], dtype=[gl.float16] * 8,
                                         is_pure=True, pack=2)
    elif BITS == 4:
        return gl.inline_asm_elementwise(KEY_ASM_4, "=r,=r,=r,=r,r,r", [x], dtype=[gl.float16] * 4,
                                         is_pure=True, pack=2)
    else:
        return gl.inline_asm_elementwise(KEY_ASM_8, "=r,=r,r,r", [x], dtype=[gl.float16] * 2, is_pure=True, pack=2)


@gluon.jit
def _decode_values(wa, wb, s2, BITS: gl.constexpr):
    args = [gl.join(wa, wa), gl.join(wb, wb), gl.join(s2, s2)]
    if BITS == 2:
        return gl.inline_asm_elementwise(VALUE_ASM_2, VALUE_OUT_2, args, dtype=[gl.float16] * 16,
                                         is_pure=True, pack=2)
    elif BITS == 4:
        return gl.inline_asm_elementwise(VALUE_ASM_4, VALUE_OUT_4, args, dtype=[gl.float16] * 8,
                                         is_pure=True, pack=2)
    else:
        return gl.inline_asm_elementwise(VALUE_ASM_8, VALUE_OUT_8, args, dtype=[gl.float16] * 4,
                                         is_pure=True, pack=2)


@gluon.jit
def _key_tile(base, t0, skw_t: gl.constexpr, D: gl.constexpr, BITS: gl.constexpr, NTOK: gl.constexpr,
              b_l: gl.constexpr, SMEM: gl.constexpr):
    """[D, NTOK] fp16 B operand ``64 + m' c`` of NTOK key tokens, rows in :func:`key_channels` order: from token
    ``t0`` of global memory at ``base``, or (``SMEM``) from the shared view ``base`` of those tokens' words."""
    WPT: gl.constexpr = D * BITS // 128
    RPW: gl.constexpr = 16 // BITS
    w_l: gl.constexpr = gl.BlockedLayout([1, 1, WPT], [8, 4, 1], [1, 1, 1], [2, 1, 0])
    if SMEM:
        w = base.load(w_l)  # [NTOK, 4, WPT]: the token rows as they lie in memory
    else:
        tok = gl.arange(0, NTOK, layout=gl.SliceLayout(1, gl.SliceLayout(2, w_l)))
        quad = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, w_l)))
        j2 = gl.arange(0, WPT, layout=gl.SliceLayout(0, gl.SliceLayout(1, w_l)))
        offs = (t0 + tok)[:, None, None] * skw_t + (quad * WPT)[None, :, None] + j2[None, None, :]
        w = gl.load(base + offs)
    o = _decode_keys(w, BITS)
    # o[r]: [NTOK, 4 (quad), WPT (j2), 2 (e)]; stack r (bit 0 first), then order (tok, j2, r_hi.., hh, quad, e)
    if RPW == 2:
        z = gl.join(o[0], o[1])  # [..., e, r0]
        z = gl.permute(z, [0, 2, 4, 1, 3])
    elif RPW == 4:
        z = gl.join(gl.join(o[0], o[1]), gl.join(o[2], o[3]))  # [..., e, r0, r1]
        z = gl.permute(z, [0, 2, 5, 4, 1, 3])
    else:
        z = gl.join(gl.join(gl.join(o[0], o[1]), gl.join(o[2], o[3])),
                    gl.join(gl.join(o[4], o[5]), gl.join(o[6], o[7])))  # [..., e, r0, r1, r2]
        z = gl.permute(z, [0, 2, 6, 5, 4, 1, 3])
    k = gl.permute(gl.reshape(z, [NTOK, D]), [1, 0])
    return gl.convert_layout(k, b_l, assert_trivial=True)


@gluon.jit
def _value_tile(base, sbase, zbase, t0, svw_t: gl.constexpr, svs_t: gl.constexpr, D: gl.constexpr, BITS: gl.constexpr,
                NTOK: gl.constexpr, G_V: gl.constexpr, b_l: gl.constexpr, SMEM: gl.constexpr):
    """B operands of NTOK value tokens from ``t0``: [NTOK, D] fp16 ``m' c s``, columns in :func:`value_channels`
    order, and [NTOK, 8] their zeros, column g the zero of lane g's value group (that of all its columns).
    ``SMEM``: ``base``, ``sbase`` and ``zbase`` are shared views of these tokens' words, scales and zeros
    (made by :func:`_group_values`), read into the same registers as from global memory."""
    NWL: gl.constexpr = D * BITS // 256  # words a lane reads of each token
    RPW: gl.constexpr = 16 // BITS
    # [token pairs (JH: 8 tokens apart), t, g, words]: lanes (g, t), a lane's words contiguous (one vector load)
    x_l: gl.constexpr = gl.BlockedLayout([1, 1, 1, NWL], [1, 4, 8, 1], [1, 1, 1, 1], [3, 1, 2, 0])
    if SMEM:
        wa, wb, s2, zeros = _value_operands_from_shared(base, sbase, zbase, D, BITS, NTOK, G_V, x_l)
    else:
        wa, wb, s2, zeros = _value_operands_from_global(base, sbase, zbase, t0, svw_t, svs_t, D, BITS, NTOK, G_V, x_l)
    o = _decode_values(wa, wb, s2, BITS)
    # o[half * RPW + r]: [JH, 4 (t), 8 (g), NWL, 2 (e)] -> (jh, t, e | w, half, r.., g)
    if RPW == 2:
        z = gl.join(gl.join(o[0], o[1]), gl.join(o[2], o[3]))  # [JH, t, g, w, e, r0, half]
        z = gl.permute(z, [0, 1, 4, 3, 6, 5, 2])
    elif RPW == 4:
        z = gl.join(gl.join(gl.join(o[0], o[1]), gl.join(o[2], o[3])),
                    gl.join(gl.join(o[4], o[5]), gl.join(o[6], o[7])))  # [.., e, r0, r1, half]
        z = gl.permute(z, [0, 1, 4, 3, 7, 6, 5, 2])
    else:
        z = gl.join(gl.join(gl.join(gl.join(o[0], o[1]), gl.join(o[2], o[3])),
                            gl.join(gl.join(o[4], o[5]), gl.join(o[6], o[7]))),
                    gl.join(gl.join(gl.join(o[8], o[9]), gl.join(o[10], o[11])),
                            gl.join(gl.join(o[12], o[13]), gl.join(o[14], o[15]))))  # [.., e, r0, r1, r2, half]
        z = gl.permute(z, [0, 1, 4, 3, 8, 7, 6, 5, 2])
    return (gl.convert_layout(gl.reshape(z, [NTOK, D]), b_l, assert_trivial=True),
            gl.convert_layout(zeros.to(gl.float16), b_l, assert_trivial=True))


@gluon.jit
def _value_operands_from_global(base, sbase, zbase, t0, svw_t: gl.constexpr, svs_t: gl.constexpr, D: gl.constexpr,
                                BITS: gl.constexpr, NTOK: gl.constexpr, G_V: gl.constexpr, x_l: gl.constexpr):
    """(words of tokens a, of tokens b = a + 1, their scales (s_a, s_b) as one f16x2, [NTOK, 8] zeros) for
    :func:`_value_tile`, loaded from global memory: lane (t, g) reads tokens ``jh * 8 + 2 t`` and the next."""
    NWL: gl.constexpr = D * BITS // 256
    jh = gl.arange(0, NTOK // 8, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, x_l))))
    t = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, x_l))))
    g = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, x_l))))
    w = gl.arange(0, NWL, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, x_l))))
    tok_a = t0 + jh[:, None, None] * 8 + t[None, :, None] * 2  # [JH, 4, 1]: tokens a; b = a + 1
    gv = (g * (D // 8)) // G_V  # a lane's D / 8 channels lie in one value group
    words_a = base + (tok_a * svw_t + (g * NWL)[None, None, :])[:, :, :, None] + w[None, None, None, :]
    scales_a = sbase + (tok_a * svs_t + gv[None, None, :])[:, :, :, None]  # [JH, 4, 8, 1]
    wa = gl.load(words_a)
    wb = gl.load(words_a + svw_t)
    zeros_a = zbase + (tok_a * svs_t + gv[None, None, :])  # [JH, 4, 8], as the scales
    za = gl.load(zeros_a)
    zb = gl.load(zeros_a + svs_t)
    zeros = gl.reshape(gl.permute(gl.join(za, zb), [0, 1, 3, 2]), [NTOK, 8])  # k = jh * 8 + t * 2 + e, n = g
    sa = gl.load(scales_a).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    sb = gl.load(scales_a + svs_t).to(gl.int16, bitcast=True).to(gl.int32)
    s2 = gl.broadcast(sa | (sb << 16), wa)[0]  # (s_a, s_b) as one f16x2
    return wa, wb, s2, zeros


@gluon.jit
def _value_operands_from_shared(words, scales, zeros, D: gl.constexpr, BITS: gl.constexpr, NTOK: gl.constexpr,
                                G_V: gl.constexpr, x_l: gl.constexpr):
    """:func:`_value_operands_from_global` from shared views of NTOK tokens (made by :func:`_group_values`): words
    [JH, 4, 2, 8, NWL] and scales [JH, 4, 2, SV, 1, 1], zeros [JH, 4, 2, SV, 1] (token ``jh * 8 + 2 t + e``;
    SV = D / G_V groups a token). Each is read in one load, tokens a and b (e) in one thread's registers,
    then split; a lane reads the group of its channels, ``g // (8 / SV)``: the size-1 axis its lanes share."""
    NWL: gl.constexpr = D * BITS // 256
    JH: gl.constexpr = NTOK // 8
    SV: gl.constexpr = D // G_V
    y_l: gl.constexpr = gl.BlockedLayout([1, 1, 2, 1, NWL], [1, 4, 1, 8, 1], [1, 1, 1, 1, 1], [4, 2, 1, 3, 0])
    s_l: gl.constexpr = gl.BlockedLayout([1, 1, 2, 1, 1, NWL], [1, 4, 1, SV, 8 // SV, 1], [1, 1, 1, 1, 1, 1],
                                         [5, 2, 1, 4, 3, 0])
    z_l: gl.constexpr = gl.BlockedLayout([1, 1, 2, 1, 1], [1, 4, 1, SV, 8 // SV], [1, 1, 1, 1, 1], [2, 1, 4, 3, 0])
    wa, wb = gl.split(gl.permute(words.load(y_l), [0, 1, 3, 4, 2]))
    s = gl.broadcast(scales.load(s_l), gl.full([JH, 4, 2, SV, 8 // SV, NWL], 0, gl.float16, s_l))[0]
    sa, sb = gl.split(gl.permute(gl.reshape(s, [JH, 4, 2, 8, NWL]), [0, 1, 3, 4, 2]))
    sa = gl.convert_layout(sa, x_l, assert_trivial=True).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    sb = gl.convert_layout(sb, x_l, assert_trivial=True).to(gl.int16, bitcast=True).to(gl.int32)
    z = gl.broadcast(zeros.load(z_l), gl.full([JH, 4, 2, SV, 8 // SV], 0, gl.float16, z_l))[0]
    return (gl.convert_layout(wa, x_l, assert_trivial=True), gl.convert_layout(wb, x_l, assert_trivial=True),
            sa | (sb << 16), gl.reshape(z, [NTOK, 8]))


@gluon.jit
def _key_group_vector(ptr, D: gl.constexpr, BITS: gl.constexpr, a_l: gl.constexpr, SMEM: gl.constexpr):
    """A key group's D per-channel fp16 values (scales or zeros) in reduction order, as the A operand's columns,
    from global memory at ``ptr`` or (``SMEM``) the shared view ``ptr`` of the row, shaped [1, 4, WPT, 2, RPW].

    Quad q reduces over the channels of words ``q * WPT ..``, a contiguous quarter of the row: it loads them
    with vector loads and only reorders its own registers."""
    WPT: gl.constexpr = D * BITS // 128
    RPW: gl.constexpr = 16 // BITS
    HR: gl.constexpr = RPW // 2
    c_l: gl.constexpr = gl.BlockedLayout([1, 1, WPT, 2, RPW], [8, 4, 1, 1, 1], [1, 1, 1, 1, 1], [4, 3, 2, 1, 0])
    if SMEM:
        x = ptr.load(c_l)
    else:
        q = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, c_l)))))
        j2 = gl.arange(0, WPT, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, gl.SliceLayout(4, c_l)))))
        e = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(4, c_l)))))
        r = gl.arange(0, RPW, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, c_l)))))
        offs = ((q[None, :, None, None] * WPT + j2[None, None, :, None]) * (2 * RPW)
                + e[None, None, None, :] * RPW)[:, :, :, :, None] + r[None, None, None, None, :]
        x = gl.load(ptr + offs)
    x = gl.reshape(x, [4, WPT, 2, HR, 2])  # (q, j2, e, r_hi, hh)
    x = gl.reshape(gl.permute(x, [1, 3, 4, 0, 2]), [D])  # k = ((j2 * HR + r_hi) * 2 + hh) * 8 + q * 2 + e
    return gl.convert_layout(x, gl.SliceLayout(0, a_l), assert_trivial=True)


@gluon.jit
def _tile_columns(x, N: gl.constexpr, mma: gl.constexpr):
    """[16, 8] accumulator fragment -> [16, N], each 8-column tile a copy: registers shared, no instructions."""
    for i in gl.static_range(N.bit_length() - 4):
        x = gl.reshape(gl.permute(gl.join(x, x), [0, 2, 1]), [16, 16 << i])
    return gl.convert_layout(x, mma, assert_trivial=True)


@gluon.jit
def _mul_f16x2(a, b):
    """fp16 ``a * b``, one ``mul.rn.f16x2`` a register pair (Triton's own pairing of the broadcast needs repacking)."""
    return gl.inline_asm_elementwise("mul.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=gl.float16,
                                     is_pure=True, pack=2)


@gluon.jit
def _group_scores(qm, qz, KS, KZ, KW, grp, j: gl.constexpr, NG: gl.constexpr, sks_g: gl.constexpr,
                  skw_t: gl.constexpr, R: gl.constexpr, D: gl.constexpr, G_K: gl.constexpr, K_BITS: gl.constexpr,
                  mma: gl.constexpr, a_l: gl.constexpr, b_l: gl.constexpr, SMEM: gl.constexpr):
    """Scores [16, G_K] (base 2) of the rows against key group ``grp``: ``q'_g . (64 + m' c) + offset``, the
    offset ``q . z_g - 64 sum(q'_g)`` from two mmas whose 8 columns are equal (the same fp16 q'_g as the codes').
    The group is read from the heads' memory, or (``SMEM``) is group ``j`` of a stage of ``NG`` groups
    (:func:`_copy_block`)."""
    if SMEM:
        WPT: gl.constexpr = D * K_BITS // 128
        RPW: gl.constexpr = 16 // K_BITS
        rows: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [4, 3, 2, 1, 0])  # of a group (index() drops NG)
        ks = KS._reinterpret(gl.float16, [NG, 1, 4, WPT, 2, RPW], rows).index(j)
        kz = KZ._reinterpret(gl.float16, [NG, 1, 4, WPT, 2, RPW], rows).index(j)
        kw = KW._reinterpret(gl.int32, [NG, G_K, 4, WPT], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])).index(j)
    else:
        ks = KS + grp * sks_g
        kz = KZ + grp * sks_g
        kw = KW
    scale = gl.broadcast(_key_group_vector(ks, D, K_BITS, a_l, SMEM)[None, :], qm)[0]
    qg = _mul_f16x2(qm, scale)  # q s_g / m' in fp16
    # rows 8-15 hold no head for R <= 8: as constant zeros they need no multiply (32 HMUL2 a block fewer), except
    # where ptxas then spends more on register moves than it saves (8-bit keys loaded into registers: SASS)
    SKIP_PAD_ROWS: gl.constexpr = R <= 8 and (SMEM or K_BITS < 8)
    if SKIP_PAD_ROWS:
        qg = gl.where((gl.arange(0, 16, layout=gl.SliceLayout(1, a_l)) < 8)[:, None], qg, 0.0)
    zg = gl.convert_layout(_key_group_vector(kz, D, K_BITS, a_l, SMEM), gl.SliceLayout(1, b_l), assert_trivial=True)
    zero = gl.zeros([16, 8], gl.float32, mma)
    offset = mma_v2(qz, gl.broadcast(zg[:, None], gl.zeros([D, 8], gl.float16, b_l))[0], zero)
    offset -= MAGIC_C * mma_v2(qg, gl.full([D, 8], 1.0, gl.float16, b_l), zero)
    codes = _key_tile(kw, grp * G_K, skw_t, D, K_BITS, G_K, b_l, SMEM)
    return mma_v2(qg, codes, _tile_columns(offset, G_K, mma))


@gluon.jit
def _group_values(p, acc, acc_z, acc_l, VW, VS, VZ, t0, j: gl.constexpr, NG: gl.constexpr,
                  svw_t: gl.constexpr, svs_t: gl.constexpr, D: gl.constexpr, G_K: gl.constexpr, G_V: gl.constexpr,
                  V_BITS: gl.constexpr, mma: gl.constexpr, a_l: gl.constexpr, b_l: gl.constexpr,
                  SMEM: gl.constexpr):
    """With the probabilities ``p`` [16, G_K] (fp32): ``acc += P V`` (columns in :func:`value_channels` order,
    ``m' c s``), ``acc_z += P z`` (column g: the zeros of lane g's value group) and ``acc_l += P 1`` (the softmax
    sum, in all 8 columns); the values of tokens ``t0 ..`` in the heads' memory, or (``SMEM``) of group ``j`` of a
    stage of ``NG`` groups."""
    p = gl.convert_layout(p.to(gl.float16), a_l, assert_trivial=True)
    if SMEM:
        NWL: gl.constexpr = D * V_BITS // 256
        SV: gl.constexpr = D // G_V
        JH: gl.constexpr = G_K // 8
        rank5: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [4, 3, 2, 1, 0])  # of a group (index() drops NG)
        vw = VW._reinterpret(gl.int32, [NG, JH, 4, 2, 8, NWL], rank5).index(j)
        vs = VS._reinterpret(gl.float16, [NG, JH, 4, 2, SV, 1, 1],
                             gl.SwizzledSharedLayout(1, 1, 1, [5, 4, 3, 2, 1, 0])).index(j)
        vz = VZ._reinterpret(gl.float16, [NG, JH, 4, 2, SV, 1], rank5).index(j)
    else:
        vw, vs, vz = VW, VS, VZ
    values, zeros = _value_tile(vw, vs, vz, t0, svw_t, svs_t, D, V_BITS, G_K, G_V, b_l, SMEM)
    acc = mma_v2(p, values, acc)
    acc_z = mma_v2(p, zeros, acc_z)
    acc_l = mma_v2(p, gl.full([G_K, 8], 1.0, gl.float16, b_l), acc_l)
    return acc, acc_z, acc_l


@gluon.jit
def _block(acc, acc_z, acc_l, m_i, qm, qz, grp0, NG: gl.constexpr, KS, KZ, KW, VW, VS, VZ,
           sks_g: gl.constexpr, skw_t: gl.constexpr, svw_t: gl.constexpr, svs_t: gl.constexpr,
           R: gl.constexpr, D: gl.constexpr, G_K: gl.constexpr, G_V: gl.constexpr, K_BITS: gl.constexpr,
           V_BITS: gl.constexpr, mma: gl.constexpr, a_l: gl.constexpr, b_l: gl.constexpr, SMEM: gl.constexpr):
    """The softmax state updated with ``NG`` (1 or 2) key groups from group ``grp0``: read from the heads'
    memory (KS .. VZ: pointers), or (``SMEM``) from the stage that :func:`_copy_block` filled (its buffers).

    The running max is raised only when some row's block max exceeds it by more than ``RESCALE`` (log2
    units), one warp-wide branch: the accumulators are then rescaled, otherwise probabilities up to
    ``2^RESCALE`` enter them (fp16 holds them, fp32 sums them) and the merge's log-sum-exp accounts for it."""
    # for R <= 8 rows 8-15 of the tile hold no head (their scores are 0): a constant row max, no instructions
    ROWS: gl.constexpr = 8 if R <= 8 else 16
    real = (gl.arange(0, 16, layout=gl.SliceLayout(1, mma)) < ROWS)[:, None]
    s0 = _group_scores(qm, qz, KS, KZ, KW, grp0, 0, NG, sks_g, skw_t, R, D, G_K, K_BITS, mma, a_l, b_l, SMEM)
    m_blk = gl.max(gl.where(real, s0, 0.0), 1)
    if NG == 2:
        s1 = _group_scores(qm, qz, KS, KZ, KW, grp0 + 1, 1, NG, sks_g, skw_t, R, D, G_K, K_BITS, mma, a_l, b_l, SMEM)
        m_blk = gl.maximum(m_blk, gl.max(gl.where(real, s1, 0.0), 1))
    m_new = m_i
    if gl.max(m_blk - m_i, 0) > RESCALE_C:
        m_new = gl.maximum(m_i, m_blk)
        alpha = gl.exp2(m_i - m_new)
        acc = acc * alpha[:, None]
        acc_z = acc_z * alpha[:, None]
        acc_l = acc_l * alpha[:, None]
    acc, acc_z, acc_l = _group_values(gl.exp2(s0 - m_new[:, None]), acc, acc_z, acc_l, VW, VS, VZ, grp0 * G_K, 0,
                                      NG, svw_t, svs_t, D, G_K, G_V, V_BITS, mma, a_l, b_l, SMEM)
    if NG == 2:
        acc, acc_z, acc_l = _group_values(gl.exp2(s1 - m_new[:, None]), acc, acc_z, acc_l, VW, VS, VZ,
                                          (grp0 + 1) * G_K, 1, NG, svw_t, svs_t, D, G_K, G_V, V_BITS, mma, a_l, b_l,
                                          SMEM)
    return acc, acc_z, acc_l, m_new


@gluon.jit
def _copy_to_shared(dst, src, live):
    """``cp.async`` of the 1-D shared view ``dst``'s N int32 words from ``src`` (a scalar pointer), 16 bytes a
    lane an instruction where N allows (N >= 32 words: a stage's smallest range). Without ``live`` nothing is read
    (the copies' source size is 0, rather than a branch around them) and ``dst`` is filled with zeros: a buffer
    no step reads again."""
    N: gl.constexpr = dst.shape[0]
    VEC: gl.constexpr = 4 if N >= 128 else N // 32
    words: gl.constexpr = gl.BlockedLayout([VEC], [32], [1], [0])
    offs = gl.arange(0, N, layout=words)
    async_copy.async_copy_global_to_shared(dst, src + offs, mask=offs < gl.where(live, N, 0))


@gluon.jit
def _copy_block(kw_s, ks_s, kz_s, vw_s, vs_s, vz_s, st, KW_h, KS_h, KZ_h, VW_h, VS_h, VZ_h, grp, live,
                skw_t: gl.constexpr, sks_g: gl.constexpr, svw_t: gl.constexpr, svs_t: gl.constexpr,
                G_K: gl.constexpr):
    """Start copying the six ranges of the key groups from ``grp`` (key words, scales, zeros; value words, scales,
    zeros: each contiguous, which :func:`decode_attention_gluon` checks) into stage ``st`` of the ring's buffers,
    as much as a stage holds, if ``live``; the fp16 scales and zeros travel as int32 pairs. Nothing waits here:
    ``async_copy.wait_group`` does."""
    kw, ks, kz = kw_s.index(st), ks_s.index(st), kz_s.index(st)  # all six views first: the order ptxas was
    vw, vs, vz = vw_s.index(st), vs_s.index(st), vz_s.index(st)  # measured with (its registers are at the edge)
    i32: gl.constexpr = gl.pointer_type(gl.int32)
    _copy_to_shared(kw, KW_h + grp * G_K * skw_t, live)
    _copy_to_shared(ks, (KS_h + grp * sks_g).to(i32, bitcast=True), live)
    _copy_to_shared(kz, (KZ_h + grp * sks_g).to(i32, bitcast=True), live)
    _copy_to_shared(vw, VW_h + grp * G_K * svw_t, live)
    _copy_to_shared(vs, (VS_h + grp * G_K * svs_t).to(i32, bitcast=True), live)
    _copy_to_shared(vz, (VZ_h + grp * G_K * svs_t).to(i32, bitcast=True), live)


# PTX: lane 0 asks the copy engine to bring ``$2`` bytes from address ``$1`` into L2 (sm_90's bulk prefetch: one
# instruction a contiguous range, no registers held, a hint the hardware may drop). The range is widened to 16-byte
# boundaries, which the instruction requires; the callers' ranges lie inside the history they read (the rounding
# stays in the same 16-byte chunks).
L2_PREFETCH = gl.constexpr(
    "{ .reg .pred p; .reg .u32 lane, head, size; .reg .u64 a; "
    "mov.u32 lane, %laneid; setp.eq.u32 p, lane, 0; "
    "cvt.u32.u64 head, $1; and.b32 head, head, 15; add.u32 size, $2, head; add.u32 size, size, 15; "
    "and.b32 size, size, 0xFFFFFFF0; and.b64 a, $1, 0xFFFFFFFFFFFFFFF0; "
    "@p cp.async.bulk.prefetch.L2.global [a], size; mov.u32 $0, 0; }")


@gluon.jit
def _prefetch_l2(ptr, nbytes: gl.constexpr):
    """Bring ``nbytes`` from ``ptr`` (a scalar pointer) into L2, from lane 0 of the warp."""
    lane_l: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    zero = gl.arange(0, 32, layout=lane_l) * 0
    gl.inline_asm_elementwise(L2_PREFETCH, "=r,l,r", [ptr + zero, zero + nbytes], dtype=gl.int32, is_pure=False,
                              pack=1)


@gluon.jit
def _prefetch_block(KW_h, KS_h, KZ_h, VW_h, VS_h, VZ_h, grp, NG: gl.constexpr, skw_t: gl.constexpr,
                    sks_g: gl.constexpr, svw_t: gl.constexpr, svs_t: gl.constexpr, D: gl.constexpr, G_K: gl.constexpr,
                    G_V: gl.constexpr, K_BITS: gl.constexpr, V_BITS: gl.constexpr):
    """The six ranges a block of ``NG`` key groups from group ``grp`` reads (key words, scales, zeros; value words,
    scales, zeros; each from its first token's row to its last's), prefetched into L2: a later block's loads then
    wait for L2, not HBM, and its bytes stream in while this program computes. A split's first ``PREFETCH`` blocks
    (and a single last group) are not prefetched."""
    T: gl.constexpr = NG * G_K
    _prefetch_l2(KW_h + grp * G_K * skw_t, ((T - 1) * skw_t + D * K_BITS // 32) * 4)
    _prefetch_l2(KS_h + grp * sks_g, ((NG - 1) * sks_g + D) * 2)
    _prefetch_l2(KZ_h + grp * sks_g, ((NG - 1) * sks_g + D) * 2)
    _prefetch_l2(VW_h + grp * G_K * svw_t, ((T - 1) * svw_t + D * V_BITS // 32) * 4)
    _prefetch_l2(VS_h + grp * G_K * svs_t, ((T - 1) * svs_t + D // G_V) * 2)
    _prefetch_l2(VZ_h + grp * G_K * svs_t, ((T - 1) * svs_t + D // G_V) * 2)


# Group counts change every 32 tokens: specializing on them would recompile mid-generation.
@gluon.jit(do_not_specialize=["n_groups", "groups_per_split", "n_parts"])
def _gluon_decode_kernel(
    Q, KW, KS, KZ, VW, VS, VZ, O_part, LSE_part,
    sq_b, sq_h, skw_b, skw_h, skw_t: gl.constexpr, sks_b, sks_h, sks_g: gl.constexpr,
    svw_b, svw_h, svw_t: gl.constexpr, svs_b, svs_h, svs_t: gl.constexpr,
    n_groups, groups_per_split, n_parts, qk_scale,
    H_KV: gl.constexpr, R: gl.constexpr, D: gl.constexpr, G_K: gl.constexpr, G_V: gl.constexpr,
    K_BITS: gl.constexpr, V_BITS: gl.constexpr, PREFETCH: gl.constexpr, STAGES: gl.constexpr,
    DEPENDENT_MERGE: gl.constexpr,
):
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    GPB: gl.constexpr = BLOCK_C // G_K if G_K < BLOCK_C else 1
    pid = gl.program_id(0)
    split = gl.program_id(1)
    if DEPENDENT_MERGE:  # the merge, a programmatic dependent launch (sm_90), may start at once, as resources allow
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0 $1", "=r,r", [split], dtype=gl.int32,
                                  is_pure=False, pack=1)
    b = (pid // H_KV).to(gl.int64)  # batch offsets of a long cache overflow int32
    h = pid % H_KV

    # query rows in key order: q * scale * log2(e) / m' (scaled per group) and without m' (zero terms)
    rows = gl.arange(0, 16, layout=gl.SliceLayout(1, a_l))
    ch, mult = _key_channel(gl.arange(0, D, layout=gl.SliceLayout(0, a_l)), K_BITS, D)
    q = gl.load(Q + b * sq_b + (h * R + rows)[:, None] * sq_h + ch[None, :], mask=(rows < R)[:, None], other=0.0)
    q = q.to(gl.float32) * qk_scale
    qm = (q / mult[None, :]).to(gl.float16)
    qz = q.to(gl.float16)

    KW_h = KW + b * skw_b + h * skw_h
    KS_h = KS + b * sks_b + h * sks_h
    KZ_h = KZ + b * sks_b + h * sks_h
    VW_h = VW + b * svw_b + h * svw_h
    VS_h = VS + b * svs_b + h * svs_h
    VZ_h = VZ + b * svs_b + h * svs_h
    m_i = gl.full([16], float("-inf"), gl.float32, layout=gl.SliceLayout(1, mma))
    acc = gl.zeros([16, D], gl.float32, mma)
    acc_z = gl.zeros([16, 8], gl.float32, mma)  # column g: sum p z of lane g's value group
    acc_l = gl.zeros([16, 8], gl.float32, mma)  # sum p, 8 copies
    g_lo = split * groups_per_split
    g_hi = gl.minimum(g_lo + groups_per_split, n_groups)
    if STAGES > 0:
        # a ring of STAGES shared buffers: block i + STAGES - 1 is copied in (cp.async, no registers held)
        # while block i is computed, so that a block's loads wait for shared memory, not for HBM
        T: gl.constexpr = GPB * G_K
        flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])  # a stage: one row of words
        kw_s = gl.allocate_shared_memory(gl.int32, [STAGES, T * skw_t], flat)
        ks_s = gl.allocate_shared_memory(gl.int32, [STAGES, GPB * sks_g // 2], flat)
        kz_s = gl.allocate_shared_memory(gl.int32, [STAGES, GPB * sks_g // 2], flat)
        vw_s = gl.allocate_shared_memory(gl.int32, [STAGES, T * svw_t], flat)
        vs_s = gl.allocate_shared_memory(gl.int32, [STAGES, T * svs_t // 2], flat)
        vz_s = gl.allocate_shared_memory(gl.int32, [STAGES, T * svs_t // 2], flat)
        n_blocks = (g_hi - g_lo) // GPB
        for i in gl.static_range(STAGES - 1):
            _copy_block(kw_s, ks_s, kz_s, vw_s, vs_s, vz_s, i, KW_h, KS_h, KZ_h, VW_h, VS_h, VZ_h, g_lo + i * GPB,
                        i < n_blocks, skw_t, sks_g, svw_t, svs_t, G_K)
            async_copy.commit_group()
        for i in range(n_blocks):
            # block i + STAGES - 1, into the buffers block i - 1 was read from (the barrier at the end of the step)
            ahead = i + STAGES - 1
            _copy_block(kw_s, ks_s, kz_s, vw_s, vs_s, vz_s, ahead % STAGES, KW_h, KS_h, KZ_h, VW_h, VS_h, VZ_h,
                        g_lo + ahead * GPB, ahead < n_blocks, skw_t, sks_g, svw_t, svs_t, G_K)
            async_copy.commit_group()  # a group a step, empty or not, so that the count below means block i
            async_copy.wait_group(STAGES - 1)
            gl.thread_barrier()  # every lane's copies of block i landed
            st = i % STAGES
            acc, acc_z, acc_l, m_i = _block(acc, acc_z, acc_l, m_i, qm, qz, g_lo + i * GPB, GPB, ks_s.index(st),
                                            kz_s.index(st), kw_s.index(st), vw_s.index(st), vs_s.index(st),
                                            vz_s.index(st), sks_g, skw_t, svw_t, svs_t, R, D, G_K, G_V, K_BITS,
                                            V_BITS, mma, a_l, b_l, True)
            gl.thread_barrier()  # every lane done reading block i before its buffers are refilled
        async_copy.wait_group(0)  # the zero-filling copies past the split's end land before the program exits
    else:
        for grp in range(g_lo, g_hi - GPB + 1, GPB):
            if PREFETCH > 0:  # the block PREFETCH blocks ahead, if this split reads it
                if grp + (PREFETCH + 1) * GPB <= g_hi:
                    _prefetch_block(KW_h, KS_h, KZ_h, VW_h, VS_h, VZ_h, grp + PREFETCH * GPB, GPB, skw_t, sks_g,
                                    svw_t, svs_t, D, G_K, G_V, K_BITS, V_BITS)
            acc, acc_z, acc_l, m_i = _block(acc, acc_z, acc_l, m_i, qm, qz, grp, GPB, KS_h, KZ_h, KW_h, VW_h, VS_h,
                                            VZ_h, sks_g, skw_t, svw_t, svs_t, R, D, G_K, G_V, K_BITS, V_BITS, mma,
                                            a_l, b_l, False)
    if GPB == 2:
        if (g_hi - g_lo) % 2 == 1:  # a history of an odd number of groups ends with a single one
            acc, acc_z, acc_l, m_i = _block(acc, acc_z, acc_l, m_i, qm, qz, g_hi - 1, 1, KS_h, KZ_h, KW_h, VW_h,
                                            VS_h, VZ_h, sks_g, skw_t, svw_t, svs_t, R, D, G_K, G_V, K_BITS, V_BITS,
                                            mma, a_l, b_l, False)

    # out = (acc / m' + sum_t p z(t)) / sum_t p, columns back to their stored channels; column n's zeros are
    # those of its lane's group, in the acc_z column the thread holding n holds (n % 8)
    vch, vmult = _value_channel(gl.arange(0, D, layout=gl.SliceLayout(0, mma)), V_BITS, D)
    out = (acc / vmult[None, :] + _tile_columns(acc_z, D, mma)) / _tile_columns(acc_l, D, mma)
    l = gl.max(acc_l, 1)
    rows_o = gl.arange(0, 16, layout=gl.SliceLayout(1, mma))
    part = ((b * H_KV + h) * R + rows_o) * n_parts + split
    gl.store(O_part + part[:, None] * D + vch[None, :], out, mask=(rows_o < R)[:, None])
    gl.store(LSE_part + part, m_i + gl.log2(l), mask=rows_o < R)


def compile_sm90(k_bits: int, v_bits: int, head_dim: int = 128, gqa: int = 4, key_group: int = 32,
                 value_group: int = 32, prefetch: int = 0, stages: int | None = None, sm: int = 90):
    """The kernel compiled ahead of time for sm_90a (no GPU needed): its ``asm`` holds ttgir, ptx and cubin.
    ``stages`` as :func:`decode_attention_gluon` takes it (default :func:`default_stages`); ``sm``: another target
    (80, 89: no dependent launch of the merge, which needs sm_90).

    Every ``convert_layout`` in it asserts that it moves no data, so that compiling proves the decoded
    registers are the mma fragments; CI inspects the SASS (``benchmarks/sass_decode.py --gluon``)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    d = head_dim
    stages = (0 if prefetch else default_stages(k_bits, v_bits)) if stages is None else stages
    strides = dict(skw_t=d * k_bits // 32, sks_g=d, svw_t=d * v_bits // 32, svs_t=d // value_group)
    constexprs = dict(H_KV=8, R=gqa, D=d, G_K=key_group, G_V=value_group, K_BITS=k_bits, V_BITS=v_bits,
                      PREFETCH=prefetch, STAGES=stages, DEPENDENT_MERGE=sm >= 90, **strides)
    types = {"Q": "*fp16", "KW": "*i32", "KS": "*fp16", "KZ": "*fp16", "VW": "*i32", "VS": "*fp16", "VZ": "*fp16",
             "O_part": "*fp32", "LSE_part": "*fp32"}
    ints = ["sq_b", "sq_h", "skw_b", "skw_h", "sks_b", "sks_h", "svw_b", "svw_h", "svs_b", "svs_h",
            "n_groups", "groups_per_split", "n_parts"]
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32")
                 for name in _gluon_decode_kernel.arg_names}
    signature["qk_scale"] = "fp32"
    assert set(ints) <= set(signature)
    # the variant a launch with 16-byte aligned pointers and strides that are multiples of 16 gets (Triton
    # specializes on that at each launch: other tensors run another, still correct, binary)
    aligned = [i for i, name in enumerate(_gluon_decode_kernel.arg_names)
               if name in types or name in ints[:10]]
    source = GluonASTSource(_gluon_decode_kernel, signature, constexprs=constexprs,
                            attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    return triton.compile(source, target=GPUTarget("cuda", sm, 32), options={"num_warps": 1})


def gluon_supported(qkeys: QuantizedTensor, qvalues: QuantizedTensor, query: torch.Tensor,
                    history_start: int = 0) -> bool:
    """Whether :func:`decode_attention_gluon` reads this history (see the module docstring). Not checked (it would
    cost a host sync a step): value scales must stay below 1024 (``-64 s`` is an fp16) and ``16 q s`` within
    fp16 for the keys' scales s, far beyond what attention activations reach."""
    k, v = qkeys.spec, qvalues.spec
    d = query.shape[-1]
    r = query.shape[1] // qkeys.shape[1]
    g_k, g_v = k.group_len(qkeys.shape), v.group_len(qvalues.shape)
    return (
        history_start == 0 and qkeys.levels is None and qvalues.levels is None
        and k.bits in GLUON_BITS and v.bits in GLUON_BITS and k.axis == "channel" and v.axis == "token"
        and k.fp8 is None and v.fp8 is None and not k.symmetric and not v.symmetric
        and d in (64, 128) and d * v.bits >= 256 and r <= 16
        and g_k in (32, 64, 128) and qkeys.num_tokens % g_k == 0
        and d // 8 <= g_v <= d and d % g_v == 0
        and qkeys.scale.dtype == torch.float16 and qvalues.scale.dtype == torch.float16
    )


def default_stages(k_bits: int, v_bits: int) -> int:
    """Shared-memory stages :func:`decode_attention_gluon` uses by default. Measured on the H100 (NOTES, round 10;
    ``gluon_sweep.py``, CUDA graphs, 32k tokens at batch 4 and 16, 128k at batch 1): 2 stages cut K4V4's time by
    15-17% and K2V2's by 28-29% against loading into registers, 3-4 stages by less; K8V8's 18 KiB stages cost
    occupancy and take 14-22% longer, so a side of 8 bits keeps loading into registers. The mixed pairs (K4V2,
    K2V4, K8V4, ...) follow by their widest side: extrapolated, not measured; nor has the H200 run them."""
    return 2 if max(k_bits, v_bits) <= 4 else 0


@functools.cache
def _shared_memory_per_program(device: torch.device) -> int:
    """The most shared memory a program may take on ``device`` (asked once a device, not at every call)."""
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


@functools.cache
def _has_dependent_launch(device: torch.device) -> bool:
    """Whether ``device`` runs programmatic dependent launches (sm_90 on): the merge then overlaps this kernel's end."""
    return torch.cuda.get_device_capability(device) >= (9, 0)


GLUON_MIN_WORK = 2**16  # cached tokens x sequences x KV heads: below it the Triton kernel is the faster


def gluon_preferred(qkeys: QuantizedTensor) -> bool:
    """Whether the Gluon kernel beats :mod:`.decode`'s on this history. Measured on the H200 (Llama-3.1-8B shape,
    ``benchmarks/results/attention_h200_gluon*.json``): 1.2-1.9x faster from 32k tokens at every batch, and at
    batch 4 / 4k (CUDA graphs: 1.1x for K4V4, 1.3x for K8V8, even for K2V2); 10-15% slower at batch 1 / 4k
    (32.5k work), where too few one-warp programs run to hide memory latency. At batch 16-64 / 4k the two are
    even or the Gluon one ahead, except K4V2 at batch 64 (9% slower, eager). Measured before the shared-memory
    stages, which made the Gluon kernel 1.2-1.4x faster at long histories (H100); the threshold was not re-measured
    with them."""
    b, h_kv, t = qkeys.shape[0], qkeys.shape[1], qkeys.num_tokens
    return b * h_kv * t >= GLUON_MIN_WORK


def decode_attention_gluon(
    query: torch.Tensor,
    qkeys: QuantizedTensor,
    qvalues: QuantizedTensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    maxnreg: int | None = None,
    prefetch: int = 0,
    stages: int | None = None,
) -> torch.Tensor:
    """Same arguments and result as :func:`~kvtuner.kernels.decode.decode_attention_triton` for a history that
    :func:`gluon_supported` accepts (``history_start`` 0); num_splits: history slices a KV head (default:
    :func:`~kvtuner.kernels.decode.default_num_splits` over 64-token blocks, 8 one-warp programs an SM);
    maxnreg: a register cap a thread (more resident warps, some spilled); prefetch: each program asks for the
    block this many blocks ahead of the one it computes to be brought into L2 (sm_90's bulk prefetch; 0: none;
    only without stages, whose copies already bring the next block in).
    The kernel is latency-bound (NOTES_kernels.md, round 8): a warp's loads wait on HBM because its 249 registers
    leave no room to issue them earlier; a prefetch holds no register. Measured on the H200 (NOTES, round 9): 2
    ahead +7-8% for K2V2, -4-6% for K4V4, 4 ahead slower for both; so off by default. stages: a ring of this many
    shared-memory buffers a program (``cp.async``: block i + stages - 1 is copied in while block i is computed, the
    copies holding no registers; 0: each block loaded straight into registers; default :func:`default_stages`, or 0
    with a prefetch). Unlike the Triton kernel's ``num_stages`` (the compiler's software pipelining) the ring is
    written into this kernel. It copies contiguous ranges, so it needs the layout
    :func:`~kvtuner.kernels.gluon_layout.stages_can_copy` accepts, as :class:`~kvtuner.cache.MixedPrecisionCache`
    stores it; a default of stages falls back to 0 where it does not. The result is bit-identical either way."""
    from kvtuner.kernels.decode import default_num_splits, merge_with_residual

    if not gluon_supported(qkeys, qvalues, query):
        raise ValueError("the Gluon decode kernel does not read this layout; use decode_attention_triton")
    if prefetch < 0 or (prefetch and torch.cuda.get_device_capability(query.device) < (9, 0)):
        raise ValueError("prefetch is a number of blocks >= 0, and > 0 needs sm_90 (cp.async.bulk.prefetch)")
    b, h_q, d = query.shape
    h_kv = qkeys.shape[1]
    g_k, g_v = qkeys.spec.group_len(qkeys.shape), qvalues.spec.group_len(qvalues.shape)
    kw, ks, kz, vw, vs, vz = (qkeys.payload, qkeys.scale, qkeys.zero, qvalues.payload, qvalues.scale, qvalues.zero)
    if ks.stride() != kz.stride() or vs.stride() != vz.stride():
        raise ValueError("scale and zero must share strides")
    if any(t.stride(-1) != 1 for t in (query, kw, ks, vw, vs)):
        raise ValueError("every input must be contiguous in its last dimension")
    n_groups = qkeys.num_tokens // g_k
    n_blocks = -(-n_groups // groups_per_block(g_k))
    splits, groups_per_split = split_plan(n_groups, g_k, num_splits or default_num_splits(
        n_blocks, b * h_kv, query.device, ctas_per_sm=8))
    if stages is None:  # none with a prefetch, nor where the layout can't be copied (asked last: host time a call);
        # 2 stages of 2- or 4-bit codes take at most 42 KiB of shared memory, which every sm_80 on gives
        stages = 0 if prefetch else default_stages(qkeys.spec.bits, qvalues.spec.bits)
        stages = stages if stages and stages_can_copy(qkeys, qvalues) else 0
    elif stages < 0:
        raise ValueError(f"stages is a number of shared-memory buffers >= 0, not {stages}")
    elif stages and prefetch:
        raise ValueError("prefetch is for the kernel without stages: the stages' copies already bring blocks in")
    elif stages:
        if not stages_can_copy(qkeys, qvalues):
            raise ValueError("stages > 0 copies each block as contiguous ranges of whole 4-byte words: the codes, "
                             "scales and zeros must be contiguous along tokens (key groups), each head's rows "
                             "starting on a 4-byte boundary")
        need = stages * stage_bytes(d, g_k, g_v, qkeys.spec.bits, qvalues.spec.bits)
        limit = _shared_memory_per_program(query.device)
        if need > limit:
            raise ValueError(f"{stages} stages need {need} bytes of shared memory a program; this GPU gives {limit}")
    dependent = _has_dependent_launch(query.device)
    o_part = torch.empty((b * h_q, splits, d), device=query.device, dtype=torch.float32)
    lse_part = torch.empty((b * h_q, splits), device=query.device, dtype=torch.float32)
    _gluon_decode_kernel[(b * h_kv, splits)](
        query, kw, ks, kz, vw, vs, vz, o_part, lse_part,
        query.stride(0), query.stride(1), kw.stride(0), kw.stride(1), kw.stride(2),
        ks.stride(0), ks.stride(1), ks.stride(2), vw.stride(0), vw.stride(1), vw.stride(2),
        vs.stride(0), vs.stride(1), vs.stride(2),
        n_groups, groups_per_split, splits, scale * LOG2E,
        H_KV=h_kv, R=h_q // h_kv, D=d, G_K=g_k, G_V=g_v, K_BITS=qkeys.spec.bits, V_BITS=qvalues.spec.bits,
        PREFETCH=prefetch, STAGES=stages, DEPENDENT_MERGE=dependent, num_warps=1,
        **({"maxnreg": maxnreg} if maxnreg else {}),
    )
    return merge_with_residual(query, keys, values, scale, o_part, lse_part, dependent=dependent)


def loop_census(kernel, key_group: int = 32) -> dict:
    """:func:`kvtuner.kernels.sass.loop_census` of a :func:`compile_sm90` kernel: its loop covers one block,
    ``max(BLOCK, key_group)`` tokens."""
    from kvtuner.kernels.sass import loop_census as census

    return census(kernel, max(BLOCK, key_group))
