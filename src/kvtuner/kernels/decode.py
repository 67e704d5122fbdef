"""Split-K decode attention that reads the packed KV cache directly (flash-decoding on KIVI storage).

One query token per sequence attends to the quantized history plus the full-precision residual.
Decoding is bandwidth bound, so the kernel reads the packed words, scales and zeros once and
never writes dequantized K/V to memory:

* grid ``(B * H_kv, num_splits + 1)``: each program owns one KV head and all ``R = H_q / H_kv``
  query heads that share it (GQA: the packed bytes are read once for the whole group). Programs
  ``0 .. num_splits-1`` cover slices of the history, the last one the residual. Splitting the
  context keeps the GPU full at batch 1; a small reduce kernel merges the partial softmaxes by
  their log-sum-exp.
* keys are grouped per channel (a scale and zero per ``G`` tokens per channel), so for a token
  of group g, ``q . k[t] = (q * s_g) . c[t] + q . z_g``: the scales fold into the query once per
  group and the zero term is one dot per group (MixPE), so the key product runs on the integer
  codes and dequantization comes after the group dot product.
* a step covers ``NG`` key groups at once. The ``R`` query rows are stacked once per group,
  row ``(g, r)`` holding ``q_r * s_g``, into the ``M = 16`` rows of a tensor-core tile (for
  Llama's GQA of 4: 4 groups of 4 rows, instead of 4 rows padded to 16). One dot against the
  step's codes gives every row all ``NG * G`` scores, of which row ``(g, r)`` keeps those of
  group g; the softmax statistics are shared across the g-copies of a query head and the rows
  are summed at the end.
* values are grouped per token (a scale and zero per ``G_V`` channels), dequantized in
  registers, then multiplied by the probabilities on the tensor cores.

Codes are unpacked from the int32 layout of :mod:`kvtuner.quant.packing` (3-bit: a 2-bit plane
then a 1-bit plane) by repeated halving: each word splits into its low and high half fields and
the halves are interleaved, so after ``log2(32 / bits)`` rounds the codes lie in channel order
without any shuffle between threads. Each code becomes the fp16 number 1024 + c by one OR (no
int-to-float conversion); keys take the 1024 off in the zero term, values before their scale.
Dot operands are fp16 whatever the model dtype: fp16 keeps 3 more mantissa bits than bf16,
codes up to 255 are exact, and scaled queries, probabilities and dequantized values stay far
inside its range (Triton's interpreter also cannot run bf16 dots). Accumulation is fp32 and
the softmax runs in base 2 with ``log2(e)`` folded into the query scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtuner.quant import QuantizedTensor

LOG2E = 1.4426950408889634


@triton.jit
def _unpack_plane(row_ptrs, mask, D: tl.constexpr, BITS: tl.constexpr):
    """[N, D] int32 codes of one power-of-two plane; ``row_ptrs`` [N, 1] point at each row's word 0."""
    x = tl.load(row_ptrs + tl.arange(0, D * BITS // 32)[None, :], mask=mask, other=0)
    for level in tl.static_range(5):  # field widths 16, 8, 4, 2, 1 down to BITS
        if (16 >> level) >= BITS:
            low_bits = (1 << (16 >> level)) - 1
            x = tl.interleave(x & low_bits, (x >> (16 >> level)) & low_bits)
    return x


@triton.jit
def _unpack_codes(row_ptrs, mask, D: tl.constexpr, BITS: tl.constexpr):
    """[N, D] fp16 codes plus 1024: a code c < 1024 OR-ed into the bits of fp16 1024 is exactly
    1024 + c, so no int-to-float conversion (a slow unit) is needed; callers take the 1024 off."""
    if BITS == 3:
        codes = _unpack_plane(row_ptrs, mask, D, 2) | (_unpack_plane(row_ptrs + D // 16, mask, D, 1) << 2)
    else:
        codes = _unpack_plane(row_ptrs, mask, D, BITS)
    return (codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _per_channel(ptrs, mask, D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr):
    """[N, D] per-token group parameters (one per G channels) laid out like :func:`_unpack_codes`:
    loaded once per packed word, then doubled by the same interleaving rounds."""
    P: tl.constexpr = 2 if BITS == 3 else BITS  # the plane whose word count sets the layout
    CPW: tl.constexpr = 32 // P
    x = tl.load(ptrs + (tl.arange(0, D // CPW) * CPW // G)[None, :], mask=mask, other=0.0).to(tl.float16)
    for level in tl.static_range(5):
        if (16 >> level) >= P:
            x = tl.interleave(x, x)
    return x


@triton.jit
def _across_groups(x, NG: tl.constexpr, R_P: tl.constexpr, MAX: tl.constexpr):
    """Max or sum of a stacked [NG * R_P] vector over its NG copies, broadcast back to every copy."""
    x2 = tl.reshape(x, (NG, R_P))
    y = tl.max(x2, 0) if MAX else tl.sum(x2, 0)
    return tl.reshape(tl.broadcast_to(y[None, :], (NG, R_P)), (NG * R_P,))


@triton.jit
def _softmax_step(s, m_i, l_i, acc, NG: tl.constexpr, R_P: tl.constexpr):
    """Online softmax in base 2 over stacked rows: fold scores ``s`` [M, N] into max, sum and output."""
    m_new = tl.maximum(m_i, _across_groups(tl.max(s, 1), NG, R_P, True))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, m_new, l_i * alpha + _across_groups(tl.sum(p, 1), NG, R_P, False), acc * alpha[:, None]


# Lengths change every step: specializing on them (== 1, % 16) would recompile mid-generation.
@triton.jit(do_not_specialize=["n_hist", "n_res", "steps_per_split", "num_splits"])
def _decode_split_kernel(
    Q, KW, KS, KZ, VW, VS, VZ, KR, VR, O_part, LSE_part,
    sq_b, sq_h,
    skw_b, skw_h, skw_t,
    sks_b, sks_h, sks_g,
    svw_b, svw_h, svw_t,
    svs_b, svs_h, svs_t,
    skr_b, skr_h, skr_t,
    svr_b, svr_h, svr_t,
    n_hist, n_res, steps_per_split, num_splits, qk_scale,
    H_KV: tl.constexpr, R: tl.constexpr, R_P: tl.constexpr, NG: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
    G_K: tl.constexpr, G_V: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
):
    NG_M: tl.constexpr = M // R_P  # row groups; rows (g, r) with g >= NG stay idle
    N: tl.constexpr = NG * G_K  # tokens a step
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)  # batch offsets of a long cache overflow int32
    h = pid_bh % H_KV
    rows = tl.arange(0, M)
    r = rows % R_P
    g_row = rows // R_P
    cols = tl.arange(0, N)
    own = g_row[:, None] == (cols // G_K)[None, :]  # row (g, r) scores the tokens of group g
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * sq_b + (h * R + r)[:, None] * sq_h + offs_d[None, :], mask=(r < R)[:, None], other=0.0)
    q = q.to(tl.float32) * qk_scale

    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    if split < num_splits:
        n_steps = tl.cdiv(n_hist, N)
        for step in range(split * steps_per_split, tl.minimum((split + 1) * steps_per_split, n_steps)):
            offs_t = step * N + cols
            valid = offs_t < n_hist
            group = step * NG + g_row
            sz = b * sks_b + h * sks_h + group[:, None] * sks_g + offs_d[None, :]
            g_ok = ((g_row < NG) & (group * G_K < n_hist))[:, None]
            qs = (q * tl.load(KS + sz, mask=g_ok, other=0.0).to(tl.float32)).to(tl.float16)
            # the codes carry +1024 (see _unpack_codes): take 1024 * sum(q * s) back off each row
            kz = tl.load(KZ + sz, mask=g_ok, other=0.0).to(tl.float32)
            zero_term = tl.sum(q * kz - 1024.0 * qs.to(tl.float32), 1)
            kc = _unpack_codes(KW + b * skw_b + h * skw_h + offs_t[:, None] * skw_t, valid[:, None], D, K_BITS)
            s = tl.dot(qs, tl.trans(kc)) + zero_term[:, None]
            s = tl.where(own & valid[None, :], s, float("-inf"))
            p, m_i, l_i, acc = _softmax_step(s, m_i, l_i, acc, NG_M, R_P)

            vc = _unpack_codes(VW + b * svw_b + h * svw_h + offs_t[:, None] * svw_t, valid[:, None], D, V_BITS)
            vsz = b * svs_b + h * svs_h + offs_t[:, None] * svs_t
            vs = _per_channel(VS + vsz, valid[:, None], D, G_V, V_BITS)
            vz = _per_channel(VZ + vsz, valid[:, None], D, G_V, V_BITS)
            acc += tl.dot(p.to(tl.float16), (vc - 1024.0) * vs + vz)
    else:
        for t0 in range(0, n_res, N):
            offs_t = t0 + cols
            valid = offs_t < n_res
            k = tl.load(KR + b * skr_b + h * skr_h + offs_t[:, None] * skr_t + offs_d[None, :],
                        mask=valid[:, None], other=0.0)
            s = tl.dot(q.to(tl.float16), tl.trans(k.to(tl.float16)))
            s = tl.where(own & valid[None, :], s, float("-inf"))
            p, m_i, l_i, acc = _softmax_step(s, m_i, l_i, acc, NG_M, R_P)
            v = tl.load(VR + b * svr_b + h * svr_h + offs_t[:, None] * svr_t + offs_d[None, :],
                        mask=valid[:, None], other=0.0)
            acc += tl.dot(p.to(tl.float16), v.to(tl.float16))

    # fold the NG_M row copies of each query head: their outputs add, their max and sum are shared
    acc = tl.sum(tl.reshape(acc, (NG_M, R_P, D)), 0)
    m = tl.max(tl.reshape(m_i, (NG_M, R_P)), 0)
    l = tl.max(tl.reshape(l_i, (NG_M, R_P)), 0)
    has = l > 0
    out = acc / tl.where(has, l, 1.0)[:, None]
    lse = tl.where(has, m + tl.log2(tl.where(has, l, 1.0)), float("-inf"))
    offs_r = tl.arange(0, R_P)
    part = ((b * H_KV + h) * R + offs_r) * (num_splits + 1) + split
    tl.store(LSE_part + part, lse, mask=offs_r < R)
    tl.store(O_part + part[:, None] * D + offs_d[None, :], out, mask=(offs_r < R)[:, None])


@triton.jit(do_not_specialize=["n_parts"])
def _decode_reduce_kernel(O_part, LSE_part, Out, n_parts, D: tl.constexpr, PARTS: tl.constexpr):
    """Merge one query head's partial outputs, weighting each by exp2(its lse - max lse)."""
    row = tl.program_id(0)
    offs_p = tl.arange(0, PARTS)
    offs_d = tl.arange(0, D)
    valid = offs_p < n_parts
    lse = tl.load(LSE_part + row * n_parts + offs_p, mask=valid, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))
    o = tl.load(O_part + (row * n_parts + offs_p)[:, None] * D + offs_d[None, :], mask=valid[:, None], other=0.0)
    out = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)
    tl.store(Out + row * D + offs_d, out.to(Out.dtype.element_ty))


def default_num_splits(n_steps: int, programs: int, device: torch.device) -> int:
    """History splits per KV head: enough programs for ~4 per SM, at least 2 steps each."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(triton.cdiv(4 * sms, programs), triton.cdiv(n_steps, 2)))


def decode_attention_triton(
    query: torch.Tensor,
    qkeys: QuantizedTensor | None,
    qvalues: QuantizedTensor | None,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    groups_per_step: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Launcher; same arguments and result as :func:`~kvtuner.kernels.reference.decode_attention_reference`.

    num_splits: history slices per KV head (default :func:`default_num_splits`); groups_per_step:
    key groups a step, at most one per copy of the query rows (default: up to 128 tokens);
    num_warps and num_stages are launch tunables that benchmarks sweep.
    """
    b, h_q, d = query.shape
    h_kv, n_res = keys.shape[1], keys.shape[2]
    r = h_q // h_kv
    r_p = triton.next_power_of_2(r)
    m = max(16, r_p)
    tensors = [query, keys, values]
    if qkeys is None:  # no history programs run; typed placeholders still have to compile
        n_hist, g_k, g_v, k_bits, v_bits, ng = 0, 16, d, 2, 2, 1
        kw = vw = torch.empty(1, device=query.device, dtype=torch.int32)
        ks = kz = vs = vz = torch.empty(1, device=query.device, dtype=torch.float16)
        hist_strides = (0,) * 12
        splits = 0
    else:
        g_k = qkeys.spec.group_len(qkeys.shape)
        ng = groups_per_step or max(1, min(m // r_p, 128 // g_k))
        if ng > m // r_p:
            raise ValueError(f"groups_per_step {ng} exceeds the {m // r_p} copies of the query rows")
        g_v = qvalues.spec.group_len(qvalues.shape)
        k_bits, v_bits = qkeys.spec.bits, qvalues.spec.bits
        n_hist = qkeys.num_tokens
        kw, ks, kz = qkeys.payload, qkeys.scale, qkeys.zero
        vw, vs, vz = qvalues.payload, qvalues.scale, qvalues.zero
        tensors += [kw, ks, kz, vw, vs, vz]
        if kz.stride() != ks.stride() or vz.stride() != vs.stride():
            raise ValueError("scale and zero must share strides")
        hist_strides = (*kw.stride()[:3], *ks.stride()[:3], *vw.stride()[:3], *vs.stride()[:3])
        n_steps = triton.cdiv(n_hist, ng * g_k)
        splits = min(num_splits or default_num_splits(n_steps, b * h_kv, query.device), n_steps)
    if any(t.stride(-1) != 1 for t in tensors):
        raise ValueError("every input must be contiguous in its last dimension")
    steps_per_split = triton.cdiv(triton.cdiv(n_hist, ng * g_k), splits) if splits else 0
    n_parts = splits + 1
    o_part = torch.empty((b * h_q, n_parts, d), device=query.device, dtype=torch.float32)
    lse_part = torch.empty((b * h_q, n_parts), device=query.device, dtype=torch.float32)
    _decode_split_kernel[(b * h_kv, n_parts)](
        query, kw, ks, kz, vw, vs, vz, keys, values, o_part, lse_part,
        query.stride(0), query.stride(1), *hist_strides, *keys.stride()[:3], *values.stride()[:3],
        n_hist, n_res, steps_per_split, splits, scale * LOG2E,
        H_KV=h_kv, R=r, R_P=r_p, NG=ng, M=m, D=d, G_K=g_k, G_V=g_v, K_BITS=k_bits, V_BITS=v_bits,
        num_warps=num_warps, num_stages=num_stages,
    )
    out = torch.empty((b, h_q, d), device=query.device, dtype=query.dtype)
    _decode_reduce_kernel[(b * h_q,)](o_part, lse_part, out, n_parts, D=d, PARTS=triton.next_power_of_2(n_parts))
    return out
