"""The packed math of the Gluon decode kernel (:mod:`.gluon_decode`) in torch: its channel orders, its
magic-number decode and a CPU emulation of its arithmetic.

Gluon kernels do not run under ``TRITON_INTERPRET=1``, so this is what CI can check of them without a GPU:
that the registers each thread decodes hold the codes :func:`kvtuner.quant.unpack` reads (bit for bit,
through the same ``(x & mask) | 0x5400`` the kernel's ``lop3`` computes), that the orders below are
permutations undone where the kernel undoes them, and that the kernel's arithmetic (fp16 operands
rounded where the kernel rounds them, the folded key scales and the offsets that cancel the magic
number, values scaled by one fused ``y * s - 64 s``, the online softmax over 64-token blocks, split-K
and the merge) attends like :func:`~kvtuner.kernels.reference.decode_attention_reference`.
"""

from __future__ import annotations

import torch

from kvtuner.quant import QuantizedTensor

LOG2E = 1.4426950408889634
MAGIC_BITS = 0x5400  # fp16 64.0: OR-ed with a code field, 64 + m' c with one ulp = 1/16
MAGIC = 64.0
BLOCK = 64  # tokens a step at least (whole key groups)


def key_channels(k, bits: int, head_dim: int):
    """(stored channel, field) of key reduction index ``k`` (int or int tensor).

    ``k = 16 jj + 8 hh + 2 q + e`` is a position in the m16n8k16 fragments (lane quad q, register hh of the
    k-step, pair element e). Quad q reads words ``q * WPT ..`` of its token (``WPT = D * bits / 128``:
    one 16-byte load for 4 bits and D = 128); register ``r = 2 (jj % (RPW / 2)) + hh`` of its word
    ``jj // (RPW / 2)`` holds field r (byte ``r // (8 / bits)``, bit ``bits * (r % (8 / bits))`` of it)
    of both 16-bit halves, e the half."""
    rpw, cpw = 16 // bits, 32 // bits
    wpt = head_dim * bits // 128
    half_regs = rpw // 2
    e, quad, hh, jj = k % 2, (k // 2) % 4, (k // 8) % 2, k // 16
    r = (jj % half_regs) * 2 + hh
    return (quad * wpt + jj // half_regs) * cpw + e * (cpw // 2) + r, r


def value_channels(n, bits: int, head_dim: int):
    """(stored channel, field) of value output column ``n`` (int or int tensor).

    ``n = 8 i + g`` (lane group g, n-tile i); lane g reads half-words ``g * HW .. g * HW + HW - 1`` of each
    token (``HW = D * bits / 128``), n-tile ``i = (w * 2 + half) * RPW + r`` is field r of half-word
    ``2 w + half`` of them."""
    rpw = 16 // bits
    hw = head_dim * bits // 128
    g, i = n % 8, n // 8
    return (g * hw + i // rpw) * rpw + i % rpw, i % rpw


def multiplier(field, bits: int):
    """``m'`` of a code in register field ``field``: its fp16 is ``64 + m' c``."""
    return 2.0 ** (bits * (field % (8 // bits))) / 16.0


def magic_decode(words: torch.Tensor, field: torch.Tensor, half: torch.Tensor, bits: int) -> torch.Tensor:
    """fp16 ``64 + m' c`` of field ``field`` of 16-bit half ``half`` of int32 ``words`` (broadcast), exactly as
    ``lop3(x, mask, 0x54005400)`` makes it: the code's bits OR-ed into the mantissa of 64."""
    fields = 8 // bits
    shift = 16 * half + 8 * (field // fields)
    mask = ((1 << bits) - 1) << (bits * (field % fields))
    return (((words >> shift) & mask) | MAGIC_BITS).to(torch.int16).view(torch.float16)


def _codes(q: QuantizedTensor, order) -> torch.Tensor:
    bits, d = q.spec.bits, q.shape[-1]
    ch, field = order(torch.arange(d), bits, d)
    word = ch // (32 // bits)
    half = (ch % (32 // bits)) // (16 // bits)
    return magic_decode(q.payload[..., word], field, half, bits)


def key_codes(qkeys: QuantizedTensor) -> torch.Tensor:
    """The key history as the kernel's B operands hold it: ``[..., T, D]`` fp16 ``64 + m' c``, D in key order."""
    return _codes(qkeys, key_channels)


def value_codes(qvalues: QuantizedTensor) -> torch.Tensor:
    """The value history's fp16 ``64 + m' c``, ``[..., T, D]`` with D in value (output column) order."""
    return _codes(qvalues, value_channels)


def groups_per_block(key_group: int) -> int:
    """Key groups one loop step of the kernel reads: a 64-token block, or one group when that is longer."""
    return max(1, BLOCK // key_group)


def stage_bytes(head_dim: int, key_group: int, value_group: int, k_bits: int, v_bits: int) -> int:
    """Bytes of shared memory one stage of the Gluon kernel's ring holds: a block's key and value words, its key
    scales and zeros (a row of ``head_dim`` a group) and value scales and zeros (``head_dim / value_group`` a
    token), as the kernel's ``_copy_block`` copies them."""
    groups = groups_per_block(key_group)
    tokens = groups * key_group
    return tokens * head_dim * (k_bits + v_bits) // 8 + 4 * groups * head_dim + 4 * tokens * (head_dim // value_group)


def stages_can_copy(qkeys: QuantizedTensor, qvalues: QuantizedTensor) -> bool:
    """Whether the Gluon kernel's stages can copy this history: each of a block's six ranges (key and value words,
    scales, zeros) contiguous along tokens (key groups for the key scales), and every head's rows starting on a
    4-byte boundary, since the fp16 scales and zeros travel as int32 pairs. What :class:`~kvtuner.cache.
    MixedPrecisionCache` stores (buffers with spare capacity along tokens) is; a view cut at an odd token of
    one-scale-a-token values is not."""
    k, v = qkeys, qvalues
    d = k.shape[-1]
    rows = (k.payload.stride(2), k.scale.stride(2), v.payload.stride(2), v.scale.stride(2))
    want = (d * k.spec.bits // 32, d, d * v.spec.bits // 32, d // v.spec.group_len(v.shape))
    halves = (k.scale, k.zero, v.scale, v.zero)
    return (rows == want and k.zero.stride() == k.scale.stride() and v.zero.stride() == v.scale.stride()
            and all(t.data_ptr() % 4 == 0 and t.stride(0) % 2 == 0 and t.stride(1) % 2 == 0 for t in halves))


def split_plan(n_groups: int, key_group: int, num_splits: int) -> tuple[int, int]:
    """(splits, key groups a split) for ``num_splits`` asked: whole blocks a split, no split empty."""
    step = groups_per_block(key_group)
    blocks = -(-n_groups // step)
    per_split = -(-blocks // max(1, min(num_splits, blocks))) * step
    return -(-n_groups // per_split), per_split


def emulate_decode(query: torch.Tensor, qkeys: QuantizedTensor, qvalues: QuantizedTensor, keys: torch.Tensor,
                   values: torch.Tensor, scale: float, num_splits: int = 1) -> torch.Tensor:
    """The Gluon kernel's arithmetic on the CPU (same arguments as
    :func:`~kvtuner.kernels.decode.decode_attention_triton`): what it rounds to fp16 is rounded here, what it
    accumulates in fp32 is summed in float32 (in another order), and the history is reduced in
    ``num_splits`` slices of 64-token blocks and merged with the residual by their log-sum-exp. One
    difference: the kernel lets its running max lag a block's by up to 2^8 (fewer rescales), which changes
    only where fp16 rounds the probabilities; here the max is exact every block."""
    b, h_q, d = query.shape
    h_kv, n_hist = qkeys.shape[1], qkeys.num_tokens
    r = h_q // h_kv
    k_bits, v_bits = qkeys.spec.bits, qvalues.spec.bits
    g_k, g_v = qkeys.spec.group_len(qkeys.shape), qvalues.spec.group_len(qvalues.shape)
    kch, kfield = key_channels(torch.arange(d), k_bits, d)
    vch, vfield = value_channels(torch.arange(d), v_bits, d)
    q = query.float().reshape(b, h_kv, r, d)[..., kch] * (scale * LOG2E)
    qm = (q / multiplier(kfield, k_bits)).half()
    qz = q.half().float()
    ks, kz = qkeys.scale[..., kch], qkeys.zero[..., kch].float()  # [B, H, groups, D] in key order
    y_k = key_codes(qkeys).float()  # [B, H, T, D]
    y_v = value_codes(qvalues).float()
    v_scale = qvalues.scale.float()  # [B, H, T, NGV]
    vs = v_scale[..., vch // g_v]  # [B, H, T, D] in column order
    v_deq = (y_v * vs - MAGIC * vs).half().float()  # fma.rn.f16x2: exact in float32, rounded once
    v_zero = qvalues.zero.float()  # [B, H, T, NGV]

    n_groups = n_hist // g_k
    step = groups_per_block(g_k)
    _, per_split = split_plan(n_groups, g_k, num_splits)
    parts = []  # (normalized output [B, H, R, D] in stored channel order, lse [B, H, R])
    for g_lo in range(0, n_groups, per_split):
        m = torch.full((b, h_kv, r), float("-inf"))
        acc = torch.zeros(b, h_kv, r, d)
        acc_z = torch.zeros(b, h_kv, r, v_zero.shape[-1] + 1)
        g_hi = min(g_lo + per_split, n_groups)
        for grp0 in range(g_lo, g_hi, step):
            groups = range(grp0, min(grp0 + step, g_hi))
            scores = []
            for grp in groups:
                qg = (qm * ks[:, :, grp, None, :]).float()  # mul.rn.f16x2
                offset = (qz * kz[:, :, grp, None, :]).sum(-1) - MAGIC * qg.sum(-1)
                tokens = slice(grp * g_k, (grp + 1) * g_k)
                scores.append(torch.einsum("bhrd,bhtd->bhrt", qg, y_k[:, :, tokens]) + offset[..., None])
            m_new = torch.maximum(m, torch.cat(scores, -1).amax(-1))
            alpha = torch.exp2(m - m_new)
            acc, acc_z = acc * alpha[..., None], acc_z * alpha[..., None]
            for grp, s in zip(groups, scores):
                p = torch.exp2(s - m_new[..., None]).half().float()
                tokens = slice(grp * g_k, (grp + 1) * g_k)
                acc = acc + torch.einsum("bhrt,bhtd->bhrd", p, v_deq[:, :, tokens])
                z_cols = torch.cat([v_zero[:, :, tokens].half().float(), torch.ones_like(v_zero[:, :, tokens, :1])], -1)
                acc_z = acc_z + torch.einsum("bhrt,bhtc->bhrc", p, z_cols)
            m = m_new
        out_cols = acc / multiplier(vfield, v_bits) + acc_z[..., :-1][..., vch // g_v]
        out = torch.empty_like(out_cols)
        out[..., vch] = out_cols / acc_z[..., -1:]
        parts.append((out, m + torch.log2(acc_z[..., -1])))
    if keys.shape[2]:
        kr = keys.float()
        s = torch.einsum("bhrd,bhtd->bhrt", query.float().reshape(b, h_kv, r, d), kr) * (scale * LOG2E)
        m = s.amax(-1)
        p = torch.exp2(s - m[..., None])
        parts.append((torch.einsum("bhrt,bhtd->bhrd", p, values.float()) / p.sum(-1)[..., None],
                      m + torch.log2(p.sum(-1))))
    lse = torch.stack([lse for _, lse in parts])
    weights = torch.softmax(lse * torch.log(torch.tensor(2.0)), dim=0)
    out = sum(w[..., None] * o for w, (o, _) in zip(weights, parts))
    return out.reshape(b, h_q, d).to(query.dtype)
