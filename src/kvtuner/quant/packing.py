"""Bit packing of integer codes into int32 words along the last dimension.

Layout (one layout for CPU and GPU): codes of ``bits`` bits are packed little-end first
into int32 words, ``32 // bits`` codes a word (1 bit: 32, 2 bits: 16, 4 bits: 8, 8 bits: 4),
so code ``i`` of a row lives in word ``i // cpw`` at bit offset ``bits * (i % cpw)``.
The last dimension is zero-padded up to a whole number of words.

3-bit codes are split into a 2-bit plane (the low bits) and a 1-bit plane (the high bit),
packed as above and concatenated along the last dimension: a row of 64 codes takes
4 + 2 = 6 words, exactly 3 bits a code, and a kernel unpacks it with two shifted loads.
"""

from __future__ import annotations

import torch

PACKABLE_BITS = (1, 2, 3, 4, 8)


def codes_per_word(bits: int) -> int:
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"codes_per_word is defined for 1, 2, 4 or 8 bits, not {bits}")
    return 32 // bits


def packed_width(length: int, bits: int) -> int:
    """Number of int32 words that hold ``length`` codes of ``bits`` bits."""
    if bits == 3:
        return packed_width(length, 2) + packed_width(length, 1)
    cpw = codes_per_word(bits)
    return -(-length // cpw)


def _pack_pow2(codes: torch.Tensor, bits: int) -> torch.Tensor:
    cpw = codes_per_word(bits)
    length = codes.shape[-1]
    words = packed_width(length, bits)
    pad = words * cpw - length
    c = codes.to(torch.int64)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*codes.shape[:-1], words, cpw)
    shifts = torch.arange(cpw, device=codes.device, dtype=torch.int64) * bits
    packed = (c << shifts).sum(dim=-1)  # disjoint bit fields: sum == bitwise or
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # two's complement wrap into int32
    return packed.to(torch.int32)


def _unpack_pow2(words: torch.Tensor, bits: int, length: int, dtype: torch.dtype) -> torch.Tensor:
    """In int32: an arithmetic shift fills the top with sign bits, which the mask drops (int64 would move
    twice the bytes, and decoding reads every code once a step)."""
    cpw = codes_per_word(bits)
    shifts = torch.arange(cpw, device=words.device, dtype=torch.int32) * bits
    codes = ((words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(*words.shape[:-1], -1)
    return (codes if codes.shape[-1] == length else codes[..., :length]).to(dtype)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` along the last dim into int32 words."""
    if bits not in PACKABLE_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes; supported: {PACKABLE_BITS}")
    if bits == 3:
        return torch.cat([_pack_pow2(codes & 3, 2), _pack_pow2(codes >> 2, 1)], dim=-1)
    return _pack_pow2(codes, bits)


def unpack(words: torch.Tensor, bits: int, length: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Inverse of :func:`pack`: ``length`` codes along the last dim, as ``dtype`` (a float dtype saves a
    pass where the codes are read as numbers)."""
    if bits not in PACKABLE_BITS:
        raise ValueError(f"cannot unpack {bits}-bit codes; supported: {PACKABLE_BITS}")
    if bits == 3:
        low_words = packed_width(length, 2)
        low = _unpack_pow2(words[..., :low_words], 2, length, torch.int32)
        high = _unpack_pow2(words[..., low_words:], 1, length, torch.int32)
        return (low | (high << 2)).to(dtype)
    return _unpack_pow2(words, bits, length, dtype)
