"""Rotary position embedding as a pure rotation, for quantizing keys before it (KVQuant's pre-RoPE keys).

Why: a key's outliers sit in fixed channels before RoPE; the rotation mixes each channel pair
``(i, i + D/2)`` at a position-dependent angle, so after it the outlier's energy wanders between
the two channels from token to token, and per-channel groups along tokens see a wider range.
Un-rotating the cached (post-RoPE) keys, quantizing, and rotating back on read keeps that
structure. The round trip is exact for any angles, so positions only decide how much it helps,
never whether it is correct.

Convention: transformers' ``apply_rotary_pos_emb`` with ``rotate_half`` (Llama, Mistral, Qwen2,
Qwen3): ``k' = k * cos + rotate_half(k) * sin`` with ``cos = cos(p * inv_freq)`` duplicated over
the two halves. A model's ``attention_scaling`` multiplies cos and sin; it is left in the keys
(both directions here are pure rotations).
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """``x`` [B, H, T, D] rotated by ``positions`` [B or 1, T] * ``inv_freq`` [D/2] (back by that angle if ``inverse``).

    Computes in float32 (float64 for float64 input) and returns ``x``'s dtype.
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    angles = positions.to(compute)[..., None] * inv_freq.to(device=x.device, dtype=compute)  # [B, T, D/2]
    emb = torch.cat((angles, angles), dim=-1)[:, None]  # [B, 1, T, D]
    cos, sin = emb.cos(), emb.sin()
    if inverse:
        sin = -sin
    xf = x.to(compute)
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
